//! Batched loads, the DataLoader pattern: many keys, one call to the source.
//!
//! A GraphQL resolver (or any code that walks a list) asks for one record per item; loaded
//! one by one, that is N queries (the N+1 problem). A [`BatchLoader`] gathers the keys
//! asked for within a short *window* (default 1 ms, from the first key) and loads all the
//! misses with one call to a batch function (`SELECT .. WHERE id = ANY($1)`), however many
//! callers asked and whether they asked one key at a time ([`BatchLoader::load`]) or
//! many ([`BatchLoader::load_many`]).
//!
//! Every key still goes through the cache's own read path, so:
//!
//! - hits are answered from the cache and never reach the batch function;
//! - each key is loaded once (single-flight per key): a key already being loaded, by a
//!   batch or by a plain `get_or_load`, is joined, not loaded again; on Redis and two-tier,
//!   once across every process sharing the prefix (the per-key load lock);
//! - a key the batch function leaves out of its answer is "not found" (negative caching);
//!   an error of the batch function is shared by every key of that batch and not cached;
//! - XFetch early refreshes of hot keys join the next batch.
//!
//! `get_or_load_many(keys, batch)` on each cache does the same for one call without a
//! loader to keep: it dispatches as soon as every key of the call that is not answered
//! otherwise is waiting for the batch (or after the window).
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use sd_cache::{BatchLoader, Cache};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cache: Cache<u64, String> = Cache::builder().build()?;
//! let calls = Arc::new(AtomicUsize::new(0));
//! let c = Arc::clone(&calls);
//! let users = BatchLoader::builder(cache.clone(), move |ids: Vec<u64>| {
//!     c.fetch_add(1, Ordering::SeqCst);
//!     // SELECT id, name FROM users WHERE id = ANY($1)
//!     let rows: HashMap<u64, String> = ids.into_iter().map(|id| (id, format!("user {id}"))).collect();
//!     async move { Ok::<_, std::io::Error>(rows) }
//! })
//! .build()?;
//! // Three resolvers in the same tick: one batch call.
//! let (a, b, c) = tokio::join!(users.load(1), users.load(2), users.load_many([2, 3]));
//! assert_eq!(a?.as_deref(), Some("user 1"));
//! assert_eq!(b?.as_deref(), Some("user 2"));
//! assert_eq!(c?.len(), 2);
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! assert_eq!(cache.get(&3).as_deref(), Some("user 3")); // cached for the next request
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sd_core::BoxError;
use sd_core::boxed::BoxFuture;
use tokio::sync::{Notify, watch};

use crate::expiring::Loaded;
use crate::{Cache, Error, Result};

mod sealed {
    use super::*;

    /// A cache a [`BatchLoader`] reads through: its own read path with a loader, so hits,
    /// single-flight and the cross-process lock apply to every key. Implemented for the
    /// memory, Redis and two-tier caches.
    pub trait ReadThrough<K, V>: Clone + Send + Sync + 'static {
        /// The value of `key` (`None`: not found), running `load` on a miss (its answer is
        /// stored for the cache's own lifetime).
        fn read_through<L, Fut>(
            self,
            key: K,
            load: L,
        ) -> impl Future<Output = Result<Option<V>>> + Send
        where
            L: FnOnce() -> Fut + Send + 'static,
            Fut: Future<Output = Result<Option<V>>> + Send + 'static;
    }
}
pub(crate) use sealed::ReadThrough;

impl<K, V> ReadThrough<K, V> for Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn read_through<L, Fut>(self, key: K, load: L) -> impl Future<Output = Result<Option<V>>> + Send
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>>> + Send + 'static,
    {
        let load = move || async move { load().await.map(Loaded::plain) };
        async move { self.resolve(key, load, false).await }
    }
}

#[cfg(feature = "redis")]
mod redis_impls {
    use redis::aio::ConnectionLike;

    use super::*;
    use crate::redis::{Codec, RedisCache};
    use crate::two_tier::TwoTier;

    /// The Redis and two-tier caches read through their own `resolve` by `&str`.
    macro_rules! read_through {
        ($cache:ident) => {
            impl<V, C, K> ReadThrough<String, V> for $cache<V, C, K>
            where
                V: Clone + Send + Sync + 'static,
                C: ConnectionLike + Clone + Send + Sync + 'static,
                K: Codec<V>,
            {
                fn read_through<L, Fut>(
                    self,
                    key: String,
                    load: L,
                ) -> impl Future<Output = Result<Option<V>>> + Send
                where
                    L: FnOnce() -> Fut + Send + 'static,
                    Fut: Future<Output = Result<Option<V>>> + Send + 'static,
                {
                    let load = move || async move { load().await.map(Loaded::plain) };
                    async move { self.resolve(&key, load, false).await }
                }
            }
        };
    }

    read_through!(RedisCache);
    read_through!(TwoTier);

    /// `get_or_load_many` of the Redis and two-tier caches.
    macro_rules! get_or_load_many {
        ($cache:ident, $once:literal) => {
            impl<V, C, K> $cache<V, C, K>
            where
                V: Clone + Send + Sync + 'static,
                C: ConnectionLike + Clone + Send + Sync + 'static,
                K: Codec<V>,
            {
                /// The values of `keys` that exist: hits from the cache, and every miss
                /// loaded by one call of `batch` in this process (a key left out of its
                /// answer is cached as "not found").
                #[doc = $once]
                /// See [`crate::Cache::get_or_load_many`]; for a loader that also batches
                /// concurrent single reads, [`BatchLoader`].
                ///
                /// # Errors
                ///
                /// [`Error::Loader`] when `batch` failed, and the errors of
                /// [`try_get_or_load_optional`](Self::try_get_or_load_optional).
                pub async fn get_or_load_many<E, F, Fut>(
                    &self,
                    keys: impl IntoIterator<Item = impl Into<String>>,
                    batch: F,
                ) -> Result<HashMap<String, V>>
                where
                    F: Fn(Vec<String>) -> Fut + Send + Sync + 'static,
                    Fut: Future<Output = std::result::Result<HashMap<String, V>, E>>
                        + Send
                        + 'static,
                    E: Into<BoxError>,
                {
                    let keys = keys.into_iter().map(Into::into).collect();
                    get_or_load_many(self, keys, batch).await
                }
            }
        };
    }

    get_or_load_many!(
        RedisCache,
        "Each key is loaded once across every process sharing the prefix: a key another process holds the load lock of is waited for, not loaded."
    );
    get_or_load_many!(
        TwoTier,
        "Keys in this instance's memory tier are answered without a round trip; the rest read through Redis, each loaded once across every process."
    );
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The values of `keys` that exist: hits from the cache, and every miss loaded by one
    /// call of `batch` (given the missing keys, it returns the values it found; a key it
    /// leaves out is cached as "not found"). A key another call is loading is joined, not
    /// loaded again; a key listed twice is read once. For a loader that also batches
    /// concurrent single reads, see [`BatchLoader`].
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use sd_cache::Cache;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cache: Cache<u64, String> = Cache::builder().build()?;
    /// cache.insert(1, "cached".to_owned());
    /// let found = cache
    ///     .get_or_load_many([1, 2, 3], |mut ids: Vec<u64>| async move {
    ///         ids.sort();
    ///         assert_eq!(ids, [2, 3]); // only the misses, in one call
    ///         Ok::<_, std::io::Error>(HashMap::from([(2, "loaded".to_owned())]))
    ///     })
    ///     .await?;
    /// assert_eq!(found.len(), 2); // 3 was not found (and is cached as such)
    /// assert_eq!(found[&1], "cached");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Loader`] when `batch` failed (shared by every key of that call).
    pub async fn get_or_load_many<E, F, Fut>(
        &self,
        keys: impl IntoIterator<Item = K>,
        batch: F,
    ) -> Result<HashMap<K, V>>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        get_or_load_many(self, keys.into_iter().collect(), batch).await
    }
}

/// The batch function, boxed: keys in, the values found out.
type BatchFn<K, V> = Arc<
    dyn Fn(Vec<K>) -> BoxFuture<'static, std::result::Result<HashMap<K, V>, BoxError>>
        + Send
        + Sync,
>;

type Outcome<K, V> = Arc<Result<HashMap<K, V>>>;

/// One batch being gathered, then loaded.
struct Batch<K, V> {
    /// The keys in the order asked, and the same as a set (each key once).
    keys: Mutex<(Vec<K>, HashSet<K>)>,
    /// Set to the batch function's answer; dropped unset if it panicked.
    done: watch::Sender<Option<Outcome<K, V>>>,
    /// Dispatch now: the batch is full, or every caller left is waiting on it.
    ready: Notify,
}

struct Batcher<K, V> {
    load: BatchFn<K, V>,
    window: Duration,
    max_batch: usize,
    /// The batch open for keys, if any.
    open: Mutex<Option<Arc<Batch<K, V>>>>,
    /// For one `get_or_load_many`: its keys not yet answered. The batch goes as soon as
    /// it holds all of them (nothing else of the call can join it).
    unanswered: Option<AtomicUsize>,
    batches: AtomicU64,
}

impl<K, V> Batcher<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Adds `key` to the open batch (opening one if none is) and waits for its answer.
    async fn enqueue(self: Arc<Self>, key: K) -> Result<Option<V>> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(Error::loader(
                "batched loads run their batch on a tokio runtime; call them inside one",
            ));
        };
        let mut done = {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let batch = match open.as_ref() {
                Some(b) => Arc::clone(b),
                None => {
                    let b = Arc::new(Batch {
                        keys: Mutex::new((Vec::new(), HashSet::new())),
                        done: watch::channel(None).0,
                        ready: Notify::new(),
                    });
                    *open = Some(Arc::clone(&b));
                    runtime.spawn(Arc::clone(&self).dispatch(Arc::clone(&b)));
                    b
                }
            };
            let done = batch.done.subscribe();
            let queued = {
                let mut keys = batch.keys.lock().unwrap_or_else(PoisonError::into_inner);
                if keys.1.insert(key.clone()) {
                    keys.0.push(key.clone());
                }
                keys.0.len()
            };
            if queued >= self.max_batch {
                *open = None;
                batch.ready.notify_one();
            } else if self.all_waiting(queued) {
                batch.ready.notify_one();
            }
            done
        };
        let outcome = match done.wait_for(Option::is_some).await {
            Ok(o) => o.clone(),
            Err(_) => None,
        };
        match outcome.as_deref() {
            Some(Ok(found)) => Ok(found.get(&key).cloned()),
            Some(Err(e)) => Err(e.clone()),
            None => Err(Error::loader("the batch function panicked")),
        }
    }

    /// Whether every unanswered key of a `get_or_load_many` is in the open batch.
    fn all_waiting(&self, queued: usize) -> bool {
        self.unanswered
            .as_ref()
            .is_some_and(|n| queued >= n.load(Ordering::SeqCst))
    }

    /// One key of a `get_or_load_many` was answered: the batch may now hold all the rest.
    fn answered(&self) {
        let Some(n) = &self.unanswered else { return };
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let left = n.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        if let Some(batch) = open.as_ref() {
            let queued = batch
                .keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .0
                .len();
            if queued >= left {
                batch.ready.notify_one();
            }
        }
    }

    /// Waits out the window (or until the batch is ready), closes it and loads it.
    async fn dispatch(self: Arc<Self>, batch: Arc<Batch<K, V>>) {
        tokio::select! {
            () = tokio::time::sleep(self.window) => {}
            () = batch.ready.notified() => {}
        }
        {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            if open.as_ref().is_some_and(|b| Arc::ptr_eq(b, &batch)) {
                *open = None;
            }
        }
        // No key joins a batch once it left `open`, so the keys are final.
        let keys = std::mem::take(&mut batch.keys.lock().unwrap_or_else(PoisonError::into_inner).0);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let outcome = (self.load)(keys).await.map_err(Error::loader);
        batch.done.send_replace(Some(Arc::new(outcome)));
    }

    /// Reads `key` through `cache`; a miss joins the batch.
    fn read<T: ReadThrough<K, V>>(
        self: &Arc<Self>,
        cache: &T,
        key: K,
    ) -> impl Future<Output = Result<Option<V>>> + Send + 'static {
        let this = Arc::clone(self);
        let load_key = key.clone();
        cache
            .clone()
            .read_through(key, move || this.enqueue(load_key))
    }

    /// Reads every key (each once), answering the call with the values found.
    async fn read_many<T: ReadThrough<K, V>>(
        self: &Arc<Self>,
        cache: &T,
        keys: Vec<K>,
    ) -> Result<HashMap<K, V>> {
        let mut seen = HashSet::with_capacity(keys.len());
        let keys: Vec<K> = keys
            .into_iter()
            .filter(|k| seen.insert(k.clone()))
            .collect();
        if let Some(n) = &self.unanswered {
            n.store(keys.len(), Ordering::SeqCst);
        }
        let mut reads: FuturesUnordered<_> = keys
            .into_iter()
            .map(|key| {
                let read = self.read(cache, key.clone());
                async move { (key, read.await) }
            })
            .collect();
        let mut found = HashMap::new();
        while let Some((key, result)) = reads.next().await {
            self.answered();
            if let Some(v) = result? {
                found.insert(key, v);
            }
        }
        Ok(found)
    }
}

/// Batched loads through a cache (the DataLoader pattern). See the [module docs](self).
///
/// Cloning is cheap; clones share the open batch. Each batch is sent from a task on the
/// current tokio runtime; a miss outside one fails with [`Error::Loader`] saying so.
pub struct BatchLoader<K, V, T> {
    cache: T,
    batcher: Arc<Batcher<K, V>>,
}

impl<K, V, T: Clone> Clone for BatchLoader<K, V, T> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            batcher: Arc::clone(&self.batcher),
        }
    }
}

impl<K, V, T> fmt::Debug for BatchLoader<K, V, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLoader")
            .field("window", &self.batcher.window)
            .field("max_batch", &self.batcher.max_batch)
            .field("batches", &self.batcher.batches.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Builds a [`BatchLoader`].
pub struct BatchLoaderBuilder<K, V, T> {
    cache: T,
    load: BatchFn<K, V>,
    window: Duration,
    max_batch: usize,
}

impl<K, V, T> fmt::Debug for BatchLoaderBuilder<K, V, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchLoaderBuilder")
            .field("window", &self.window)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

/// Boxes a batch function whose error is anything that converts into a [`BoxError`].
fn boxed<K, V, E, F, Fut>(batch: F) -> BatchFn<K, V>
where
    F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<HashMap<K, V>, E>> + Send + 'static,
    E: Into<BoxError>,
{
    Arc::new(move |keys| {
        let fut = batch(keys);
        Box::pin(async move { fut.await.map_err(Into::into) })
    })
}

impl<K, V, T> BatchLoaderBuilder<K, V, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    T: ReadThrough<K, V>,
{
    /// How long a batch gathers keys after its first one (default 1 ms). Zero still
    /// gathers what the callers ask before the batch's task first runs.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The most keys in one call of the batch function (default 1,000); a full batch goes
    /// at once and the next key opens a new one.
    pub fn max_batch(mut self, keys: usize) -> Self {
        self.max_batch = keys;
        self
    }

    /// Checks the settings and builds the loader.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming `max_batch` (zero) or `window` (above a minute).
    pub fn build(self) -> Result<BatchLoader<K, V, T>> {
        if self.max_batch == 0 {
            return Err(Error::InvalidConfig {
                field: "max_batch",
                reason: "must be at least 1 key".into(),
            });
        }
        if self.window > Duration::from_secs(60) {
            return Err(Error::InvalidConfig {
                field: "window",
                reason: "must be at most a minute; a few milliseconds is typical".into(),
            });
        }
        Ok(BatchLoader {
            cache: self.cache,
            batcher: Arc::new(Batcher {
                load: self.load,
                window: self.window,
                max_batch: self.max_batch,
                open: Mutex::new(None),
                unanswered: None,
                batches: AtomicU64::new(0),
            }),
        })
    }
}

impl<K, V, T> BatchLoader<K, V, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    T: ReadThrough<K, V>,
{
    /// A loader reading through `cache` that loads misses with `batch`: given the keys, it
    /// returns the values it found (a key left out is "not found").
    pub fn builder<E, F, Fut>(cache: T, batch: F) -> BatchLoaderBuilder<K, V, T>
    where
        F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<HashMap<K, V>, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        BatchLoaderBuilder {
            cache,
            load: boxed(batch),
            window: Duration::from_millis(1),
            max_batch: 1_000,
        }
    }

    /// The value of `key` (`None`: not found): a hit from the cache, else from the batch
    /// this call joins.
    ///
    /// # Errors
    ///
    /// [`Error::Loader`] (shared by the batch) when the batch function failed or panicked;
    /// the cache's own errors ([`Error::Backend`], ...).
    pub async fn load(&self, key: K) -> Result<Option<V>> {
        self.batcher.read(&self.cache, key).await
    }

    /// The values of `keys` that exist (each key read once however often listed).
    ///
    /// # Errors
    ///
    /// The first error of any key, as [`load`](Self::load).
    pub async fn load_many(&self, keys: impl IntoIterator<Item = K>) -> Result<HashMap<K, V>> {
        self.batcher
            .read_many(&self.cache, keys.into_iter().collect())
            .await
    }

    /// Calls of the batch function so far.
    pub fn batches(&self) -> u64 {
        self.batcher.batches.load(Ordering::Relaxed)
    }
}

/// `get_or_load_many` of every cache: one batcher for the call, dispatched as soon as
/// every unanswered key waits on it.
pub(crate) async fn get_or_load_many<K, V, T, E, F, Fut>(
    cache: &T,
    keys: Vec<K>,
    batch: F,
) -> Result<HashMap<K, V>>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    T: ReadThrough<K, V>,
    F: Fn(Vec<K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<HashMap<K, V>, E>> + Send + 'static,
    E: Into<BoxError>,
{
    let batcher = Arc::new(Batcher {
        load: boxed(batch),
        window: MANY_WINDOW,
        max_batch: usize::MAX,
        open: Mutex::new(None),
        unanswered: Some(AtomicUsize::new(0)),
        batches: AtomicU64::new(0),
    });
    batcher.read_many(cache, keys).await
}

/// How long a `get_or_load_many` batch waits for keys that are neither answered nor in it
/// (waiting on another process's load lock, say) before it goes without them.
const MANY_WINDOW: Duration = Duration::from_millis(5);
