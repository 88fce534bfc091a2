//! The two-tier cache: a per-process memory tier in front of the shared Redis tier, kept
//! coherent across processes.
//!
//! Reads are answered from memory when they can (no round trip), otherwise from Redis
//! (with everything [`RedisCache`] does: one loader per key cluster-wide, XFetch, negative
//! caching), and the value is then kept in memory for `local_ttl`.
//!
//! # The guarantee
//!
//! **Once [`TwoTier::insert`] or [`TwoTier::invalidate`] returns `Ok` in one process, no
//! read that starts afterwards in any process returns the value it replaced from its memory
//! tier.** (Reads that started before the write returned may still see the older value;
//! that is a concurrent read.)
//!
//! # How
//!
//! Each instance subscribes to `{prefix}:two-tier` and `{prefix}:two-tier:ack:{id}`, and
//! keeps a *lease* in the registry hash `{prefix}:two-tier:instances` (instance id → lease
//! expiry in server milliseconds):
//!
//! 1. **Heartbeat.** Every `lease / 4` an instance renews its lease (server time + `lease`)
//!    and, in the same script, publishes a ping to itself on the invalidation channel. When
//!    the ping comes back, every message published before it has been received and
//!    handled, so the instance may serve its memory tier until *its own* clock reads
//!    (time it sent the ping) + 90% of `lease`: always before the expiry the server wrote.
//!    Without pings coming back (subscription lost, Redis down or frozen) it stops serving
//!    from memory when that deadline passes, and reads go to Redis.
//! 2. **Write.** The writer stores the value in Redis, drops its own memory copy, then
//!    publishes `i|writer|seq|key` and reads the registry *in one script*. It waits for an
//!    acknowledgement from every instance whose lease was live at that instant, or until
//!    that instance's lease expiry (so at most `lease`). An instance acknowledges after it
//!    dropped its memory copy and detached any running load of the key.
//!    - an instance that acknowledged dropped the value before the write returned;
//!    - one that did not (frozen, partitioned, its subscription silently dead) has stopped
//!      serving from memory by its lease expiry, since its deadline is earlier and only a
//!      ping published after the write (so received after the invalidation) can extend it;
//!    - one whose lease had already lapsed was not serving from memory at all.
//! 3. **Resync.** An instance whose subscription dropped and came back, or whose lease
//!    lapsed and was renewed, may have missed invalidations: it clears its memory tier and
//!    detaches running loads *before* it serves from memory again. A value loaded from
//!    Redis is kept in memory only if no invalidation of its key (or resync) happened while
//!    it was read.
//!
//! Clocks are only compared with themselves: the writer converts the server's expiry into
//! a wait measured from the reply, an instance measures its deadline on its own clock, and
//! 10% of the lease is margin for clock-rate differences and scheduling.
//!
//! # Costs and limits
//!
//! - A memory hit is a clock read and an atomic load on top of the memory [`Cache`] hit.
//! - A write costs the Redis write, one more round trip (the announcement), and the wait
//!   for acknowledgements: about one more round trip while every instance is healthy, up to
//!   `lease` when one is not. Keep `lease` short (default 2 s).
//! - Every writer of a prefix served by two-tier caches must write through a [`TwoTier`]: a
//!   plain [`RedisCache`] write or invalidation is not announced, so memory tiers keep their
//!   copy until `local_ttl`. Loads and early refreshes do not drop memory copies either (a
//!   refresh that found a newer value in the store reaches memory tiers within `local_ttl`,
//!   as with any TTL cache).
//! - The registry and channels are plain keys and channels: this runs on one Redis server
//!   (or a primary with replicas), not on Redis Cluster.
//! - If the announcement fails after the value was written (Redis lost between the two
//!   round trips), the write returns [`Error::Backend`] with operation `announce`: the value
//!   is in Redis, but other memory tiers were not told. If Redis is down for them too, their
//!   leases lapse and they resync; otherwise they may keep the old copy up to `local_ttl`.
//!   Retry the write (it is idempotent) to restore the guarantee.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use redis::aio::ConnectionLike;
use sd_core::redis::Script;
use tokio::sync::{Notify, watch};

use crate::clock::{Clock, MonotonicClock, saturating_nanos};
use crate::memory::{Cache, require_value};
use crate::redis::{Codec, JsonCodec, RedisCache, RedisCacheBuilder};
use crate::stats::CacheStats;
use crate::{Error, Result};

/// Renews an instance's lease and pings it through the invalidation channel.
static HEARTBEAT: Script = Script::new(include_str!("redis/heartbeat.lua"));
/// Publishes an invalidation and reads the registry of live instances.
static ANNOUNCE: Script = Script::new(include_str!("redis/announce.lua"));

/// Builds a [`TwoTier`] from a [`RedisCacheBuilder`] (whose settings apply to the Redis
/// tier) and the memory tier's settings.
pub struct TwoTierBuilder<V, K = JsonCodec> {
    remote: RedisCacheBuilder<V, K>,
    local_capacity: u64,
    local_ttl: Duration,
    lease: Duration,
}

impl<V, K: fmt::Debug> fmt::Debug for TwoTierBuilder<V, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwoTierBuilder")
            .field("remote", &self.remote)
            .field("local_capacity", &self.local_capacity)
            .field("local_ttl", &self.local_ttl)
            .field("lease", &self.lease)
            .finish()
    }
}

impl<V, K> TwoTierBuilder<V, K>
where
    V: Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    /// Most entries in the memory tier (default 10,000).
    pub fn local_capacity(mut self, entries: u64) -> Self {
        self.local_capacity = entries;
        self
    }

    /// How long a value stays in the memory tier (default 5 s, at most the Redis TTL).
    /// Writes and invalidations drop it sooner, in every process.
    pub fn local_ttl(mut self, ttl: Duration) -> Self {
        self.local_ttl = ttl;
        self
    }

    /// How long an instance may serve from memory without hearing from Redis (default 2 s,
    /// between 100 ms and 60 s). It bounds how long a write waits for an instance that does
    /// not acknowledge (frozen, partitioned), and how long a lost subscription goes unnoticed.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.lease < Duration::from_millis(100) || self.lease > Duration::from_secs(60) {
            return Err(Error::InvalidConfig {
                field: "lease",
                reason: "must be between 100 ms and 60 s; it bounds how long a write waits for an unresponsive instance".into(),
            });
        }
        if self.local_ttl.is_zero() || self.local_ttl > self.remote.policy().ttl {
            return Err(Error::InvalidConfig {
                field: "local_ttl",
                reason: "must be above zero and at most the Redis tier's `ttl`".into(),
            });
        }
        Ok(())
    }

    /// Checks the settings, subscribes through `pubsub` (a client of the same server as
    /// `conn`), registers this instance and starts its heartbeat. Must run inside a tokio
    /// runtime. The instance serves from memory once its first heartbeat came back.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field; [`Error::Backend`] when the subscription or
    /// the first heartbeat fails.
    pub async fn build<C>(self, conn: C, pubsub: redis::Client) -> Result<TwoTier<V, C, K>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.validate()?;
        let policy = self.remote.policy().clone();
        let clock = MonotonicClock::new();
        let mut local = Cache::builder()
            .clock(clock.clone())
            .max_capacity(self.local_capacity)
            .ttl(self.local_ttl)
            .beta(policy.beta)
            .early_refresh(policy.early_refresh);
        local = match policy.negative_ttl {
            Some(n) => local.negative_ttl(n.min(self.local_ttl)),
            None => local.no_negative_caching(),
        };
        let local = local.build()?;
        let remote = self.remote.build_woken_externally(conn)?;
        let prefix = remote.key_prefix().clone();
        let id = format!("{:016x}", rand::random::<u64>());
        let channel = prefix.key("two-tier");
        let channels = [
            channel.clone(),
            prefix.key(&format!("two-tier:ack:{id}")),
            remote.events_channel().to_owned(),
        ];
        let subscription = subscribe(&pubsub, &channels).await?;
        let (closed_tx, closed_rx) = watch::channel(());
        let leave = Leave::new(
            remote.connection(),
            prefix.key("two-tier:instances"),
            id.clone(),
        );
        let inner = Arc::new(Inner {
            local,
            remote,
            registry: prefix.key("two-tier:instances"),
            channel,
            events: channels[2].clone(),
            ack_prefix: prefix.key("two-tier:ack:"),
            ack_channel: channels[1].clone(),
            id,
            lease: self.lease,
            clock,
            serving_until: AtomicU64::new(0),
            pings: Mutex::new(BTreeMap::new()),
            next_seq: AtomicU64::new(1),
            acks: DashMap::new(),
            resyncs: AtomicU64::new(0),
            _leave: leave,
            _closed: closed_tx,
        });
        inner.heartbeat().await?;
        tokio::spawn(listen(
            Arc::downgrade(&inner),
            pubsub,
            channels,
            subscription,
            closed_rx.clone(),
        ));
        tokio::spawn(beat(Arc::downgrade(&inner), closed_rx));
        Ok(TwoTier { inner })
    }
}

struct Inner<V, C, K> {
    local: Cache<String, V>,
    remote: RedisCache<V, C, K>,
    registry: String,
    channel: String,
    events: String,
    ack_prefix: String,
    ack_channel: String,
    id: String,
    lease: Duration,
    clock: MonotonicClock,
    /// Until when (nanoseconds on `clock`) the memory tier may answer reads; 0 = not now.
    serving_until: AtomicU64,
    /// Pings sent and not yet received: sequence number -> when sent.
    pings: Mutex<BTreeMap<u64, Duration>>,
    next_seq: AtomicU64,
    /// Acknowledgements received for this instance's writes in progress.
    acks: DashMap<u64, Arc<AckWait>>,
    resyncs: AtomicU64,
    _leave: Leave,
    /// Dropped with the cache: tells the background tasks to stop.
    _closed: watch::Sender<()>,
}

#[derive(Default)]
struct AckWait {
    acked: Mutex<HashSet<String>>,
    notify: Notify,
}

/// A memory tier in front of a Redis tier; a write or invalidation that returned is never
/// read stale from another instance's memory tier. See the [module docs](self).
///
/// Cloning is cheap; clones share the instance (one subscription, one lease).
pub struct TwoTier<V, C = redis::aio::MultiplexedConnection, K = JsonCodec> {
    inner: Arc<Inner<V, C, K>>,
}

impl<V, C, K> Clone for TwoTier<V, C, K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V, C, K> fmt::Debug for TwoTier<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    K: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwoTier")
            .field("id", &self.inner.id)
            .field("local", &self.inner.local)
            .field("remote", &self.inner.remote)
            .field("resyncs", &self.inner.resyncs.load(Ordering::Relaxed))
            .finish()
    }
}

impl<V> TwoTier<V>
where
    V: Clone + Send + Sync + 'static,
{
    /// A builder over `remote` (the Redis tier's settings), with the memory tier's defaults:
    /// 10,000 entries, local TTL 5 s (or the Redis TTL if shorter), lease 2 s.
    pub fn builder<K: Codec<V>>(remote: RedisCacheBuilder<V, K>) -> TwoTierBuilder<V, K> {
        let local_ttl = remote.policy().ttl.min(Duration::from_secs(5));
        TwoTierBuilder {
            remote,
            local_capacity: 10_000,
            local_ttl,
            lease: Duration::from_secs(2),
        }
    }
}

impl<V, C, K> TwoTier<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    /// The Redis tier (its stats, `data_key`, reads that skip the memory tier).
    pub fn remote(&self) -> &RedisCache<V, C, K> {
        &self.inner.remote
    }

    /// The memory tier's counters (hits here are reads answered without a round trip).
    pub fn stats(&self) -> CacheStats {
        self.inner.local.stats()
    }

    /// The Redis tier's counters (this process only).
    pub fn remote_stats(&self) -> CacheStats {
        self.inner.remote.stats()
    }

    /// Times this instance cleared its memory tier because it may have missed invalidations
    /// (subscription re-established, or lease renewed after it lapsed).
    pub fn resyncs(&self) -> u64 {
        self.inner.resyncs.load(Ordering::Relaxed)
    }

    /// Whether the memory tier may answer reads now (the lease is live).
    pub fn is_serving_local(&self) -> bool {
        self.inner.serving()
    }

    /// This instance's id in the registry.
    pub fn instance_id(&self) -> &str {
        &self.inner.id
    }

    /// The value for `key`: from memory when it holds it, else from Redis (one round trip;
    /// the value is then kept in memory). `None` for a miss and for a cached "not found".
    ///
    /// # Errors
    ///
    /// As [`RedisCache::get`].
    pub async fn get(&self, key: &str) -> Result<Option<V>> {
        if let Some(v) = self.inner.hit(key, false) {
            return Ok(v);
        }
        // Boxed, so the future of a memory hit stays small.
        Box::pin(self.get_from_redis(key)).await
    }

    async fn get_from_redis(&self, key: &str) -> Result<Option<V>> {
        let inner = &self.inner;
        let mark = inner.local.write_mark(key);
        let read = inner.remote.get(key).await;
        if let Err(Error::Backend { .. }) = &read {
            inner.lapse();
        }
        if let Ok(Some(v)) = &read {
            inner
                .local
                .insert_if_unchanged(key.to_owned(), mark, v.clone());
        }
        read
    }

    /// Stores `value` for `key` in Redis and returns once every other instance dropped its
    /// memory copy (or provably stopped serving from memory).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] (operation `write` or `announce`), [`Error::Codec`],
    /// [`Error::InvalidKey`].
    pub async fn insert(&self, key: &str, value: &V) -> Result<()> {
        let written = self.inner.remote.insert(key, value).await;
        self.inner.after_write(key, written).await
    }

    /// Removes `key` from Redis and returns once every other instance dropped its memory
    /// copy (or provably stopped serving from memory).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] (operation `invalidate` or `announce`), [`Error::InvalidKey`].
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let removed = self.inner.remote.invalidate(key).await;
        self.inner.after_write(key, removed).await
    }

    /// The value for `key`, loading it with `loader` on a miss in both tiers (once per key
    /// across every process). See [`RedisCache::get_or_load`].
    ///
    /// # Errors
    ///
    /// As [`RedisCache::get_or_load`].
    pub async fn get_or_load<F, Fut>(&self, key: &str, loader: F) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = V> + Send + 'static,
    {
        let load = move || async move { Ok(Some(loader().await)) };
        require_value(self.resolve(key, load, true).await)
    }

    /// The value for `key`, loading it with the fallible `loader` on a miss in both tiers.
    ///
    /// # Errors
    ///
    /// As [`RedisCache::try_get_or_load`].
    pub async fn try_get_or_load<E, F, Fut>(&self, key: &str, loader: F) -> Result<V>
    where
        E: Into<sd_core::BoxError>,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<V, E>> + Send + 'static,
    {
        let load = move || async move { loader().await.map(Some).map_err(Error::loader) };
        require_value(self.resolve(key, load, true).await)
    }

    /// Like [`try_get_or_load`](Self::try_get_or_load) for a loader that may find nothing
    /// (negative caching in both tiers).
    ///
    /// # Errors
    ///
    /// As [`RedisCache::try_get_or_load_optional`].
    pub async fn try_get_or_load_optional<E, F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Option<V>>
    where
        E: Into<sd_core::BoxError>,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
    {
        let load = move || async move { loader().await.map_err(Error::loader) };
        self.resolve(key, load, false).await
    }

    async fn resolve<L, Fut>(&self, key: &str, load: L, want_value: bool) -> Result<Option<V>>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>>> + Send + 'static,
    {
        if let Some(v) = self.inner.hit(key, want_value) {
            return Ok(v);
        }
        // Boxed, so the future of a memory hit stays small.
        Box::pin(self.resolve_slow(key, load, want_value)).await
    }

    async fn resolve_slow<L, Fut>(&self, key: &str, load: L, want_value: bool) -> Result<Option<V>>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>>> + Send + 'static,
    {
        let inner = &self.inner;
        if !inner.serving() {
            return inner.remote_resolve(key, load, want_value).await;
        }
        // The memory tier's own single-flight, XFetch and "no store after an invalidation"
        // apply; its loader is the Redis tier.
        let this = Arc::clone(inner);
        let owned = key.to_owned();
        let from_redis = move || async move { this.remote_resolve(&owned, load, want_value).await };
        inner
            .local
            .resolve(key.to_owned(), from_redis, want_value)
            .await
    }
}

impl<V, C, K> Inner<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    fn serving(&self) -> bool {
        saturating_nanos(self.clock.now()) < self.serving_until.load(Ordering::Acquire)
    }

    /// A memory hit needing no refresh, while the lease is live: one clock read for both.
    fn hit(&self, key: &str, want_value: bool) -> Option<Option<V>> {
        let now = self.clock.now();
        if saturating_nanos(now) >= self.serving_until.load(Ordering::Acquire) {
            return None;
        }
        self.local.peek_at(key, want_value, now)
    }

    /// Stops serving from memory until a heartbeat comes back (which then resyncs).
    fn lapse(&self) {
        self.serving_until.store(0, Ordering::Release);
    }

    /// Forgets everything the memory tier holds or is loading.
    fn resync(&self) {
        self.lapse();
        self.local.invalidate_all();
        self.remote.forget_all();
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads through the Redis tier; a Redis failure (or a read answered around one) stops
    /// the memory tier from serving until the lease is renewed, and that renewal resyncs.
    async fn remote_resolve<L, Fut>(
        &self,
        key: &str,
        load: L,
        want_value: bool,
    ) -> Result<Option<V>>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<V>>> + Send + 'static,
    {
        let fallbacks = self.remote.fallback_count();
        let result = self.remote.resolve(key, load, want_value).await;
        if matches!(result, Err(Error::Backend { .. })) || self.remote.fallback_count() != fallbacks
        {
            self.lapse();
        }
        result
    }

    /// Drops the local copy, announces the change and waits for the acknowledgements.
    async fn after_write(&self, key: &str, written: Result<()>) -> Result<()> {
        // Whatever happened in Redis, our own copy may be outdated now.
        self.local.invalidate_borrowed(key);
        self.remote.forget(key);
        if let Err(e) = written {
            if matches!(e, Error::Backend { .. }) {
                self.lapse();
            }
            return Err(e);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let wait = Arc::new(AckWait::default());
        self.acks.insert(seq, Arc::clone(&wait));
        let _cleanup = AckCleanup {
            acks: &self.acks,
            seq,
        };
        let message = format!("i|{}|{seq}|{key}", self.id);
        let mut conn = self.remote.connection();
        let (now, registry): (u64, Vec<(String, u64)>) = ANNOUNCE
            .call(1)
            .arg(&self.registry)
            .arg(&self.channel)
            .arg(message)
            .invoke(&mut conn)
            .await
            .map_err(|e| {
                self.lapse();
                backend("announce", e)
            })?;
        let replied = tokio::time::Instant::now();
        let mut pending: HashMap<String, tokio::time::Instant> = registry
            .into_iter()
            .filter(|(id, expiry)| *id != self.id && *expiry > now)
            .map(|(id, expiry)| (id, replied + Duration::from_millis(expiry - now)))
            .collect();
        loop {
            let notified = wait.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let acked = wait.acked.lock().unwrap_or_else(PoisonError::into_inner);
                let now = tokio::time::Instant::now();
                pending.retain(|id, deadline| !acked.contains(id) && *deadline > now);
            }
            let Some(next) = pending.values().min().copied() else {
                return Ok(());
            };
            let _ = tokio::time::timeout_at(next, notified).await;
        }
    }

    /// Renews the lease and sends a ping through the invalidation channel.
    async fn heartbeat(&self) -> Result<()> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let sent = self.clock.now();
        self.pings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, sent);
        let mut conn = self.remote.connection();
        HEARTBEAT
            .call(1)
            .arg(&self.registry)
            .arg(&self.id)
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(&self.channel)
            .arg(format!("p|{}|{seq}", self.id))
            .invoke::<u64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| backend("heartbeat", e))
    }

    /// Handles one message, in the order the server published them.
    fn on_message(&self, channel: &str, payload: &str) {
        if channel == self.events {
            // A write, load or invalidation of `payload` in some process: wake our waiters.
            // The memory copy is dropped by the writer's announcement (a load does not make
            // the memory copy wrong; see the module docs for plain Redis writers).
            self.remote.wake(payload);
        } else if channel == self.ack_channel {
            if let Some((seq, id)) = payload.split_once('|')
                && let Ok(seq) = seq.parse::<u64>()
                && let Some(wait) = self.acks.get(&seq)
            {
                wait.acked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id.to_owned());
                wait.notify.notify_waiters();
            }
        } else if channel == self.channel {
            let mut parts = payload.splitn(4, '|');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                // Our own writes dropped our copy before they were announced; dropping it
                // again here would only throw away a newer value read since.
                (Some("i"), Some(writer), Some(seq), Some(key)) if writer != self.id => {
                    self.local.invalidate_borrowed(key);
                    self.remote.forget(key);
                    self.acknowledge(writer, seq);
                }
                (Some("p"), Some(id), Some(seq), None) if id == self.id => {
                    if let Ok(seq) = seq.parse::<u64>() {
                        self.on_ping(seq);
                    }
                }
                _ => {}
            }
        }
    }

    fn acknowledge(&self, writer: &str, seq: &str) {
        let mut conn = self.remote.connection();
        let channel = format!("{}{writer}", self.ack_prefix);
        let message = format!("{seq}|{}", self.id);
        tokio::spawn(async move {
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async(&mut conn)
                .await;
            if let Err(error) = sent {
                tracing::warn!(%error, "sd-cache: could not acknowledge an invalidation; the writer waits for our lease instead");
            }
        });
    }

    /// Our ping came back: every message published before it was handled.
    fn on_ping(&self, seq: u64) {
        let sent = {
            let mut pings = self.pings.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(sent) = pings.remove(&seq) else {
                return;
            };
            // Older pings were lost (or overtaken): forget them.
            *pings = pings.split_off(&seq);
            sent
        };
        if !self.serving() {
            // The lease lapsed (or this is the first ping): invalidations may have been
            // missed meanwhile, so start from an empty memory tier.
            self.resync();
        }
        let until = sent + self.lease - self.lease / 10;
        self.serving_until
            .fetch_max(saturating_nanos(until), Ordering::AcqRel);
    }
}

/// Leaves the registry when the instance is dropped, so writers stop waiting for it at
/// once instead of until its lease lapses (best effort: needs a runtime; the lease bounds
/// the wait otherwise).
struct Leave(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Leave {
    fn new<C: ConnectionLike + Clone + Send + Sync + 'static>(
        mut conn: C,
        registry: String,
        id: String,
    ) -> Self {
        Leave(Some(Box::new(move || {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            runtime.spawn(async move {
                let _: redis::RedisResult<i64> = redis::cmd("HDEL")
                    .arg(registry)
                    .arg(id)
                    .query_async(&mut conn)
                    .await;
            });
        })))
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(leave) = self.0.take() {
            leave();
        }
    }
}

struct AckCleanup<'a> {
    acks: &'a DashMap<u64, Arc<AckWait>>,
    seq: u64,
}

impl Drop for AckCleanup<'_> {
    fn drop(&mut self) {
        self.acks.remove(&self.seq);
    }
}

async fn subscribe(client: &redis::Client, channels: &[String; 3]) -> Result<redis::aio::PubSub> {
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|e| backend("subscribe", e))?;
    pubsub
        .subscribe(channels.as_slice())
        .await
        .map_err(|e| backend("subscribe", e))?;
    Ok(pubsub)
}

/// Delivers messages in order; when the subscription drops, stops serving from memory,
/// re-subscribes with backoff and resyncs.
async fn listen<V, C, K>(
    inner: Weak<Inner<V, C, K>>,
    client: redis::Client,
    channels: [String; 3],
    first: redis::aio::PubSub,
    mut closed: watch::Receiver<()>,
) where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    let mut subscription = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let pubsub = match subscription.take() {
            Some(p) => p,
            None => {
                let attempt = tokio::select! {
                    r = subscribe(&client, &channels) => r,
                    _ = closed.changed() => return,
                };
                match attempt {
                    Ok(p) => {
                        backoff = Duration::from_millis(50);
                        let Some(inner) = inner.upgrade() else { return };
                        // Anything published while we were not subscribed is lost to us.
                        inner.resync();
                        p
                    }
                    Err(error) => {
                        tracing::warn!(%error, "sd-cache: two-tier subscription failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = closed.changed() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
        };
        let mut stream = pubsub.into_on_message();
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = closed.changed() => return,
            };
            let Some(msg) = msg else { break };
            let Some(inner) = inner.upgrade() else { return };
            let channel = msg.get_channel_name();
            if let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) {
                inner.on_message(channel, payload);
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        tracing::warn!("sd-cache: two-tier subscription lost; serving from Redis until it is back");
        inner.resync();
    }
}

/// Renews the lease every quarter lease.
async fn beat<V, C, K>(inner: Weak<Inner<V, C, K>>, mut closed: watch::Receiver<()>)
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    loop {
        let period = match inner.upgrade() {
            Some(inner) => inner.lease / 4,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = closed.changed() => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Err(error) = inner.heartbeat().await {
            tracing::warn!(%error, "sd-cache: two-tier heartbeat failed; the memory tier stops serving when the lease lapses");
        }
    }
}

fn backend(operation: &'static str, e: redis::RedisError) -> Error {
    Error::Backend {
        backend: "redis",
        operation,
        source: Arc::new(e),
    }
}

impl<V, C, K> crate::write::CacheTier<String, V> for TwoTier<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    fn put(&self, key: &String, value: &V) -> impl Future<Output = Result<()>> + Send {
        self.insert(key, value)
    }

    fn remove(&self, key: &String) -> impl Future<Output = Result<()>> + Send {
        self.invalidate(key)
    }
}
