//! Leases under contention while the lock's store fails over: RedisLock on sd-core's
//! `FailoverConnection` to a Sentinel group (a forced promotion, then a crashed
//! master), and EtcdLock on a three-member etcd cluster whose leader is killed. Every
//! holder writes through a fenced register (the protected resource); the history
//! checker must find no stale write accepted. What the failover costs is counted: lock
//! tokens handed out again (the counter rolled back with writes the old master never
//! replicated), whose holders the fence then refuses. The tests print their figures
//! (RELIABILITY.md quotes them).
#![cfg(all(feature = "redis", feature = "etcd"))]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

mod history;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use history::{Event, check_fencing, record};
use sd_core::failover::FailoverConnection;
use sd_lock::fence::FencedRegister;
use sd_lock::redis::RedisLock;
use sd_lock::{Lock, etcd::EtcdLock};
use sd_testkit::{EtcdCluster, RedisSentinelGroup};

/// What the contenders did.
struct Run {
    events: Vec<Event>,
    /// Every token granted, in grant order.
    grants: Vec<u64>,
    errors: u64,
}

/// Four contenders take the lease on one resource in turn and write three times
/// through `register` while they hold it, until `stop`.
async fn contend<L: Lock + 'static>(
    lock: Arc<L>,
    register: Arc<FencedRegister<String>>,
    stop: Arc<AtomicBool>,
    run: Arc<Mutex<Run>>,
) {
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let (lock, register, stop, run) =
                (lock.clone(), register.clone(), stop.clone(), run.clone());
            tokio::spawn(async move {
                let who = format!("c{w}");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    match lock.try_acquire("res", Duration::from_secs(2)).await {
                        Ok(lease) => {
                            let token = lease.token().0;
                            run.lock().unwrap().grants.push(token);
                            for _ in 0..3 {
                                n += 1;
                                let value = format!("{who}-{n}");
                                let event = record(&who, token, &value, async {
                                    register.write(lease.token(), value.clone())
                                })
                                .await;
                                run.lock().unwrap().events.push(event);
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            let _ = lock.release(lease).await;
                        }
                        Err(sd_lock::Error::Held { .. }) => {}
                        Err(_) => run.lock().unwrap().errors += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Runs the contenders, the blocking `faults` in the middle, and checks the history.
async fn fenced_run<L: Lock + 'static>(
    backend: &str,
    lock: L,
    faults: impl FnOnce() + Send + 'static,
) {
    let register = Arc::new(FencedRegister::new(String::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let run = Arc::new(Mutex::new(Run {
        events: Vec::new(),
        grants: Vec::new(),
        errors: 0,
    }));
    let contending = tokio::spawn(contend(
        Arc::new(lock),
        register.clone(),
        stop.clone(),
        run.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(faults).await.unwrap();
    let at = run.lock().unwrap().grants.len();
    let recovering = std::time::Instant::now();
    sd_testkit::eventually("50 more leases after the failover", || async {
        run.lock().unwrap().grants.len() >= at + 50
    })
    .await;
    let recovered_in = recovering.elapsed();
    stop.store(true, Ordering::Relaxed);
    contending.await.unwrap();
    let run = std::mem::replace(
        &mut *run.lock().unwrap(),
        Run {
            events: Vec::new(),
            grants: Vec::new(),
            errors: 0,
        },
    );

    let accepted = run.events.iter().filter(|e| e.accepted()).count();
    let refused = run.events.len() - accepted;
    let mut seen = BTreeSet::new();
    let mut newest = 0;
    let mut reissued = 0;
    for &t in &run.grants {
        if !seen.insert(t) || t < newest {
            reissued += 1;
        }
        newest = newest.max(t);
    }
    println!(
        "lock {backend}: {} leases, {} fenced writes ({accepted} accepted, {refused} \
         refused as stale), {} lock errors during the failover, {reissued} tokens handed \
         out again after the failover, 50 leases again {recovered_in:.2?} after the \
         failover was complete, 0 stale writes accepted (checked)",
        run.grants.len(),
        run.events.len(),
        run.errors,
    );
    check_fencing(&run.events, Some(register.peek().as_str()));
}

#[test]
fn fencing_keeps_stale_writers_out_across_sentinel_promotions() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    sd_testkit::runtime().block_on(async move {
        let conn = FailoverConnection::builder()
            .sentinel(group.sentinel_urls(), group.master_name())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        let lock = RedisLock::builder(conn)
            .prefix("fo")
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        // The servers live until the end of the test, not of the fault closure.
        let group = Arc::new(Mutex::new(group));
        let _servers = group.clone();
        fenced_run("redis sentinel", lock, move || {
            let mut g = group.lock().unwrap();
            g.failover().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            g.kill_master_only().unwrap();
        })
        .await;
    });
}

#[test]
fn fencing_keeps_stale_writers_out_when_the_etcd_leader_is_killed() {
    let etcd = EtcdCluster::start().expect("start an etcd cluster");
    sd_testkit::runtime().block_on(async move {
        let client = etcd_client::Client::connect(etcd.urls(), None)
            .await
            .unwrap();
        let lock = EtcdLock::new(client);
        let etcd = Arc::new(Mutex::new(etcd));
        let _servers = etcd.clone();
        fenced_run("etcd cluster", lock, move || {
            etcd.lock().unwrap().kill_leader().unwrap();
        })
        .await;
    });
}

#[test]
fn fencing_keeps_stale_writers_out_across_cluster_failovers_of_the_locks_shard() {
    let cluster = sd_testkit::RedisCluster::start_with_replicas().expect("start a cluster");
    sd_testkit::runtime().block_on(async move {
        let conn = FailoverConnection::builder()
            .cluster(cluster.urls())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        let lock = RedisLock::builder(conn)
            .prefix("fo")
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        // The shard that holds the lock: masters 0, 1, 2 hold the slot ranges in order,
        // node 3 + i replicates master i.
        let slot = match sd_testkit::resp::command(
            cluster.nodes()[0].port(),
            &["CLUSTER", "KEYSLOT", &lock.key("res")],
        )
        .unwrap()
        {
            sd_testkit::resp::Reply::Integer(slot) => slot,
            other => panic!("CLUSTER KEYSLOT gave {other:?}"),
        };
        let master = match slot {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        let cluster = Arc::new(Mutex::new(cluster));
        let _servers = cluster.clone();
        fenced_run("redis cluster", lock, move || {
            let mut c = cluster.lock().unwrap();
            c.failover(master + 3).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            c.kill_master(master + 3).unwrap();
        })
        .await;
    });
}
