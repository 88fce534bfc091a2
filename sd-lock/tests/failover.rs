//! Leases under contention while the lock's store fails over: RedisLock on sd-core's
//! `FailoverConnection` to a Sentinel group (a forced promotion, then a crashed
//! master), and EtcdLock on a three-member etcd cluster whose leader is killed. Every
//! holder writes through a fenced register (the protected resource); the history
//! checker must find no stale write accepted. What the failover costs is counted: lock
//! tokens handed out again (the counter rolled back with writes the old master never
//! replicated), whose holders the fence then refuses, and leases lost (an extend while
//! the lease is still valid finds it gone). With `wait_for_replicas(1, ..)` the same
//! runs must hand out no token again and lose no lease (a lease counts once its replica
//! holds it), and a `WAIT` that cannot be met fails the acquire and leaves no lease
//! behind.
//! The tests print their figures (RELIABILITY.md quotes them).
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
use sd_testkit::{EtcdCluster, RedisCluster, RedisSentinelGroup, RedisServer};

/// The replicas the `WAIT` tests ask for, and how long they wait.
const WAIT: (u32, Duration) = (1, Duration::from_millis(500));

/// What the contenders did.
struct Run {
    events: Vec<Event>,
    /// Every token granted, in grant order.
    grants: Vec<u64>,
    errors: u64,
    /// Leases that an extend, while they were still valid, found gone: lost with a
    /// failover (a grant the new master never had). Extending is idempotent, so a
    /// call the connection sent twice through a failover cannot look like a loss (a
    /// release sent twice can: its second run finds the key gone).
    lost: u64,
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
                            let mut lease = lease;
                            let valid = lease.is_valid();
                            let extended = lock.extend(&mut lease, Duration::from_secs(2)).await;
                            if valid && matches!(extended, Err(sd_lock::Error::LeaseExpired { .. }))
                            {
                                run.lock().unwrap().lost += 1;
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
/// Returns how many tokens were handed out again and how many valid leases were lost.
async fn fenced_run<L: Lock + 'static>(
    backend: &str,
    lock: L,
    faults: impl FnOnce() + Send + 'static,
) -> (usize, u64) {
    let register = Arc::new(FencedRegister::new(String::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let run = Arc::new(Mutex::new(Run {
        events: Vec::new(),
        grants: Vec::new(),
        errors: 0,
        lost: 0,
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
            lost: 0,
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
         out again after the failover, {} leases lost (extended while valid, found gone), \
         50 leases again {recovered_in:.2?} after the failover was complete, 0 stale \
         writes accepted (checked)",
        run.grants.len(),
        run.events.len(),
        run.errors,
        run.lost,
    );
    check_fencing(&run.events, Some(register.peek().as_str()));
    (reissued, run.lost)
}

/// A Redis lock on `conn` for these runs, waiting for replicas or not.
fn redis_lock(
    conn: FailoverConnection,
    wait: Option<(u32, Duration)>,
) -> RedisLock<FailoverConnection> {
    let mut builder = RedisLock::builder(conn)
        .prefix("fo")
        .timeout(Duration::from_secs(15));
    if let Some((replicas, timeout)) = wait {
        builder = builder.wait_for_replicas(replicas, timeout);
    }
    builder.build().unwrap()
}

async fn sentinel_connection(group: &RedisSentinelGroup) -> FailoverConnection {
    FailoverConnection::builder()
        .sentinel(group.sentinel_urls(), group.master_name())
        .build()
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn cluster_connection(cluster: &RedisCluster) -> FailoverConnection {
    FailoverConnection::builder()
        .cluster(cluster.urls())
        .build()
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[test]
fn fencing_keeps_stale_writers_out_across_sentinel_promotions() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    sd_testkit::runtime().block_on(async move {
        let lock = redis_lock(sentinel_connection(&group).await, None);
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
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    sd_testkit::runtime().block_on(async move {
        let lock = redis_lock(cluster_connection(&cluster).await, None);
        let master = cluster.master_of(&lock.key("res")).unwrap();
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

#[test]
fn fencing_and_wait_keep_stale_writers_out_across_sentinel_promotions() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    sd_testkit::runtime().block_on(async move {
        let lock = redis_lock(sentinel_connection(&group).await, Some(WAIT));
        let group = Arc::new(Mutex::new(group));
        let _servers = group.clone();
        let (reissued, lost) = fenced_run("redis sentinel, WAIT 1 replica", lock, move || {
            let mut g = group.lock().unwrap();
            g.failover().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            // The crashed master comes back as the new master's replica: with none, no
            // lease could count.
            if let Err(e) = g.kill_master() {
                panic!("kill the master and restart it as a replica: {e}");
            }
        })
        .await;
        assert_eq!(
            reissued, 0,
            "a token was handed out again although replicated"
        );
        assert_eq!(lost, 0, "a lease that counted was lost with the failover");
    });
}

#[test]
fn fencing_and_wait_keep_stale_writers_out_across_cluster_failovers_of_the_locks_shard() {
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    sd_testkit::runtime().block_on(async move {
        let lock = redis_lock(cluster_connection(&cluster).await, Some(WAIT));
        let master = cluster.master_of(&lock.key("res")).unwrap();
        let cluster = Arc::new(Mutex::new(cluster));
        let _servers = cluster.clone();
        let (reissued, lost) = fenced_run("redis cluster, WAIT 1 replica", lock, move || {
            let mut c = cluster.lock().unwrap();
            c.failover(master + 3).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            // The killed master comes back as its successor's replica.
            let new = c.kill_master(master + 3).unwrap();
            c.nodes_mut()[master + 3].start_again().unwrap();
            c.wait_replica_of(master + 3, new).unwrap();
        })
        .await;
        assert_eq!(
            reissued, 0,
            "a token was handed out again although replicated"
        );
        assert_eq!(lost, 0, "a lease that counted was lost with the failover");
    });
}

#[test]
fn a_wait_that_cannot_be_met_fails_the_acquire_and_leaves_no_lease() {
    // One server, no replica: `WAIT 1` can never be met.
    let server = RedisServer::start().expect("start redis");
    sd_testkit::runtime().block_on(async {
        let conn = FailoverConnection::builder()
            .server(server.url())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        for (replicas, timeout) in [(0, Duration::from_secs(1)), (1, Duration::ZERO)] {
            match RedisLock::builder(conn.clone())
                .wait_for_replicas(replicas, timeout)
                .build()
            {
                Err(sd_lock::Error::InvalidConfig { field, .. }) => {
                    assert_eq!(field, "wait_for_replicas")
                }
                other => panic!("({replicas}, {timeout:?}) was accepted: {other:?}"),
            }
        }
        let waiting = redis_lock(conn.clone(), Some((1, Duration::from_millis(100))));
        let started = std::time::Instant::now();
        match waiting.try_acquire("res", Duration::from_secs(10)).await {
            Err(sd_lock::Error::NotReplicated { acked, wanted, .. }) => {
                assert_eq!((acked, wanted), (0, 1))
            }
            other => panic!("acquired without a replica: {other:?}"),
        }
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "WAIT did not wait"
        );
        assert!(
            matches!(
                server.command(&["EXISTS", &waiting.key("res")]).unwrap(),
                sd_testkit::resp::Reply::Integer(0)
            ),
            "the lease that did not count was left behind"
        );
        // Nothing holds the resource: a lock that does not wait gets it at once.
        let plain = redis_lock(conn, None);
        plain
            .try_acquire("res", Duration::from_secs(10))
            .await
            .unwrap();
    });
}
