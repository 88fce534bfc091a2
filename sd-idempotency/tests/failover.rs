//! The Redis store through Sentinel failovers, on sd-core's `FailoverConnection`: every
//! key is claimed, run and completed by a first request, and sent again a moment later
//! by a retry, while the master is promoted by force and then crashes. Redis replicates
//! asynchronously and the store does not ask for `WAIT`, so a claim or a completion the
//! old master took and never passed on is lost, and the retry runs the key again. The
//! test counts those double runs and checks they all come from the failover windows
//! (RELIABILITY.md quotes the figures it prints).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_core::failover::FailoverConnection;
use sd_idempotency::redis::RedisStore;
use sd_idempotency::{ClaimOutcome, Fingerprint, Store, StoredResponse};
use sd_testkit::{RedisCluster, RedisSentinelGroup};

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
                return store
                    .complete(&claim, &response, Duration::from_secs(120))
                    .await
                    .is_ok();
            }
            Ok(ClaimOutcome::Completed(_)) => return true,
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    false
}

/// Runs first requests and their retries on `conn` while the blocking `faults` run;
/// `faults` returns the windows in which a double run is allowed.
async fn double_runs(
    backend: &str,
    conn: FailoverConnection,
    faults: impl FnOnce() -> Vec<(Instant, Instant)> + Send + 'static,
) {
    let store = Arc::new(
        RedisStore::builder()
            .prefix("fo")
            .timeout(Duration::from_secs(15))
            .build(conn)
            .unwrap(),
    );
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
    println!(
        "idempotency {backend}, no WAIT: {} keys, {retried} retries, 2 failovers \
         (windows of {:.1?} and {:.1?}), {} keys ran twice, {outside} of them outside the \
         failover windows, {unanswered} first requests not completed (claim lost in a \
         failover)",
        runs.len(),
        windows[0].1 - windows[0].0,
        windows[1].1 - windows[1].0,
        doubles.len(),
    );
    assert_eq!(outside, 0, "a key ran twice with no failover to explain it");
}

#[test]
fn double_runs_without_wait_are_counted_and_come_from_the_failover_windows() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    sd_testkit::runtime().block_on(async move {
        let conn = FailoverConnection::builder()
            .sentinel(group.sentinel_urls(), group.master_name())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        let group = Arc::new(Mutex::new(group));
        let g = group.clone();
        double_runs("redis sentinel", conn, move || {
            let mut g = g.lock().unwrap();
            // The old master takes writes until the connection moves, within one
            // check interval (0.5 s) of the Sentinels' switch: the window allows 1 s.
            let forced = Instant::now();
            let new = g.start_failover().unwrap();
            let forced_end = Instant::now() + Duration::from_secs(1);
            g.wait_settled(new, Duration::from_secs(60)).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let crash = Instant::now();
            g.kill_master_only().unwrap();
            vec![(forced, forced_end), (crash, Instant::now())]
        })
        .await;
        drop(group);
    });
}

#[test]
fn double_runs_without_wait_on_a_cluster_come_from_the_failover_windows() {
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    sd_testkit::runtime().block_on(async move {
        let conn = FailoverConnection::builder()
            .cluster(cluster.urls())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        let cluster = Arc::new(Mutex::new(cluster));
        let c = cluster.clone();
        double_runs("redis cluster", conn, move || {
            let mut c = c.lock().unwrap();
            // A manual failover loses nothing; a killed master loses what it had not
            // sent to its replica.
            let manual = Instant::now();
            c.failover(3).unwrap();
            let manual_end = Instant::now();
            std::thread::sleep(Duration::from_millis(300));
            let crash = Instant::now();
            c.kill_master(1).unwrap();
            vec![(manual, manual_end), (crash, Instant::now())]
        })
        .await;
        drop(cluster);
    });
}
