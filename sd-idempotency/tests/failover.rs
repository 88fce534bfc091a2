//! The Redis store through Sentinel and Cluster failovers, on sd-core's
//! `FailoverConnection`: every key is claimed, run and completed by a first request, and
//! sent again a moment later by a retry, while the master is promoted by force and then
//! crashes. Redis replicates asynchronously: without `wait_for_replicas`, a claim or a
//! completion the old master took and never passed on is lost, and the retry runs the
//! key again; the tests count those double runs and check they all come from the
//! failover windows. With `wait_for_replicas(1, ..)`, no key may run twice. A `WAIT`
//! that cannot be met fails the claim and leaves nothing behind. (RELIABILITY.md quotes
//! the figures the tests print.)
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_core::failover::FailoverConnection;
use sd_idempotency::redis::RedisStore;
use sd_idempotency::{ClaimOutcome, Error, Fingerprint, Store, StoredResponse};
use sd_testkit::{RedisCluster, RedisSentinelGroup, RedisServer};

/// The replicas the `WAIT` tests ask for, and how long they wait.
const WAIT: (u32, Duration) = (1, Duration::from_millis(500));

type Runs = Arc<Mutex<HashMap<String, (u32, Instant)>>>;

/// Sends `key` until it is answered: runs the work (counted in `runs`) when claimed,
/// replays when completed, waits while another request holds it. False when the
/// completion failed (its claim was lost with the old master) or no answer came.
async fn request(store: &RedisStore<FailoverConnection>, key: &str, runs: &Runs) -> bool {
    let fingerprint = Fingerprint::of(key);
    for _ in 0..200 {
        match store
            .claim("svc", key, &fingerprint, Duration::from_secs(5))
            .await
        {
            Ok(ClaimOutcome::Claimed(claim)) => {
                {
                    let mut runs = runs.lock().unwrap();
                    let entry = runs.entry(key.to_owned()).or_insert((0, Instant::now()));
                    entry.0 += 1;
                }
                let response = StoredResponse::new(200, key.as_bytes().to_vec());
                // A completion its replicas did not acknowledge (with `WAIT`) is sent
                // again, as the error says: after a failover the new master has the
                // claim, which they did acknowledge.
                for _ in 0..100 {
                    match store
                        .complete(&claim, &response, Duration::from_secs(120))
                        .await
                    {
                        Ok(()) => return true,
                        Err(Error::NotReplicated { .. }) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => return false,
                    }
                }
                return false;
            }
            Ok(ClaimOutcome::Completed(_)) => return true,
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    false
}

/// Runs first requests and their retries on `conn` while the blocking `faults` run;
/// `faults` returns the windows in which a double run is allowed (none with `wait`).
/// Returns the number of keys that ran twice.
async fn double_runs(
    backend: &str,
    conn: FailoverConnection,
    wait: Option<(u32, Duration)>,
    faults: impl FnOnce() -> Vec<(Instant, Instant)> + Send + 'static,
) -> usize {
    let mut builder = RedisStore::builder()
        .prefix("fo")
        .timeout(Duration::from_secs(15));
    if let Some((replicas, timeout)) = wait {
        builder = builder.wait_for_replicas(replicas, timeout);
    }
    let store = Arc::new(builder.build(conn).unwrap());
    let runs: Runs = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();

    // First requests, one key after another.
    let first = {
        let (store, runs, stop) = (store.clone(), runs.clone(), stop.clone());
        tokio::spawn(async move {
            let mut unanswered = 0;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k{i}");
                if !request(&store, &key, &runs).await {
                    unanswered += 1;
                }
                let _ = done_tx.send((key, Instant::now()));
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            unanswered
        })
    };
    // The retry of each key, 300 ms after its first request was answered.
    let retries = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(async move {
            let mut sent = 0;
            while let Some((key, answered)) = done_rx.recv().await {
                tokio::time::sleep_until((answered + Duration::from_millis(300)).into()).await;
                request(&store, &key, &runs).await;
                sent += 1;
            }
            sent
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let windows = tokio::task::spawn_blocking(faults).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let unanswered = first.await.unwrap();
    let retried = retries.await.unwrap();

    let runs = runs.lock().unwrap();
    let doubles: Vec<(&String, &Instant)> = runs
        .iter()
        .filter(|(_, (n, _))| *n > 1)
        .map(|(k, (_, at))| (k, at))
        .collect();
    let outside = doubles
        .iter()
        .filter(|(_, at)| !windows.iter().any(|(a, b)| (*a..=*b).contains(at)))
        .count();
    let waits = match wait {
        Some((replicas, timeout)) => format!("WAIT {replicas} replica, {timeout:?}"),
        None => "no WAIT".to_owned(),
    };
    println!(
        "idempotency {backend}, {waits}: {} keys, {retried} retries, 2 failovers \
         (windows of {:.1?} and {:.1?}), {} keys ran twice, {outside} of them outside the \
         failover windows, {unanswered} first requests not completed (no claim that \
         counted, or its completion lost or not acknowledged)",
        runs.len(),
        windows[0].1 - windows[0].0,
        windows[1].1 - windows[1].0,
        doubles.len(),
    );
    assert_eq!(outside, 0, "a key ran twice with no failover to explain it");
    doubles.len()
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

/// A Sentinel group under load: a forced promotion, then a crashed master. With `WAIT`,
/// the crashed master comes back as the new master's replica (with none, no claim could
/// count). Returns the keys that ran twice.
fn sentinel_double_runs(wait: Option<(u32, Duration)>) -> usize {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    sd_testkit::runtime().block_on(async move {
        let conn = sentinel_connection(&group).await;
        let group = Arc::new(Mutex::new(group));
        let g = group.clone();
        let doubles = double_runs("redis sentinel", conn, wait, move || {
            let mut g = g.lock().unwrap();
            // The old master takes writes until the connection moves, within one
            // check interval (0.5 s) of the Sentinels' switch: the window allows 1 s.
            let forced = Instant::now();
            let new = g.start_failover().unwrap();
            let forced_end = Instant::now() + Duration::from_secs(1);
            g.wait_settled(new, Duration::from_secs(60)).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let crash = Instant::now();
            if wait.is_some() {
                g.kill_master().unwrap();
            } else {
                g.kill_master_only().unwrap();
            }
            vec![(forced, forced_end), (crash, Instant::now())]
        })
        .await;
        drop(group);
        doubles
    })
}

/// A Cluster with replicas under load: a manual failover (loses nothing), then a killed
/// master (loses what it had not sent to its replica). With `WAIT`, the killed master
/// comes back as its successor's replica (with none, no claim on that shard could
/// count). Returns the keys that ran twice.
fn cluster_double_runs(wait: Option<(u32, Duration)>) -> usize {
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    sd_testkit::runtime().block_on(async move {
        let conn = cluster_connection(&cluster).await;
        let cluster = Arc::new(Mutex::new(cluster));
        let c = cluster.clone();
        let doubles = double_runs("redis cluster", conn, wait, move || {
            let mut c = c.lock().unwrap();
            let manual = Instant::now();
            c.failover(3).unwrap();
            let manual_end = Instant::now();
            std::thread::sleep(Duration::from_millis(300));
            let crash = Instant::now();
            let new = c.kill_master(1).unwrap();
            if wait.is_some() {
                c.nodes_mut()[1].start_again().unwrap();
                c.wait_replica_of(1, new).unwrap();
            }
            vec![(manual, manual_end), (crash, Instant::now())]
        })
        .await;
        drop(cluster);
        doubles
    })
}

#[test]
fn double_runs_without_wait_are_counted_and_come_from_the_failover_windows() {
    sentinel_double_runs(None);
}

#[test]
fn double_runs_without_wait_on_a_cluster_come_from_the_failover_windows() {
    cluster_double_runs(None);
}

#[test]
fn no_key_runs_twice_with_wait_across_sentinel_promotions() {
    let doubles = sentinel_double_runs(Some(WAIT));
    assert_eq!(
        doubles, 0,
        "a key ran twice although its claim was replicated"
    );
}

#[test]
fn no_key_runs_twice_with_wait_across_cluster_failovers() {
    let doubles = cluster_double_runs(Some(WAIT));
    assert_eq!(
        doubles, 0,
        "a key ran twice although its claim was replicated"
    );
}

#[test]
fn a_wait_that_cannot_be_met_fails_the_claim_and_leaves_nothing() {
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
            match RedisStore::builder()
                .wait_for_replicas(replicas, timeout)
                .build(conn.clone())
            {
                Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "wait_for_replicas"),
                other => panic!("({replicas}, {timeout:?}) was accepted: {other:?}"),
            }
        }
        let waiting = RedisStore::builder()
            .wait_for_replicas(1, Duration::from_millis(100))
            .build(conn.clone())
            .unwrap();
        let fingerprint = Fingerprint::of("body");
        let started = Instant::now();
        match waiting
            .claim("svc", "k", &fingerprint, Duration::from_secs(5))
            .await
        {
            Err(Error::NotReplicated { acked, wanted }) => assert_eq!((acked, wanted), (0, 1)),
            other => panic!("claimed without a replica: {other:?}"),
        }
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "WAIT did not wait"
        );
        let key = waiting.redis_key("svc", "k");
        assert!(
            matches!(
                server.command(&["EXISTS", &key]).unwrap(),
                sd_testkit::resp::Reply::Integer(0)
            ),
            "the claim that did not count was left behind"
        );
        // Nothing holds the key: a store that does not wait claims it at once.
        let plain = RedisStore::builder().build(conn).unwrap();
        assert!(matches!(
            plain
                .claim("svc", "k", &fingerprint, Duration::from_secs(5))
                .await
                .unwrap(),
            ClaimOutcome::Claimed(_)
        ));
    });
}
