//! Transactional outbox on PostgreSQL with a relay to Redis Streams and NATS JetStream,
//! ordered and parallel, losing nothing.
//!
//! A service that writes to its database and then publishes an event loses the event
//! when it crashes between the two, and publishes a lie when the write rolls back. With
//! the outbox, the event is a row written **in the same transaction** as the business
//! data ([`postgres::Outbox::enqueue`]); a [`postgres::Relay`] publishes committed rows
//! afterwards through a [`Publisher`], at least once, in order per aggregate.
//!
//! Without a database, [`memory::MemoryOutbox`] (no feature) offers the same shape in
//! process: a unit of work whose events become visible at commit and never after a
//! rollback, and a [`memory::MemoryRelay`] with the same publishing, ordering and
//! dead-letter rules (see [In memory](#in-memory)).
//!
//! Use it when a database write and a message must both happen or neither. Do not use
//! it for fire-and-forget notifications that may be lost (publish directly), or when
//! you already run Kafka Connect with Debezium (point its Outbox Event Router at the
//! table instead, see below).
//!
//! # Example
//!
//! The relay needs PostgreSQL (feature `postgres`):
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use sd_outbox::postgres::{Mode, Outbox, Relay};
//! use sd_outbox::{MemoryPublisher, Message};
//!
//! let outbox = Outbox::new(pool.clone())?; // table `outbox`
//! outbox.migrate().await?;
//!
//! // In the service: the order and its event commit together.
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ('o-1', 1250)").execute(&mut *tx).await?;
//! let id = outbox
//!     .enqueue(&mut tx, Message::json("order", "o-1", "order_created", serde_json::json!({"total": 1250})))
//!     .await?;
//! tx.commit().await?;
//!
//! // Anywhere (the same process or a worker): the relay publishes committed rows.
//! let sink = MemoryPublisher::new(); // or redis::RedisStreamsPublisher, nats::JetStreamPublisher
//! let relay = Relay::builder(outbox.clone(), sink.clone()).mode(Mode::Parallel).build()?.spawn();
//! # let _ = (id, relay);
//! # Ok(()) }
//! ```
//!
//! The pure parts run anywhere; a sink receives [`Event`]s, whose `id` is the dedupe key:
//!
//! ```
//! use sd_outbox::{Event, MemoryPublisher, Message, Publisher};
//!
//! let message = Message::json("order", "o-1", "order_created", serde_json::json!({"total": 1250}))
//!     .header("trace-id", "4bf92f35");
//! message.validate()?;
//! let event = Event::from_message(message);
//! let sink = MemoryPublisher::new();
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! rt.block_on(sink.publish(std::slice::from_ref(&event)))?;
//! assert_eq!(sink.events()[0].id, event.id);
//! assert_eq!(sink.events()[0].headers["trace-id"], "4bf92f35");
//! // Bad input is a typed error naming the field, never a panic.
//! let bad = Message::json("", "o-1", "order_created", serde_json::json!({}));
//! assert!(matches!(bad.validate(), Err(sd_outbox::Error::InvalidMessage { field: "aggregate_type", .. })));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Guarantees
//!
//! - **Atomic with your transaction.** `enqueue` is one `INSERT` on the caller's
//!   `sqlx::Transaction`: a rolled-back transaction publishes nothing; a committed one
//!   is published.
//! - **At least once.** A row is marked `published` only after the sink acknowledged it
//!   (Redis replied to `XADD`; JetStream returned the publish ack). A relay that crashes
//!   between the acknowledgement and the mark leaves the row pending, and it is
//!   published again **with the same id**. JetStream drops that copy itself
//!   (`Nats-Msg-Id` = outbox id, within the stream's duplicate window); Redis Streams
//!   keeps both, so consumers dedupe with [`postgres::Inbox`] (or their own
//!   `(consumer, message id)` key) in the transaction of their handler.
//! - **Nothing skipped.** Relays find rows by `status = 'pending'`, never by an id
//!   watermark, so a row whose transaction commits after one with a higher id (the
//!   sequence-gap trap) is found by the next batch.
//! - **Order, parallel mode** (the default): several relays share 64 lanes (a hash of
//!   aggregate type and id), each lane held by one relay at a time through `FOR UPDATE
//!   SKIP LOCKED`. Events of one aggregate are never in flight together and leave in
//!   insertion (`seq`) order, which is their commit order when the writers of one
//!   aggregate serialize (the usual row lock on the aggregate). No order across
//!   aggregates.
//! - **Order, ordered mode**: one active relay per group (a session advisory lock on its
//!   own connection; standbys take over within `standby_interval` once its connection
//!   closes). It reads only rows of transactions that can no longer be running
//!   (`txid < pg_snapshot_xmin(pg_current_snapshot())`) in `(txid, seq)` order: one
//!   total order, transactions in the order they got their transaction id, each
//!   transaction's events together in insertion order. That equals commit order for
//!   transactions that do not overlap; for overlapping ones PostgreSQL exposes no
//!   commit order without logical decoding (CDC). A long-running transaction anywhere
//!   in the database delays publishing (not correctness) until it ends.
//! - **Failures.** A failed publish retries with exponential backoff and jitter
//!   (`next_attempt_at`), holding back the later events of the same aggregate (parallel)
//!   or everything (ordered). After `max_attempts` the row is **dead-lettered**: status
//!   `dead`, kept with `attempts` and `last_error`, listed by
//!   [`postgres::Outbox::dead_letters`], re-sent by [`postgres::Outbox::redrive`]; later
//!   events of its aggregate then go on without it, so a redriven event arrives after
//!   them.
//! - **Wake-ups.** A statement trigger sends `NOTIFY` at commit; each relay `LISTEN`s and
//!   starts a batch at once. Notifications are a hint: a fallback poll (1 s) finds
//!   anything a lost notification would have announced.
//! - **Retention.** Published rows are swept after `retention` (24 h by default);
//!   pending and dead rows never are.
//!
//! # In memory
//!
//! [`memory::MemoryOutbox`] needs no feature and no server. [`begin`] opens a
//! [`MemoryTx`]; [`enqueue`] validates and stages a message inside it; [`commit`] makes
//! every staged event visible at once, while dropping the transaction (or
//! [`rollback`]) discards them: a rolled-back event is never seen by any relay.
//! [`commit_with`] runs your in-memory business write under the outbox lock and commits
//! the events only if it returned `Ok`. A [`memory::MemoryRelay`] (one batch with
//! `run_once`, until idle with `drain`, or in the background with `spawn`; several may
//! share one outbox) publishes through any [`Publisher`] at least once, in commit order
//! per aggregate, retrying with [`Backoff`] and dead-lettering after `max_attempts`
//! ([`dead_letters`], [`redrive`]).
//!
//! It is **process-local and lost on restart**: pending events and dead letters die
//! with the process, and two processes do not share it. Use it for tests, demos and
//! single-process services whose business data is in memory too (the in-memory stores
//! of the other sd crates); in one process there is no crash window between the data
//! and the event, since both are lost together. With data in PostgreSQL, use
//! [`postgres::Outbox`].
//!
//! [`begin`]: memory::MemoryOutbox::begin
//! [`MemoryTx`]: memory::MemoryTx
//! [`enqueue`]: memory::MemoryTx::enqueue
//! [`commit`]: memory::MemoryTx::commit
//! [`rollback`]: memory::MemoryTx::rollback
//! [`commit_with`]: memory::MemoryTx::commit_with
//! [`dead_letters`]: memory::MemoryOutbox::dead_letters
//! [`redrive`]: memory::MemoryOutbox::redrive
//!
//! # Moving to Debezium
//!
//! The table carries the Outbox Event Router's default columns (`id uuid`,
//! `aggregatetype`, `aggregateid`, `type`, `payload jsonb`), so producers keep calling
//! `enqueue` unchanged: point a Debezium PostgreSQL connector at the table with
//! `transforms=outbox`, `transforms.outbox.type=io.debezium.transforms.outbox.EventRouter`
//! (`route.by.field=aggregatetype`, the default), stop the relays, and set
//! `retention` low or sweep the table yourself (the connector reads the WAL, not the
//! rows). Byte payloads live in `payload_bytes`; name it with
//! `table.field.event.payload` if you use them. Ordering then follows the WAL (commit
//! order).
//!
//! # Backends
//!
//! | part | what it does |
//! |---|---|
//! | [`memory::MemoryOutbox`] | in-process unit of work (commit / rollback), dead letters, redrive; no feature |
//! | [`memory::MemoryRelay`] | publishes a memory outbox: per-aggregate order, retries, dead letters |
//! | [`postgres::Outbox`] | the table, `enqueue`, stats, dead letters, redrive, sweep |
//! | [`postgres::Relay`] | ordered or parallel relay, LISTEN/NOTIFY + poll, retries, metrics |
//! | [`postgres::Inbox`] | consumer-side dedupe in the handler's transaction |
//! | [`MemoryPublisher`] | keeps events in memory (tests, demos) |
//! | [`redis::RedisStreamsPublisher`] | pipelined `XADD` to `outbox:{aggregatetype}`, id in the entry |
//! | [`nats::JetStreamPublisher`] | publish to `outbox.{aggregatetype}` with `Nats-Msg-Id`, acks awaited |
//!
//! # Figures
//!
//! From `benches/benches/outbox.rs` (`cargo bench -p sd-benches --bench outbox`), the
//! run of `scripts/bench.sh` in `benches/RESULTS.md` (2026-11-28 04:03 UTC, a two-core
//! Intel Xeon VM otherwise idle, whose timings swing by a third from one run to the
//! next), PostgreSQL 15 (`fsync=off`, `synchronous_commit=off`) and Redis on loopback.
//!
//! | relay to Redis Streams, 10,000 events | batch 100 | batch 1000 |
//! |---|---|---|
//! | parallel, 1 relay | 15,800/s (0.98×) | 32,800/s (0.83×) |
//! | parallel, 3 relays | 20,400/s (1.27×) | 48,600/s (1.23×) |
//! | ordered, 1 active relay | 21,300/s (1.32×) | 31,400/s (0.79×) |
//! | naive single poller (baseline) | 16,100/s | 39,500/s |
//!
//! The baseline is the Eventuate-style loop (`SELECT .. WHERE status = 'pending' ORDER
//! BY seq LIMIT n`, pipelined `XADD`, `UPDATE`): no claiming, so it is only correct
//! with one reader, and it has no retries, dead letters or ordering guards. A parallel
//! batch also takes three database round trips (`BEGIN` with the lane claim, the read,
//! the mark with `COMMIT`) and pays for the lane locks; the ordered relay reads through
//! its `(txid, seq)` index.
//!
//! Enqueue in its own transaction (`BEGIN`, `INSERT`, `COMMIT`) against the same row
//! into a plain table with only a primary key, run in alternating blocks of 10 so both
//! see the same table sizes, autovacuum and load: **+50 µs** (median over 200 rounds:
//! bare 180 µs, enqueue 230 µs; criterion's estimates in the same run +55 µs median,
//! +38 µs mean). Goal: at most +100 µs. The two runs of the same bench before it gave +31 µs
//! each. The server's share is small: callgrind on a PostgreSQL backend counts
//! 85 k instructions for the bare insert and commit and 190 k for the outbox's (the
//! NOTIFY trigger 21 k, the ordered-mode index 15 k, the three partial indexes that
//! hold no pending row but are checked on each insert 24 k, the lane index, the
//! sequence); pgbench puts the server's difference at about 20 µs.
//!
//! Commit to publish (the Redis acknowledgement) with notifications: **p50 0.74 ms,
//! p99 1.2 ms** over 3,543 events; with LISTEN off and a 100 ms poll, p50 102 ms.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `postgres`: the outbox table, enqueue, the relay and the inbox (sqlx 0.8).
//! - `redis`: the Redis Streams sink (redis-rs, async, connection manager).
//! - `nats`: the NATS JetStream sink (async-nats 0.50, JetStream only).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod error;
mod message;
mod publisher;

pub mod memory;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub use crate::backoff::Backoff;
pub use crate::error::{Error, Result};
pub use crate::message::{Event, Headers, MAX_FIELD_LEN, Message, Payload, new_id};
pub use crate::publisher::{MemoryPublisher, Publisher};
