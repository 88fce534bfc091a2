//! The in-memory cache: moka for storage and eviction, single-flight and XFetch on top.

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use moka::notification::RemovalCause;
use tracing::Instrument;

use crate::clock::{
    CacheClock, Clock, MonotonicClock, RandomSource, ThreadRandom, saturating_nanos,
};
use crate::expiring::Loaded;
use crate::policy::Policy;
use crate::singleflight::SingleFlight;
use crate::stats::{CacheStats, Counters};
use crate::{Error, Result};

/// The loading reads every cache of this crate offers, written once: an infallible, a
/// fallible, an optional and an expiring loader, each adapted to the one
/// `Result<Loaded<V>>` load that the cache's own `resolve(key, load, want_value)` runs
/// once per key. They return `resolve`'s future, so the memory cache's, which answers a
/// hit when called, stays a ready value. Each method's documentation goes before its name; `key` is the
/// cache's key type.
macro_rules! loading_reads {
    (
        key: $key:ty;
        $(#[$get:meta])* get_or_load;
        $(#[$try_get:meta])* try_get_or_load;
        $(#[$optional:meta])* try_get_or_load_optional;
        $(#[$expiring:meta])* try_get_or_load_expiring;
    ) => {
        $(#[$get])*
        // `'a` ties `&self` to a borrowed key (Redis, two-tier); the memory cache owns its key.
        #[allow(clippy::needless_lifetimes)]
        pub fn get_or_load<'a, F, Fut>(
            &'a self,
            key: $key,
            loader: F,
        ) -> impl ::std::future::Future<Output = crate::Result<V>> + Send
        where
            F: FnOnce() -> Fut + Send + 'static,
            Fut: ::std::future::Future<Output = V> + Send + 'static,
        {
            let load =
                move || async move { Ok(crate::expiring::Loaded::plain(Some(loader().await))) };
            ::futures::FutureExt::map(self.resolve(key, load, true), crate::memory::require_value)
        }

        $(#[$try_get])*
        // `'a` ties `&self` to a borrowed key (Redis, two-tier); the memory cache owns its key.
        #[allow(clippy::needless_lifetimes)]
        pub fn try_get_or_load<'a, E, F, Fut>(
            &'a self,
            key: $key,
            loader: F,
        ) -> impl ::std::future::Future<Output = crate::Result<V>> + Send
        where
            E: Into<sd_core::BoxError>,
            F: FnOnce() -> Fut + Send + 'static,
            Fut: ::std::future::Future<Output = std::result::Result<V, E>> + Send + 'static,
        {
            let load = move || async move {
                loader()
                    .await
                    .map(|v| crate::expiring::Loaded::plain(Some(v)))
                    .map_err(crate::Error::loader)
            };
            ::futures::FutureExt::map(self.resolve(key, load, true), crate::memory::require_value)
        }

        $(#[$optional])*
        // `'a` ties `&self` to a borrowed key (Redis, two-tier); the memory cache owns its key.
        #[allow(clippy::needless_lifetimes)]
        pub fn try_get_or_load_optional<'a, E, F, Fut>(
            &'a self,
            key: $key,
            loader: F,
        ) -> impl ::std::future::Future<Output = crate::Result<Option<V>>> + Send
        where
            E: Into<sd_core::BoxError>,
            F: FnOnce() -> Fut + Send + 'static,
            Fut: ::std::future::Future<Output = std::result::Result<Option<V>, E>>
                + Send
                + 'static,
        {
            let load = move || async move {
                loader()
                    .await
                    .map(crate::expiring::Loaded::plain)
                    .map_err(crate::Error::loader)
            };
            self.resolve(key, load, false)
        }

        $(#[$expiring])*
        // `'a` ties `&self` to a borrowed key (Redis, two-tier); the memory cache owns its key.
        #[allow(clippy::needless_lifetimes)]
        pub fn try_get_or_load_expiring<'a, E, F, Fut>(
            &'a self,
            key: $key,
            loader: F,
        ) -> impl ::std::future::Future<Output = crate::Result<Option<V>>> + Send
        where
            E: Into<sd_core::BoxError>,
            F: FnOnce() -> Fut + Send + 'static,
            Fut: ::std::future::Future<Output = std::result::Result<crate::Expiring<V>, E>>
                + Send
                + 'static,
        {
            let load = move || async move {
                loader()
                    .await
                    .map(crate::expiring::Loaded::from)
                    .map_err(crate::Error::loader)
            };
            self.resolve(key, load, false)
        }
    };
}
pub(crate) use loading_reads;

/// Number of write-sequence shards (a power of two).
const SHARDS: usize = 64;

/// One cached value with what XFetch needs. Stored by value, and cloned out of the engine
/// on every hit, so it is kept small (40 bytes around a `u64`: the engine's node of an
/// entry then fits a cache line more often): wrap large values in `Arc`.
#[derive(Debug, Clone)]
struct Entry<V> {
    /// `None` for a cached "not found" (negative caching).
    value: Option<V>,
    /// When the value stops being fresh (ns on the cache's clock).
    expiry: u64,
    /// Before this instant no read can refresh early (see [`crate::xfetch::refresh_window_start`]).
    refresh_from: u64,
    /// Identity of this write, so an early refresh can tell whether it was overtaken
    /// (wrapping: two writes of one key 2^32 writes apart inside one refresh's decision
    /// are not a concern).
    id: u32,
    /// How long the load that produced the value took, in microseconds rounded up
    /// (saturating after 71 minutes).
    delta_us: u32,
}

impl<V> Entry<V> {
    fn delta(&self) -> Duration {
        Duration::from_micros(u64::from(self.delta_us))
    }

    fn expiry(&self) -> Duration {
        Duration::from_nanos(self.expiry)
    }

    /// Until when the value may still be served if a reload fails: its expiry plus the
    /// stale-on-error window (a "not found" is never served stale).
    fn stale_until(&self, policy: &Policy) -> Duration {
        if self.value.is_some() {
            self.expiry().saturating_add(policy.stale_if_error)
        } else {
            self.expiry()
        }
    }
}

type Shared<V> = Result<Option<V>>;

/// What a loader hands the cache: the value with its lifetime, if the loader chose one.
pub(crate) type Load<V> = Result<Loaded<V>>;

/// Builds a [`Cache`]. Every setting has a default; `build` checks them all.
pub struct CacheBuilder<K, V> {
    name: String,
    max_capacity: u64,
    policy: Policy,
    clock: CacheClock,
    random: Arc<dyn RandomSource>,
    _types: std::marker::PhantomData<fn(K, V)>,
}

impl<K, V> fmt::Debug for CacheBuilder<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("name", &self.name)
            .field("max_capacity", &self.max_capacity)
            .field("policy", &self.policy)
            .field("clock", &self.clock)
            .field("random", &self.random)
            .finish()
    }
}

impl<K, V> Default for CacheBuilder<K, V> {
    fn default() -> Self {
        Self {
            name: sd_core::observe::DEFAULT_NAME.to_owned(),
            max_capacity: 10_000,
            policy: Policy::default(),
            clock: CacheClock::new(MonotonicClock::new()),
            random: Arc::new(ThreadRandom),
            _types: std::marker::PhantomData,
        }
    }
}

impl<K, V> CacheBuilder<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Most entries kept (default 10,000). The engine evicts by TinyLFU admission and LRU.
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.max_capacity = entries;
        self
    }

    crate::policy::policy_setters!();

    /// The cache's name (default `"default"`): the `sd.name` of its metrics (feature
    /// `metrics`) and spans. Name it after what it holds (`"users"`, `"prices"`), never
    /// after a key: a label's values must stay few.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The clock used for freshness (default [`MonotonicClock`]). The engine's own memory
    /// reclamation keeps using real time.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = CacheClock::new(clock);
        self
    }

    /// Checks the settings and builds the cache.
    pub fn build(self) -> Result<Cache<K, V>> {
        if self.max_capacity == 0 {
            return Err(Error::InvalidConfig {
                field: "max_capacity",
                reason: "must be at least 1 entry".into(),
            });
        }
        self.policy.validate()?;
        let counters = Arc::new(Counters::observed(
            &self.name,
            sd_core::observe::backend::MEMORY,
        ));
        let evictions = Arc::clone(&counters);
        let engine = moka::sync::Cache::builder()
            .max_capacity(self.max_capacity)
            .time_to_live(self.policy.max_retention())
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    Counters::bump(&evictions.evictions);
                }
            })
            .build();
        Ok(Cache {
            inner: Arc::new(Inner {
                engine,
                flights: SingleFlight::new(),
                policy: self.policy,
                clock: self.clock,
                random: self.random,
                counters,
                write_seq: (0..SHARDS).map(|_| Mutex::new(0)).collect(),
                next_id: AtomicU32::new(0),
                hasher: RandomState::new(),
            }),
        })
    }
}

struct Inner<K, V> {
    engine: moka::sync::Cache<K, Entry<V>>,
    flights: SingleFlight<K, Shared<V>>,
    policy: Policy,
    clock: CacheClock,
    random: Arc<dyn RandomSource>,
    counters: Arc<Counters>,
    /// Per-shard write counters: a load stores its value only if no write or invalidation
    /// touched its shard while it ran, so a slow load never overwrites a newer write.
    write_seq: Box<[Mutex<u64>]>,
    next_id: AtomicU32,
    hasher: RandomState,
}

/// An in-memory read-through cache that never stampedes.
///
/// - concurrent misses on one key run one loader (single-flight); if the leading caller is
///   dropped a waiter takes over with its own loader; a panicking loader fails only its
///   caller; a loader error is shared with every waiter;
/// - a read close to expiry may refresh the entry in the background (XFetch) while every
///   reader keeps getting the current value;
/// - TTL jitter, negative caching and bounded serve-stale-on-error.
///
/// Cloning is cheap and clones share the cache. Early refreshes are spawned on the current
/// tokio runtime; outside one, entries simply expire and reload on the next miss.
pub struct Cache<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for Cache<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Hash + Eq + Send + Sync + 'static, V: Send + Sync + 'static> fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.inner.engine.entry_count())
            .field("policy", &self.inner.policy)
            .field("stats", &self.inner.counters.snapshot())
            .finish()
    }
}

/// What a leading load must do before calling the loader.
enum Need {
    /// Load unless a fresh entry appeared meanwhile.
    Fresh { want_value: bool },
    /// Early refresh of this entry: load unless someone replaced it meanwhile.
    Refresh { id: u32 },
}

impl<K, V> Cache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// A builder with the defaults (10,000 entries, TTL 60 s, beta 1, negative TTL 5 s).
    pub fn builder() -> CacheBuilder<K, V> {
        CacheBuilder::default()
    }

    /// The fresh value for `key`, if any. `None` for a miss and for a cached "not found".
    pub fn get(&self, key: &K) -> Option<V> {
        let now = self.inner.clock.now_nanos();
        match self.inner.engine.get(key) {
            Some(e) if now < e.expiry => {
                self.inner.counters.hits.bump();
                e.value
            }
            _ => {
                Counters::bump(&self.inner.counters.misses);
                None
            }
        }
    }

    /// Stores `value` for `key` (cache-aside), fresh for the TTL.
    pub fn insert(&self, key: K, value: V) {
        self.put(key, Some(value));
    }

    /// Caches "not found" for `key` for the negative TTL (no-op when negative caching is off).
    pub fn insert_not_found(&self, key: K) {
        self.put(key, None);
    }

    fn put(&self, key: K, value: Option<V>) {
        let now = self.inner.clock.now();
        let delta = self
            .inner
            .engine
            .get(&key)
            .map_or(Duration::ZERO, |e| e.delta());
        let mut seq = self.lock_shard(&key);
        *seq = seq.wrapping_add(1);
        match self.entry(value, None, delta, now) {
            Some(entry) => self.inner.engine.insert(key, entry),
            None => self.inner.engine.invalidate(&key),
        }
    }

    /// Removes `key`. A load that was running for it will not store its (older) result, and
    /// calls that start from now on do not wait for that load: they load anew.
    pub fn invalidate(&self, key: &K) {
        let mut seq = self.lock_shard(key);
        *seq = seq.wrapping_add(1);
        self.inner.engine.invalidate(key);
        self.inner.flights.forget(key);
    }

    /// Removes every entry. Loads running now will not store their results, and calls that
    /// start from now on do not wait for them.
    pub fn invalidate_all(&self) {
        let guards: Vec<_> = self
            .inner
            .write_seq
            .iter()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
            .collect();
        for mut g in guards {
            *g = g.wrapping_add(1);
        }
        self.inner.engine.invalidate_all();
        self.inner.flights.forget_all();
    }

    /// Counters since the cache was built.
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// Entries held now (approximate: the engine applies writes lazily).
    pub fn entry_count(&self) -> u64 {
        self.inner.engine.entry_count()
    }

    /// Runs the engine's pending maintenance (evictions, expirations) now.
    pub fn run_pending_tasks(&self) {
        self.inner.engine.run_pending_tasks();
    }

    crate::memory::loading_reads! {
        key: K;
        /// The value for `key`, loading it with `loader` on a miss.
        ///
        /// Concurrent misses run one loader. Near expiry a read may start a background refresh
        /// with its `loader` and still return the current value at once; that is why the loader
        /// must be `Send + 'static`.
        ///
        /// A hit is answered when the call is made: the returned future is ready, so the
        /// loader API costs a plain [`get`](Self::get) and a branch.
        ///
        /// # Errors
        ///
        /// Only when this call waited on a load of the same key that a *fallible* loader led and
        /// that failed ([`Error::Loader`], shared), or an optional loader found nothing
        /// ([`Error::NotFound`]).
        get_or_load;
        /// The value for `key`, loading it with the fallible `loader` on a miss.
        ///
        /// A loader error is shared with every caller coalesced on that load (one `Arc`), and is
        /// not cached: the next call loads again. With `stale_if_error` set, a value expired less
        /// than that long ago is returned instead of the error.
        ///
        /// The loader's error is any `E: Into<BoxError>`: your own error type, an
        /// `anyhow::Error`, a `Box<dyn Error + Send + Sync>`, even a `&str`.
        ///
        /// ```
        /// # #[tokio::main(flavor = "current_thread")]
        /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
        /// use sd_cache::Cache;
        ///
        /// let cache: Cache<u32, String> = Cache::builder().build()?;
        /// // A database call returning `anyhow::Result<String>` fits here the same way.
        /// let name = cache
        ///     .try_get_or_load(7, || async {
        ///         Ok::<_, Box<dyn std::error::Error + Send + Sync>>("ada".to_owned())
        ///     })
        ///     .await?;
        /// assert_eq!(name, "ada");
        /// let down = cache.try_get_or_load(8, || async { Err::<String, _>("db down") }).await;
        /// assert_eq!(down.unwrap_err().loader_error().map(|e| e.to_string()).as_deref(), Some("db down"));
        /// # Ok(())
        /// # }
        /// ```
        ///
        /// # Errors
        ///
        /// [`Error::Loader`] when the load failed and no stale value may be served;
        /// [`Error::NotFound`] when this call waited on an optional loader that found nothing.
        try_get_or_load;
        /// Like [`try_get_or_load`](Self::try_get_or_load) for a loader that may find nothing:
        /// `Ok(None)` is cached for the negative TTL (negative caching), so a flood of reads for
        /// a key that does not exist reaches the loader once per negative TTL.
        ///
        /// # Errors
        ///
        /// [`Error::Loader`] when the load failed and no stale value may be served.
        try_get_or_load_optional;
        /// Like [`try_get_or_load_optional`](Self::try_get_or_load_optional) for a loader
        /// that chooses each entry's lifetime ([`Expiring`](crate::Expiring)): from an HTTP
        /// `Cache-Control`, a token's expiry, a record's validity. Expiry, XFetch early
        /// refresh, jitter (in proportion) and negative caching work from that lifetime;
        /// it is cut to `max_ttl` (default: the `ttl`), and zero means "do not cache". See
        /// [`expiring`](crate::expiring).
        ///
        /// ```
        /// use std::time::Duration;
        /// use sd_cache::{Cache, Expiring, ManualClock};
        ///
        /// # #[tokio::main(flavor = "current_thread")]
        /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
        /// let clock = ManualClock::new();
        /// let cache: Cache<&str, String> = Cache::builder()
        ///     .clock(clock.clone())
        ///     .ttl(Duration::from_secs(60))
        ///     .max_ttl(Duration::from_secs(3600))
        ///     .build()?;
        /// let token = cache
        ///     .try_get_or_load_expiring("token", || async {
        ///         // The identity provider says: valid for 10 seconds.
        ///         Ok::<_, std::io::Error>(Expiring::new("t0k3n".to_owned(), Duration::from_secs(10)))
        ///     })
        ///     .await?;
        /// assert_eq!(token.as_deref(), Some("t0k3n"));
        /// clock.advance(Duration::from_secs(10));
        /// assert_eq!(cache.get(&"token"), None); // expired at its own time, not the ttl's
        /// # Ok(())
        /// # }
        /// ```
        ///
        /// # Errors
        ///
        /// [`Error::Loader`] when the load failed and no stale value may be served.
        try_get_or_load_expiring;
    }

    /// Reads `key`, loading it with `load` on a miss. A hit is answered now, when called
    /// (the future is ready: a hit costs a lookup and a branch); a miss returns the boxed
    /// future of [`Self::resolve_miss`].
    pub(crate) fn resolve<L, Fut>(&self, key: K, load: L, want_value: bool) -> Resolve<'_, V>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Load<V>> + Send + 'static,
    {
        let now = self.inner.clock.now_nanos();
        let current = self.inner.engine.get(&key);
        if let Some(e) = current.as_ref()
            && now < e.expiry
            && (e.value.is_some() || !want_value)
        {
            self.inner.counters.hits.bump();
            if now >= e.refresh_from {
                self.maybe_refresh(&key, e, Duration::from_nanos(now), load);
            }
            return Resolve::Hit(Some(current.and_then(|e| e.value)));
        }
        let now = Duration::from_nanos(now);
        Resolve::Miss(Box::pin(
            self.resolve_miss(key, load, want_value, current, now),
        ))
    }

    /// [`Self::resolve`] after a miss: `current` is the entry read (expired, or not the
    /// value wanted) at `now`.
    async fn resolve_miss<L, Fut>(
        &self,
        key: K,
        load: L,
        want_value: bool,
        current: Option<Entry<V>>,
        now: Duration,
    ) -> Shared<V>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Load<V>> + Send + 'static,
    {
        Counters::bump(&self.inner.counters.misses);
        let policy = &self.inner.policy;
        let stale = current.filter(|e| e.value.is_some() && now < e.stale_until(policy));
        let need = Need::Fresh { want_value };
        let (result, role) = self
            .inner
            .flights
            .run(&key, || self.lead(key.clone(), load, need, stale))
            .await;
        self.inner.counters.note(role);
        result
    }

    /// Starts a background refresh if XFetch says so and no load of `key` is running.
    ///
    /// At most one early refresh per key is in flight: the flight is claimed synchronously,
    /// before the task is spawned, so the readers that fire together on a hot key start one
    /// task between them; and a refresh whose entry was replaced meanwhile (by another
    /// refresh or a write) does not load (see [`Self::lead`]).
    fn maybe_refresh<L, Fut>(&self, key: &K, entry: &Entry<V>, now: Duration, load: L)
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Load<V>> + Send + 'static,
    {
        if self.inner.flights.is_running(key) {
            return;
        }
        let u = self.inner.random.unit();
        if !crate::xfetch::should_refresh(
            now,
            entry.expiry(),
            entry.delta(),
            self.inner.policy.beta,
            u,
        ) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(claim) = self.inner.flights.claim(key) else {
            return;
        };
        let this = self.clone();
        let key = key.clone();
        let stale = Some(entry.clone());
        let need = Need::Refresh { id: entry.id };
        runtime.spawn(async move {
            let result = this
                .inner
                .flights
                .run_claimed(claim, || this.lead(key.clone(), load, need, stale))
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "sd-cache: early refresh failed; the current value stays until it expires");
            }
        });
    }

    /// The leader's side of a flight: check again, load, store, and decide what to share.
    async fn lead<L, Fut>(&self, key: K, load: L, need: Need, stale: Option<Entry<V>>) -> Shared<V>
    where
        L: FnOnce() -> Fut,
        Fut: Future<Output = Load<V>>,
    {
        let now = self.inner.clock.now();
        let current = self.inner.engine.get(&key);
        match (&need, &current) {
            // A previous flight stored a fresh value between our miss and our lead.
            (Need::Fresh { want_value }, Some(e))
                if now < e.expiry() && (e.value.is_some() || !want_value) =>
            {
                return Ok(e.value.clone());
            }
            // Someone refreshed or overwrote the entry since this refresh was decided.
            (Need::Refresh { id }, Some(e)) if *id != e.id && now < e.expiry() => {
                return Ok(e.value.clone());
            }
            _ => {}
        }
        if matches!(need, Need::Refresh { .. }) {
            Counters::bump(&self.inner.counters.early_refreshes);
        }
        let seq = self.read_shard(&key);
        let result = load()
            .instrument(crate::observe::load_span(
                &self.inner.counters.name,
                sd_core::observe::backend::MEMORY,
            ))
            .await;
        let done = self.inner.clock.now();
        let delta = done.saturating_sub(now);
        self.inner.counters.record_load(delta, result.is_ok());
        match result {
            Ok(loaded) => {
                self.store_if_unchanged(key, seq, loaded.value.clone(), loaded.ttl, delta);
                Ok(loaded.value)
            }
            Err(error) => match stale {
                Some(e) if done < e.stale_until(&self.inner.policy) && e.value.is_some() => {
                    if done >= e.expiry() {
                        Counters::bump(&self.inner.counters.stale_served);
                    }
                    tracing::warn!(%error, "sd-cache: load failed, serving the previous value");
                    Ok(e.value.clone())
                }
                _ => Err(error),
            },
        }
    }

    /// The entry to store for `value` loaded (in `delta`) or written at `now`, fresh for
    /// `ttl` if the loader chose it; `None` when nothing may be stored.
    fn entry(
        &self,
        value: Option<V>,
        ttl: Option<Duration>,
        delta: Duration,
        now: Duration,
    ) -> Option<Entry<V>> {
        let policy = &self.inner.policy;
        let lifetime = policy.lifetime(value.is_none(), ttl, self.inner.random.as_ref())?;
        let expiry = now.saturating_add(lifetime);
        let delta_us = u32::try_from(delta.as_nanos().div_ceil(1_000)).unwrap_or(u32::MAX);
        let delta = Duration::from_micros(u64::from(delta_us));
        Some(Entry {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            refresh_from: saturating_nanos(policy.refresh_from(expiry, delta)),
            value,
            delta_us,
            expiry: saturating_nanos(expiry),
        })
    }

    /// The write mark of `key`'s shard: pass it to [`Self::insert_if_unchanged`] to store a
    /// value read elsewhere only if no write or invalidation of the shard happened since.
    #[cfg(feature = "redis")]
    pub(crate) fn write_mark<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.read_shard(key)
    }

    /// A fresh hit that needs no early refresh, by a borrowed key (no allocation); `None`
    /// otherwise, counting nothing (the caller goes on to [`Self::resolve`]).
    /// `now` (nanoseconds) must come from this cache's clock.
    #[cfg(feature = "redis")]
    #[inline]
    pub(crate) fn peek_at<Q>(&self, key: &Q, want_value: bool, now: u64) -> Option<Option<V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let e = self.inner.engine.get(key)?;
        if now < e.expiry && now < e.refresh_from && (e.value.is_some() || !want_value) {
            self.inner.counters.hits.bump();
            Some(e.value)
        } else {
            None
        }
    }

    /// [`Self::invalidate`] by a borrowed key.
    #[cfg(feature = "redis")]
    pub(crate) fn invalidate_borrowed<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut seq = self.lock_shard(key);
        *seq = seq.wrapping_add(1);
        self.inner.engine.invalidate(key);
        self.inner.flights.forget_borrowed(key);
    }

    /// Stores `value`, fresh for at most `ttl`, unless the shard was written or
    /// invalidated since `mark`.
    #[cfg(feature = "redis")]
    pub(crate) fn insert_if_unchanged(&self, key: K, mark: u64, value: V, ttl: Option<Duration>) {
        self.store_if_unchanged(key, mark, Some(value), ttl, Duration::ZERO);
    }

    fn store_if_unchanged(
        &self,
        key: K,
        seq: u64,
        value: Option<V>,
        ttl: Option<Duration>,
        delta: Duration,
    ) {
        let now = self.inner.clock.now();
        let current = self.lock_shard(&key);
        if *current != seq {
            return;
        }
        match self.entry(value, ttl, delta, now) {
            Some(entry) => self.inner.engine.insert(key, entry),
            None => self.inner.engine.invalidate(&key),
        }
    }

    fn lock_shard<Q: Hash + ?Sized>(&self, key: &Q) -> std::sync::MutexGuard<'_, u64> {
        let shard = (self.inner.hasher.hash_one(key) as usize) & (SHARDS - 1);
        self.inner.write_seq[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read_shard<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        *self.lock_shard(key)
    }
}

/// The future of [`Cache::resolve`]: a hit, answered when it was called, or a miss.
/// A hit holds only its value (`None` for a cached "not found"), not a whole
/// `Result`, so the future stays small and the hit path copies little.
pub(crate) enum Resolve<'a, V> {
    Hit(Option<Option<V>>),
    Miss(Pin<Box<dyn Future<Output = Shared<V>> + Send + 'a>>),
}

impl<V> Unpin for Resolve<'_, V> {}

impl<V> Future for Resolve<'_, V> {
    type Output = Shared<V>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Shared<V>> {
        match self.get_mut() {
            Resolve::Hit(hit) => Poll::Ready(Ok(hit
                .take()
                .expect("a cache read's future polled after it completed"))),
            Resolve::Miss(miss) => miss.as_mut().poll(cx),
        }
    }
}

pub(crate) fn require_value<V>(shared: Shared<V>) -> Result<V> {
    match shared {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(Error::NotFound),
        Err(e) => Err(e),
    }
}
