//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use sd_outbox::postgres::{Inbox, Mode, Outbox, Relay, RelayHandle};
use sd_outbox::{Event, Message, Publisher};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

mod config;
mod waits;
#[allow(unused_imports)] // not every test binary checks a configuration error
pub use config::invalid_field;
pub use sd_testkit::{eventually, runtime};
pub use waits::waits;

pub async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .unwrap()
}

/// A migrated outbox (migrated twice: it must be idempotent) on `url`.
pub async fn outbox(url: &str) -> Outbox {
    let outbox = Outbox::builder()
        .table("events_outbox")
        .build(pool(url).await)
        .unwrap();
    outbox.migrate().await.unwrap();
    outbox.migrate().await.unwrap();
    for table in [
        "CREATE TABLE IF NOT EXISTS orders (id UUID PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS effects (n BIGSERIAL, message_id UUID)",
    ] {
        sqlx::query(table).execute(outbox.pool()).await.unwrap();
    }
    outbox
}

/// Runs `test` on a migrated outbox in a fresh database.
pub fn with_outbox<F, Fut>(test: F)
where
    F: FnOnce(Outbox) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = sd_testkit::database()
        .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
    runtime().block_on(async { test(outbox(db.url()).await).await });
}

/// Runs `sql`, an INSERT of the one value `$1`, with `id` in `tx`.
async fn insert_id(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, sql: &'static str, id: Uuid) {
    sqlx::query(sql).bind(id).execute(&mut **tx).await.unwrap();
}

/// Enqueues `message` in a transaction of its own that also writes a business row.
pub async fn write(outbox: &Outbox, message: Message) -> Uuid {
    let mut tx = outbox.pool().begin().await.unwrap();
    let id = outbox.enqueue(&mut tx, message).await.unwrap();
    insert_id(&mut tx, "INSERT INTO orders (id) VALUES ($1)", id).await;
    tx.commit().await.unwrap();
    id
}

pub fn order_event(aggregate: &str, n: usize) -> Message {
    Message::json(
        "order",
        aggregate,
        "order_changed",
        serde_json::json!({ "n": n }),
    )
}

pub fn n_of(event: &Event) -> usize {
    match &event.payload {
        sd_outbox::Payload::Json(v) => v["n"].as_u64().unwrap() as usize,
        sd_outbox::Payload::Bytes(_) => panic!("json expected"),
    }
}

/// Asserts every aggregate's events arrived in order, without gaps once deduplicated.
pub fn assert_order_per_aggregate(events: &[(String, usize, Uuid)], per_aggregate: usize) {
    let mut seen = HashSet::new();
    let mut next: HashMap<&str, usize> = HashMap::new();
    for (aggregate, n, id) in events {
        if !seen.insert(*id) {
            continue; // a redelivery: the inbox's business
        }
        let expected = next.entry(aggregate.as_str()).or_insert(0);
        assert_eq!(*n, *expected, "aggregate {aggregate} out of order");
        *expected += 1;
    }
    for (aggregate, count) in next {
        assert_eq!(count, per_aggregate, "aggregate {aggregate} lost events");
    }
}

/// Applies `event` once per consumer through the inbox; true when it had an effect.
pub async fn consume(inbox: &Inbox, pool: &PgPool, id: Uuid) -> bool {
    let mut tx = pool.begin().await.unwrap();
    let first = inbox.receive(&mut tx, "billing", id).await.unwrap();
    if first {
        insert_id(&mut tx, "INSERT INTO effects (message_id) VALUES ($1)", id).await;
    }
    tx.commit().await.unwrap();
    first
}

/// [`consume`] of each of `ids` in turn, as a consumer reading them off a broker would:
/// whether each had an effect.
pub async fn consume_all(
    inbox: &Inbox,
    pool: &PgPool,
    ids: impl IntoIterator<Item = Uuid>,
) -> Vec<bool> {
    let mut effects = Vec::new();
    for id in ids {
        effects.push(consume(inbox, pool, id).await);
    }
    effects
}

/// How many of `effects` are true.
pub fn applied(effects: &[bool]) -> usize {
    effects.iter().filter(|&&e| e).count()
}

/// Publishes through the inner sink (acknowledged), then never returns: the relay is
/// aborted between the broker's acknowledgement and marking the rows, as in a crash.
#[derive(Clone)]
pub struct PublishThenHang<P>(pub P);

impl<P: Publisher + Clone> Publisher for PublishThenHang<P> {
    fn publish(&self, events: &[Event]) -> impl Future<Output = sd_outbox::Result<()>> + Send {
        let publish = self.0.publish(events);
        async move {
            publish.await?;
            std::future::pending::<()>().await;
            Ok(())
        }
    }
}

/// Nothing is left to publish.
pub async fn drained(outbox: &Outbox) -> bool {
    outbox.stats().await.unwrap().backlog == 0
}

/// The crash between the broker's acknowledgement and marking the rows: a relay of `mode`
/// over `publisher` publishes, then hangs until it is aborted once `published` holds; the
/// `sent` rows it published are still pending. Then `fresh` starts a relay over the real
/// publisher, which is returned once it has published them again.
pub async fn crash_after_publish<P, F, Fut>(
    outbox: &Outbox,
    publisher: &P,
    mode: Mode,
    sent: u64,
    published: F,
    fresh: impl FnOnce() -> RelayHandle,
) -> RelayHandle
where
    P: Publisher + Clone,
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let crashing = Relay::builder(outbox.clone(), PublishThenHang(publisher.clone()))
        .mode(mode)
        .build()
        .unwrap()
        .spawn();
    eventually("the first publish", published).await;
    crashing.abort().await;
    assert_eq!(outbox.stats().await.unwrap().backlog, sent, "not marked");
    let relay = fresh();
    eventually("the republish", || drained(outbox)).await;
    relay
}

/// An ordered relay over `publisher` with the default options.
pub fn ordered_relay<P: Publisher>(outbox: &Outbox, publisher: P) -> RelayHandle {
    Relay::builder(outbox.clone(), publisher)
        .mode(Mode::Ordered)
        .build()
        .unwrap()
        .spawn()
}

/// A relay of `mode` that dead-letters a row after `max_attempts`, its waits from 10 ms
/// doubling to at most 40 ms, polling every 50 ms: for dead-letter tests.
pub fn impatient_relay<P: Publisher>(
    outbox: &Outbox,
    publisher: P,
    mode: Mode,
    max_attempts: u32,
) -> RelayHandle {
    Relay::builder(outbox.clone(), publisher)
        .mode(mode)
        .max_attempts(max_attempts)
        .retry(waits(Duration::from_millis(10), Duration::from_millis(40)))
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap()
        .spawn()
}

/// Two parallel relays that retry quickly and never give up: for broker outages.
pub fn outage_relays<P: Publisher + Clone>(outbox: &Outbox, publisher: &P) -> Vec<RelayHandle> {
    (0..2)
        .map(|_| {
            Relay::builder(outbox.clone(), publisher.clone())
                .poll_interval(Duration::from_millis(100))
                .retry(waits(Duration::from_millis(50), Duration::from_millis(400)))
                .max_attempts(10_000)
                .build()
                .unwrap()
                .spawn()
        })
        .collect()
}

/// The end of an outage test, once the broker is back: the backlog drains, the sink
/// (`read` gives its id, aggregate, `n` and subject or stream per message) holds every
/// aggregate's `per_aggregate` events in order, none died, and the relays shut down.
pub async fn drains_in_order<F, Fut>(
    outbox: &Outbox,
    relays: Vec<RelayHandle>,
    per_aggregate: usize,
    read: F,
) where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Vec<(Uuid, String, usize, String)>>,
{
    eventually("the drain", || drained(outbox)).await;
    let got: Vec<_> = read()
        .await
        .into_iter()
        .map(|(id, aggregate, n, _)| (aggregate, n, id))
        .collect();
    assert_order_per_aggregate(&got, per_aggregate);
    assert_eq!(outbox.stats().await.unwrap().dead, 0);
    for relay in relays {
        relay.shutdown().await;
    }
}

/// Writes events `range` round-robin over five aggregates `a0`..`a4`.
pub async fn write_round_robin(outbox: &Outbox, range: std::ops::Range<usize>) {
    for n in range {
        write(outbox, order_event(&format!("a{}", n % 5), n / 5)).await;
    }
}

/// Waits until the relays have met publish failures.
pub async fn failures_seen(relays: &[RelayHandle]) {
    eventually("publish failures", || async {
        let mut failures = 0;
        for relay in relays {
            failures += relay.metrics().await.unwrap().failures;
        }
        failures > 0
    })
    .await;
}

/// Ten writers, `aggregates / 10` aggregates each, five events per transaction:
/// `per_aggregate` events (`n` = 0, 1, ...) for each of `agg-0` .. `agg-{aggregates-1}`.
pub async fn write_concurrently(outbox: &Outbox, aggregates: usize, per_aggregate: usize) {
    let writers: Vec<_> = (0..10)
        .map(|w| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for n in (0..per_aggregate).step_by(5) {
                    for a in 0..aggregates / 10 {
                        let aggregate = format!("agg-{}", w * (aggregates / 10) + a);
                        let mut tx = outbox.pool().begin().await.unwrap();
                        for k in n..(n + 5).min(per_aggregate) {
                            outbox
                                .enqueue(&mut tx, order_event(&aggregate, k))
                                .await
                                .unwrap();
                        }
                        tx.commit().await.unwrap();
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}
