//! The pool's behaviour: bounds, backpressure, ordering, panics, run-time limits.
//! Draining, shutdown, memory bounds and watermarks are in `lifecycle.rs`.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use sd_pool::{Error, Job, Order, Pool};
use tokio::sync::{Notify, Semaphore};

/// Counts jobs running at once and remembers the most.
#[derive(Default)]
struct HighWater {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl HighWater {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

#[test]
fn config_errors_name_the_field() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = Pool::builder().workers(0).queue(1).build().unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConfig {
                    field: "workers",
                    ..
                }
            ),
            "{err}"
        );
        let err = Pool::builder().workers(1).queue(0).build().unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { field: "queue", .. }),
            "{err}"
        );
        let err = Pool::builder()
            .workers(1)
            .queue(1)
            .max_key_backlog(0)
            .build()
            .unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidConfig {
                field: "max_key_backlog",
                ..
            }
        ));
        let err = Pool::builder()
            .workers(1)
            .queue(1)
            .max_watermark_window(0)
            .build()
            .unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidConfig {
                field: "max_watermark_window",
                ..
            }
        ));
        let pool = Pool::builder().workers(1).queue(1).build().unwrap();
        assert!(matches!(
            pool.set_workers(0),
            Err(Error::InvalidConfig { .. })
        ));
    });
    assert!(matches!(
        Pool::builder().workers(1).queue(1).build(),
        Err(Error::NoRuntime)
    ));
}

#[test]
fn running_jobs_never_exceed_the_limit_under_stress() {
    let rt = sd_testkit::runtime_with(4);
    rt.block_on(async {
        let limit = 7;
        let pool = Pool::builder().workers(limit).queue(32).build().unwrap();
        let hw = Arc::new(HighWater::default());
        let done = Arc::new(AtomicUsize::new(0));
        let mut producers = Vec::new();
        for _ in 0..16 {
            let (pool, hw, done) = (pool.clone(), hw.clone(), done.clone());
            producers.push(tokio::spawn(async move {
                let mut handles = Vec::new();
                for i in 0..500 {
                    let (hw, done) = (hw.clone(), done.clone());
                    let h = pool
                        .submit(async move {
                            hw.enter();
                            for _ in 0..(i % 4) {
                                tokio::task::yield_now().await;
                            }
                            hw.leave();
                            done.fetch_add(1, Ordering::SeqCst);
                        })
                        .await
                        .unwrap();
                    handles.push(h);
                }
                for h in handles {
                    h.await.unwrap();
                }
            }));
        }
        for p in producers {
            p.await.unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 16 * 500);
        assert!(hw.peak() <= limit, "peak {} > {limit}", hw.peak());
        let m = pool.metrics();
        assert!(m.running_peak <= limit);
        assert!(m.queued_peak <= 32);
        assert_eq!(m.completed, 8000);
        assert_eq!((m.queued, m.running), (0, 0));
    });
}

#[tokio::test(start_paused = true)]
async fn submit_waits_when_full_and_try_submit_returns_the_job() {
    let (pool, gate, first) = common::held_pool().await;
    let second = pool.try_submit(async {}).unwrap();
    // Full: try_submit hands the very job back.
    let rejected = pool.try_submit(async { 42 }).unwrap_err();
    assert!(matches!(
        rejected.error,
        Error::Full {
            bound: "queue",
            limit: 1
        }
    ));
    assert_eq!(rejected.into_job().into_future().await, 42);
    // submit waits...
    let waiting = pool.submit(async { 7u8 });
    let mut waiting = std::pin::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_secs(60), &mut waiting)
            .await
            .is_err()
    );
    // ... and submit_timeout gives up with the job.
    let timed_out = pool
        .submit_timeout(async { 9 }, Duration::from_millis(5))
        .await
        .unwrap_err();
    assert!(matches!(
        timed_out.error,
        Error::Timeout {
            bound: Some("queue"),
            ..
        }
    ));
    gate.notify_one();
    let third = waiting.await.unwrap();
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(third.await.unwrap(), 7);
}

/// Runs `jobs` (key, duration in ms) through a per-key pool in paused time and returns
/// the order in which each key's jobs started, plus how often each job ran.
fn run_keyed(
    order: Order,
    concurrency: usize,
    jobs: &[(u8, u8)],
) -> (HashMap<u8, Vec<usize>>, Vec<usize>, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = Pool::builder()
            .workers(concurrency)
            .queue(8)
            .order(order)
            .max_key_backlog(3)
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(HashMap::<u8, Vec<usize>>::new()));
        let runs = Arc::new(Mutex::new(vec![0usize; jobs.len()]));
        let hw = Arc::new(HighWater::default());
        let mut handles = Vec::new();
        for (i, &(key, ms)) in jobs.iter().enumerate() {
            let (seen, runs, hw) = (seen.clone(), runs.clone(), hw.clone());
            let job = Job::new(async move {
                hw.enter();
                seen.lock().unwrap().entry(key).or_default().push(i);
                runs.lock().unwrap()[i] += 1;
                tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
                hw.leave();
            })
            .with_key(&key);
            handles.push(pool.submit(job).await.unwrap());
        }
        for h in handles {
            h.await.unwrap();
        }
        let seen = seen.lock().unwrap().clone();
        let runs = runs.lock().unwrap().clone();
        (seen, runs, hw.peak())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Within a key, jobs start in submission order and one at a time; every job runs once.
    #[test]
    fn per_key_order_holds(jobs in proptest::collection::vec((0u8..6, 0u8..6), 1..80), concurrency in 1usize..6) {
        let (seen, runs, peak) = run_keyed(Order::PerKey, concurrency, &jobs);
        for (key, order) in &seen {
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "key {key}: {order:?}");
        }
        prop_assert!(runs.iter().all(|&n| n == 1));
        prop_assert!(peak <= concurrency);
    }
}

/// Runs `jobs` (key, work) through a pool of `order` on a multi-thread runtime, counting
/// per key the jobs inside their bodies at once; returns the most seen for any key, the
/// start order per key, and how often each job ran. Work is real: `work % 4` yields and
/// `work` microseconds of sleep, so jobs of different keys interleave on both threads.
fn run_keyed_in_flight(
    order: Order,
    concurrency: usize,
    jobs: &[(u8, u16)],
) -> (usize, HashMap<u8, Vec<usize>>, Vec<usize>) {
    let rt = sd_testkit::runtime();
    rt.block_on(async {
        let pool = Pool::builder()
            .workers(concurrency)
            .queue(8)
            .order(order)
            .max_key_backlog(4)
            .build()
            .unwrap();
        let in_flight: Arc<Vec<AtomicUsize>> =
            Arc::new((0..=u8::MAX).map(|_| AtomicUsize::new(0)).collect());
        let worst = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(HashMap::<u8, Vec<usize>>::new()));
        let runs: Arc<Vec<AtomicUsize>> =
            Arc::new(jobs.iter().map(|_| AtomicUsize::new(0)).collect());
        let mut handles = Vec::new();
        for (i, &(key, work)) in jobs.iter().enumerate() {
            let (in_flight, worst, seen, runs) =
                (in_flight.clone(), worst.clone(), seen.clone(), runs.clone());
            let job = Job::new(async move {
                let k = usize::from(key);
                let now = in_flight[k].fetch_add(1, Ordering::SeqCst) + 1;
                worst.fetch_max(now, Ordering::SeqCst);
                seen.lock().unwrap().entry(key).or_default().push(i);
                runs[i].fetch_add(1, Ordering::SeqCst);
                for _ in 0..work % 4 {
                    tokio::task::yield_now().await;
                }
                tokio::time::sleep(Duration::from_micros(u64::from(work))).await;
                in_flight[k].fetch_sub(1, Ordering::SeqCst);
            })
            .with_key(&key);
            handles.push(pool.submit(job).await.unwrap());
        }
        for h in handles {
            h.await.unwrap();
        }
        let seen = seen.lock().unwrap().clone();
        let runs = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        (worst.load(Ordering::SeqCst), seen, runs)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// On two threads, with random keys and durations, a key never has two jobs running
    /// at once, its jobs start in submission order, and every job runs once.
    #[test]
    fn per_key_runs_one_job_of_a_key_at_a_time(
        jobs in proptest::collection::vec((0u8..8, 0u16..400), 1..120),
        concurrency in 1usize..8,
    ) {
        let (worst, seen, runs) = run_keyed_in_flight(Order::PerKey, concurrency, &jobs);
        prop_assert!(worst <= 1, "{worst} jobs of one key ran at once");
        for (key, order) in &seen {
            prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "key {key}: {order:?}");
        }
        prop_assert!(runs.iter().all(|&n| n == 1));
    }
}

/// The in-flight counter above is not vacuous: a pool that ignores keys (unordered) runs
/// jobs of one key at once, and the counter sees it.
#[test]
fn the_per_key_counter_catches_a_pool_that_ignores_keys() {
    // Eight jobs of one key, 20 ms each, four workers: ignoring the key, four overlap.
    let jobs = [(3u8, 20_000u16); 8];
    let (worst, _, _) = run_keyed_in_flight(Order::Unordered, 4, &jobs);
    assert!(worst > 1, "unordered ran one job of the key at a time");
    let (worst, _, _) = run_keyed_in_flight(Order::PerKey, 4, &jobs);
    assert_eq!(worst, 1);
}

#[test]
fn per_key_runs_keys_concurrently_and_serial_runs_one() {
    let jobs: Vec<(u8, u8)> = (0..40).map(|i| (i % 8, 3)).collect();
    let (_, _, peak) = run_keyed(Order::PerKey, 4, &jobs);
    assert_eq!(peak, 4);
    let (seen, runs, peak) = run_keyed(Order::Serial, 4, &jobs);
    assert_eq!(peak, 1);
    assert!(runs.iter().all(|&n| n == 1));
    // Serial keeps the global order too: key k's jobs are k, k+8, ...
    for (k, order) in seen {
        assert_eq!(
            order,
            (0..5).map(|j| usize::from(k) + 8 * j).collect::<Vec<_>>()
        );
    }
    let (_, _, peak) = run_keyed(Order::Unordered, 4, &[(1, 3); 12]);
    assert_eq!(peak, 4, "unordered ignores keys");
}

#[tokio::test(start_paused = true)]
async fn a_full_key_backlog_blocks_only_that_key() {
    let pool = Pool::builder()
        .workers(4)
        .queue(16)
        .order(Order::PerKey)
        .max_key_backlog(1)
        .build()
        .unwrap();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let first = pool
        .submit(Job::new(async move { g.notified().await }).with_key("a"))
        .await
        .unwrap();
    let _second = pool.try_submit(Job::new(async {}).with_key("a")).unwrap();
    assert!(matches!(
        common::refused(&pool, Job::new(async {}).with_key("a")),
        Error::Full {
            bound: "max_key_backlog",
            limit: 1
        }
    ));
    pool.try_submit(Job::new(async {}).with_key("b"))
        .unwrap()
        .await
        .unwrap();
    gate.notify_one();
    first.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn panics_are_reported_and_do_not_shrink_capacity() {
    let hooked = Arc::new(AtomicUsize::new(0));
    let h = hooked.clone();
    let pool = Pool::builder()
        .workers(2)
        .queue(200)
        .on_panic(move |report| {
            assert!(report.message.contains("boom"));
            h.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..100u32 {
        handles.push(
            pool.submit(async move {
                if i % 2 == 0 {
                    panic!("boom {i}");
                }
                Ok::<u32, Infallible>(i)
            })
            .await
            .unwrap(),
        );
    }
    for (i, h) in handles.into_iter().enumerate() {
        match h.await {
            Err(Error::Panicked { message, .. }) => {
                assert_eq!(i % 2, 0);
                assert_eq!(message, format!("boom {i}"));
            }
            Ok(Ok(v)) => assert_eq!(v as usize, i),
            other => panic!("job {i}: {other:?}"),
        }
    }
    assert_eq!(hooked.load(Ordering::SeqCst), 50);
    let m = pool.metrics();
    assert_eq!((m.panicked, m.completed, m.failed), (50, 50, 0));
    // Both workers are still there: two jobs that need each other finish.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let (b1, b2) = (barrier.clone(), barrier.clone());
    let x = pool
        .submit(async move {
            b1.wait().await;
        })
        .await
        .unwrap();
    let y = pool
        .submit(async move {
            b2.wait().await;
        })
        .await
        .unwrap();
    x.await.unwrap();
    y.await.unwrap();
    // A failed output is counted, not a panic.
    pool.submit(async { Err::<(), &str>("no") })
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(pool.metrics().failed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_submitting_into_its_own_full_pool_gets_an_error() {
    let pool = Pool::builder().workers(1).queue(1).build().unwrap();
    let inner = pool.clone();
    let outer = pool
        .submit(async move {
            // The queue has room: fine.
            let queued = inner.submit(async {}).await.map_err(|r| r.error)?;
            // Now it is full and this job holds the only worker: waiting would deadlock.
            let err = inner.submit(async {}).await.unwrap_err().error;
            drop(queued);
            Ok::<Error, Error>(err)
        })
        .await
        .unwrap();
    let err = outer.await.unwrap().unwrap();
    assert!(
        matches!(err, Error::WouldDeadlock { bound: "queue" }),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_can_change_at_run_time() {
    let pool = Pool::builder().workers(2).queue(100).build().unwrap();
    let hw = Arc::new(HighWater::default());
    let gate = Arc::new(Semaphore::new(0));
    let mut handles = Vec::new();
    for _ in 0..10 {
        let (hw, gate) = (hw.clone(), gate.clone());
        handles.push(
            pool.submit(async move {
                hw.enter();
                gate.acquire().await.unwrap().forget();
                hw.leave();
            })
            .await
            .unwrap(),
        );
    }
    tokio::task::yield_now().await;
    assert_eq!(hw.peak(), 2);
    pool.set_workers(5).unwrap();
    tokio::task::yield_now().await;
    assert_eq!(pool.metrics().running, 5);
    assert_eq!(hw.peak(), 5);
    pool.set_workers(1).unwrap();
    gate.add_permits(5);
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        pool.metrics().running,
        1,
        "shrinking lets running jobs finish, then holds the new limit"
    );
    gate.add_permits(5);
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(pool.metrics().workers, 1);
}
