//! The failover controls: a Sentinel group, a Redis Cluster with replicas and a
//! three-member etcd cluster each fail over when told to and when a process dies, and
//! the data written before survives where the server promises it.
#![allow(clippy::unwrap_used)] // a failed step in a self-test is a test failure

use std::time::Duration;

use sd_testkit::resp::{Reply, command};
use sd_testkit::{EtcdCluster, RedisCluster, RedisSentinelGroup, http, is_alive};

fn text(port: u16, args: &[&str]) -> Option<String> {
    command(port, args).unwrap().as_text()
}

fn role(port: u16) -> String {
    match command(port, &["ROLE"]).unwrap() {
        Reply::Array(Some(items)) => items[0].as_text().unwrap(),
        other => panic!("ROLE gave {other:?}"),
    }
}

/// Writes `key` on the master on `port` and waits until one replica acknowledged it.
fn set_replicated(port: u16, key: &str, value: &str) {
    assert_eq!(text(port, &["SET", key, value]).as_deref(), Some("OK"));
    assert_eq!(
        command(port, &["WAIT", "1", "5000"]).unwrap(),
        Reply::Integer(1)
    );
}

#[test]
fn sentinel_group_fails_over_on_command_and_on_a_crash() {
    let mut group = RedisSentinelGroup::start().expect("start a sentinel group");
    let first = group.master_port().unwrap();
    assert_eq!(first, group.nodes()[0].port());
    set_replicated(first, "k1", "v1");

    let second = group.failover().unwrap();
    assert_ne!(second, first);
    assert_eq!(role(second), "master");
    assert_eq!(role(first), "slave", "the old master is demoted");
    assert_eq!(text(second, &["GET", "k1"]).as_deref(), Some("v1"));
    match command(first, &["SET", "k1", "stale"]).unwrap() {
        Reply::Error(e) => assert!(e.starts_with("READONLY"), "{e}"),
        other => panic!("a demoted master took a write: {other:?}"),
    }

    set_replicated(second, "k2", "v2");
    let third = group.kill_master_only().unwrap();
    assert_eq!(third, first, "the only replica was promoted");
    assert_eq!(text(third, &["GET", "k2"]).as_deref(), Some("v2"));
    // The crashed master started again (empty) becomes a replica. On a loaded machine
    // the Sentinels may fail over once more meanwhile, to it once it synced: the group
    // settles on one master either way, the other node its replica.
    let old = group.node_index(second).unwrap();
    group.nodes_mut()[old].start_again().unwrap();
    let settled = group.wait_settled_on_any(Duration::from_secs(45)).unwrap();
    let other = if settled == first { second } else { first };
    assert_eq!(role(settled), "master");
    assert_eq!(
        role(other),
        "slave",
        "the crashed master came back as a replica"
    );

    let pids: Vec<u32> = group
        .nodes()
        .iter()
        .filter_map(|n| n.pid())
        .chain(group.sentinels().iter().filter_map(|s| s.pid()))
        .collect();
    assert_eq!(pids.len(), 5);
    drop(group);
    assert!(pids.iter().all(|&p| !is_alive(p)));
}

/// A key whose slot lies in `from..=to`, found by asking the cluster.
fn key_in(port: u16, from: i64, to: i64) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(
            |k| match command(port, &["CLUSTER", "KEYSLOT", k]).unwrap() {
                Reply::Integer(slot) => (from..=to).contains(&slot),
                other => panic!("CLUSTER KEYSLOT gave {other:?}"),
            },
        )
        .unwrap()
}

#[test]
fn cluster_with_replicas_fails_over_by_command_and_by_a_crash() {
    let mut cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    assert_eq!(cluster.masters(), vec![0, 1, 2]);
    for m in 0..3 {
        assert_eq!(cluster.replica_of(m), Some(m + 3));
    }
    let port = |c: &RedisCluster, i: usize| c.nodes()[i].port();

    // A manual failover of the first shard: the replica takes the slots and the data.
    let key = key_in(port(&cluster, 0), 0, 5460);
    set_replicated(port(&cluster, 0), &key, "before");
    cluster.failover(3).unwrap();
    let masters = cluster.masters();
    assert!(masters.contains(&3) && !masters.contains(&0), "{masters:?}");
    assert_eq!(cluster.replica_of(3), Some(0));
    assert_eq!(
        text(port(&cluster, 3), &["GET", &key]).as_deref(),
        Some("before")
    );
    match command(port(&cluster, 0), &["SET", &key, "stale"]).unwrap() {
        Reply::Error(e) => assert!(
            e.starts_with("MOVED") && e.ends_with(&format!(":{}", port(&cluster, 3))),
            "{e}"
        ),
        other => panic!("a demoted master took a write: {other:?}"),
    }

    // A crash of the second shard's master: its replica is elected.
    let key = key_in(port(&cluster, 1), 5461, 10922);
    set_replicated(port(&cluster, 1), &key, "kept");
    let pid = cluster.nodes()[1].pid().unwrap();
    assert_eq!(cluster.kill_master(1).unwrap(), 4);
    assert!(!is_alive(pid));
    assert!(cluster.masters().contains(&4));
    assert_eq!(
        text(port(&cluster, 4), &["GET", &key]).as_deref(),
        Some("kept")
    );
    assert_eq!(
        text(port(&cluster, 4), &["SET", &key, "after"]).as_deref(),
        Some("OK")
    );
    cluster.nodes_mut()[1].start_again().unwrap();
    cluster.wait_replica_of(1, 4).unwrap();
    cluster
        .wait_running_ok(std::time::Duration::from_secs(30))
        .unwrap();
}

/// `sd/k` and `v1` in base64, as etcd's JSON gateway takes them.
const KEY: &str = "c2Qvaw==";
const VALUE: &str = "djE=";

fn etcd_put(port: u16) {
    let body = format!(r#"{{"key":"{KEY}","value":"{VALUE}"}}"#);
    let (status, reply) = http::request(port, "POST", "/v3/kv/put", Some(&body)).unwrap();
    assert_eq!(status, 200, "{reply}");
}

fn etcd_has_value(port: u16) -> bool {
    let body = format!(r#"{{"key":"{KEY}"}}"#);
    let (status, reply) = http::request(port, "POST", "/v3/kv/range", Some(&body)).unwrap();
    status == 200 && reply.contains(VALUE)
}

#[test]
fn etcd_cluster_elects_a_new_leader_when_the_leader_is_killed_or_paused() {
    let mut etcd = EtcdCluster::start().expect("start an etcd cluster");
    assert_eq!(etcd.urls().len(), 3);
    let first = etcd.leader().unwrap();
    etcd_put(etcd.members()[first].port());

    let killed = etcd.kill_leader().unwrap();
    assert_eq!(killed, first);
    let second = etcd.leader().unwrap();
    assert_ne!(second, first);
    assert!(etcd_has_value(etcd.members()[second].port()));
    etcd.members_mut()[killed].start_again().unwrap();
    etcd.wait_healthy().unwrap();
    sd_testkit::eventually_blocking("the restarted member has the key", || {
        etcd_has_value(etcd.members()[killed].port())
    });

    let before = etcd.leader().unwrap();
    let paused = etcd.pause_leader().unwrap();
    assert_eq!(paused, before);
    let third = etcd.leader().unwrap();
    assert_ne!(third, paused);
    etcd_put(etcd.members()[third].port());
    etcd.members_mut()[paused].resume().unwrap();
    etcd.wait_healthy().unwrap();

    // One member down leaves a quorum: the others still serve.
    let other = (0..3).find(|&i| i != third).unwrap();
    etcd.members_mut()[other].kill().unwrap();
    assert!(etcd_has_value(etcd.members()[third].port()));
}
