//! The in-memory outbox: rollback, commit, order per aggregate under concurrent
//! producers and relays, retries, dead letters, redrive, invalid input.
#![allow(clippy::unwrap_used)]

#[path = "common/config.rs"]
mod config;
#[path = "common/waits.rs"]
mod waits;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use config::invalid_field;
use proptest::prelude::*;
use sd_outbox::memory::{MemoryOutbox, MemoryRelay};
use sd_outbox::{Error, Event, MemoryPublisher, Message, Publisher, Result};
use waits::waits;

fn msg(aggregate: &str, n: u64) -> Message {
    Message::json("order", aggregate, "step", serde_json::json!({ "n": n }))
}

fn n_of(e: &Event) -> u64 {
    match &e.payload {
        sd_outbox::Payload::Json(v) => v["n"].as_u64().unwrap(),
        sd_outbox::Payload::Bytes(_) => panic!("json expected"),
    }
}

/// A sink that fails on demand: `fail_all`, or at a random point of a batch with
/// probability `flaky` percent (acknowledging the events before it, as the publisher
/// contract says).
#[derive(Clone, Default)]
struct Faulty {
    sink: MemoryPublisher,
    fail_all: Arc<AtomicBool>,
    flaky: Arc<AtomicU32>,
}

impl Publisher for Faulty {
    async fn publish(&self, events: &[Event]) -> Result<()> {
        if self.fail_all.load(Ordering::Relaxed) {
            return Err(Error::publish(0, "broker down"));
        }
        let flaky = self.flaky.load(Ordering::Relaxed);
        if flaky > 0 && rand::random_range(0..100) < flaky {
            let ok = rand::random_range(0..events.len());
            self.sink.publish(&events[..ok]).await?;
            return Err(Error::publish(ok, "flaky broker"));
        }
        // Yield so relays on other threads really overlap.
        tokio::task::yield_now().await;
        self.sink.publish(events).await
    }
}

fn quick<P: Publisher>(outbox: &MemoryOutbox, p: P, attempts: u32) -> MemoryRelay<P> {
    MemoryRelay::builder(outbox.clone(), p)
        .max_attempts(attempts)
        .retry(waits(Duration::from_millis(1), Duration::from_millis(4)))
        .poll_interval(Duration::from_millis(20))
        .batch_size(7)
        .build()
        .unwrap()
}

#[tokio::test]
async fn rolled_back_publishes_nothing_and_committed_publishes() {
    let outbox = MemoryOutbox::new();
    // Dropped without commit.
    let mut tx = outbox.begin();
    tx.enqueue(msg("ghost-1", 0)).unwrap();
    drop(tx);
    // Rolled back explicitly.
    let mut tx = outbox.begin();
    tx.enqueue(msg("ghost-2", 0)).unwrap();
    tx.rollback();
    // The closure failed.
    let r: std::result::Result<(), &str> = outbox.transaction(|tx| {
        tx.enqueue(msg("ghost-3", 0)).unwrap();
        Err("business rule refused the order")
    });
    assert!(r.is_err());
    // The business write under the lock failed.
    let mut tx = outbox.begin();
    tx.enqueue(msg("ghost-4", 0)).unwrap();
    assert!(tx.commit_with(|| Err::<(), _>("constraint")).is_err());
    assert_eq!(outbox.pending(), 0, "nothing rolled back is visible");

    // Committed: one transaction of two events, one through the closure, one with a
    // business write.
    let mut tx = outbox.begin();
    let a = tx.enqueue(msg("o-1", 0)).unwrap();
    let b = tx.enqueue(msg("o-1", 1)).unwrap();
    assert_eq!(tx.len(), 2);
    assert_eq!(tx.commit(), 2);
    let c = outbox.transaction(|tx| tx.enqueue(msg("o-2", 0))).unwrap();
    let mut rows = Vec::new();
    let mut tx = outbox.begin();
    let d = tx.enqueue(msg("o-3", 0)).unwrap();
    let (_, n) = tx
        .commit_with(|| {
            rows.push("o-3");
            Ok::<_, Error>(())
        })
        .unwrap();
    assert_eq!((n, rows), (1, vec!["o-3"]));
    assert_eq!(outbox.pending(), 4);

    let sink = MemoryPublisher::new();
    let relay = quick(&outbox, sink.clone(), 3);
    assert_eq!(relay.drain().await.unwrap(), 4);
    let ids: Vec<_> = sink.events().iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        vec![a, b, c, d],
        "committed events, in commit order, once"
    );
    assert_eq!(outbox.pending(), 0);
    assert_eq!(relay.published(), 4);
    assert!(
        sink.events()
            .iter()
            .all(|e| !e.aggregate_id.starts_with("ghost"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_per_aggregate_with_concurrent_producers_and_relays() {
    const PRODUCERS: u64 = 16;
    const AGGREGATES_EACH: u64 = 4;
    const EVENTS_EACH: u64 = 50;
    let outbox = MemoryOutbox::new();
    let faulty = Faulty::default();
    faulty.flaky.store(20, Ordering::Relaxed);
    // Three relays on one outbox, started before the producers.
    let relays: Vec<_> = (0..3)
        .map(|_| quick(&outbox, faulty.clone(), 1_000).spawn())
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                // Each producer owns its aggregates, so their commit order is the
                // producer's program order; transactions of 1 to 3 events interleave them.
                let mut next = vec![0u64; AGGREGATES_EACH as usize];
                let mut left = AGGREGATES_EACH * EVENTS_EACH;
                while left > 0 {
                    let mut tx = outbox.begin();
                    for _ in 0..rand::random_range(1..=3u64).min(left) {
                        let a = loop {
                            let a = rand::random_range(0..AGGREGATES_EACH as usize);
                            if next[a] < EVENTS_EACH {
                                break a;
                            }
                        };
                        tx.enqueue(msg(&format!("p{p}-a{a}"), next[a])).unwrap();
                        next[a] += 1;
                        left -= 1;
                    }
                    if rand::random_range(0..10) == 0 {
                        // A rolled-back transaction in the mix: its numbers are reused.
                        let mut ghost = outbox.begin();
                        ghost.enqueue(msg(&format!("p{p}-a0"), 999_999)).unwrap();
                        drop(ghost);
                    }
                    tx.commit();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    let total = (PRODUCERS * AGGREGATES_EACH * EVENTS_EACH) as usize;
    sd_testkit::eventually("every event at the sink", || async {
        faulty.sink.len() >= total
    })
    .await;
    for r in relays {
        r.shutdown().await;
    }
    let mut per_aggregate: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in faulty.sink.events() {
        per_aggregate
            .entry(e.aggregate_id.clone())
            .or_default()
            .push(n_of(&e));
    }
    assert_eq!(per_aggregate.len(), (PRODUCERS * AGGREGATES_EACH) as usize);
    let want: Vec<u64> = (0..EVENTS_EACH).collect();
    for (aggregate, got) in &per_aggregate {
        assert_eq!(got, &want, "{aggregate}: every event once, in commit order");
    }
    assert_eq!(outbox.pending(), 0);
    assert!(outbox.dead_letters().is_empty());
}

#[tokio::test]
async fn failing_publisher_retries_then_dead_letters_and_redrive_republishes() {
    let outbox = MemoryOutbox::new();
    let faulty = Faulty::default();
    faulty.fail_all.store(true, Ordering::Relaxed);
    let relay = quick(&outbox, faulty.clone(), 3);
    let first = outbox.transaction(|tx| tx.enqueue(msg("o-1", 0))).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    while outbox.dead_letters().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        let report = relay.run_once().await.unwrap();
        if report.failed {
            failures += 1;
            // The event is still pending until the cap, and its aggregate is held back.
            assert_eq!(outbox.pending(), usize::from(report.dead_lettered == 0));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(failures, 3, "exactly max_attempts attempts");
    assert_eq!((relay.failures(), relay.dead_lettered()), (3, 1));
    let dead = outbox.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.id, first);
    assert_eq!(dead[0].event.attempts, 3);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("broker down")
    );
    assert_eq!(outbox.pending(), 0);
    assert!(faulty.sink.is_empty());

    // The broker is back: later events of the aggregate go on without the dead one,
    // and a redrive sends it again with the same id, after them.
    faulty.fail_all.store(false, Ordering::Relaxed);
    let later = outbox.transaction(|tx| tx.enqueue(msg("o-1", 1))).unwrap();
    assert_eq!(relay.drain().await.unwrap(), 1);
    assert!(outbox.redrive(first));
    assert!(
        !outbox.redrive(first),
        "a redriven event is no dead letter any more"
    );
    assert!(outbox.dead_letters().is_empty());
    assert_eq!(relay.drain().await.unwrap(), 1);
    let ids: Vec<_> = faulty.sink.events().iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![later, first]);
    assert_eq!(faulty.sink.events()[1].attempts, 0, "a fresh attempt count");
    assert_eq!(outbox.redrive_all(), 0);
}

#[tokio::test]
async fn a_failing_event_holds_back_its_aggregate_only() {
    let outbox = MemoryOutbox::new();
    let faulty = Faulty::default();
    let relay = MemoryRelay::builder(outbox.clone(), faulty.clone())
        .max_attempts(10)
        // Long enough that the retry is not due during this test.
        .retry(waits(Duration::from_secs(3600), Duration::from_secs(3600)))
        .build()
        .unwrap();
    outbox
        .transaction(|tx| {
            tx.enqueue(msg("stuck", 0))?;
            tx.enqueue(msg("stuck", 1))?;
            tx.enqueue(msg("free", 0))?;
            Ok::<_, Error>(())
        })
        .unwrap();
    faulty.fail_all.store(true, Ordering::Relaxed);
    let report = relay.run_once().await.unwrap();
    assert!(report.failed && report.published == 0 && report.retry_in.is_some());
    faulty.fail_all.store(false, Ordering::Relaxed);
    assert_eq!(relay.drain().await.unwrap(), 1);
    let sent: Vec<_> = faulty
        .sink
        .events()
        .iter()
        .map(|e| e.aggregate_id.clone())
        .collect();
    assert_eq!(sent, vec!["free"], "stuck/1 waits behind stuck/0");
    assert_eq!(outbox.pending(), 2);
}

#[tokio::test]
async fn spawned_relay_publishes_commits_and_stops() {
    let outbox = MemoryOutbox::new();
    let sink = MemoryPublisher::new();
    let handle = MemoryRelay::builder(outbox.clone(), sink.clone())
        .build()
        .unwrap()
        .spawn();
    for n in 0..20 {
        outbox.transaction(|tx| tx.enqueue(msg("o-1", n))).unwrap();
    }
    sd_testkit::eventually("the relay published 20", || async { sink.len() >= 20 }).await;
    assert_eq!(handle.relay().published(), 20);
    handle.shutdown().await;
    let got: Vec<u64> = sink.events().iter().map(n_of).collect();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
}

#[test]
fn invalid_messages_and_options_are_refused() {
    let outbox = MemoryOutbox::new();
    let mut tx = outbox.begin();
    let bad = Message::json("", "o-1", "created", serde_json::json!({}));
    assert!(matches!(
        tx.enqueue(bad),
        Err(Error::InvalidMessage {
            field: "aggregate_type",
            ..
        })
    ));
    let bad = msg("o-1", 0).header("bad:name", "x");
    assert!(matches!(
        tx.enqueue(bad),
        Err(Error::InvalidMessage {
            field: "headers",
            ..
        })
    ));
    let long = "x".repeat(sd_outbox::MAX_FIELD_LEN + 1);
    assert!(matches!(
        tx.enqueue(Message::json("order", "o-1", long, serde_json::json!({}))),
        Err(Error::InvalidMessage {
            field: "event_type",
            ..
        })
    ));
    // The transaction stays usable; only the valid message commits.
    tx.enqueue(msg("o-1", 0)).unwrap();
    assert_eq!(tx.commit(), 1);
    assert_eq!(outbox.pending(), 1);

    let sink = MemoryPublisher::new();
    let field =
        |b: sd_outbox::memory::MemoryRelayBuilder<MemoryPublisher>| invalid_field(b.build());
    let b = || MemoryRelay::builder(outbox.clone(), sink.clone());
    assert_eq!(field(b().batch_size(0)), "batch_size");
    assert_eq!(field(b().max_attempts(0)), "max_attempts");
    assert_eq!(field(b().poll_interval(Duration::ZERO)), "poll_interval");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any interleaving of commits, rollbacks and flaky batches: every committed event
    /// arrives, nothing rolled back does, each aggregate in commit order.
    #[test]
    fn committed_arrive_in_order_rolled_back_never(
        ops in proptest::collection::vec((0u8..4, 0usize..3, any::<bool>()), 1..60),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let outbox = MemoryOutbox::new();
            let faulty = Faulty::default();
            let relay = MemoryRelay::builder(outbox.clone(), faulty.clone())
                .max_attempts(u32::MAX)
                .retry(waits(Duration::from_micros(1), Duration::from_micros(1)))
                .batch_size(3)
                .build()
                .unwrap();
            let mut next = [0u64; 3];
            let mut committed: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for (op, aggregate, commit) in ops {
                match op {
                    0 | 1 => {
                        let mut tx = outbox.begin();
                        let name = format!("a{aggregate}");
                        tx.enqueue(msg(&name, next[aggregate])).unwrap();
                        if commit {
                            tx.commit();
                            committed.entry(name).or_default().push(next[aggregate]);
                            next[aggregate] += 1;
                        } else {
                            tx.enqueue(msg("ghost", 0)).unwrap();
                        }
                    }
                    2 => {
                        faulty.flaky.store(if commit { 60 } else { 0 }, Ordering::Relaxed);
                        relay.run_once().await.unwrap();
                    }
                    _ => {
                        faulty.flaky.store(0, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        relay.drain().await.unwrap();
                    }
                }
            }
            faulty.flaky.store(0, Ordering::Relaxed);
            while outbox.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                relay.drain().await.unwrap();
            }
            let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for e in faulty.sink.events() {
                got.entry(e.aggregate_id.clone()).or_default().push(n_of(&e));
            }
            assert_eq!(got, committed);
        });
    }
}

#[tokio::test]
async fn the_memory_publisher_keeps_the_publisher_contract() {
    let sink = MemoryPublisher::new();
    let read = |aggregate_type: String| {
        let sink = sink.clone();
        async move {
            sink.events()
                .into_iter()
                .filter(|e| e.aggregate_type == aggregate_type)
                .map(|e| e.id)
                .collect::<Vec<_>>()
        }
    };
    sd_outbox::conformance::run_all(&sink, read).await;
}
