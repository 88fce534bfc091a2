//! The order table with its outbox, the relay, and the consumers of `OrderPlaced`.
//!
//! On PostgreSQL the order row and its `OrderPlaced` event commit in one transaction
//! (`sd_outbox::postgres::Outbox::enqueue`) and sd-outbox's `Relay` publishes them. On
//! memory the event goes through sd-outbox's in-memory outbox: it is staged in a
//! `MemoryTx` and `commit_with` stores the order row under the outbox lock, appending
//! the event only if the row was written (a retried step writes neither), so no relay
//! sees an event before its row; a `MemoryRelay` publishes it. Both relays publish to the
//! same [`Fanout`], at least once, in order per order, retrying a failed publish with
//! backoff and dead-lettering after 10 attempts. The memory outbox lives in the process:
//! pending events are lost on restart, which is fine for a run that keeps its orders in
//! memory too.
//!
//! The publisher hands every event to each consumer as an sd-pool job keyed by order id
//! (so one order's events are handled in order) and acknowledges the batch once every
//! job finished. Delivery is at least once, so each consumer drops a redelivery by event
//! id: in an `Inbox` row written in its handler's transaction on PostgreSQL, in a set on
//! memory.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use sd_outbox::memory::{MemoryOutbox, MemoryRelay, MemoryRelayHandle};
use sd_outbox::postgres::{Inbox, Outbox, Relay, RelayHandle};
use sd_outbox::{Event, MemoryPublisher, Message, Publisher};
use sd_pool::{Job, Order, Pool};
use sqlx::PgPool;

use super::participants::lock;

/// The consumers of `OrderPlaced`: each gets every event.
pub(crate) const CONSUMERS: [&str; 2] = ["shipping", "email"];

/// An order row, as the order service stores it when the saga confirms.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct OrderData {
    pub(crate) order_id: String,
    pub(crate) client: String,
    pub(crate) sku: String,
    pub(crate) quantity: u32,
    pub(crate) amount_cents: u64,
    pub(crate) card: String,
    pub(crate) reservation: Option<String>,
    pub(crate) payment: Option<String>,
}

impl OrderData {
    fn event(&self) -> Message {
        let payload = serde_json::json!({
            "order_id": self.order_id,
            "sku": self.sku,
            "quantity": self.quantity,
            "amount_cents": self.amount_cents,
        });
        Message::json("order", &self.order_id, "OrderPlaced", payload)
    }
}

/// The order table and its outbox.
#[derive(Debug)]
pub(crate) enum Orders {
    Memory(Arc<MemoryOrders>),
    Postgres { pool: PgPool, outbox: Outbox },
}

/// On memory: the rows, and sd-outbox's in-memory outbox for their events.
#[derive(Debug, Default)]
pub(crate) struct MemoryOrders {
    rows: Mutex<BTreeMap<String, OrderData>>,
    outbox: MemoryOutbox,
}

/// The order was stored before (a retried step): its event is not committed again.
struct AlreadyPlaced;

const ORDERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS checkout_orders (
    id text PRIMARY KEY, client text NOT NULL, sku text NOT NULL, quantity integer NOT NULL,
    amount_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())";

impl Orders {
    /// The order table and outbox on PostgreSQL (created if missing).
    pub(crate) async fn postgres(
        pool: PgPool,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        sqlx::query(ORDERS_TABLE).execute(&pool).await?;
        let outbox = Outbox::builder()
            .table("checkout_outbox")
            .build(pool.clone())?;
        outbox.migrate().await?;
        Ok(Orders::Postgres { pool, outbox })
    }

    /// Writes the order and its `OrderPlaced` event together; a second call for the
    /// same order (a retried step) writes nothing.
    pub(crate) async fn place(&self, order: &OrderData) -> Result<(), String> {
        match self {
            Orders::Memory(m) => {
                let mut tx = m.outbox.begin();
                tx.enqueue(order.event()).map_err(|e| e.to_string())?;
                // The row is written under the outbox lock; the event is appended only if
                // it was.
                let written = tx.commit_with(|| {
                    let mut rows = lock(&m.rows);
                    if rows.contains_key(&order.order_id) {
                        return Err(AlreadyPlaced);
                    }
                    rows.insert(order.order_id.clone(), order.clone());
                    Ok(())
                });
                match written {
                    Ok(((), _)) | Err(AlreadyPlaced) => Ok(()),
                }
            }
            Orders::Postgres { pool, outbox } => {
                let text = |e: &dyn std::fmt::Display| e.to_string();
                let mut tx = pool.begin().await.map_err(|e| text(&e))?;
                let inserted = sqlx::query(
                    "INSERT INTO checkout_orders (id, client, sku, quantity, amount_cents)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&order.order_id)
                .bind(&order.client)
                .bind(&order.sku)
                .bind(i32::try_from(order.quantity).unwrap_or(i32::MAX))
                .bind(i64::try_from(order.amount_cents).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(|e| text(&e))?;
                if inserted.rows_affected() == 1 {
                    outbox
                        .enqueue(&mut tx, order.event())
                        .await
                        .map_err(|e| text(&e))?;
                }
                tx.commit().await.map_err(|e| text(&e))
            }
        }
    }

    /// The ids of the stored orders that start with `prefix`.
    pub(crate) async fn ids(&self, prefix: &str) -> Result<Vec<String>, String> {
        match self {
            Orders::Memory(m) => Ok(lock(&m.rows)
                .keys()
                .filter(|id| id.starts_with(prefix))
                .cloned()
                .collect()),
            Orders::Postgres { pool, .. } => sqlx::query_scalar(
                "SELECT id FROM checkout_orders WHERE starts_with(id, $1) ORDER BY id",
            )
            .bind(prefix)
            .fetch_all(pool)
            .await
            .map_err(|e| e.to_string()),
        }
    }

    /// Starts relaying the outbox to `publisher`.
    pub(crate) fn relay(&self, publisher: Fanout) -> Result<Relaying, String> {
        match self {
            Orders::Memory(m) => {
                let relay = MemoryRelay::builder(m.outbox.clone(), publisher)
                    .poll_interval(Duration::from_millis(100))
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok(Relaying::Memory(relay.spawn()))
            }
            Orders::Postgres { outbox, .. } => {
                let relay = Relay::builder(outbox.clone(), publisher)
                    .poll_interval(Duration::from_millis(100))
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok(Relaying::Postgres(relay.spawn()))
            }
        }
    }
}

/// A running relay; stopped by [`Relaying::stop`] (or aborted when dropped).
#[derive(Debug)]
pub(crate) enum Relaying {
    Memory(MemoryRelayHandle<Fanout>),
    Postgres(RelayHandle),
}

impl Relaying {
    pub(crate) async fn stop(self) {
        match self {
            Relaying::Memory(handle) => handle.shutdown().await,
            Relaying::Postgres(handle) => handle.shutdown().await,
        }
    }
}

/// How each consumer drops a redelivered event.
#[derive(Debug)]
pub(crate) enum Dedupe {
    Memory(Mutex<HashSet<(&'static str, u128)>>),
    Postgres { pool: PgPool, inbox: Inbox },
}

impl Dedupe {
    pub(crate) async fn postgres(
        pool: PgPool,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let inbox = Inbox::builder()
            .table("checkout_inbox")
            .build(pool.clone())?;
        inbox.migrate().await?;
        Ok(Dedupe::Postgres { pool, inbox })
    }

    /// Runs `handler` unless `consumer` handled `event` before; `Ok(true)` when it ran.
    async fn once<F>(
        &self,
        consumer: &'static str,
        event: &Event,
        handler: F,
    ) -> Result<bool, String>
    where
        F: Future<Output = ()>,
    {
        match self {
            Dedupe::Memory(seen) => {
                if !lock(seen).insert((consumer, event.id.as_u128())) {
                    return Ok(false);
                }
                handler.await;
                Ok(true)
            }
            Dedupe::Postgres { pool, inbox } => {
                let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                let first = inbox
                    .receive(&mut tx, consumer, event.id)
                    .await
                    .map_err(|e| e.to_string())?;
                if first {
                    // The handler's own writes would go in `tx` here.
                    handler.await;
                }
                tx.commit().await.map_err(|e| e.to_string())?;
                Ok(first)
            }
        }
    }
}

/// The publisher: a log of every event published (redeliveries included), then one
/// sd-pool job per consumer and event, keyed by order id.
#[derive(Debug, Clone)]
pub(crate) struct Fanout(Arc<FanoutInner>);

#[derive(Debug)]
struct FanoutInner {
    log: MemoryPublisher,
    pool: Pool,
    dedupe: Dedupe,
    /// Times each (consumer, order) was handled.
    handled: Mutex<BTreeMap<(&'static str, String), u32>>,
    redeliveries: AtomicU64,
    lost_acks: AtomicU32,
}

impl Fanout {
    /// The first `lost_acks` batches are delivered but reported failed, as when the
    /// broker's acknowledgement is lost: the relay sends them again.
    pub(crate) fn new(dedupe: Dedupe, lost_acks: u32) -> Result<Self, sd_pool::Error> {
        let pool = Pool::builder()
            .workers(8)
            .queue(256)
            .order(Order::PerKey)
            .build()?;
        Ok(Fanout(Arc::new(FanoutInner {
            log: MemoryPublisher::new(),
            pool,
            dedupe,
            handled: Mutex::default(),
            redeliveries: AtomicU64::new(0),
            lost_acks: AtomicU32::new(lost_acks),
        })))
    }

    /// Every event published, in publish order (redeliveries included).
    pub(crate) fn published(&self) -> Vec<Event> {
        self.0.log.events()
    }

    /// Times each (consumer, order id) was handled.
    pub(crate) fn handled(&self) -> BTreeMap<(&'static str, String), u32> {
        lock(&self.0.handled).clone()
    }

    /// Deliveries a consumer dropped as already handled.
    pub(crate) fn redeliveries(&self) -> u64 {
        self.0.redeliveries.load(Ordering::Relaxed)
    }

    /// Stops the consumers' pool once its jobs are done.
    pub(crate) async fn drain(&self) {
        let _ = self.0.pool.drain(Duration::from_secs(10)).await;
    }
}

impl Publisher for Fanout {
    fn publish(&self, events: &[Event]) -> impl Future<Output = sd_outbox::Result<()>> + Send {
        let (inner, events) = (self.0.clone(), events.to_vec());
        async move {
            inner.log.publish(&events).await?;
            let mut jobs = Vec::with_capacity(events.len() * CONSUMERS.len());
            for (index, event) in events.iter().enumerate() {
                for consumer in CONSUMERS {
                    let (worker, event) = (inner.clone(), event.clone());
                    let key = event.aggregate_id.clone();
                    let job = Job::new(async move { consume(&worker, consumer, &event).await })
                        .with_key(&key);
                    match inner.pool.submit(job).await {
                        Ok(handle) => jobs.push((index, handle)),
                        Err(_) => {
                            return Err(sd_outbox::Error::publish(
                                0,
                                "the consumer pool is closed",
                            ));
                        }
                    }
                }
            }
            // Acknowledge the leading events every consumer finished.
            let mut first_failed: Option<(usize, String)> = None;
            for (index, handle) in jobs {
                let failure = match handle.await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failure
                    && first_failed.as_ref().is_none_or(|(i, _)| index < *i)
                {
                    first_failed = Some((index, e));
                }
            }
            let lose = || {
                let left = &inner.lost_acks;
                left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            };
            match first_failed {
                None if lose() => Err(sd_outbox::Error::publish(0, "ack lost (injected)")),
                None => Ok(()),
                Some((index, reason)) => Err(sd_outbox::Error::publish(index, reason)),
            }
        }
    }
}

/// One consumer handling one event: counted once per (consumer, order) however often it
/// is delivered.
async fn consume(inner: &FanoutInner, consumer: &'static str, event: &Event) -> Result<(), String> {
    let ran = inner
        .dedupe
        .once(consumer, event, async {
            // Shipping would book a courier, email would send a receipt.
            tokio::task::yield_now().await;
        })
        .await?;
    if ran {
        *lock(&inner.handled)
            .entry((consumer, event.aggregate_id.clone()))
            .or_default() += 1;
    } else {
        inner.redeliveries.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
