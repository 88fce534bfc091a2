//! A Redis Streams consumer group feeding a [`Pool`].
//!
//! [`StreamConsumer::run`] reads entries with `XREADGROUP`, submits one job per entry to
//! the pool (waiting when it is full, so reading slows down with the workers), tags each
//! with its read sequence as the offset, and acknowledges with `XACK` only entries at or
//! below the pool's watermark whose handler succeeded. Every `claim_every` it takes over
//! entries that another consumer (or this one, after a failed handler) left pending
//! longer than `min_idle`: `XPENDING` with `IDLE` lists them with their delivery counts,
//! `XCLAIM` takes them (`XAUTOCLAIM` would not say how often each was delivered).
//!
//! **Poison entries**: every [`Entry`] carries its delivery count
//! ([`Entry::deliveries`]). With [`max_deliveries`](StreamConsumerBuilder::max_deliveries)
//! set, an entry whose handler fails on its last allowed delivery is moved to the
//! [dead-letter stream](StreamConsumerBuilder::dead_letter_stream) with its fields plus
//! [`DLQ_STREAM`], [`DLQ_GROUP`], [`DLQ_ID`], [`DLQ_ERROR`] (the handler error's
//! `Display`) and [`DLQ_DELIVERIES`], and acknowledged in its stream, in one script (so
//! it is in exactly one of the two); an entry claimed with more deliveries than that
//! (its last delivery panicked, or its consumer died) is moved without running. The
//! entries behind it keep flowing: a failed entry never holds up its key.
//! [`StreamConsumer::redrive`] moves dead letters back once the cause is fixed.
//! Without `max_deliveries`, a failing entry is redelivered after every `min_idle`,
//! forever.
//!
//! **Retrying `run`**: when a Redis command fails (the server restarted, a response
//! timed out), `run` returns the error and leaves the pool running. Call it again, after
//! a back-off: it carries on from where the failed call stopped (read sequence, entries in
//! flight, acknowledgements still owed), so `loop { consumer.run(..) }` survives a Redis
//! outage. Entries whose `XREADGROUP` reply was lost to the fault are pending in the group
//! and reclaimed after `min_idle`. Each `run` first creates the stream and the group if
//! they are missing, so after a Redis that restarted empty (no persistence) the consumer
//! rejoins and carries on with what is produced from then on; what the lost stream held
//! is gone with it.
//!
//! **At least once**: an entry is acknowledged only after its handler returned `Ok` and
//! every entry this consumer read before it finished. A consumer that dies leaves its
//! unacknowledged entries pending; another consumer of the group reclaims them after
//! `min_idle` and runs them again. So a handler can see an entry more than once (after a
//! crash, a failed handler, or a handler running longer than `min_idle`) and must be
//! idempotent or deduplicate by [`Entry::id`]. Pick `min_idle` above your slowest
//! handler.
//!
//! **Redis Cluster, Sentinel and failover**: give `build` an
//! [`sd_core::failover::FailoverConnection`] (one server, a Sentinel group or a Cluster)
//! and the consumer follows a failover: a call that meets it is retried within the
//! connection's `failover_timeout`, and a `run` that still fails is called again (see
//! above). Every command names one key, the stream (`XGROUP`, `XREADGROUP`, `XACK`,
//! `XPENDING`, `XCLAIM`; the group lives inside it), except the two dead-letter scripts,
//! which write the stream and the dead-letter stream together: on a Cluster both must sit
//! in one slot, so the default dead-letter stream shares the stream's hash tag
//! (`{orders}:dead` for `orders`) and [`build`](StreamConsumerBuilder::build) refuses a
//! [`dead_letter_stream`](StreamConsumerBuilder::dead_letter_stream) with another tag
//! ([`Error::InvalidConfig`] naming `dead_letter_stream`). Streams of different names may
//! live on different shards; each consumer reads one. What a failover costs, since Redis
//! replicates asynchronously: acknowledgements and group reads the old master had not
//! passed on are lost, so entries already handled are delivered again (duplicates);
//! entries whose `XREADGROUP` reply died with the connection wait in the group until
//! `min_idle` and then run after later entries of their key (the failover test never met
//! one: its first handlings kept per-key order); entries the old master took and never
//! passed on are gone from the stream, which the producer prevents by waiting for a
//! replica (sd-outbox's `wait_for_replicas`). RELIABILITY.md at the repository root has
//! the figures of the failover test (sd-outbox's `tests/failover.rs`, the outbox relay
//! into this consumer on a Cluster with replicas).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Value, cmd};

use crate::error::{Error, Result};
use crate::pool::Pool;

mod dead_letter;
mod reply;
mod run;

use dead_letter::DeadLetter;
pub use dead_letter::{DLQ_DELIVERIES, DLQ_ERROR, DLQ_GROUP, DLQ_ID, DLQ_STREAM};
use run::Run;

/// Where and how a [`StreamConsumer`] reads: what its builder collected.
#[derive(Debug, Clone)]
struct Settings {
    stream: String,
    group: String,
    consumer: String,
    partition: u32,
    batch: usize,
    block: Duration,
    min_idle: Duration,
    claim_every: Duration,
    key_field: Option<String>,
    drain_timeout: Duration,
    max_deliveries: Option<u64>,
    dead_letter_stream: Option<String>,
}

impl Settings {
    /// The dead-letter stream's name: the one set, or the stream's name with `:dead`
    /// (and the stream's hash tag).
    fn dead_letter_stream(&self) -> String {
        self.dead_letter_stream
            .clone()
            .unwrap_or_else(|| dead_letter::default_name(&self.stream))
    }
}

/// Builds a [`StreamConsumer`]; see [`StreamConsumer::builder`]. `stream`, `group` and
/// `consumer` must be set; the rest have defaults: batch 100, block 100 ms, min idle
/// 30 s, claim every 5 s, no key field, drain timeout 30 s, partition 0, no delivery
/// limit (no dead-letter stream).
#[derive(Debug, Clone)]
pub struct StreamConsumerBuilder {
    settings: Settings,
}

impl StreamConsumerBuilder {
    /// The stream to read (required). It is created, with the group, if missing.
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.settings.stream = stream.into();
        self
    }

    /// The consumer group (required). It reads from the start of the stream when it is
    /// created.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.settings.group = group.into();
        self
    }

    /// This consumer's name in the group (required); unique per live consumer.
    pub fn consumer(mut self, consumer: impl Into<String>) -> Self {
        self.settings.consumer = consumer.into();
        self
    }

    /// Entries per `XREADGROUP`/`XAUTOCLAIM` (`COUNT`); at least 1.
    pub fn batch(mut self, n: usize) -> Self {
        self.settings.batch = n;
        self
    }

    /// How long one `XREADGROUP` blocks; at least 1 ms (`BLOCK 0` would block forever),
    /// and below the connection's response timeout (500 ms by default in redis-rs, which
    /// [`connect`](Self::connect) checks), or every idle read fails.
    pub fn block(mut self, d: Duration) -> Self {
        self.settings.block = d;
        self
    }

    /// How long an entry must sit unacknowledged before `XAUTOCLAIM` takes it over; at
    /// least 1 ms. Make it longer than the slowest handler, or live consumers steal each
    /// other's work.
    pub fn min_idle(mut self, d: Duration) -> Self {
        self.settings.min_idle = d;
        self
    }

    /// How often to look for entries to reclaim; at least 1 ms.
    pub fn claim_every(mut self, d: Duration) -> Self {
        self.settings.claim_every = d;
        self
    }

    /// The entry field whose value is the job's ordering key (with [`Order::PerKey`]).
    ///
    /// [`Order::PerKey`]: crate::Order::PerKey
    pub fn key_field(mut self, field: impl Into<String>) -> Self {
        self.settings.key_field = Some(field.into());
        self
    }

    /// How long `run` waits for in-flight entries after the shutdown signal.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.settings.drain_timeout = d;
        self
    }

    /// Moves an entry to the dead-letter stream once it has been delivered `n` times
    /// without success (at least 1; off by default: a failing entry is redelivered
    /// forever). The handler runs at most `n` times per entry: when it fails on the
    /// `n`-th delivery, the entry is moved with the error; when an entry is claimed with
    /// more than `n` deliveries (its `n`-th panicked, ran past `min_idle`, or its
    /// consumer died), it is moved without running, with an error saying so.
    ///
    /// Deliveries are Redis's count for the group: reads and claims by every consumer.
    /// With several consumers the limit holds for the group, and an entry is moved by
    /// one of them only (the move acknowledges it first, and writes nothing if another
    /// consumer acknowledged it).
    pub fn max_deliveries(mut self, n: u64) -> Self {
        self.settings.max_deliveries = Some(n);
        self
    }

    /// The dead-letter stream (default: the stream's name with `:dead`, inside the
    /// stream's hash tag: `{orders}:dead` for `orders`, `{orders}:in:dead` for
    /// `{orders}:in`). It must hash like the stream (the same `{tag}`, checked by
    /// `build`), since one script writes both and Redis Cluster runs a script on one
    /// slot. Requires [`max_deliveries`](Self::max_deliveries).
    pub fn dead_letter_stream(mut self, stream: impl Into<String>) -> Self {
        self.settings.dead_letter_stream = Some(stream.into());
        self
    }

    /// The pool partition this consumer's offsets are tracked under.
    pub fn partition(mut self, p: u32) -> Self {
        self.settings.partition = p;
        self
    }

    /// Checks the values: [`Error::InvalidConfig`] names the first field out of range.
    fn check(&self, response_timeout: Option<Duration>) -> Result<()> {
        let cfg = &self.settings;
        let refuse = |field, reason: &'static str| Err(Error::config(field, reason));
        for (field, value) in [
            ("stream", &cfg.stream),
            ("group", &cfg.group),
            ("consumer", &cfg.consumer),
        ] {
            if value.is_empty() {
                return Err(Error::config(
                    field,
                    format!("must be set; name it with `.{field}(..)`"),
                ));
            }
        }
        if cfg.batch == 0 {
            return refuse("batch", "must be at least 1 entry");
        }
        if cfg.block.as_millis() == 0 {
            return refuse(
                "block",
                "must be at least 1 ms (Redis reads BLOCK 0 as \"wait forever\")",
            );
        }
        if cfg.min_idle.as_millis() == 0 {
            return refuse(
                "min_idle",
                "must be at least 1 ms, and above the slowest handler, or consumers steal entries still running",
            );
        }
        if cfg.claim_every.as_millis() == 0 {
            return refuse("claim_every", "must be at least 1 ms");
        }
        if cfg.max_deliveries == Some(0) {
            return refuse(
                "max_deliveries",
                "must be at least 1 delivery (leave it unset to redeliver forever)",
            );
        }
        if let Some(dead) = &cfg.dead_letter_stream {
            if cfg.max_deliveries.is_none() {
                return refuse(
                    "dead_letter_stream",
                    "is set but nothing is ever moved there; set `max_deliveries` too",
                );
            }
            if dead.is_empty() || *dead == cfg.stream {
                return refuse(
                    "dead_letter_stream",
                    "must be named, and not the stream itself (a dead letter would come back)",
                );
            }
            if dead_letter::hash_tag(dead) != dead_letter::hash_tag(&cfg.stream) {
                return refuse(
                    "dead_letter_stream",
                    "must hash like the stream: give both the same {hash tag} (`{orders}` and `{orders}:dead`), since one script writes both",
                );
            }
        }
        match response_timeout {
            Some(timeout) if cfg.block >= timeout => refuse(
                "block",
                "must be below the connection's response timeout (500 ms by default), or every idle read times out; lower `block`, or pass a connection with a longer timeout to `build`",
            ),
            _ => Ok(()),
        }
    }

    /// Checks the settings, then creates the stream and the group (reading from the
    /// start) on `conn` if they do not exist. The consumer owns `pool`: `run` drains it
    /// on shutdown.
    ///
    /// `conn` is any redis-rs connection (`ConnectionLike + Clone`): a
    /// `MultiplexedConnection`, a `ConnectionManager`, a cluster connection. `XREADGROUP`
    /// blocks on it for up to [`block`](Self::block), and a multiplexed connection answers
    /// in order, so commands that other code sends on the same connection wait behind
    /// that read: give the consumer a connection of its own (for instance
    /// `client.get_multiplexed_async_connection()`), whose response timeout is above
    /// `block`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field; [`Error::Backend`] if the group cannot be
    /// created.
    pub async fn build<C>(self, mut conn: C, pool: Pool) -> Result<StreamConsumer<C>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.check(None)?;
        join_group(&mut conn, &self.settings).await?;
        Ok(StreamConsumer {
            conn,
            meters: crate::observe::ConsumerMeters::new(
                pool.name(),
                sd_core::observe::backend::REDIS,
            ),
            pool,
            cfg: self.settings,
            state: tokio::sync::Mutex::default(),
        })
    }

    /// Connects to `url` with a `ConnectionManager` of its own (redis-rs' default
    /// timeouts), then as [`build`](Self::build). Also refuses a `block` at or above that
    /// connection's response timeout.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build), and [`Error::Backend`] if the connection fails.
    pub async fn connect(self, url: &str, pool: Pool) -> Result<StreamConsumer<ConnectionManager>> {
        self.check(redis::aio::ConnectionManagerConfig::new().response_timeout())?;
        let client = redis::Client::open(url).map_err(redis_err("connect"))?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(redis_err("connect"))?;
        self.build(conn, pool).await
    }
}

/// One stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// The entry id, e.g. `1700000000000-0`.
    pub id: String,
    /// Field-value pairs in stream order.
    pub fields: Vec<(String, Vec<u8>)>,
    /// Whether this delivery came from a claim (a redelivery).
    pub reclaimed: bool,
    /// How many times the group has delivered the entry, this delivery included: 1 when
    /// read new, and one more for every claim since (by any consumer of the group), as
    /// `XPENDING` counts. See [`StreamConsumerBuilder::max_deliveries`].
    pub deliveries: u64,
}

impl Entry {
    /// The first value of `field`.
    pub fn get(&self, field: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `field` as UTF-8.
    pub fn get_str(&self, field: &str) -> Option<&str> {
        self.get(field).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The W3C trace context the entry carries: `traceparent` (and `tracestate`) in its
    /// `headers` field, a JSON object of strings as sd-outbox's Redis Streams sink writes
    /// it, else in fields of those names. `None` when there is none or it is malformed
    /// (see [`TraceParent::extract`](sd_core::trace::TraceParent::extract)). The consumer
    /// makes it the parent of the entry's job span.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn trace_parent(&self) -> Option<sd_core::trace::TraceParent> {
        use sd_core::trace::{TRACEPARENT, TraceParent};
        let headers: Option<serde_json::Map<String, serde_json::Value>> = self
            .get("headers")
            .and_then(|h| serde_json::from_slice(h).ok());
        if let Some(headers) = headers
            && headers.keys().any(|k| k.eq_ignore_ascii_case(TRACEPARENT))
        {
            let pairs = headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)));
            return TraceParent::extract(pairs);
        }
        TraceParent::extract(
            self.fields
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), std::str::from_utf8(v).ok()?))),
        )
    }
}

/// What [`StreamConsumer::run`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Entries read with `XREADGROUP`.
    pub read: u64,
    /// Entries taken over with a claim.
    pub reclaimed: u64,
    /// Entries acknowledged after their handler succeeded.
    pub acked: u64,
    /// Entries whose handler failed or panicked, left pending for redelivery.
    pub left_pending: u64,
    /// Entries moved to the dead-letter stream (and acknowledged in their stream).
    pub dead_lettered: u64,
}

/// A consumer group member that feeds a [`Pool`]; see the [module docs](self). Made by
/// [`StreamConsumer::builder`]; `C` is the connection (any redis-rs `ConnectionLike`,
/// by default a `ConnectionManager`).
pub struct StreamConsumer<C = ConnectionManager> {
    conn: C,
    pool: Pool,
    cfg: Settings,
    meters: crate::observe::ConsumerMeters,
    /// What `run` keeps between calls, so that a retried `run` continues the sequence the
    /// pool tracks and acknowledges what earlier calls read. Calls to `run` take turns.
    state: tokio::sync::Mutex<RunState>,
}

/// The part of a consumer's progress that outlives one call to `run`.
#[derive(Debug, Default)]
struct RunState {
    /// The next read sequence (the pool offset of the next entry submitted).
    next_seq: u64,
    /// Entries submitted and not yet acknowledged or given up, by read sequence.
    by_seq: BTreeMap<u64, String>,
    /// The same, by entry id, so a reclaim does not run an entry we are running.
    in_flight: HashMap<String, u64>,
    /// Sequences whose handler returned `Ok`.
    succeeded: Arc<Mutex<HashSet<u64>>>,
    /// Entries at or below the watermark whose `XACK` has not succeeded yet.
    to_ack: Vec<String>,
    /// Entries whose last allowed delivery failed, by read sequence, with the error.
    failed: Arc<Mutex<HashMap<u64, DeadLetter>>>,
    /// Entries to move to the dead-letter stream, oldest first.
    to_dead: VecDeque<DeadLetter>,
}

/// The set behind `m`, even if a job panicked holding it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `d` in whole milliseconds, as Redis commands take it.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl<C> fmt::Debug for StreamConsumer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("pool", &self.pool)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |source| Error::Backend {
        backend: "redis",
        operation: op,
        source: Box::new(source),
    }
}

impl StreamConsumer {
    /// A builder; set at least the stream, the group and this consumer's name.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use sd_pool::{Pool, redis::StreamConsumer};
    ///
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let pool = Pool::builder().workers(8).queue(64).build()?;
    /// let consumer = StreamConsumer::builder()
    ///     .stream("orders")
    ///     .group("billing")
    ///     .consumer("worker-1")
    ///     .build(client.get_multiplexed_async_connection().await?, pool)
    ///     .await?;
    /// # drop(consumer);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> StreamConsumerBuilder {
        StreamConsumerBuilder {
            settings: Settings {
                stream: String::new(),
                group: String::new(),
                consumer: String::new(),
                partition: 0,
                batch: 100,
                block: Duration::from_millis(100),
                min_idle: Duration::from_secs(30),
                claim_every: Duration::from_secs(5),
                key_field: None,
                drain_timeout: Duration::from_secs(30),
                max_deliveries: None,
                dead_letter_stream: None,
            },
        }
    }
}

impl<C> StreamConsumer<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The pool the entries run on.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Reads, runs and acknowledges entries until `shutdown` resolves; then stops
    /// reading, drains the pool (up to the drain timeout) and acknowledges what finished.
    /// Entries not finished stay pending for another consumer.
    ///
    /// A Redis error ends the call with [`Error::Backend`] and leaves the pool running;
    /// call `run` again to carry on (see the [module docs](self)). If the pool refuses an
    /// entry (closed by someone else), `run` drains, acknowledges what finished and
    /// returns that error; it returns `Ok` only after `shutdown`.
    ///
    /// The handler's error is `Display`: its text is what a dead letter records
    /// ([`DLQ_ERROR`]); `anyhow::Error`, `Box<dyn Error>`, `String` and `&str` all are.
    pub async fn run<H, Fut, E>(
        &self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ConsumerReport>
    where
        H: Fn(Entry) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        // Again on every run: a Redis that restarted empty lost the stream and the group,
        // and reading would fail with NOGROUP until they exist.
        let mut conn = self.conn.clone();
        join_group(&mut conn, &self.cfg).await?;
        let mut run = Run {
            conn,
            cfg: &self.cfg,
            pool: &self.pool,
            meters: &self.meters,
            handler: Arc::new(handler),
            state: self.state.lock().await,
            report: ConsumerReport::default(),
        };
        let mut shutdown = pin!(shutdown);
        let refused = run.read_loop(shutdown.as_mut()).await?;
        let drained = self.pool.drain(self.cfg.drain_timeout).await;
        // Entries handed back stay pending in Redis: another consumer reclaims them.
        drop(drained);
        run.ack().await?;
        match refused {
            Some(error) => Err(error),
            None => Ok(run.report),
        }
    }

    /// Moves up to `max` entries of the dead-letter stream that came from this
    /// consumer's stream back to it (once the cause is fixed), oldest first, and returns
    /// how many moved. Each is added to the stream as a new entry (a new id, at the end,
    /// so after entries added since: its place in its key's order is not kept) with its
    /// own fields (the `sd-dlq-*` ones dropped), read by the group like any new entry
    /// with a fresh delivery count, and deleted from the dead-letter stream in the same
    /// script step. Dead letters of other streams sharing the dead-letter stream are
    /// left where they are. Safe while `run` runs.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if Redis fails; what moved before the failure stays moved.
    pub async fn redrive(&self, max: usize) -> Result<u64> {
        dead_letter::redrive(&mut self.conn.clone(), &self.cfg, max).await
    }
}

/// Creates the stream and the group (reading from the start) unless the group exists.
async fn join_group(conn: &mut impl ConnectionLike, cfg: &Settings) -> Result<()> {
    let created: redis::RedisResult<Value> = cmd("XGROUP")
        .arg("CREATE")
        .arg(&cfg.stream)
        .arg(&cfg.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(source) => Err(redis_err("XGROUP CREATE")(source)),
    }
}
