//! Backpressured worker pool with per-key ordering, completion watermarks for stream
//! consumers, panic isolation and a graceful drain.
//!
//! # What it is
//!
//! A [`Pool`] runs async jobs on tokio tasks with two explicit bounds: at most
//! `workers` jobs run at once and at most `queue` accepted jobs wait.
//! When both are used up, [`Pool::submit`] waits (backpressure), [`Pool::try_submit`]
//! hands the job back, and [`Pool::submit_timeout`] does either. On top of that:
//!
//! - **Ordering modes** ([`Order`]): unordered; per key (serial within a key, concurrent
//!   across keys, a bounded backlog per key); serial.
//! - **Completion watermarks** ([`watermark`]): a job may carry `(partition, offset)`;
//!   [`Pool::watermark`] is the highest offset at or below which every job of that
//!   partition is done, so a consumer commits it and a crash replays instead of losing.
//!   A partition whose finished-but-not-committable window reaches
//!   `max_watermark_window` takes no more jobs until its head finishes.
//! - **Panic isolation**: a panic is caught on the worker, reported to the job's
//!   [`JobHandle`] as [`Error::Panicked`] (distinct from [`Error::Cancelled`]), counted,
//!   passed to the `on_panic` hook, and the worker takes the next job.
//! - **Lifecycle**: [`Pool::close`], [`Pool::drain`] (deadline; every accepted job
//!   finishes or is handed back), [`Pool::shutdown_now`] (abort; hands back what did not
//!   run). A job that submits into its own full pool gets [`Error::WouldDeadlock`].
//! - **Metrics** ([`Pool::metrics`]): queued, running, completed, failed, panicked,
//!   cancelled, time in queue, run time, peaks.
//! - **Redis Streams consumer** (feature `redis`): a consumer group feeding the pool,
//!   acknowledging in watermark order, reclaiming dead consumers' entries and moving
//!   poison entries to a dead-letter stream.
//! - **Kafka consumer** (feature `kafka`): a consumer-group member feeding the pool per
//!   key, per partition or unordered, committing each partition's watermark + 1, pausing
//!   partitions instead of blocking its poll loop, retrying failed records and then
//!   sending them to a dead-letter topic.
//!
//! # When to use it
//!
//! When work arrives faster than it can be done and memory must stay bounded: a stream
//! consumer, a fan-out of requests, a job runner that must finish what it accepted on
//! shutdown. When order matters per entity but not globally, use [`Order::PerKey`].
//!
//! When not: for CPU-bound work use rayon or `spawn_blocking` (jobs here are async and
//! share the tokio runtime); for a few futures in one task, `buffer_unordered` is
//! simpler; for durable jobs that must survive a process crash, use a persistent queue
//! (the Redis consumer here gives that for streams).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use sd_pool::{Job, Order, Pool};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::builder().workers(4).queue(64).order(Order::PerKey).build()?;
//! let mut handles = Vec::new();
//! for (offset, user) in ["ann", "bob", "ann", "cy"].into_iter().enumerate() {
//!     let job = Job::new(async move { format!("{user} #{offset}") })
//!         .with_key(user)
//!         .with_offset(0, offset as u64);
//!     handles.push(pool.submit(job).await?);
//! }
//! assert_eq!(handles.remove(2).await?, "ann #2");
//! let drained = pool.drain(Duration::from_secs(5)).await;
//! assert!(drained.is_complete());
//! assert_eq!(pool.watermark(0), Some(3));
//! assert_eq!(pool.metrics().completed, 4);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! - No more than `workers` jobs run at once; no more than `queue`
//!   wait; no more than `max_key_backlog` wait behind one key; a partition's tracked
//!   offsets stay below `max_watermark_window` plus the jobs in flight. Nothing else is
//!   buffered.
//! - In [`Order::PerKey`], jobs with equal keys start in submission order, each after the
//!   previous one finished (keys are hashed to 64 bits; a collision only serialises two
//!   keys). [`Order::Serial`] does that for all jobs.
//! - A job accepted by `submit`/`try_submit` (an `Ok` handle) runs exactly once, unless
//!   `drain` or `shutdown_now` hands it back unrun or `shutdown_now` aborts it. Dropping
//!   a [`JobHandle`] does not cancel the job. `submit` is cancel-safe.
//! - The watermark never passes an offset whose job has not finished (completed,
//!   failed or panicked; a job handed back or aborted never counts as finished).
//! - **Redis consumer: at least once.** An entry is acknowledged (`XACK`) only after its
//!   job succeeded and every entry read before it has finished. If the consumer dies, its
//!   unacknowledged entries are reclaimed by another member of the group (listed with
//!   `XPENDING … IDLE` and claimed with `XCLAIM` after `min_idle`) and processed again,
//!   so a handler may see an entry twice and must be idempotent (or deduplicate by entry
//!   id). An entry whose handler failed or panicked is not acknowledged and is
//!   redelivered after `min_idle`; with `max_deliveries(n)` it is moved after its n-th
//!   delivery to a dead-letter stream (its fields, the error, the count, its stream and
//!   id), acknowledged in the same script, and `StreamConsumer::redrive` moves it back.
//!   A Redis error (a restart, a timed-out response) ends `run` with the error and
//!   leaves the pool running; calling `run` again carries on where it stopped, so
//!   `loop { consumer.run(..) }` with a back-off survives an outage.
//! - **Kafka consumer: at least once, effects once with an inbox.** A partition's
//!   offset is committed only up to the first record not finished; after a crash the
//!   records above the last commit run again (at most the window and the records in
//!   flight, per partition). A handler that writes its effect and an inbox row keyed by
//!   `(topic, partition, offset)` in one database transaction makes each effect happen
//!   once. No Kafka transactions: see the `kafka` module.
//!
//! # How it compares
//!
//! Per job, a pool costs about what `tokio::spawn` under a `Semaphore` costs, and in
//! steady state less (a worker takes the next queued job without a spawn);
//! `buffer_unordered` in one task is far cheaper for tiny futures, but runs nothing in
//! parallel and bounds nothing but concurrency. With [`Order::PerKey`], a stream of jobs
//! finishes about as fast as the best schedule per-key order allows (one task per key,
//! the jobs split by key up front). Per key is slower than unordered only when there are
//! fewer keys than workers: no scheduler that keeps per-key order can finish before the
//! busiest key's own work is done. The measured figures, beside the peers' from the same
//! run, are in
//! [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
//!
//! # Sizing
//!
//! What one `redis::StreamConsumer` (feature `redis`; batch 100, 64 workers, handlers
//! that do nothing) handled in entries a second from one stream on one Redis server,
//! beside a bare `XREADGROUP` + `XACK` loop, is in the Sizing section of
//! [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md#sizing): the ceiling of the consumer's own work; real handlers add
//! their time over the workers. A stream, its group and its dead-letter stream share one
//! hash tag, so one stream gets one shard's rate however large the cluster: more comes
//! from more streams (each with its consumers), spread over shards, `shards = ceil(load /
//! (rate × headroom))` for their total, with a headroom below 1 (the file works examples
//! at 0.5). More consumers in one group add readers, not shards.
//!
//! # Metrics and spans
//!
//! With feature `metrics`, a pool reports through the `metrics` facade; install the
//! exporter's recorder before building the pool (handles are registered then). `sd.name`
//! is the pool's name (`PoolBuilder::name`, default `"default"`).
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `sd.pool.jobs` | counter | jobs | `sd.name`, `sd.outcome` (`ok`, `error`, `panicked`, `rejected`, `cancelled`) |
//! | `sd.pool.queue.depth` | gauge | jobs | `sd.name` |
//! | `sd.pool.in_flight` | gauge | jobs | `sd.name` |
//! | `sd.pool.queue.wait_time` | histogram | s | `sd.name` |
//! | `sd.pool.job.duration` | histogram | s | `sd.name` |
//! | `sd.pool.watermark.lag` | gauge | jobs | `sd.name`, `sd.partition` |
//! | `messaging.client.consumed.messages` | counter | messages | `sd.name`, `messaging.system` (`redis`, `kafka`), `messaging.operation.name` (`receive`) |
//! | `messaging.process.duration` | histogram | s | `sd.name`, `messaging.system`, `messaging.operation.name` (`process`), `error.type` (`error`, `panicked`) when the handler failed |
//!
//! The last two are the stream consumers' (`redis::StreamConsumer`, `kafka::KafkaConsumer`),
//! named after OpenTelemetry's messaging conventions, with their pool's `sd.name`; their
//! handles are registered when the consumer is built. `consumed` counts entries read with
//! `XREADGROUP` or taken over with `XCLAIM`, and records polled: a redelivery counts
//! again. Each handler run is one `process` sample (each attempt, for Kafka); a Redis
//! handler that panics is not timed (`sd.pool.jobs` counts it as `panicked`).
//!
//! `rejected` counts jobs refused because a bound was reached (`try_submit`'s
//! `Error::Full`, a `submit_timeout` that timed out); `error` counts jobs whose output is
//! a failure ([`Outcome`]). The gauges are set under the pool's lock whenever a job is
//! accepted, finishes or is cancelled. The queue wait is shaped as OpenTelemetry's
//! `db.client.connection.wait_time` (the time before a slot was free), under the pool's
//! own name since a job is not a database connection. A partition's watermark lag is
//! its jobs accepted and not yet below its watermark (running, queued, or finished
//! behind an unfinished one); its gauge is registered when the partition's first job is
//! accepted. Each job runs in a `pool.job` span
//! with `sd.name` and the job's id.
//!
//! # Traces
//!
//! With feature `otel`, a job's `pool.job` span can continue the W3C trace context of the
//! message it handles: `Job::with_trace_parent` makes it the span's parent, so the job
//! and every span its handler opens are in the producer's trace (one trace id from the
//! request that wrote the message to the job; the `trace` module explains why a parent
//! and not a link). The Redis Streams consumer reads `traceparent` (and `tracestate`) from each
//! entry's `headers` field (as sd-outbox's sink writes them) or from fields of those
//! names; the Kafka consumer from the record's headers. Elsewhere (a NATS JetStream
//! consumer, for one) read it with `trace::TraceParent::extract` over the message's
//! headers. A malformed `traceparent` is ignored (logged at debug level): the job
//! starts a trace of its own. Spans and ids come from the tracing-opentelemetry layer the
//! application installs; without it nothing changes.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `metrics`: the pool's metrics through the `metrics` facade (see
//!   [Metrics and spans](#metrics-and-spans)).
//! - `redis`: `redis::StreamConsumer`, a Redis Streams consumer group on top of the pool,
//!   with a delivery limit and a dead-letter stream.
//! - `kafka`: `kafka::KafkaConsumer`, a Kafka consumer-group member on top of the pool
//!   (rdkafka with its bundled librdkafka).
//! - `otel`: job spans continue the trace context of the message they handle (see
//!   [Traces](#traces)); re-exports sd-core's `trace` module (opentelemetry 0.33 API,
//!   tracing-opentelemetry 0.34).
//!
//! # Running the tests
//!
//! `cargo test -p sd-pool` (or `cargo nextest run -p sd-pool`) runs every suite: the
//! crate's tests turn on `redis` and `kafka` through a dev-dependency on the crate
//! itself, so no suite is left out for want of a feature flag. The Redis Streams suite
//! starts real `redis-server` processes through `sd-testkit`, the Kafka suites a tansu
//! broker (and PostgreSQL for the inbox); a missing server binary fails the test, it is
//! never skipped.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod fasthash;
#[cfg(feature = "kafka")]
pub mod kafka;
mod observe;
mod pool;
#[cfg(feature = "redis")]
pub mod redis;
pub mod watermark;
/// W3C trace context (`traceparent`, `tracestate`) to give a job its parent: sd-core's.
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub use sd_core::trace;

pub use crate::error::{Error, Rejected, Result, UnexpectedReply};
pub use crate::pool::{
    Drained, IntoJob, Job, JobHandle, Metrics, Order, Outcome, OutputOf, PanicReport, Pool,
    PoolBuilder, ReturnedJob, Shutdown,
};
