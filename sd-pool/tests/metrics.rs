//! Feature `metrics`: a pool counts its jobs by how they ended (a full queue's refusal
//! included) and keeps its queue depth and jobs in flight, with the documented names and
//! labels, and each partition's watermark lag.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::sync::Arc;
use std::time::Duration;

use sd_core::observe::{Capture, label, outcome};
use sd_pool::{Error, Job, Pool};
use tokio::sync::Notify;

#[tokio::test]
async fn jobs_by_outcome_a_full_queue_and_the_gauges_are_reported() {
    let capture = Capture::new();
    let pool = capture.build(|| {
        Pool::builder()
            .name("mail")
            .workers(1)
            .queue(1)
            .build()
            .unwrap()
    });
    let mail = [(label::NAME, "mail")];
    let jobs = |o| {
        capture.counter(
            "sd.pool.jobs",
            &[(label::NAME, "mail"), (label::OUTCOME, o)],
        )
    };
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let first = pool
        .submit(async move {
            g.notified().await;
            Ok::<u32, &str>(1)
        })
        .await
        .unwrap();
    let second = pool
        .submit(async { Err::<u32, &str>("refused") })
        .await
        .unwrap();
    // One running, one queued: the queue of one is full.
    let full = pool.try_submit(async { Ok::<u32, &str>(3) }).unwrap_err();
    assert!(matches!(full.error, Error::Full { .. }), "{:?}", full.error);
    assert_eq!(jobs(outcome::REJECTED), 1);
    assert_eq!(capture.gauges("sd.pool.queue.depth", &mail), [1.0]);
    assert_eq!(capture.gauges("sd.pool.in_flight", &mail), [1.0]);

    gate.notify_one();
    assert_eq!(first.await.unwrap(), Ok(1));
    assert_eq!(second.await.unwrap(), Err("refused"));
    let panics = pool.submit(async { panic!("boom") as u32 }).await.unwrap();
    assert!(panics.await.is_err(), "a panic is the handle's error");
    assert!(pool.drain(Duration::from_secs(10)).await.is_complete());

    assert_eq!(
        [
            outcome::OK,
            outcome::ERROR,
            outcome::PANICKED,
            outcome::REJECTED,
            outcome::CANCELLED
        ]
        .map(jobs),
        [1, 1, 1, 1, 0]
    );
    assert_eq!(capture.gauges("sd.pool.queue.depth", &mail), [0.0]);
    assert_eq!(capture.gauges("sd.pool.in_flight", &mail), [0.0]);
    assert_eq!(capture.samples("sd.pool.queue.wait_time", &mail).len(), 3);
    assert_eq!(capture.samples("sd.pool.job.duration", &mail).len(), 3);
}

#[tokio::test]
async fn each_partition_reports_its_watermark_lag() {
    let capture = Capture::new();
    let pool = Pool::builder()
        .name("orders")
        .workers(2)
        .queue(8)
        .build()
        .unwrap();
    let lag = |p: &str| {
        capture.gauges(
            "sd.pool.watermark.lag",
            &[(label::NAME, "orders"), (label::PARTITION, p)],
        )
    };
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    // Each partition's gauge is registered with its first job.
    let slow = capture.build(|| {
        pool.try_submit(Job::new(async move { g.notified().await }).with_offset(0, 10))
            .unwrap()
    });
    let other = capture.build(|| {
        pool.try_submit(Job::new(async {}).with_offset(1, 5))
            .unwrap()
    });
    other.await.unwrap();
    let mut done = Vec::new();
    for offset in 11..14 {
        done.push(
            pool.submit(Job::new(async {}).with_offset(0, offset))
                .await
                .unwrap(),
        );
    }
    for handle in done {
        handle.await.unwrap();
    }
    // Offsets 11 to 13 finished behind the unfinished 10: four not below the watermark.
    assert_eq!(lag("0"), [4.0]);
    assert_eq!(lag("1"), [0.0]);
    gate.notify_one();
    slow.await.unwrap();
    assert_eq!(lag("0"), [0.0]);
    assert_eq!(pool.watermark(0), Some(13));
}
