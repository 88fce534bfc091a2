//! The pool's lifecycle and bookkeeping: drain, close, shutdown, bounded memory under a
//! fast producer, and completion watermarks.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use sd_pool::{Error, Job, Order, Pool};
use tokio::sync::Notify;

#[tokio::test(start_paused = true)]
async fn drain_finishes_everything_accepted() {
    let pool = Pool::builder().workers(3).queue(50).build().unwrap();
    let runs = Arc::new(Mutex::new(vec![0u32; 40]));
    for i in 0..40 {
        let runs = runs.clone();
        pool.submit(async move {
            tokio::time::sleep(Duration::from_millis(i as u64 % 7)).await;
            runs.lock().unwrap()[i] += 1;
        })
        .await
        .unwrap();
    }
    let drained = pool.drain(Duration::from_secs(3600)).await;
    assert!(drained.is_complete());
    assert!(runs.lock().unwrap().iter().all(|&n| n == 1));
    assert!(matches!(
        pool.try_submit(async {}).unwrap_err().error,
        Error::Closed
    ));
}

#[tokio::test(start_paused = true)]
async fn drain_at_its_deadline_returns_the_queued_jobs_in_order() {
    let pool = Pool::builder().workers(1).queue(8).build().unwrap();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let running = pool
        .submit(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            g.notified().await;
        })
        .await
        .unwrap();
    let mut queued = Vec::new();
    for i in 0..3u32 {
        queued.push(pool.submit(async move { i }).await.unwrap());
    }
    tokio::task::yield_now().await;
    let drained = pool.drain(Duration::from_secs(1)).await;
    assert!(!drained.is_complete());
    assert_eq!(drained.still_running, 1);
    let ids: Vec<u64> = drained.returned.iter().map(|j| j.id()).collect();
    assert_eq!(ids, queued.iter().map(|h| h.id()).collect::<Vec<_>>());
    let m = pool.metrics();
    assert_eq!((m.running, m.queued), (1, 0));
    assert_eq!((m.submitted, m.returned, m.completed), (4, 3, 0));
    // The running job goes on past the deadline and completes; it ran for 10 s + 1 s
    // of paused time (deterministic, not a wall-clock measurement).
    tokio::time::sleep(Duration::from_secs(10)).await;
    gate.notify_one();
    running.await.unwrap();
    let m = pool.metrics();
    assert_eq!((m.running, m.completed), (0, 1));
    assert!(m.run_time_max >= Duration::from_secs(11), "{m:?}");
    assert_eq!(m.run_time_total, m.run_time_max, "one job ran");
    // A returned job completes its handle where it is run.
    for job in drained.returned {
        job.run().await;
    }
    for (i, h) in queued.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), i as u32);
    }
}

#[tokio::test(start_paused = true)]
async fn close_wakes_waiting_submitters_with_closed() {
    let (pool, gate, running) = common::held_pool().await;
    let queued = pool.submit(async { 1 }).await.unwrap();
    // Full: two submitters wait for room.
    let waiters: Vec<_> = (2..4u32)
        .map(|value| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.submit(async move { value }).await.map(drop) })
        })
        .collect();
    tokio::task::yield_now().await;
    assert!(waiters.iter().all(|w| !w.is_finished()));
    pool.close();
    for (waiter, value) in waiters.into_iter().zip(2..) {
        let rejected = waiter.await.unwrap().unwrap_err();
        assert!(
            matches!(rejected.error, Error::Closed),
            "{}",
            rejected.error
        );
        assert_eq!(rejected.into_job().into_future().await, value);
    }
    // Accepted jobs still run.
    gate.notify_one();
    running.await.unwrap();
    assert_eq!(queued.await.unwrap(), 1);
    assert_eq!(pool.metrics().submitted, 2);
}

#[test]
fn drain_under_random_cancellation_loses_nothing_and_runs_nothing_twice() {
    for seed in 0..8u64 {
        let rt = sd_testkit::runtime();
        rt.block_on(async move {
            let pool = Pool::builder()
                .workers(4)
                .queue(8)
                .order(Order::PerKey)
                .max_key_backlog(2)
                .build()
                .unwrap();
            let total = 400usize;
            let runs: Arc<Vec<AtomicUsize>> =
                Arc::new((0..total).map(|_| AtomicUsize::new(0)).collect());
            let accepted: Arc<Vec<AtomicUsize>> =
                Arc::new((0..total).map(|_| AtomicUsize::new(0)).collect());
            let mut producers = Vec::new();
            for p in 0..4 {
                let (pool, runs, accepted) = (pool.clone(), runs.clone(), accepted.clone());
                producers.push(tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 31 + p as u64);
                    for i in (p..total).step_by(4) {
                        let runs2 = runs.clone();
                        let work = rng.random_range(0..300u64);
                        let job = Job::new(async move {
                            tokio::time::sleep(Duration::from_micros(work)).await;
                            runs2[i].fetch_add(1, Ordering::SeqCst);
                        })
                        .with_key(&(i % 5));
                        // Randomly cancel the submit (drop its future) or drop the handle.
                        let patience = Duration::from_micros(rng.random_range(0..400u64));
                        match rng.random_range(0..3) {
                            0 => {
                                if let Ok(Ok(h)) =
                                    tokio::time::timeout(patience, pool.submit(job)).await
                                {
                                    accepted[i].fetch_add(1, Ordering::SeqCst);
                                    drop(h);
                                }
                            }
                            1 => {
                                if pool.submit_timeout(job, patience).await.is_ok() {
                                    accepted[i].fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            _ => {
                                if let Ok(h) = pool.submit(job).await {
                                    accepted[i].fetch_add(1, Ordering::SeqCst);
                                    if rng.random_bool(0.5) {
                                        h.await.unwrap();
                                    }
                                }
                            }
                        }
                    }
                }));
            }
            // Drain part-way through, as a shutdown signal would.
            tokio::time::sleep(Duration::from_millis(5 + seed)).await;
            let drained = pool.drain(Duration::from_millis(seed % 3)).await;
            // Jobs still running at the deadline finish; returned ones run here (a
            // producer may be awaiting one's handle).
            let returned: Vec<_> = drained.returned.iter().map(|j| j.id()).collect();
            for job in drained.returned {
                job.run().await;
            }
            for p in producers {
                p.await.unwrap();
            }
            let rest = pool.drain(Duration::from_secs(60)).await;
            assert!(rest.is_complete());
            let m = pool.metrics();
            assert_eq!(m.returned as usize, returned.len());
            for i in 0..total {
                let (a, r) = (
                    accepted[i].load(Ordering::SeqCst),
                    runs[i].load(Ordering::SeqCst),
                );
                // Ran exactly when accepted. (A cancelled submit future that had already
                // enqueued would show up as r = 1, a = 0: it cannot happen.)
                assert_eq!(a, r, "seed {seed} job {i}: accepted {a}, ran {r}");
            }
            assert_eq!(m.cancelled, 0);
            assert_eq!(m.completed + m.returned, m.submitted);
        });
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_now_aborts_running_and_returns_queued() {
    let pool = Pool::builder().workers(1).queue(4).build().unwrap();
    let running = pool.submit(std::future::pending::<()>()).await.unwrap();
    let queued = pool.submit(async { 5 }).await.unwrap();
    tokio::task::yield_now().await;
    let shutdown = pool.shutdown_now();
    assert_eq!(shutdown.aborted, 1);
    assert_eq!(shutdown.returned.len(), 1);
    assert!(
        matches!(running.await, Err(Error::Cancelled { .. })),
        "aborted, not panicked"
    );
    // A returned job completes its handle wherever it is run.
    for job in shutdown.returned {
        job.run().await;
    }
    assert_eq!(queued.await.unwrap(), 5);
    let dropped = Pool::builder().workers(1).queue(4).build().unwrap();
    let _busy = dropped.submit(std::future::pending::<()>()).await.unwrap();
    let h = dropped.submit(async {}).await.unwrap();
    drop(dropped.shutdown_now());
    assert!(matches!(h.await, Err(Error::Cancelled { .. })));
    tokio::task::yield_now().await;
    assert_eq!(dropped.metrics().cancelled, 1);
    assert_eq!(dropped.metrics().running, 0);
}

#[tokio::test(start_paused = true)]
async fn memory_stays_bounded_when_the_producer_is_ten_times_faster() {
    let (concurrency, capacity) = (4, 16);
    let pool = Pool::builder()
        .workers(concurrency)
        .queue(capacity)
        .build()
        .unwrap();
    let mut worst = 0;
    let mut handles = std::collections::VecDeque::new();
    for _ in 0..2000 {
        // Workers take 10 ms a job, 4 at once: 0.4 jobs/ms. The producer offers 4 jobs/ms.
        tokio::time::sleep(Duration::from_micros(250)).await;
        handles.push_back(
            pool.submit(async { tokio::time::sleep(Duration::from_millis(10)).await })
                .await
                .unwrap(),
        );
        worst = worst.max(pool.metrics().queued);
        while handles.len() > 64 {
            handles.pop_front();
        }
    }
    assert!(worst <= capacity);
    assert_eq!(worst, capacity, "the producer was the faster one");
    let m = pool.metrics();
    assert!(m.queued_peak <= capacity && m.running_peak <= concurrency);
    assert!(pool.drain(Duration::from_secs(3600)).await.is_complete());
    // Time in queue is measured (paused time: deterministic, not a wall-clock assertion).
    let m = pool.metrics();
    assert!(m.queue_time_max >= Duration::from_millis(10), "{m:?}");
    assert_eq!(pool.metrics().completed, 2000);
}

#[tokio::test(start_paused = true)]
async fn watermark_follows_out_of_order_completions_and_bounds_the_window() {
    let pool = Pool::builder()
        .workers(4)
        .queue(64)
        .max_watermark_window(3)
        .build()
        .unwrap();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    // Offset 0 is slow; 1..=3 finish at once.
    let head = pool
        .submit(Job::new(async move { g.notified().await }).with_offset(0, 0))
        .await
        .unwrap();
    let mut rest = Vec::new();
    for o in 1..=3 {
        rest.push(
            pool.submit(Job::new(async {}).with_offset(0, o))
                .await
                .unwrap(),
        );
    }
    for h in rest {
        h.await.unwrap();
    }
    assert_eq!(pool.watermark(0), None, "offset 0 is not done");
    assert_eq!(pool.watermark_window(0), 3);
    assert!(matches!(
        common::refused(&pool, Job::new(async {}).with_offset(0, 4)),
        Error::Full {
            bound: "max_watermark_window",
            limit: 3
        }
    ));
    // Other partitions are not held back.
    pool.submit(Job::new(async {}).with_offset(1, 0))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(pool.watermark(1), Some(0));
    assert!(matches!(
        common::refused(&pool, Job::new(async {}).with_offset(1, 0)),
        Error::OffsetNotIncreasing {
            partition: 1,
            offset: 0,
            last: 0
        }
    ));
    gate.notify_one();
    head.await.unwrap();
    assert_eq!(pool.watermark(0), Some(3));
    pool.submit(Job::new(async {}).with_offset(0, 4))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(pool.watermarks(), vec![(0, 4), (1, 0)]);
}

#[tokio::test(start_paused = true)]
async fn watermark_never_passes_a_running_offset() {
    let pool = Pool::builder().workers(8).queue(64).build().unwrap();
    let violations = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    let mut rng = rand::rng();
    for o in 0..500u64 {
        let (p, v) = (pool.clone(), violations.clone());
        let ms = rng.random_range(0..5u64);
        let job = Job::new(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if p.watermark(0).is_some_and(|w| w >= o) {
                v.fetch_add(1, Ordering::SeqCst);
            }
        })
        .with_offset(0, o);
        handles.push(pool.submit(job).await.unwrap());
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert_eq!(pool.watermark(0), Some(499));
}
