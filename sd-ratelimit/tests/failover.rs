//! The Redis limiter under steady load through failovers, on sd-core's
//! `FailoverConnection`: a Sentinel group (a forced promotion, then a crashed master)
//! and a Redis Cluster with replicas (`CLUSTER FAILOVER`, then a killed master).
//! Decisions must resume after each promotion, and what the limiter admits beyond the
//! limit (state lost with writes the old master took and never replicated) is counted
//! and bounded. The tests print their figures (RELIABILITY.md quotes them).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_core::failover::FailoverConnection;
use sd_ratelimit::redis::{FailurePolicy, RedisLimiter, RedisLimiterBuilder};
use sd_ratelimit::{Limit, Quota};
use sd_testkit::{RedisCluster, RedisSentinelGroup};

/// Keys under load, and each key's rate (burst = rate).
const KEYS: usize = 8;
const RATE: u32 = 10;

/// What one worker saw.
#[derive(Default)]
struct Tally {
    allowed: Vec<u64>,
    denied: u64,
    errors: u64,
    /// Longest time between two answered decisions.
    longest_gap: Duration,
    /// When each answered decision came.
    answered: Vec<Instant>,
}

fn limiter(conn: FailoverConnection) -> RedisLimiter<FailoverConnection> {
    let limit = Limit::gcra(Quota::per_second(RATE).unwrap());
    RedisLimiterBuilder::new(limit)
        .prefix("fo")
        // Long enough for the connection to wait out a promotion (its failover_timeout
        // is 10 s): a failover shows as a pause, not as failure-policy answers.
        .timeout(Duration::from_secs(15))
        .on_failure(FailurePolicy::Closed)
        .build(conn)
        .unwrap()
}

/// Runs two workers checking the keys in turn until `faults` (blocking) returned and
/// `settle` more passed; returns the tallies and the run's length.
async fn under_load(
    limiter: RedisLimiter<FailoverConnection>,
    faults: impl FnOnce() -> Vec<Instant> + Send + 'static,
    settle: Duration,
) -> (Tally, Duration, Vec<Duration>) {
    let limiter = Arc::new(limiter);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (limiter, stop) = (limiter.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tally = Tally {
                    allowed: vec![0; KEYS],
                    ..Tally::default()
                };
                let mut last = Instant::now();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let key = i % KEYS;
                    match limiter.check(&format!("k{key}")).await {
                        Ok(d) if d.allowed => tally.allowed[key] += 1,
                        Ok(_) => tally.denied += 1,
                        Err(_) => tally.errors += 1,
                    }
                    tally.answered.push(Instant::now());
                    tally.longest_gap = tally.longest_gap.max(last.elapsed());
                    last = Instant::now();
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tally
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let promotions = tokio::task::spawn_blocking(faults).await.unwrap();
    tokio::time::sleep(settle).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally {
        allowed: vec![0; KEYS],
        ..Tally::default()
    };
    for w in workers {
        let t = w.await.unwrap();
        for (sum, n) in total.allowed.iter_mut().zip(&t.allowed) {
            *sum += n;
        }
        total.denied += t.denied;
        total.errors += t.errors;
        total.longest_gap = total.longest_gap.max(t.longest_gap);
        total.answered.extend(t.answered);
    }
    // How long after each promotion the first decision was answered.
    let resumed = promotions
        .iter()
        .map(|p| {
            total
                .answered
                .iter()
                .filter(|a| *a > p)
                .min()
                .map_or(Duration::MAX, |a| *a - *p)
        })
        .collect();
    (total, started.elapsed(), resumed)
}

/// Prints the figures and checks the promises: no errors, decisions after the faults,
/// and over-admission within what `lost` seconds of discarded writes can explain.
fn report(
    backend: &str,
    tally: &Tally,
    run: Duration,
    (resumed, bound_resume): (&[Duration], Duration),
    lost: f64,
) {
    let bound = f64::from(RATE) + f64::from(RATE) * run.as_secs_f64();
    let over: f64 = tally
        .allowed
        .iter()
        .map(|&a| (a as f64 - bound).max(0.0))
        .sum();
    let decisions = tally.allowed.iter().sum::<u64>() + tally.denied;
    println!(
        "ratelimit {backend}: {decisions} decisions in {:.1} s ({:.0}/s), {} failovers, \
         {} errors, decisions resumed {resumed:?} after each promotion, longest pause \
         {:.2} s (detection included), admitted over the limit {over:.0} (limit {RATE}/s \
         per key, {KEYS} keys, bound per key {bound:.0})",
        run.as_secs_f64(),
        decisions as f64 / run.as_secs_f64(),
        resumed.len(),
        tally.errors,
        tally.longest_gap.as_secs_f64(),
    );
    assert_eq!(tally.errors, 0, "decisions wait out a failover");
    assert!(
        resumed.iter().all(|r| *r < bound_resume),
        "decisions resumed within {bound_resume:?} of each promotion: {resumed:?}"
    );
    let allowance = f64::from(RATE) * lost * KEYS as f64;
    assert!(
        over <= allowance,
        "over-admission {over} beyond {lost} s of lost state ({allowance})"
    );
}

#[test]
fn decisions_continue_through_sentinel_failovers_and_over_admission_is_bounded() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    sd_testkit::runtime().block_on(async move {
        let conn = FailoverConnection::builder()
            .sentinel(group.sentinel_urls(), group.master_name())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        // The servers live until the end of the test, not of the fault closure.
        let group = Arc::new(Mutex::new(group));
        let _servers = group.clone();
        let faults = move || {
            let mut g = group.lock().unwrap();
            g.failover().unwrap();
            let forced = Instant::now();
            std::thread::sleep(Duration::from_millis(500));
            g.kill_master_only().unwrap();
            vec![forced, Instant::now()]
        };
        let (tally, run, resumed) = under_load(limiter(conn), faults, Duration::from_secs(1)).await;
        // A forced promotion discards what the old master took until the connection
        // moved (one check interval, 0.5 s, plus the Sentinels' switch): allow 2 s.
        // The connection's backoff tops out at 1 s and the Sentinel check runs every
        // 0.5 s: within 3 s of a promotion decisions are answered again.
        report(
            "sentinel",
            &tally,
            run,
            (&resumed, Duration::from_secs(3)),
            2.0,
        );
    });
}

#[test]
fn decisions_continue_through_cluster_failovers_and_over_admission_is_bounded() {
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
        let _servers = cluster.clone();
        let faults = move || {
            let mut c = cluster.lock().unwrap();
            c.failover(3).unwrap();
            let manual = Instant::now();
            std::thread::sleep(Duration::from_millis(500));
            c.kill_master(1).unwrap();
            vec![manual, Instant::now()]
        };
        let (tally, run, resumed) = under_load(limiter(conn), faults, Duration::from_secs(1)).await;
        // CLUSTER FAILOVER loses nothing; a killed master loses what it had not yet
        // sent to its replica (milliseconds): allow 1 s.
        // redis-rs's cluster client finds the new master from its slot map refresh,
        // within the connection's failover_timeout (10 s).
        report(
            "cluster",
            &tally,
            run,
            (&resumed, Duration::from_secs(10)),
            1.0,
        );
    });
}
