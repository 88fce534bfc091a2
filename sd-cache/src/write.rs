//! Write policies: write-through and write-behind in front of a [`Store`].
//!
//! | policy | on write | pick it for |
//! |---|---|---|
//! | cache-aside (no wrapper) | write the store yourself, then [`invalidate`](crate::Cache::invalidate) | most data: simplest, the next read loads the truth |
//! | [`WriteThrough`] | store first, then cache; a failed store leaves no new value cached | records read right after they are written (profiles, settings) |
//! | [`WriteBehind`] | cache now, store later in coalesced batches | counters, analytics, last-seen times: many writes, losing the order of intermediate values is fine |
//!
//! Write-behind keeps everything accepted in a bounded buffer (writers wait when it is full),
//! coalesces writes to one key, flushes by batch size (default 50 keys) or interval
//! (default 1 s), retries a failing batch with exponential backoff, hands what still fails
//! to a dead-letter hook, and flushes everything on [`WriteBehind::shutdown`]. A write is
//! either stored, superseded by a later write to the same key (counted as coalesced), or
//! dead-lettered: never dropped silently. The buffer lives in this process: writes accepted
//! but not yet flushed are lost if the process dies (use sd-outbox when that matters).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::memory::Cache;
use crate::{Error, Result, RetryPolicy, SharedError};

/// 4 attempts, 100 ms doubling to at most 10 s, no jitter.
fn default_retry() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(100))
        .max_interval(Duration::from_secs(10))
        .max_attempts(4)
        .jitter(0.0)
        .build()
        .unwrap_or_default()
}

/// One write to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp<V> {
    /// Store this value for the key.
    Put(V),
    /// Remove the key.
    Delete,
}

/// The system of record behind a cache (a database table, a service).
///
/// `write_batch` must apply every write or report an error; after an error the whole batch
/// is retried, so writes must be idempotent (an upsert or a delete).
pub trait Store<K: Send + Sync, V: Send + Sync>: Send + Sync + 'static {
    /// The store's error: any error that converts into a `BoxError` (your own error type,
    /// `anyhow::Error`, a `Box<dyn Error + Send + Sync>`).
    type Error: Into<sd_core::BoxError> + Send + 'static;

    /// Applies one write.
    fn write(
        &self,
        key: &K,
        op: &WriteOp<V>,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;

    /// Applies a batch (distinct keys). The default writes them one by one; override it
    /// with one multi-row statement.
    fn write_batch(
        &self,
        batch: &[(K, WriteOp<V>)],
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send {
        async move {
            for (key, op) in batch {
                self.write(key, op).await?;
            }
            Ok(())
        }
    }
}

/// A cache tier a write policy keeps in step with the store.
pub trait CacheTier<K, V>: Send + Sync + 'static {
    /// Stores `value` for `key`.
    fn put(&self, key: &K, value: &V) -> impl Future<Output = Result<()>> + Send;
    /// Removes `key`.
    fn remove(&self, key: &K) -> impl Future<Output = Result<()>> + Send;
}

impl<K, V> CacheTier<K, V> for Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn put(&self, key: &K, value: &V) -> impl Future<Output = Result<()>> + Send {
        self.insert(key.clone(), value.clone());
        std::future::ready(Ok(()))
    }

    fn remove(&self, key: &K) -> impl Future<Output = Result<()>> + Send {
        self.invalidate(key);
        std::future::ready(Ok(()))
    }
}

#[cfg(feature = "redis")]
impl<V, C, K> CacheTier<String, V> for crate::redis::RedisCache<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    K: crate::redis::Codec<V>,
{
    fn put(&self, key: &String, value: &V) -> impl Future<Output = Result<()>> + Send {
        self.insert(key, value)
    }

    fn remove(&self, key: &String) -> impl Future<Output = Result<()>> + Send {
        self.invalidate(key)
    }
}

fn store_error<E: Into<sd_core::BoxError>>(e: E) -> Error {
    Error::Store {
        source: Arc::from(e.into()),
    }
}

/// Write-through: the store first, then the cache. Writes to one key are serialised so the
/// cache ends with the value of the last successful store write.
pub struct WriteThrough<K, V, T, S> {
    cache: T,
    store: S,
    locks: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    _types: std::marker::PhantomData<fn(K, V)>,
}

impl<K, V, T: fmt::Debug, S> fmt::Debug for WriteThrough<K, V, T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteThrough")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl<K, V, T, S> WriteThrough<K, V, T, S>
where
    K: Hash + Send + Sync,
    V: Send + Sync,
    T: CacheTier<K, V>,
    S: Store<K, V>,
{
    /// Puts `store` behind `cache`.
    pub fn new(cache: T, store: S) -> Self {
        Self {
            cache,
            store,
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: RandomState::new(),
            _types: std::marker::PhantomData,
        }
    }

    /// The cache, for reads.
    pub fn cache(&self) -> &T {
        &self.cache
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Writes `value` to the store, then to the cache. When the store fails, the key is
    /// removed from the cache (the store's state is unknown) and the error returned.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] from the store; a cache error (Redis tier) after a successful store
    /// write, in which case the key was also removed from the cache when possible.
    pub async fn write(&self, key: K, value: V) -> Result<()> {
        let _serial = self.lock(&key).await;
        let op = WriteOp::Put(value);
        let stored = self.store.write(&key, &op).await;
        match (stored, op) {
            (Ok(()), WriteOp::Put(value)) => match self.cache.put(&key, &value).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = self.cache.remove(&key).await;
                    Err(e)
                }
            },
            (Ok(()), WriteOp::Delete) => Ok(()),
            (Err(e), _) => {
                let _ = self.cache.remove(&key).await;
                Err(store_error(e))
            }
        }
    }

    /// Deletes `key` from the store, then from the cache (from the cache even if the store
    /// failed).
    ///
    /// # Errors
    ///
    /// [`Error::Store`], or the cache's error.
    pub async fn delete(&self, key: K) -> Result<()> {
        let _serial = self.lock(&key).await;
        let stored = self.store.write(&key, &WriteOp::Delete).await;
        let removed = self.cache.remove(&key).await;
        stored.map_err(store_error)?;
        removed
    }

    async fn lock(&self, key: &K) -> tokio::sync::MutexGuard<'_, ()> {
        let shard = (self.hasher.hash_one(key) as usize) % self.locks.len();
        self.locks[shard].lock().await
    }
}

/// Writes that still failed after every retry, handed to the dead-letter hook.
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadLetter<K, V> {
    /// The writes (distinct keys, each with its latest operation).
    pub writes: Vec<(K, WriteOp<V>)>,
    /// The store's last error.
    pub error: SharedError,
    /// How many times the batch was tried.
    pub attempts: u32,
}

/// Counters of a write-behind buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteBehindStats {
    /// Writes accepted into the buffer.
    pub accepted: u64,
    /// Writes superseded by a later write to the same key before they were flushed.
    pub coalesced: u64,
    /// Key writes the store applied.
    pub written: u64,
    /// Batches sent to the store (retries included).
    pub batches: u64,
    /// Batch attempts that failed and were retried.
    pub retries: u64,
    /// Key writes handed to the dead-letter hook.
    pub dead_lettered: u64,
}

#[derive(Debug, Default)]
struct WriteCounters {
    accepted: AtomicU64,
    coalesced: AtomicU64,
    written: AtomicU64,
    batches: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
}

impl WriteCounters {
    fn snapshot(&self) -> WriteBehindStats {
        WriteBehindStats {
            accepted: self.accepted.load(Relaxed),
            coalesced: self.coalesced.load(Relaxed),
            written: self.written.load(Relaxed),
            batches: self.batches.load(Relaxed),
            retries: self.retries.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
        }
    }
}

type DeadLetterHook<K, V> = Arc<dyn Fn(DeadLetter<K, V>) + Send + Sync>;

/// Builds a [`WriteBehind`].
pub struct WriteBehindBuilder<K, V> {
    capacity: usize,
    batch_size: usize,
    interval: Duration,
    retry: RetryPolicy,
    dead_letter: Option<DeadLetterHook<K, V>>,
}

impl<K, V> fmt::Debug for WriteBehindBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehindBuilder")
            .field("capacity", &self.capacity)
            .field("batch_size", &self.batch_size)
            .field("interval", &self.interval)
            .field("retry", &self.retry)
            .field("dead_letter", &self.dead_letter.is_some())
            .finish()
    }
}

enum Msg<K, V> {
    Write(K, WriteOp<V>),
    Flush(oneshot::Sender<()>),
}

impl<K, V> WriteBehindBuilder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Most writes waiting in the buffer (default 10,000); writers wait beyond it.
    pub fn capacity(mut self, writes: usize) -> Self {
        self.capacity = writes;
        self
    }

    /// Flush when this many distinct keys are pending (default 50).
    pub fn batch_size(mut self, keys: usize) -> Self {
        self.batch_size = keys;
        self
    }

    /// Flush at least this often while writes are pending (default 1 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How a failing batch is retried before it is dead-lettered (default: 4 attempts,
    /// waiting 100 ms doubling to at most 10 s, no jitter).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Called with every batch that still fails after the retries. Without a hook such
    /// batches are logged at error level (with their size and error), and counted.
    pub fn dead_letter(mut self, hook: impl Fn(DeadLetter<K, V>) + Send + Sync + 'static) -> Self {
        self.dead_letter = Some(Arc::new(hook));
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: &'static str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.capacity == 0 {
            return bad("capacity", "must be at least 1 write");
        }
        if self.batch_size == 0 {
            return bad(
                "batch_size",
                "must be at least 1 key; 50 is the usual choice",
            );
        }
        if self.interval.is_zero() {
            return bad("interval", "must be above zero; 1 s is the usual choice");
        }
        Ok(())
    }

    /// Starts the worker on the current tokio runtime. Writes go to `cache` at once and to
    /// `store` in batches.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn build<T, S>(self, cache: T, store: S) -> Result<WriteBehind<K, V, T>>
    where
        T: CacheTier<K, V>,
        S: Store<K, V>,
    {
        self.validate()?;
        let (tx, rx) = mpsc::channel(self.capacity);
        let counters = Arc::new(WriteCounters::default());
        let worker = Worker {
            rx,
            store,
            pending: HashMap::new(),
            seq: 0,
            batch_size: self.batch_size,
            interval: self.interval,
            retry: self.retry,
            dead_letter: self.dead_letter,
            counters: Arc::clone(&counters),
        };
        Ok(WriteBehind {
            tx,
            cache,
            capacity: self.capacity,
            counters,
            worker: tokio::spawn(worker.run()),
        })
    }
}

/// Write-behind: the cache now, the store later, in coalesced batches. See the
/// [module docs](self).
///
/// Dropping it without [`shutdown`](Self::shutdown) still flushes everything in the
/// background while the runtime lives; `shutdown` waits for that and reports.
pub struct WriteBehind<K, V, T> {
    tx: mpsc::Sender<Msg<K, V>>,
    cache: T,
    capacity: usize,
    counters: Arc<WriteCounters>,
    worker: JoinHandle<()>,
}

impl<K, V, T: fmt::Debug> fmt::Debug for WriteBehind<K, V, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehind")
            .field("cache", &self.cache)
            .field("capacity", &self.capacity)
            .field("stats", &self.counters.snapshot())
            .finish()
    }
}

impl<K, V> WriteBehind<K, V, ()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A builder with the defaults: capacity 10,000, batch 50 keys, interval 1 s, 3 retries
    /// (4 attempts) from 100 ms doubling to 10 s.
    pub fn builder() -> WriteBehindBuilder<K, V> {
        WriteBehindBuilder {
            capacity: 10_000,
            batch_size: 50,
            interval: Duration::from_secs(1),
            retry: default_retry(),
            dead_letter: None,
        }
    }
}

impl<K, V, T> WriteBehind<K, V, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    T: CacheTier<K, V>,
{
    /// The cache, for reads.
    pub fn cache(&self) -> &T {
        &self.cache
    }

    /// Counters so far.
    pub fn stats(&self) -> WriteBehindStats {
        self.counters.snapshot()
    }

    /// Caches `value` and queues it for the store, waiting while the buffer is full.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] after shutdown; the cache's error (Redis tier), in which case
    /// nothing was queued.
    pub async fn write(&self, key: K, value: V) -> Result<()> {
        self.cache.put(&key, &value).await?;
        self.enqueue(key, WriteOp::Put(value)).await
    }

    /// Removes `key` from the cache and queues the delete for the store.
    ///
    /// # Errors
    ///
    /// As [`write`](Self::write).
    pub async fn delete(&self, key: K) -> Result<()> {
        self.cache.remove(&key).await?;
        self.enqueue(key, WriteOp::Delete).await
    }

    /// Like [`write`](Self::write) but returns [`Error::Full`] instead of waiting. The
    /// cache is updated only when the write is accepted.
    ///
    /// # Errors
    ///
    /// [`Error::Full`], [`Error::Closed`], or the cache's error.
    pub async fn try_write(&self, key: K, value: V) -> Result<()> {
        let permit = self.tx.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => Error::Full {
                capacity: self.capacity,
            },
            mpsc::error::TrySendError::Closed(()) => Error::Closed,
        })?;
        self.cache.put(&key, &value).await?;
        self.counters.accepted.fetch_add(1, Relaxed);
        permit.send(Msg::Write(key, WriteOp::Put(value)));
        Ok(())
    }

    async fn enqueue(&self, key: K, op: WriteOp<V>) -> Result<()> {
        self.tx
            .send(Msg::Write(key, op))
            .await
            .map_err(|_| Error::Closed)?;
        self.counters.accepted.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Flushes everything accepted so far (retries and dead-lettering included) and returns
    /// when the store has it.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] when the worker is gone.
    pub async fn flush(&self) -> Result<()> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Flush(ack))
            .await
            .map_err(|_| Error::Closed)?;
        done.await.map_err(|_| Error::Closed)
    }

    /// Stops accepting writes, flushes everything accepted, and returns the final counters.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the worker died (a dead-letter hook panicked); the counters
    /// then tell what was written.
    pub async fn shutdown(self) -> Result<WriteBehindStats> {
        drop(self.tx);
        self.worker.await.map_err(|_| Error::Closed)?;
        Ok(self.counters.snapshot())
    }
}

struct Worker<K, V, S> {
    rx: mpsc::Receiver<Msg<K, V>>,
    store: S,
    /// Pending writes, with the order they were first queued in.
    pending: HashMap<K, (u64, WriteOp<V>)>,
    seq: u64,
    batch_size: usize,
    interval: Duration,
    retry: RetryPolicy,
    dead_letter: Option<DeadLetterHook<K, V>>,
    counters: Arc<WriteCounters>,
}

impl<K, V, S> Worker<K, V, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    S: Store<K, V>,
{
    async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.reset();
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(Msg::Write(key, op)) => {
                        self.seq += 1;
                        let seq = self.seq;
                        match self.pending.get_mut(&key) {
                            Some(slot) => {
                                // Keep the first position, take the latest operation.
                                slot.1 = op;
                                self.counters.coalesced.fetch_add(1, Relaxed);
                            }
                            None => {
                                self.pending.insert(key, (seq, op));
                            }
                        }
                        if self.pending.len() >= self.batch_size {
                            self.flush_all().await;
                            ticker.reset();
                        }
                    }
                    Some(Msg::Flush(ack)) => {
                        self.flush_all().await;
                        let _ = ack.send(());
                    }
                    None => {
                        self.flush_all().await;
                        return;
                    }
                },
                _ = ticker.tick() => self.flush_all().await,
            }
        }
    }

    async fn flush_all(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut writes: Vec<(u64, K, WriteOp<V>)> = self
            .pending
            .drain()
            .map(|(k, (seq, op))| (seq, k, op))
            .collect();
        writes.sort_unstable_by_key(|w| w.0);
        let mut writes = writes.into_iter().map(|(_, k, op)| (k, op)).peekable();
        while writes.peek().is_some() {
            let batch: Vec<_> = writes.by_ref().take(self.batch_size).collect();
            self.flush_batch(batch).await;
        }
    }

    async fn flush_batch(&self, batch: Vec<(K, WriteOp<V>)>) {
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.counters.batches.fetch_add(1, Relaxed);
            match self.store.write_batch(&batch).await.map_err(Into::into) {
                Ok(()) => {
                    self.counters.written.fetch_add(batch.len() as u64, Relaxed);
                    return;
                }
                Err(e) if self.retry.allows_retry_after(attempts) => {
                    tracing::warn!(error = %e, attempts, "sd-cache: write-behind batch failed; retrying");
                    self.counters.retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(self.retry.random_delay(attempts)).await;
                }
                Err(e) => {
                    self.counters
                        .dead_lettered
                        .fetch_add(batch.len() as u64, Relaxed);
                    let letter = DeadLetter {
                        writes: batch,
                        error: Arc::from(e),
                        attempts,
                    };
                    match &self.dead_letter {
                        Some(hook) => hook(letter),
                        None => tracing::error!(
                            error = %letter.error,
                            writes = letter.writes.len(),
                            attempts,
                            "sd-cache: write-behind batch dead-lettered (no hook configured)"
                        ),
                    }
                    return;
                }
            }
        }
    }
}
