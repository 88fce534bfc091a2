//! Transactional outbox on PostgreSQL with a relay to Redis Streams, NATS JetStream and
//! Kafka, ordered and parallel, losing nothing.
//!
//! A service that writes to its database and then publishes an event loses the event
//! when it crashes between the two, and publishes a lie when the write rolls back. With
//! the outbox, the event is a row written **in the same transaction** as the business
//! data (`postgres::Outbox::enqueue`); a `postgres::Relay` publishes committed rows
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
//! let sink = MemoryPublisher::new(); // or a redis, nats or kafka publisher
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
//!   (Redis replied to `XADD`; JetStream returned the publish ack; Kafka's delivery
//!   report came back, with `acks=all`). A relay that crashes between the
//!   acknowledgement and the mark leaves the row pending, and it is published again
//!   **with the same id**. JetStream drops that copy itself
//!   (`Nats-Msg-Id` = outbox id, within the stream's duplicate window); Redis Streams
//!   and Kafka keep both, so consumers dedupe with `postgres::Inbox` (or their own
//!   `(consumer, message id)` key) in the transaction of their handler.
//! - **Across a Redis failover** (Sentinel or Cluster, through
//!   `sd_core::failover::FailoverConnection`): Redis replicates asynchronously, so an
//!   `XADD` the master acknowledged and lost in a crash before its replica had it is gone
//!   while its row is marked published. `redis::RedisStreamsPublisherBuilder::wait_for_replicas`
//!   marks a row only once `WAIT` says a replica holds its entry; the cost is duplicates
//!   (a batch whose `WAIT` fell short is sent again) and no publishing to a shard while it
//!   has no replica. RELIABILITY.md at the repository root has the failover test's
//!   figures, with and without it.
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
//!   `postgres::Outbox::dead_letters`, re-sent by `postgres::Outbox::redrive`; later
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
//! per aggregate, retrying under a [`RetryPolicy`] and dead-lettering after `max_attempts`
//! ([`dead_letters`], [`redrive`]).
//!
//! It is **process-local and lost on restart**: pending events and dead letters die
//! with the process, and two processes do not share it. Use it for tests, demos and
//! single-process services whose business data is in memory too (the in-memory stores
//! of the other sd crates); in one process there is no crash window between the data
//! and the event, since both are lost together. With data in PostgreSQL, use
//! `postgres::Outbox`.
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
//! order). Consumers of the Kafka sink notice no move: it already writes to the
//! router's default topics (`outbox.event.{aggregatetype}`), keyed by aggregate id, with
//! the outbox id in the `id` header.
//!
//! # Backends
//!
//! | part | what it does |
//! |---|---|
//! | [`memory::MemoryOutbox`] | in-process unit of work (commit / rollback), dead letters, redrive; no feature |
//! | [`memory::MemoryRelay`] | publishes a memory outbox: per-aggregate order, retries, dead letters |
//! | `postgres::Outbox` | the table, `enqueue`, stats, dead letters, redrive, sweep |
//! | `postgres::Relay` | ordered or parallel relay, LISTEN/NOTIFY + poll, retries, metrics |
//! | `postgres::Inbox` | consumer-side dedupe in the handler's transaction |
//! | [`MemoryPublisher`] | keeps events in memory (tests, demos) |
//! | [`BoxPublisher`] | any sink behind one type, chosen from configuration at run time |
//! | `redis::RedisStreamsPublisher` | pipelined `XADD` to `{prefix}:{aggregatetype}` (`outbox:order`), id in the entry; one pipeline per hash tag, so a batch of several streams runs on Redis Cluster; optional `WAIT` for replicas (`wait_for_replicas`) |
//! | `nats::JetStreamPublisher` | publish to `outbox.{aggregatetype}` with `Nats-Msg-Id`, acks awaited |
//! | `kafka::KafkaPublisher` | idempotent producer, `acks=all`, to `outbox.event.{aggregatetype}` keyed by aggregate id, id in the `id` header |
//!
//! # How it compares
//!
//! `benches/benches/outbox.rs` runs the relays beside the naive single poller (the
//! Eventuate-style `SELECT .. WHERE status = 'pending' ORDER BY seq LIMIT n`, pipelined
//! `XADD`, `UPDATE`), which is only correct with one reader and has no retries, dead
//! letters or ordering guards. One parallel relay keeps pace with it, several relays or
//! the ordered relay pass it at the default batch size, and `enqueue` costs a little
//! more than a bare `INSERT` of the same row in its own transaction (the notify
//! trigger and the relays' indexes). With notifications on, an event reaches the sink
//! about a millisecond after its commit; with polling only, after the poll interval.
//! One relay to Kafka is measured beside the Redis Streams rows at the same batch sizes.
//! The measured figures are in
//! [benches/RESULTS.md](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
//!
//! # Sizing
//!
//! What one Redis server (one shard) took in events a second from the Redis Streams sink
//! (batches of 100 through `publish`), beside a raw pipeline of the same `XADD`s, is in
//! the Sizing section of [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md#sizing). For a load in events a second,
//! `shards = ceil(load / (rate × headroom))`, with a headroom below 1 (the file works
//! examples at 0.5). But events go to one stream per aggregate type, and a stream lives
//! on one shard: more shards spread different aggregate types, never one, so the busiest
//! aggregate type's events a second must fit one shard's rate. The relay (reading and
//! marking rows in PostgreSQL) usually limits first: compare the relay rows of the same
//! file.
//!
//! # Metrics and spans
//!
//! With feature `metrics` (and `postgres`), the outbox table and its relays report
//! through the `metrics` facade; install the exporter's recorder before building them
//! (handles are registered then). `sd.name` is the outbox table; `messaging.system` is the
//! sink's [`Publisher::system`].
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `sd.outbox.enqueued` | counter | events | `sd.name` |
//! | `messaging.client.sent.messages` | counter | messages | `sd.name`, `messaging.system`, `messaging.operation.name` (`publish`) |
//! | `messaging.client.operation.duration` | histogram | s | `sd.name`, `messaging.system`, `messaging.operation.name` |
//! | `sd.outbox.publish.failures` | counter | attempts | `sd.name`, `messaging.system`, `messaging.operation.name` |
//! | `sd.outbox.dead_letters` | counter | events | `sd.name` |
//! | `sd.outbox.oldest_unpublished.age` | gauge | s | `sd.name` |
//!
//! `enqueued` counts writes whose transaction may still roll back; `sent` counts what the
//! sink acknowledged (a redelivery counts again). Each relay reads the oldest unpublished
//! row's age when it starts and then every 10 s. A relay runs in an `outbox.relay` span,
//! each batch in `outbox.relay.batch`, and each call of the sink in `outbox.publish` with
//! `sd.name`, `messaging.system` and `sd.operation`. The memory outbox reports nothing.
//!
//! # Traces
//!
//! With feature `otel`, `enqueue` (of `postgres::Outbox` and of [`memory::MemoryTx`])
//! records the current `tracing` span's W3C trace context in the message's headers:
//! `traceparent`, and `tracestate` when the span carries vendor state (through the
//! tracing-opentelemetry layer the application installs; outside a span, or without the
//! layer, nothing is written). A `traceparent` the message already carries is kept. Every
//! sink sends the headers: the Redis Streams sink in the entry's `headers` field (a JSON
//! object), the NATS and Kafka sinks as message headers. sd-pool's consumers (feature
//! `otel`) make it the parent of the job's span, so the request that wrote the event and
//! the job that handled it are one trace; `trace::TraceParent::extract` reads it back in
//! any other consumer.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `postgres`: the outbox table, enqueue, the relay and the inbox (sqlx 0.8).
//! - `redis`: the Redis Streams sink (redis-rs, async, any `ConnectionLike`).
//! - `nats`: the NATS JetStream sink (async-nats 0.50, JetStream only).
//! - `kafka`: the Kafka sink (rdkafka 0.38 with its bundled librdkafka, built from C;
//!   an idempotent producer, no Kafka transactions).
//! - `metrics`: the outbox's and relay's metrics through the `metrics` facade (see
//!   [Metrics and spans](#metrics-and-spans)).
//! - `otel`: `enqueue` records the current span's W3C trace context in the headers (see
//!   [Traces](#traces)); re-exports sd-core's `trace` module (opentelemetry 0.33 API,
//!   tracing-opentelemetry 0.34).
//! - `test-util`: the `conformance` module, the [`Publisher`] contract as a suite of
//!   checks that any sink (a new broker, or a [`BoxPublisher`]) can run.
//!
//! # Running the tests
//!
//! `cargo test -p sd-outbox` (or `cargo nextest run -p sd-outbox`) runs every suite:
//! the crate's tests turn on `postgres`, `redis`, `nats`, `kafka`, `test-util`, `metrics`
//! and `otel` through a dev-dependency on the crate itself, so no suite is left out for
//! want of a feature flag. The backend suites start real `postgres`, `redis-server` and
//! `nats-server` processes and a `tansu` Kafka-API broker through `sd-testkit`; a missing
//! server binary fails the test, it is never skipped.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod message;
#[cfg(feature = "postgres")]
mod observe;
mod publisher;
mod retry;

pub mod memory;

#[cfg(feature = "test-util")]
pub mod conformance;

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

pub use crate::error::{Error, Result};
pub use crate::message::{Event, Headers, MAX_FIELD_LEN, Message, Payload, new_id};
pub use crate::publisher::{BoxPublisher, MemoryPublisher, Publisher};
/// W3C trace context (`traceparent`, `tracestate`) written by `enqueue`: sd-core's.
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub use sd_core::trace;
/// Retry policies are sd-core's, the same in every sd crate.
pub use sd_core::{RetryPolicy, RetryPolicyBuilder};
