//! A Kafka consumer-group member that feeds a [`Pool`]: records of one key (or one
//! partition) run in order, different keys in parallel, and offsets are committed only
//! up to the watermark.
//!
//! [`KafkaConsumer::run`] polls records on a thread of its own (librdkafka's poll blocks,
//! and its rebalance callbacks run inside it), submits one job per record to the pool
//! and commits, per partition, the watermark + 1: the first offset not yet finished, so
//! a crash or a rebalance replays from there and loses nothing.
//!
//! - **Order** ([`RecordOrder`]): per key (the record key), per partition, or unordered.
//!   Per key, a partition's records run in parallel across keys, so 1,000 keys on 4
//!   partitions keep 64 workers busy where a partition-per-thread consumer keeps 4.
//! - **Commits**: on an interval (asynchronously), when partitions are revoked and when
//!   the run stops (synchronously). The commit's metadata lists the offsets finished
//!   above the watermark, so a new owner skips them instead of running them again
//!   ([`commit_metadata`](KafkaConsumerBuilder::commit_metadata)); a broker that drops
//!   commit metadata (or another client's metadata) makes the new owner fall back to the
//!   watermark, so at most the window runs again.
//! - **Backpressure without blocking the poll loop**: records the pool has no room for
//!   wait in order, per partition; when a partition's window of
//!   finished-but-uncommittable records reaches
//!   [`max_window`](KafkaConsumerBuilder::max_window), or
//!   [`max_held`](KafkaConsumerBuilder::max_held) of its records wait for the pool,
//!   that partition is paused, and it is resumed once there is room (its window open,
//!   half of those records handed to the pool). The poll loop keeps polling, so the
//!   member keeps its place in the group; memory stays bounded by the pool's bounds plus
//!   `max_held` records per partition. (A pause makes librdkafka drop what it fetched
//!   ahead for that partition and fetch it again after the resume, so pausing often
//!   costs throughput: keep `max_held` well above what the pool takes in a moment.)
//! - **Rebalances**: on revoke, the revoked partitions take no more records (the ones
//!   waiting for the pool are dropped), the jobs already in the pool get
//!   [`revoke_timeout`](KafkaConsumerBuilder::revoke_timeout) to finish (those not
//!   started by then never start), and the watermark is committed before the revoke
//!   returns. On assign, the committed offsets' metadata is read to skip what was
//!   already done, and the partitions are resumed.
//! - **Failures**: a failed (or panicking) handler is retried with backoff under the
//!   consumer's [`RetryPolicy`]; after the last attempt the record goes to the
//!   [dead-letter topic](KafkaConsumerBuilder::dead_letter_topic) with `sd-dlq-topic`,
//!   `sd-dlq-partition`, `sd-dlq-offset`, `sd-dlq-error` and `sd-dlq-attempts` headers
//!   beside its own, and the watermark moves on: a poison record never stalls its
//!   partition.
//!
//! # Guarantees
//!
//! **At least once.** An offset is committed only after its record's handler returned
//! `Ok` (or the record was dead-lettered, or given up on when no dead-letter topic is
//! set: then it is logged at `error` and counted in [`KafkaReport::gave_up`]), and
//! after every record before it in the partition finished. After a crash the records
//! above the last commit run again: at most the window per partition, plus the records
//! in flight. A handler must therefore be idempotent, or record its effect together
//! with the record's `(topic, partition, offset)` in one database transaction (an inbox
//! row, such as sd-outbox's `Inbox`) and skip records it has seen: that makes the
//! effect happen once, and the offset commit after it only saves work.
//!
//! The dead-letter topic is written at least once too: a record dead-lettered just before
//! a crash, and not yet committed past, is retried and dead-lettered again by its next
//! owner; its `sd-dlq-topic`/`-partition`/`-offset` headers identify the copies.
//!
//! **Order.** Within the order chosen, a record starts only after the one before it
//! finished, its retries included. A revoked partition's jobs that run past
//! `revoke_timeout` may overlap with the new owner's; pick it above your slowest
//! handler.
//!
//! **Not offered**: Kafka transactions (consume-transform-produce exactly once). They
//! are not implemented because the broker the tests run against cannot commit a
//! transaction; effects are made once with the inbox instead.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sd_pool::kafka::{KafkaConsumer, RecordOrder};
//! use sd_pool::{Order, Pool};
//!
//! let pool = Pool::builder().workers(64).queue(256).order(Order::PerKey).build()?;
//! let consumer = KafkaConsumer::builder("127.0.0.1:9092")
//!     .group("billing")
//!     .topic("orders")
//!     .order(RecordOrder::PerKey)
//!     .dead_letter_topic("orders.dlq")
//!     .build(pool)?;
//! let report = consumer
//!     .run(
//!         |record| async move {
//!             let order = record.payload().unwrap_or_default();
//!             println!("order {} at {}", String::from_utf8_lossy(order), record.offset());
//!             Ok::<(), std::io::Error>(())
//!         },
//!         tokio::time::sleep(std::time::Duration::from_secs(60)),
//!     )
//!     .await?;
//! println!("{} handled", report.handled);
//! # Ok(())
//! # }
//! ```

mod job;
mod poll;
mod record;
mod skipset;
mod tracker;

use std::fmt;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;

pub use self::job::{DLQ_ATTEMPTS, DLQ_ERROR, DLQ_OFFSET, DLQ_PARTITION, DLQ_TOPIC};
pub use self::record::{KafkaReport, Record, RecordOrder};
/// The retry policy of a failing handler (from sd-core, re-exported).
pub use sd_core::{RetryPolicy, RetryPolicyBuilder};

use self::job::{DeadLetters, JobParts};
use self::poll::{Context, Dispatched, Shared, Timing};
use self::record::Counters;
use self::tracker::Tracker;
use crate::error::{Error, Result};
use crate::fasthash::hash_one;
use crate::{Job, Order, Pool};

/// Properties the builder sets itself, and the setter to use instead.
const OWN_PROPERTIES: [(&str, &str); 4] = [
    ("bootstrap.servers", "the builder's argument"),
    ("group.id", "`group`"),
    (
        "enable.auto.commit",
        "nothing: the consumer commits its watermark itself",
    ),
    (
        "enable.auto.offset.store",
        "nothing: the consumer stores its watermark itself",
    ),
];

/// Builds a [`KafkaConsumer`]; see [`KafkaConsumer::builder`]. `group` and at least one
/// `topic` must be set; the rest have defaults: order per key, commit every second,
/// window 1,000, 10,000 records held per partition, revoke timeout 10 s, drain timeout 30 s, three attempts 100 ms apart
/// (doubling), no dead-letter topic, commit metadata up to 4,000 bytes.
#[derive(Clone)]
pub struct KafkaConsumerBuilder {
    bootstrap_servers: String,
    group: String,
    topics: Vec<String>,
    order: RecordOrder,
    commit_interval: Duration,
    max_window: usize,
    max_held: usize,
    revoke_timeout: Duration,
    drain_timeout: Duration,
    retry: RetryPolicy,
    dead_letter_topic: Option<String>,
    metadata_limit: usize,
    config: ClientConfig,
}

impl fmt::Debug for KafkaConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumerBuilder")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group", &self.group)
            .field("topics", &self.topics)
            .field("order", &self.order)
            .field("max_window", &self.max_window)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumerBuilder {
    /// The consumer group (`group.id`).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// A topic to consume (call again for more).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Which records may run at the same time (default [`RecordOrder::PerKey`]).
    pub fn order(mut self, order: RecordOrder) -> Self {
        self.order = order;
        self
    }

    /// How often finished offsets are committed while running (default 1 s).
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How many finished records of a partition may wait behind an unfinished one before
    /// the partition is paused (default 1,000). It bounds what runs again after a crash
    /// when the commit metadata is lost.
    pub fn max_window(mut self, records: usize) -> Self {
        self.max_window = records;
        self
    }

    /// How many polled records of a partition may wait for room in the pool before the
    /// partition is paused (default 10,000); it is resumed when half of them are handed
    /// to the pool. It bounds the records held in memory per partition.
    pub fn max_held(mut self, records: usize) -> Self {
        self.max_held = records;
        self
    }

    /// How long a revoke waits for the jobs of the revoked partitions already in the pool
    /// before it commits and lets them go (default 10 s); jobs not started by then never
    /// start. Keep it below the group's `max.poll.interval.ms`.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// How long `run` waits for running jobs after its shutdown future resolved
    /// (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Attempts and backoff for a failing handler (default: three attempts, 100 ms then
    /// 200 ms apart). The policy must bound its attempts.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Where records go after their last failed attempt (default: none; they are logged
    /// and committed past).
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// The most bytes of commit metadata listing offsets finished above the watermark
    /// (default 4,000; brokers keep 4,096 by default). 0 sends none.
    pub fn commit_metadata(mut self, bytes: usize) -> Self {
        self.metadata_limit = bytes;
        self
    }

    /// Further librdkafka properties for the consumer and the dead-letter producer (TLS,
    /// SASL, `session.timeout.ms`, `auto.offset.reset`, ...). They may not set
    /// `bootstrap.servers`, `group.id`, `enable.auto.commit` or
    /// `enable.auto.offset.store`.
    ///
    /// librdkafka keeps one fetch request in flight per broker, and a fetch at the end of
    /// a partition waits up to `fetch.wait.max.ms` (500 ms by default) for new records:
    /// partitions that become ready meanwhile (after an assignment, say) wait for it. A
    /// lower value starts them sooner, at the cost of more fetch requests while idle.
    pub fn client_config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// The consumer; fails with [`Error::InvalidConfig`] naming `bootstrap_servers`,
    /// `group`, `topic`, `order` (per key or per partition on a pool that is not
    /// [`Order::PerKey`] or [`Order::Serial`]), `commit_interval`, `max_window`, `max_held`,
    /// `revoke_timeout`, `drain_timeout`, `retry` (unbounded attempts, which would stall a
    /// partition), `dead_letter_topic` or `client_config`.
    pub fn build(self, pool: Pool) -> Result<KafkaConsumer> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(Error::config(
                "bootstrap_servers",
                "must name at least one `host:port`",
            ));
        }
        if self.group.trim().is_empty() {
            return Err(Error::config("group", "must name the consumer group"));
        }
        if self.topics.is_empty() {
            return Err(Error::config("topic", "name at least one topic to consume"));
        }
        if let Some(bad) = self
            .topics
            .iter()
            .find(|t| !sd_core::name::is_kafka_topic(t))
        {
            return Err(Error::config(
                "topic",
                format!("`{bad}` is not a Kafka topic name (1 to 249 of [a-zA-Z0-9._-])"),
            ));
        }
        if self.order != RecordOrder::Unordered
            && !matches!(pool.order(), Order::PerKey | Order::Serial)
        {
            return Err(Error::config(
                "order",
                "per-key and per-partition order need a pool built with Order::PerKey",
            ));
        }
        for (field, d) in [
            ("commit_interval", self.commit_interval),
            ("revoke_timeout", self.revoke_timeout),
            ("drain_timeout", self.drain_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::config(field, "must be above zero"));
            }
        }
        if self.max_window == 0 {
            return Err(Error::config("max_window", "must be at least 1"));
        }
        if self.max_held < 2 {
            return Err(Error::config(
                "max_held",
                "must be at least 2 (a partition resumes at half of it)",
            ));
        }
        if self.retry.max_attempts().is_none() {
            return Err(Error::config(
                "retry",
                "must bound its attempts: a record retried forever stalls its partition",
            ));
        }
        if let Some(dlq) = &self.dead_letter_topic {
            if !sd_core::name::is_kafka_topic(dlq) {
                return Err(Error::config(
                    "dead_letter_topic",
                    format!("`{dlq}` is not a Kafka topic name"),
                ));
            }
            if self.topics.contains(dlq) {
                return Err(Error::config(
                    "dead_letter_topic",
                    "is one of the consumed topics; a dead letter would come back",
                ));
            }
        }
        for (property, instead) in OWN_PROPERTIES {
            if self.config.get(property).is_some() {
                return Err(Error::config(
                    "client_config",
                    format!("sets `{property}`; use {instead}"),
                ));
            }
        }
        let mut config = self.config;
        config.set("bootstrap.servers", &self.bootstrap_servers);
        let dead_letters = match self.dead_letter_topic {
            Some(topic) => {
                let mut producer = config.clone();
                producer
                    .set("enable.idempotence", "true")
                    .set("acks", "all");
                Some(DeadLetters {
                    topic: Arc::from(topic),
                    producer: producer.create().map_err(config_err)?,
                    timeout: Duration::from_secs(30),
                })
            }
            None => None,
        };
        config
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        if config.get("auto.offset.reset").is_none() {
            config.set("auto.offset.reset", "earliest");
        }
        // Fail here, not in `run`, on a property librdkafka refuses.
        let probe: BaseConsumer = config.create().map_err(config_err)?;
        drop(probe);
        Ok(KafkaConsumer {
            meters: crate::observe::ConsumerMeters::new(
                pool.name(),
                sd_core::observe::backend::KAFKA,
            ),
            pool,
            topics: self.topics,
            order: self.order,
            timing: Timing {
                commit_interval: self.commit_interval,
                revoke_timeout: self.revoke_timeout,
                drain_timeout: self.drain_timeout,
                broker_timeout: Duration::from_secs(10),
            },
            max_window: self.max_window,
            max_held: self.max_held,
            metadata_limit: self.metadata_limit,
            retry: self.retry,
            dead_letters,
            config,
            running: tokio::sync::Mutex::new(()),
        })
    }
}

fn config_err(e: KafkaError) -> Error {
    match e {
        // librdkafka checks properties against each other when the client is created.
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(..) => {
            Error::config("client_config", e.to_string())
        }
        other => Error::Backend {
            backend: "kafka",
            operation: "create client",
            source: Box::new(other),
        },
    }
}

/// Sets the poll thread's stop flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A consumer-group member feeding a [`Pool`]; see the [module docs](self).
pub struct KafkaConsumer {
    pool: Pool,
    topics: Vec<String>,
    order: RecordOrder,
    timing: Timing,
    max_window: usize,
    max_held: usize,
    metadata_limit: usize,
    retry: RetryPolicy,
    dead_letters: Option<DeadLetters>,
    config: ClientConfig,
    meters: crate::observe::ConsumerMeters,
    /// Calls to `run` take turns.
    running: tokio::sync::Mutex<()>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("pool", &self.pool)
            .field("topics", &self.topics)
            .field("order", &self.order)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// A builder for a member of a group reading from `bootstrap_servers`
    /// (`host:port[,host:port...]`).
    pub fn builder(bootstrap_servers: impl Into<String>) -> KafkaConsumerBuilder {
        KafkaConsumerBuilder {
            bootstrap_servers: bootstrap_servers.into(),
            group: String::new(),
            topics: Vec::new(),
            order: RecordOrder::PerKey,
            commit_interval: Duration::from_secs(1),
            max_window: 1_000,
            max_held: 10_000,
            revoke_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            retry: RetryPolicy::builder()
                .initial_interval(Duration::from_millis(100))
                .max_attempts(3)
                .build()
                .unwrap_or_default(),
            dead_letter_topic: None,
            metadata_limit: 4_000,
            config: ClientConfig::new(),
        }
    }

    /// The pool the records run on.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Joins the group, then polls, runs and commits until `shutdown` resolves; then
    /// stops dispatching, waits up to the drain timeout for running jobs, commits and
    /// leaves the group (the partitions move to the other members).
    ///
    /// Fails with [`Error::Backend`] when the consumer cannot be created or subscribe, or
    /// when a synchronous commit (at a revoke or at the end) failed: the records above
    /// the last commit then run again on their next owner. Fails with [`Error::Closed`]
    /// when someone else closed the pool. Connection trouble while running is retried by
    /// librdkafka and logged; it does not end the run.
    pub async fn run<H, Fut, E>(
        &self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<KafkaReport>
    where
        H: Fn(Record) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let _turn = self.running.lock().await;
        let (reports_tx, reports_rx) = std::sync::mpsc::channel();
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker::new(
                self.max_window,
                self.max_held,
                self.metadata_limit,
            )?),
            reports: Mutex::new(reports_rx),
            counters: Arc::clone(&counters),
            timing: self.timing.clone(),
            topics: Mutex::default(),
            failure: Mutex::new(None),
            pool: self.pool.clone(),
            deferred: Mutex::new(self.pool.deferred()),
            meters: self.meters.clone(),
        });
        let consumer: BaseConsumer<Context> = self
            .config
            .create_with_context(Context(Arc::clone(&shared)))
            .map_err(config_err)?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| Error::Backend {
                backend: "kafka",
                operation: "subscribe",
                source: Box::new(source),
            })?;
        let parts = Arc::new(JobParts {
            handler,
            retry: self.retry,
            dead_letters: self.dead_letters.clone(),
            counters: Arc::clone(&counters),
            reports: reports_tx,
            meters: self.meters.clone(),
        });
        let (pool, order, batch) = (self.pool.clone(), self.order, Arc::clone(&shared));
        let dispatch: poll::Dispatch = Box::new(move |record, slot, revoked| {
            let job = Job::new(parts.job(record.clone(), slot, revoked));
            #[cfg(feature = "otel")]
            let job = job.with_trace_parent(record.trace_parent());
            let by_partition = (record.topic(), record.partition());
            let job = match (order, record.key()) {
                (RecordOrder::PerKey, Some(key)) => {
                    job.with_key_hash(hash_one(&(record.topic(), key)))
                }
                (RecordOrder::Unordered, _) => job,
                _ => job.with_key_hash(hash_one(&by_partition)),
            };
            let submitted = pool.try_submit_deferred(job, &mut poll::lock(&batch.deferred));
            match submitted {
                Ok(()) => Dispatched::Taken,
                Err(rejected) => {
                    let full = matches!(rejected.error, Error::Full { .. });
                    rejected.job.into_future().disarm();
                    if full {
                        Dispatched::Full(record)
                    } else {
                        Dispatched::Closed
                    }
                }
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        // Dropping `run` stops the thread too (it drains and commits on its own).
        let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread = {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("sd-pool-kafka".into())
                .spawn(move || {
                    let result = poll::poll_loop(consumer, &shared, dispatch, &stop);
                    let _ = done_tx.send(result);
                })
                .map_err(|source| Error::Backend {
                    backend: "kafka",
                    operation: "spawn the poll thread",
                    source: Box::new(source),
                })?
        };
        let mut done_rx = done_rx;
        let result = tokio::select! {
            result = &mut done_rx => result,
            () = shutdown => {
                stop.store(true, Ordering::Release);
                done_rx.await
            }
        };
        // The thread has sent its result and is about to end; joining cannot block long.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        match result {
            Ok(Ok(())) => Ok(counters.report()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::Backend {
                backend: "kafka",
                operation: "poll",
                source: "the poll thread ended without a result (it panicked)".into(),
            }),
        }
    }
}
