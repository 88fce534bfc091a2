//! A Redis Streams consumer group feeding a [`Pool`].
//!
//! [`StreamConsumer::run`] reads entries with `XREADGROUP`, submits one job per entry to
//! the pool (waiting when it is full, so reading slows down with the workers), tags each
//! with its read sequence as the offset, and acknowledges with `XACK` only entries at or
//! below the pool's watermark whose handler succeeded. Every `claim_every` it runs
//! `XAUTOCLAIM` to take over entries that another consumer (or this one, after a failed
//! handler) left pending longer than `min_idle`.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Value, cmd};
use tokio::time::Instant;

use crate::error::{Error, Result, UnexpectedReply};
use crate::pool::{Job, Pool};

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
}

/// Builds a [`StreamConsumer`]; see [`StreamConsumer::builder`]. `stream`, `group` and
/// `consumer` must be set; the rest have defaults: batch 100, block 100 ms, min idle
/// 30 s, claim every 5 s, no key field, drain timeout 30 s, partition 0.
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
    /// Whether this delivery came from `XAUTOCLAIM` (a redelivery).
    pub reclaimed: bool,
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
}

/// What [`StreamConsumer::run`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// Entries read with `XREADGROUP`.
    pub read: u64,
    /// Entries taken over with `XAUTOCLAIM`.
    pub reclaimed: u64,
    /// Entries acknowledged.
    pub acked: u64,
    /// Entries whose handler failed or panicked, left pending for redelivery.
    pub left_pending: u64,
}

/// A consumer group member that feeds a [`Pool`]; see the [module docs](self). Made by
/// [`StreamConsumer::builder`]; `C` is the connection (any redis-rs `ConnectionLike`,
/// by default a `ConnectionManager`).
pub struct StreamConsumer<C = ConnectionManager> {
    conn: C,
    pool: Pool,
    cfg: Settings,
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
    pub async fn run<H, Fut, E>(
        &self,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ConsumerReport>
    where
        H: Fn(Entry) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Send + 'static,
    {
        // Again on every run: a Redis that restarted empty lost the stream and the group,
        // and reading would fail with NOGROUP until they exist.
        let mut conn = self.conn.clone();
        join_group(&mut conn, &self.cfg).await?;
        let mut run = Run {
            conn,
            cfg: &self.cfg,
            pool: &self.pool,
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

struct Run<'a, H, C> {
    conn: C,
    cfg: &'a Settings,
    pool: &'a Pool,
    handler: Arc<H>,
    state: tokio::sync::MutexGuard<'a, RunState>,
    report: ConsumerReport,
}

impl<H, Fut, E, C> Run<'_, H, C>
where
    C: ConnectionLike + Send,
    H: Fn(Entry) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    /// Claims, reads, submits and acknowledges until `shutdown` fires (`Ok(None)`) or the
    /// pool refuses an entry (`Ok(Some(error))`). A Redis error is returned as is.
    async fn read_loop(
        &mut self,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Error>> {
        let mut cursor = "0-0".to_owned();
        let mut next_claim = Instant::now();
        loop {
            if Instant::now() >= next_claim {
                let (next, entries) = self.autoclaim(&cursor).await?;
                self.report.reclaimed += entries.len() as u64;
                if let Some(end) = self.submit_all(entries, shutdown.as_mut()).await.end() {
                    return Ok(end);
                }
                if next == "0-0" {
                    next_claim = Instant::now() + self.cfg.claim_every;
                }
                cursor = next;
            }
            let read = tokio::select! {
                biased;
                () = shutdown.as_mut() => return Ok(None),
                read = self.read() => read?,
            };
            self.report.read += read.len() as u64;
            let submitted = self.submit_all(read, shutdown.as_mut()).await;
            self.ack().await?;
            if let Some(end) = submitted.end() {
                return Ok(end);
            }
        }
    }

    async fn read(&mut self) -> Result<Vec<Entry>> {
        let reply: Value = cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch)
            .arg("BLOCK")
            .arg(u64::try_from(self.cfg.block.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS")
            .arg(&self.cfg.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XREADGROUP"))?;
        parse_read(reply)
    }

    async fn autoclaim(&mut self, cursor: &str) -> Result<(String, Vec<Entry>)> {
        let reply: Value = cmd("XAUTOCLAIM")
            .arg(&self.cfg.stream)
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg(u64::try_from(self.cfg.min_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(cursor)
            .arg("COUNT")
            .arg(self.cfg.batch)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XAUTOCLAIM"))?;
        let mut parts = match reply {
            Value::Array(parts) => parts.into_iter(),
            _ => return Err(reply_err("XAUTOCLAIM", "not an array")),
        };
        let next = parts
            .next()
            .and_then(|v| as_string(&v))
            .ok_or_else(|| reply_err("XAUTOCLAIM", "no cursor"))?;
        let mut entries = parse_entries(parts.next().unwrap_or(Value::Nil))?;
        for e in &mut entries {
            e.reclaimed = true;
        }
        entries.retain(|e| !self.state.in_flight.contains_key(&e.id));
        Ok((next, entries))
    }

    /// Submits entries in order, waiting for room, until `shutdown` fires or the pool
    /// refuses one; entries not submitted stay pending in Redis.
    async fn submit_all(
        &mut self,
        entries: Vec<Entry>,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Submitted {
        for entry in entries {
            let seq = self.state.next_seq;
            let id = entry.id.clone();
            let key = self
                .cfg
                .key_field
                .as_deref()
                .and_then(|f| entry.get(f).map(<[u8]>::to_vec));
            let (handler, succeeded) =
                (Arc::clone(&self.handler), Arc::clone(&self.state.succeeded));
            let mut job = Job::new(async move {
                let ok = handler(entry).await.is_ok();
                if ok {
                    succeeded
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(seq);
                }
                ok
            })
            .with_offset(self.cfg.partition, seq);
            if let Some(key) = key {
                job = job.with_key(&key);
            }
            let submitted = tokio::select! {
                biased;
                () = shutdown.as_mut() => return Submitted::Shutdown,
                s = self.pool.submit(job) => s,
            };
            match submitted {
                Ok(_) => {
                    let state = &mut *self.state;
                    state.next_seq += 1;
                    state.by_seq.insert(seq, id.clone());
                    state.in_flight.insert(id, seq);
                }
                Err(rejected) => {
                    // Closed, or an offset error (another user of the partition): the
                    // entry stays pending and is reclaimed later.
                    tracing::warn!(entry = %id, error = %rejected, "sd-pool: entry not submitted");
                    return Submitted::Refused(rejected.error);
                }
            }
        }
        Submitted::All
    }

    /// Acknowledges the succeeded entries at or below the watermark and forgets the
    /// failed ones there (they stay pending for `XAUTOCLAIM`). Ids whose `XACK` fails
    /// are kept and sent again by the next call (of this run or the next).
    async fn ack(&mut self) -> Result<()> {
        if let Some(mark) = self.pool.watermark(self.cfg.partition) {
            let state = &mut *self.state;
            let mut succeeded = state.succeeded.lock().unwrap_or_else(|p| p.into_inner());
            while let Some(entry) = state.by_seq.first_entry() {
                if *entry.key() > mark {
                    break;
                }
                let (seq, id) = entry.remove_entry();
                state.in_flight.remove(&id);
                if succeeded.remove(&seq) {
                    state.to_ack.push(id);
                } else {
                    self.report.left_pending += 1;
                }
            }
        }
        if self.state.to_ack.is_empty() {
            return Ok(());
        }
        let _: Value = cmd("XACK")
            .arg(&self.cfg.stream)
            .arg(&self.cfg.group)
            .arg(&self.state.to_ack)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XACK"))?;
        self.report.acked += self.state.to_ack.len() as u64;
        self.state.to_ack.clear();
        Ok(())
    }
}

/// How [`Run::submit_all`] ended.
enum Submitted {
    /// Every entry is in the pool.
    All,
    /// The shutdown signal fired.
    Shutdown,
    /// The pool refused an entry.
    Refused(Error),
}

impl Submitted {
    /// `None` to read on; otherwise how [`Run::read_loop`] ends (`Some(None)` for the
    /// shutdown, `Some(Some(error))` for a refusal).
    fn end(self) -> Option<Option<Error>> {
        match self {
            Submitted::All => None,
            Submitted::Shutdown => Some(None),
            Submitted::Refused(error) => Some(Some(error)),
        }
    }
}

fn reply_err(op: &'static str, what: &'static str) -> Error {
    Error::Backend {
        backend: "redis",
        operation: op,
        source: Box::new(UnexpectedReply { what }),
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// `XREADGROUP` reply: nil, or `[[stream, [entry...]]]` (RESP2) / `{stream: [entry...]}` (RESP3).
fn parse_read(reply: Value) -> Result<Vec<Entry>> {
    const OP: &str = "XREADGROUP";
    let streams: Vec<Value> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => return Err(reply_err(OP, "not an array or map")),
    };
    let mut out = Vec::new();
    for entries in streams {
        out.extend(parse_entries(entries)?);
    }
    Ok(out)
}

/// `[[id, [field, value, ...]], ...]`; entries deleted from the stream (nil) are skipped.
fn parse_entries(v: Value) -> Result<Vec<Entry>> {
    const OP: &str = "stream entries";
    let items = match v {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        _ => return Err(reply_err(OP, "not an array")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(parts) = item else { continue };
        let mut parts = parts.into_iter();
        let id = parts
            .next()
            .and_then(|v| as_string(&v))
            .ok_or_else(|| reply_err(OP, "entry without an id"))?;
        let fields = match parts.next() {
            Some(Value::Array(kv)) => {
                let mut fields = Vec::with_capacity(kv.len() / 2);
                let mut kv = kv.into_iter();
                while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                    let k = as_string(&k).ok_or_else(|| reply_err(OP, "field name"))?;
                    fields.push((k, as_bytes(v).unwrap_or_default()));
                }
                fields
            }
            Some(Value::Map(kv)) => kv
                .into_iter()
                .filter_map(|(k, v)| Some((as_string(&k)?, as_bytes(v).unwrap_or_default())))
                .collect(),
            // Deleted entry (Redis 6.2 XAUTOCLAIM) or no fields: nothing to run.
            _ => continue,
        };
        out.push(Entry {
            id,
            fields,
            reclaimed: false,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_replies_and_rejects_nonsense() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("k"), bulk("v")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read(reply).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].get_str("k"), Some("v"));
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        assert!(parse_read(Value::Int(3)).is_err());
        assert!(parse_entries(Value::Int(3)).is_err());
        assert!(parse_entries(Value::Array(vec![Value::Array(vec![Value::Int(1)])])).is_err());
    }
}
