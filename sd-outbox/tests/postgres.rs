//! The outbox and relay on a real PostgreSQL with the memory sink: transactions,
//! crashes, the sequence-gap trap, parallel relays, lost notifications, dead letters,
//! retention, a restarted database, ordered failover, bad configuration.
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use sd_outbox::postgres::{Inbox, Mode, Outbox, Relay, RelayHandle};
use sd_outbox::{Error, Event, MemoryPublisher, Message, Publisher};
use sd_testkit::retry_until_ok;
use uuid::Uuid;

fn ids(memory: &MemoryPublisher) -> Vec<Uuid> {
    memory.events().iter().map(|e| e.id).collect()
}

fn relay(
    outbox: &Outbox,
    memory: &MemoryPublisher,
    mode: Mode,
) -> sd_outbox::postgres::RelayHandle {
    Relay::builder(outbox.clone(), memory.clone())
        .mode(mode)
        .poll_interval(Duration::from_millis(200))
        .standby_interval(Duration::from_millis(100))
        .build()
        .unwrap()
        .spawn()
}

/// What `memory` received, as (aggregate, `n`, id) in arrival order.
fn per_aggregate(memory: &MemoryPublisher) -> Vec<(String, usize, Uuid)> {
    memory
        .events()
        .iter()
        .map(|e| (e.aggregate_id.clone(), n_of(e), e.id))
        .collect()
}

/// Runs `test` with an outbox, a memory sink and one relay to it in `mode`.
fn with_memory_relay<F, Fut>(mode: Mode, test: F)
where
    F: FnOnce(Outbox, MemoryPublisher, RelayHandle) -> Fut,
    Fut: Future<Output = ()>,
{
    with_outbox(|outbox| async move {
        let memory = MemoryPublisher::new();
        let relay = relay(&outbox, &memory, mode);
        test(outbox, memory, relay).await;
    });
}

#[test]
fn rolled_back_publishes_nothing_committed_is_published() {
    with_memory_relay(Mode::Parallel, |outbox, memory, relay| async move {
        for mode_round in 0..2 {
            let mut tx = outbox.pool().begin().await.unwrap();
            let lost = outbox
                .enqueue(&mut tx, order_event("o1", mode_round))
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            let kept = write(&outbox, order_event("o1", mode_round)).await;
            eventually("the committed event", || async {
                ids(&memory).contains(&kept)
            })
            .await;
            eventually("the marks", || drained(&outbox)).await;
            assert!(
                !ids(&memory).contains(&lost),
                "a rolled-back event was published"
            );
        }
        let events = memory.events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].aggregate_type, "order");
        assert_eq!(events[0].event_type, "order_changed");
        relay.shutdown().await;
    });
}

#[test]
fn payloads_and_headers_round_trip() {
    with_memory_relay(Mode::Ordered, |outbox, memory, relay| async move {
        let bytes = write(
            &outbox,
            Message::bytes("invoice", "i-1", "issued", vec![0u8, 159, 146, 150])
                .header("trace-id", "abc"),
        )
        .await;
        let json = write(
            &outbox,
            Message::json(
                "invoice",
                "i-1",
                "paid",
                serde_json::json!({"amount": 12.5}),
            ),
        )
        .await;
        eventually("both events", || async { memory.len() == 2 }).await;
        let events = memory.events();
        assert_eq!(events[0].id, bytes);
        assert_eq!(
            events[0].payload,
            sd_outbox::Payload::Bytes(vec![0, 159, 146, 150])
        );
        assert_eq!(
            events[0].headers.get("trace-id").map(String::as_str),
            Some("abc")
        );
        assert_eq!(events[1].id, json);
        assert_eq!(
            events[1].payload,
            sd_outbox::Payload::Json(serde_json::json!({"amount": 12.5}))
        );
        relay.shutdown().await;
    });
}

#[test]
fn crash_after_publish_before_mark_republishes_and_the_inbox_absorbs_it() {
    with_outbox(|outbox| async move {
        let inbox = Inbox::builder().build(outbox.pool().clone()).unwrap();
        inbox.migrate().await.unwrap();
        inbox.migrate().await.unwrap();
        for mode in [Mode::Parallel, Mode::Ordered] {
            let memory = MemoryPublisher::new();
            let id = write(&outbox, order_event("o-crash", 0)).await;
            let relay = crash_after_publish(
                &outbox,
                &memory,
                mode,
                1,
                || async { memory.len() == 1 },
                || relay(&outbox, &memory, mode),
            )
            .await;
            let delivered = ids(&memory);
            assert_eq!(delivered, vec![id, id], "{mode:?}: the same id twice");
            // The consumer applies both deliveries; the inbox lets one through.
            let effects = consume_all(&inbox, outbox.pool(), delivered).await;
            assert_eq!(effects, vec![true, false]);
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
                .bind(id)
                .fetch_one(outbox.pool())
                .await
                .unwrap();
            assert_eq!(n, 1);
            relay.shutdown().await;
        }
    });
}

#[test]
fn inbox_forgets_a_rolled_back_handler_and_sweeps() {
    with_outbox(|outbox| async move {
        let inbox = Inbox::builder()
            .table("billing_inbox")
            .build(outbox.pool().clone())
            .unwrap();
        inbox.migrate().await.unwrap();
        let id = sd_outbox::new_id();
        let mut tx = outbox.pool().begin().await.unwrap();
        assert!(inbox.receive(&mut tx, "billing", id).await.unwrap());
        tx.rollback().await.unwrap();
        // The handler failed: the redelivery runs it again.
        assert!(consume(&inbox, outbox.pool(), id).await);
        assert!(!consume(&inbox, outbox.pool(), id).await);
        // Another consumer sees it for the first time.
        let mut tx = outbox.pool().begin().await.unwrap();
        assert!(inbox.receive(&mut tx, "shipping", id).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(inbox.sweep(Duration::from_secs(3600)).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(inbox.sweep(Duration::from_millis(1)).await.unwrap(), 2);
        let mut tx = outbox.pool().begin().await.unwrap();
        let err = inbox.receive(&mut tx, "", id).await.unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidMessage {
                field: "consumer",
                ..
            }
        ));
    });
}

#[test]
fn a_lower_id_committed_after_a_higher_one_is_published() {
    with_outbox(|outbox| async move {
        for mode in [Mode::Parallel, Mode::Ordered] {
            let memory = MemoryPublisher::new();
            let relay = relay(&outbox, &memory, mode);
            // The lower id (and seq, and xid) is written first and held open.
            let mut low_tx = outbox.pool().begin().await.unwrap();
            let low = outbox
                .enqueue(&mut low_tx, order_event("gap-a", 0))
                .await
                .unwrap();
            let high = write(&outbox, order_event("gap-b", 0)).await;
            assert!(low < high);
            if mode == Mode::Parallel {
                eventually("the higher id", || async { ids(&memory) == vec![high] }).await;
            } else {
                // Ordered mode waits for the older transaction: two more batches than
                // now, so one started after `high` was committed, and still nothing.
                let ran = relay.metrics().await.unwrap().batches;
                eventually("two more ordered batches", || async {
                    relay.metrics().await.unwrap().batches >= ran + 2
                })
                .await;
                assert!(
                    memory.is_empty(),
                    "ordered mode passed an open older transaction"
                );
            }
            low_tx.commit().await.unwrap();
            eventually("the lower id", || async { memory.len() == 2 }).await;
            let delivered = ids(&memory);
            match mode {
                Mode::Parallel => assert_eq!(delivered, vec![high, low]),
                Mode::Ordered => assert_eq!(delivered, vec![low, high], "transaction order"),
            }
            eventually("the marks", || drained(&outbox)).await;
            relay.shutdown().await;
        }
    });
}

#[test]
fn three_parallel_relays_lose_nothing_and_keep_order_per_aggregate() {
    const AGGREGATES: usize = 50;
    const PER_AGGREGATE: usize = 200;
    with_outbox(|outbox| async move {
        let memory = MemoryPublisher::new();
        let relays: Vec<_> = (0..3)
            .map(|_| {
                Relay::builder(outbox.clone(), memory.clone())
                    .mode(Mode::Parallel)
                    .lanes_per_claim(8)
                    .build()
                    .unwrap()
                    .spawn()
            })
            .collect();
        write_concurrently(&outbox, AGGREGATES, PER_AGGREGATE).await;
        let total = AGGREGATES * PER_AGGREGATE;
        // In two stages, each under the testkit's hang guard: a loaded machine is slow.
        eventually("half the events", || async { memory.len() >= total / 2 }).await;
        eventually("all events", || async {
            memory.len() >= total && drained(&outbox).await
        })
        .await;
        let events = per_aggregate(&memory);
        assert_eq!(events.len(), total, "no duplicates without faults");
        assert_order_per_aggregate(&events, PER_AGGREGATE);
        let mut shares = Vec::new();
        for relay in relays {
            let m = relay.metrics().await.unwrap();
            assert_eq!(m.backlog, 0);
            assert_eq!(m.failures, 0);
            shares.push(m.published);
            relay.shutdown().await;
        }
        assert_eq!(shares.iter().sum::<u64>(), total as u64);
        eprintln!("published per relay: {shares:?}");
    });
}

#[test]
fn lost_notifications_the_poll_still_delivers() {
    with_outbox(|outbox| async move {
        for (listen, channel) in [(false, None), (true, Some("nobody_notifies_here"))] {
            let memory = MemoryPublisher::new();
            let mut builder = Relay::builder(outbox.clone(), memory.clone())
                .listen(listen)
                .poll_interval(Duration::from_millis(100));
            if let Some(channel) = channel {
                builder = builder.channel(channel);
            }
            let relay = builder.build().unwrap().spawn();
            let mut expected = Vec::new();
            for n in 0..20 {
                expected.push(write(&outbox, order_event("poll", n)).await);
            }
            eventually("polled events", || async { memory.len() == 20 }).await;
            assert_eq!(ids(&memory), expected);
            relay.shutdown().await;
        }
    });
}

/// Refuses every event of type `poison` while `refuse` is set.
#[derive(Clone)]
struct Poison {
    memory: MemoryPublisher,
    refuse: Arc<AtomicBool>,
}

impl Publisher for Poison {
    fn publish(&self, events: &[Event]) -> impl Future<Output = sd_outbox::Result<()>> + Send {
        let refuse = self.refuse.load(Ordering::SeqCst);
        let cut = events
            .iter()
            .position(|e| refuse && e.event_type == "poison")
            .unwrap_or(events.len());
        let published = self.memory.publish(&events[..cut]);
        async move {
            published.await?;
            if cut < events.len() {
                Err(Error::publish(cut, "the broker rejects poison"))
            } else {
                Ok(())
            }
        }
    }
}

#[test]
fn attempt_cap_dead_letters_and_redrive_republishes() {
    with_outbox(|outbox| async move {
        for mode in [Mode::Parallel, Mode::Ordered] {
            let memory = MemoryPublisher::new();
            let refuse = Arc::new(AtomicBool::new(true));
            let poisoned = Poison {
                memory: memory.clone(),
                refuse: refuse.clone(),
            };
            let relay = impatient_relay(&outbox, poisoned, mode, 3);
            let poison = write(
                &outbox,
                Message::json("order", "sick", "poison", serde_json::json!({})),
            )
            .await;
            let after = write(&outbox, order_event("sick", 1)).await;
            let other = write(&outbox, order_event("healthy", 0)).await;
            eventually("both healthy events", || async { memory.len() == 2 }).await;
            let delivered = ids(&memory);
            if mode == Mode::Ordered {
                assert_eq!(
                    delivered,
                    vec![after, other],
                    "strict order after the dead letter"
                );
            } else {
                // Per aggregate: `after` waited for `poison` to die.
                assert!(delivered.contains(&after) && delivered.contains(&other));
            }
            let dead = outbox.dead_letters(10).await.unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].event.id, poison);
            assert_eq!(dead[0].event.attempts, 3);
            assert!(dead[0].last_error.as_deref().unwrap().contains("poison"));
            let m = relay.metrics().await.unwrap();
            assert_eq!(
                (m.failures, m.dead_lettered, m.dead, m.backlog),
                (3, 1, 1, 0)
            );
            // Fixed broker: redrive it.
            refuse.store(false, Ordering::SeqCst);
            assert!(outbox.redrive(poison).await.unwrap());
            assert!(!outbox.redrive(poison).await.unwrap(), "no longer dead");
            eventually("the redriven event", || async { memory.len() == 3 }).await;
            assert_eq!(ids(&memory)[2], poison);
            assert!(outbox.dead_letters(10).await.unwrap().is_empty());
            relay.shutdown().await;
            // Clean up for the next mode.
            assert_eq!(outbox.sweep(Duration::ZERO).await.unwrap(), 3);
        }
    });
}

#[test]
fn retention_sweep_deletes_only_published_rows() {
    with_outbox(|outbox| async move {
        let memory = MemoryPublisher::new();
        for n in 0..5 {
            write(&outbox, order_event("r", n)).await;
        }
        let relay = Relay::builder(outbox.clone(), memory.clone())
            .retention(Some(Duration::from_millis(1)))
            .sweep_interval(Duration::from_millis(50))
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap()
            .spawn();
        eventually("the sweep", || async {
            let s = outbox.stats().await.unwrap();
            memory.len() == 5 && s.published == 0 && s.backlog == 0
        })
        .await;
        relay.shutdown().await;
        // A pending row and a dead one survive a sweep.
        let pending = write(&outbox, order_event("r", 5)).await;
        let dead = write(&outbox, order_event("r2", 0)).await;
        sqlx::query("UPDATE events_outbox SET status = 'dead' WHERE id = $1")
            .bind(dead)
            .execute(outbox.pool())
            .await
            .unwrap();
        assert_eq!(outbox.sweep(Duration::ZERO).await.unwrap(), 0);
        let s = outbox.stats().await.unwrap();
        assert_eq!((s.backlog, s.dead), (1, 1));
        assert!(s.oldest_pending_age.is_some());
        assert!(outbox.purge_dead(dead).await.unwrap());
        assert!(
            !outbox.purge_dead(pending).await.unwrap(),
            "pending rows are not purged"
        );
    });
}

#[test]
fn postgres_restarted_under_the_relay_it_reconnects_and_carries_on() {
    let mut server = sd_testkit::PostgresServer::start().expect("a postgres server");
    let db = server.create_database().expect("a database");
    runtime().block_on(async {
        let outbox = outbox(db.url()).await;
        for mode in [Mode::Parallel, Mode::Ordered] {
            let memory = MemoryPublisher::new();
            let relay = relay(&outbox, &memory, mode);
            let mut expected = Vec::new();
            for n in 0..50 {
                expected.push(write(&outbox, order_event(&format!("{mode:?}"), n)).await);
            }
            eventually("the first half", || async { memory.len() >= 50 }).await;
            server.restart().unwrap();
            for n in 50..100 {
                // The pool reconnects; a write may meet a dead connection once.
                let (id, _) = retry_until_ok(Duration::from_millis(100), || async {
                    let mut tx = outbox.pool().begin().await?;
                    let id = outbox
                        .enqueue(&mut tx, order_event(&format!("{mode:?}"), n))
                        .await
                        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(id)
                })
                .await;
                expected.push(id);
            }
            eventually("the second half", || async {
                let got = ids(&memory);
                expected.iter().all(|id| got.contains(id))
            })
            .await;
            let events = per_aggregate(&memory);
            assert_order_per_aggregate(&events, 100);
            eventually("the relay reports active", || async { relay.is_active() }).await;
            relay.shutdown().await;
        }
    });
}

#[test]
fn ordered_mode_one_active_relay_and_a_standby_takes_over() {
    with_outbox(|outbox| async move {
        let memory = MemoryPublisher::new();
        let a = relay(&outbox, &memory, Mode::Ordered);
        let b = relay(&outbox, &memory, Mode::Ordered);
        eventually("one active relay", || async {
            a.is_active() || b.is_active()
        })
        .await;
        let (active, standby) = if a.is_active() { (a, b) } else { (b, a) };
        let mut expected = Vec::new();
        for n in 0..100 {
            expected.push(write(&outbox, order_event("fo", n)).await);
        }
        eventually("the first hundred", || async { memory.len() >= 100 }).await;
        assert!(!standby.is_active());
        assert_eq!(
            standby.published(),
            0,
            "the standby published while the other was active"
        );
        active.abort().await;
        eventually("the standby takes over", || async { standby.is_active() }).await;
        for n in 100..200 {
            expected.push(write(&outbox, order_event("fo", n)).await);
        }
        eventually("everything", || async {
            drained(&outbox).await && memory.len() >= 200
        })
        .await;
        let mut seen = std::collections::HashSet::new();
        let order: Vec<Uuid> = ids(&memory)
            .into_iter()
            .filter(|id| seen.insert(*id))
            .collect();
        assert_eq!(order, expected, "commit order across the failover");
        standby.shutdown().await;
    });
}

#[test]
fn bad_configuration_is_refused_naming_the_field() {
    runtime().block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap();
        for bad in ["", "Outbox", "1abc", "a;drop table x", &"a".repeat(49)] {
            // The outbox's and the inbox's tables follow one rule.
            let errors = [
                Outbox::builder().table(bad).build(pool.clone()).err(),
                Inbox::builder().table(bad).build(pool.clone()).err(),
            ];
            for err in errors {
                assert!(
                    matches!(err, Some(Error::InvalidConfig { field: "table", .. })),
                    "{bad}: {err:?}"
                );
            }
        }
        let outbox = Outbox::new(pool.clone()).unwrap();
        type B = sd_outbox::postgres::RelayBuilder<MemoryPublisher>;
        type Set = Box<dyn Fn(B) -> B>;
        let cases: Vec<(&str, Set)> = vec![
            ("batch_size", Box::new(|b: B| b.batch_size(0))),
            ("batch_size", Box::new(|b: B| b.batch_size(10_001))),
            (
                "poll_interval",
                Box::new(|b: B| b.poll_interval(Duration::ZERO)),
            ),
            ("max_attempts", Box::new(|b: B| b.max_attempts(0))),
            (
                "retention",
                Box::new(|b: B| b.retention(Some(Duration::ZERO))),
            ),
            (
                "sweep_interval",
                Box::new(|b: B| b.sweep_interval(Duration::ZERO)),
            ),
            ("lanes_per_claim", Box::new(|b: B| b.lanes_per_claim(0))),
            ("lanes_per_claim", Box::new(|b: B| b.lanes_per_claim(65))),
            (
                "standby_interval",
                Box::new(|b: B| b.standby_interval(Duration::ZERO)),
            ),
            ("group", Box::new(|b: B| b.group(""))),
            ("channel", Box::new(|b: B| b.channel("Bad Channel"))),
            ("timeout", Box::new(|b: B| b.timeout(Duration::ZERO))),
        ];
        for (field, set) in cases {
            let built = set(Relay::builder(outbox.clone(), MemoryPublisher::new())).build();
            assert_eq!(invalid_field(built), field);
        }
        assert!(
            Relay::builder(outbox.clone(), MemoryPublisher::new())
                .build()
                .is_ok()
        );
    });
}

#[test]
fn invalid_messages_are_refused_before_the_database() {
    with_outbox(|outbox| async move {
        let mut tx = outbox.pool().begin().await.unwrap();
        let err = outbox
            .enqueue(&mut tx, Message::json("", "1", "t", serde_json::json!(1)))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidMessage {
                field: "aggregate_type",
                ..
            }
        ));
        // The transaction is still usable.
        outbox.enqueue(&mut tx, order_event("ok", 0)).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(outbox.stats().await.unwrap().backlog, 1);
    });
}

#[test]
fn metrics_report_backlog_lag_and_rate() {
    with_outbox(|outbox| async move {
        for n in 0..5 {
            write(&outbox, order_event("m", n)).await;
        }
        let s = outbox.stats().await.unwrap();
        assert_eq!(s.backlog, 5);
        assert!(s.oldest_pending_age.is_some());
        let memory = MemoryPublisher::new();
        let relay = relay(&outbox, &memory, Mode::Parallel);
        eventually("published", || async { memory.len() == 5 }).await;
        let m = relay.metrics().await.unwrap();
        assert_eq!(m.backlog, 0);
        assert_eq!(m.oldest_unpublished_age, None);
        assert_eq!(m.published, 5);
        assert!(m.publish_rate > 0.0);
        assert!(m.active);
        assert!(m.batches >= 1);
        relay.shutdown().await;
    });
}

#[test]
fn shipped_migrations_apply_with_psql_as_they_stand_and_are_recorded_once() {
    let db = sd_testkit::database()
        .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
    // Written for the default names: no templates, they apply as they stand.
    db.psql(include_str!("../migrations/0001_outbox.sql"))
        .unwrap();
    db.psql(include_str!("../migrations/0002_inbox.sql"))
        .unwrap();
    runtime().block_on(async {
        let pool = pool(db.url()).await;
        let outbox = Outbox::new(pool.clone()).unwrap();
        let inbox = Inbox::builder().build(pool.clone()).unwrap();
        for _ in 0..2 {
            outbox.migrate().await.unwrap();
            inbox.migrate().await.unwrap();
        }
        let applied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sd_migrations WHERE component LIKE 'sd-outbox%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(applied, 2, "one ledger row per file");
        let mut tx = pool.begin().await.unwrap();
        let id = outbox
            .enqueue(
                &mut tx,
                Message::json("order", "o-1", "t", serde_json::json!(1)),
            )
            .await
            .unwrap();
        assert!(inbox.receive(&mut tx, "c", id).await.unwrap());
        tx.commit().await.unwrap();
        assert_eq!(outbox.stats().await.unwrap().backlog, 1);
        // A configured name is put in by the migrator; a schema is refused for the outbox
        // (its lanes, type and trigger are named after it) and taken for the inbox.
        let custom = Outbox::builder()
            .table("billing_events")
            .build(pool.clone());
        let sql = &custom.unwrap().migrator().render()[0].sql;
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS billing_events ("));
        assert!(sql.contains("billing_events_lanes") && !sql.contains("outbox"));
        assert!(matches!(
            Outbox::builder()
                .table("billing.events")
                .build(pool.clone()),
            Err(Error::InvalidConfig { field: "table", .. })
        ));
        assert!(Inbox::builder().table("billing.seen").build(pool).is_ok());
    });
}
