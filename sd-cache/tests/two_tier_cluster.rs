//! The two-tier staleness checker on a Redis Cluster with a replica per master: independent
//! instances (each its own cluster connection, sharded subscription and lease) under
//! concurrent writes and reads while the shard that holds the coherence channels (the
//! registry and `SSUBSCRIBE` channels, one hash tag) fails over: its master killed mid-load
//! and restarted as a replica, then a `CLUSTER FAILOVER` back to it, then that master
//! frozen until its replica is elected (the instances' connections stay open: their
//! watchdog must notice the pings no longer coming back). The entries live on the other
//! shards (a crashed master may lose writes it acknowledged, which is Redis's to keep, not
//! the cache's). The oracle judges the raw
//! events: no read returns a version older than one whose write returned before the read
//! started. It prints what the failovers cost (reads answered by Redis instead of memory,
//! failed calls, resyncs, time until every instance served from memory again);
//! RELIABILITY.md quotes them.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_cache::{RedisCache, TwoTier};
use sd_core::failover::FailoverConnection;
use sd_testkit::RedisCluster;

mod common;
mod two_tier_common;
use common::{eventually, runtime};
use two_tier_common::oracle::{Probe, check_no_stale_reads_of};
use two_tier_common::until_serving;

type ClusterTier = TwoTier<u64, FailoverConnection>;

/// An independent instance on the cluster: its own connection and subscription.
async fn instance(cluster: &RedisCluster, prefix: &str) -> ClusterTier {
    let urls = cluster.urls();
    let conn = FailoverConnection::builder()
        .cluster(urls.clone())
        .build()
        .unwrap()
        .connect()
        .await
        .unwrap();
    TwoTier::builder(RedisCache::builder(prefix).ttl(Duration::from_secs(30)))
        .local_ttl(Duration::from_secs(10))
        .lease(Duration::from_millis(600))
        .build_on_cluster(conn, redis::Client::open(urls[0].as_str()).unwrap())
        .await
        .unwrap()
}

/// Reads that reached Redis (memory tier not serving, or a miss) and memory hits, summed.
fn reads(instances: &[ClusterTier]) -> (u64, u64) {
    instances.iter().fold((0, 0), |(remote, local), i| {
        let r = i.remote_stats();
        (remote + r.hits + r.misses, local + i.stats().hits)
    })
}

/// Runs `step` on the cluster off the runtime's workers.
async fn on_cluster<T: Send + 'static>(
    cluster: &Arc<Mutex<RedisCluster>>,
    step: impl FnOnce(&mut RedisCluster) -> T + Send + 'static,
) -> T {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || step(&mut cluster.lock().unwrap()))
        .await
        .unwrap()
}

/// One failover of the coherence shard under load: `fault` runs, then the instances must
/// serve from memory again; prints what it cost.
async fn measured(
    what: &str,
    probe: &Probe,
    instances: &[ClusterTier],
    cluster: &Arc<Mutex<RedisCluster>>,
    fault: impl FnOnce(&mut RedisCluster) + Send + 'static,
) {
    let (remote, local) = reads(instances);
    let (failed_reads, failed_writes) = probe.failures();
    let before: Vec<u64> = instances.iter().map(|i| i.resyncs()).collect();
    let started = Instant::now();
    probe.mark(&format!("{what}: begins"));
    on_cluster(cluster, fault).await;
    let failed_over = started.elapsed();
    probe.mark(&format!("{what}: failed over"));
    // Each instance loses its subscription with the shard's master (closed, or
    // `sunsubscribe` once the old master learns the slot moved, which can come after the
    // failover is done) and may miss invalidations meanwhile: it must clear its memory
    // tier, then serve from it again.
    for (instance, &resyncs) in instances.iter().zip(&before) {
        let instance = instance.clone();
        eventually(&format!("{what}: every instance resynced"), move || {
            std::future::ready(instance.resyncs() > resyncs)
        })
        .await;
    }
    until_serving(instances, true).await;
    let serving = started.elapsed();
    probe.mark(&format!("{what}: every instance serves from memory"));
    let (remote_after, local_after) = reads(instances);
    let (failed_reads_after, failed_writes_after) = probe.failures();
    let resyncs: Vec<u64> = instances
        .iter()
        .zip(&before)
        .map(|(i, b)| i.resyncs() - b)
        .collect();
    eprintln!(
        "two-tier on cluster, {what}: failover done after {:.1} s, every instance served from \
         memory again after {:.1} s; meanwhile {} reads answered by Redis and {} from memory, \
         {} reads and {} writes failed, resyncs per instance {resyncs:?}",
        failed_over.as_secs_f64(),
        serving.as_secs_f64(),
        remote_after - remote,
        local_after - local,
        failed_reads_after - failed_reads,
        failed_writes_after - failed_writes,
    );
}

#[test]
fn no_stale_read_while_the_coherence_shard_fails_over() {
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    runtime().block_on(async move {
        let prefix = sd_testkit::unique_name("two-tier-cluster");
        let mut instances = Vec::new();
        for _ in 0..4 {
            instances.push(instance(&cluster, &prefix).await);
        }
        until_serving(&instances, true).await;
        let master = cluster
            .master_of(&format!("{prefix}:{{{prefix}:two-tier}}"))
            .unwrap();
        // The entries live on the other shards: a master that crashes may lose writes it
        // acknowledged (Redis replicates asynchronously; the crate docs say so), which no
        // cache above it can undo. This test judges the memory tiers' coherence while the
        // shard of its registry and channels fails over.
        let names: Vec<String> = (0..)
            .map(|k| format!("k{k}"))
            .filter(|name| cluster.master_of(&format!("{prefix}:{{{name}}}")).unwrap() != master)
            .take(3)
            .collect();
        let names: [String; 3] = names.try_into().unwrap();
        eprintln!("coherence channels on start-up master {master}; keys {names:?} elsewhere");
        let cluster = Arc::new(Mutex::new(cluster));
        let load = instances.clone();
        let (events_before, _) = reads(&instances);
        check_no_stale_reads_of(names, load, 150, {
            let (cluster, instances) = (cluster.clone(), instances.clone());
            move |probe| async move {
                probe.failures_optional();
                probe.fault_begins();
                // The shard's master killed mid-load; its replica takes over.
                let promoted = Arc::new(Mutex::new(None));
                let p = promoted.clone();
                measured("master killed", &probe, &instances, &cluster, move |c| {
                    *p.lock().unwrap() = Some(c.kill_master(master).unwrap());
                })
                .await;
                let promoted = promoted.lock().unwrap().unwrap();
                // The killed node comes back as the new master's replica.
                on_cluster(&cluster, move |c| {
                    c.nodes_mut()[master].start_again().unwrap();
                    c.wait_replica_of(master, promoted).unwrap();
                })
                .await;
                // A manual failover: the restarted node takes the shard back. (Only one: a
                // second manual failover right after it timed out in Redis on this machine.)
                measured("CLUSTER FAILOVER", &probe, &instances, &cluster, move |c| {
                    c.failover(master).unwrap()
                })
                .await;
                // The master frozen (SIGSTOP) until its replica is elected: the instances'
                // connections to it stay open and silent, so only their pings not coming
                // back can tell them to subscribe again; they must serve from memory again
                // before the frozen node is resumed (it then rejoins as a replica).
                measured("master frozen", &probe, &instances, &cluster, move |c| {
                    c.nodes_mut()[master].pause().unwrap();
                    let started = Instant::now();
                    while !c.masters().contains(&promoted) {
                        assert!(started.elapsed() < Duration::from_secs(45), "no election");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    c.wait_running_ok(Duration::from_secs(45)).unwrap();
                })
                .await;
                on_cluster(&cluster, move |c| {
                    c.nodes_mut()[master].resume().unwrap();
                    c.wait_replica_of(master, promoted).unwrap();
                })
                .await;
                probe.fault_ends();
            }
        })
        .await;
        let (remote, local) = reads(&instances);
        let resyncs: Vec<u64> = instances.iter().map(|i| i.resyncs()).collect();
        eprintln!(
            "two-tier on cluster: {} reads answered by Redis and {local} from memory over the \
             run; resyncs per instance {resyncs:?}",
            remote - events_before
        );
        assert!(local > 0, "the memory tiers answered reads");
        for r in &resyncs {
            assert!(
                *r >= 2,
                "each instance resynced after losing its shard's master"
            );
        }
    });
}
