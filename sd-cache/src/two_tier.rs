//! The two-tier cache: a per-process memory tier in front of the shared Redis tier, kept
//! coherent across processes.
//!
//! Reads are answered from memory when they can (no round trip), otherwise from Redis
//! (with everything [`RedisCache`] does: one loader per key cluster-wide, XFetch, negative
//! caching), and the value is then kept in memory for `local_ttl`, or less: a memory copy
//! ends before its Redis entry expires, by the entry's load time × `beta` while early
//! refresh is on (XFetch's mean gap), so the reads of an entry's last stretch reach Redis
//! and refresh it early there, and none is answered from memory after it expired.
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
//! - On one Redis server (or a primary with replicas) the registry and channels are plain
//!   keys and channels ([`build`](TwoTierBuilder::build)); on a Redis Cluster they share a
//!   hash tag and use sharded pub/sub ([`build_on_cluster`](TwoTierBuilder::build_on_cluster),
//!   [below](#on-a-redis-cluster)).
//! - If the announcement fails after the value was written (Redis lost between the two
//!   round trips), the write returns [`Error::Backend`] with operation `announce`: the value
//!   is in Redis, but other memory tiers were not told. If Redis is down for them too, their
//!   leases lapse and they resync; otherwise they may keep the old copy up to `local_ttl`.
//!   Retry the write (it is idempotent) to restore the guarantee.
//!
//! # On a Redis Cluster
//!
//! [`TwoTierBuilder::build_on_cluster`] (Redis 7.0 or later) takes a cluster connection
//! (`sd_core::failover::FailoverConnection` in cluster mode) and a client of any node.
//!
//! - **Where things live.** The registry `prefix:{prefix:two-tier}:instances`, the
//!   invalidation channel `prefix:{prefix:two-tier}` and the acknowledgement channels
//!   `prefix:{prefix:two-tier}:ack:{id}` share one hash tag, so they live on one shard; the
//!   heartbeat and announce scripts write the registry and publish with `SPUBLISH` there,
//!   in one script as on one server. The entries themselves spread over every shard as in
//!   [`RedisCache`].
//! - **The subscription.** Each instance opens its own connection to the master that owns
//!   that slot (asked with `CLUSTER SLOTS` through the cluster connection; `ROLE` must say
//!   `master` in the same pipeline), `SSUBSCRIBE`s to its two channels and `SUBSCRIBE`s to
//!   the Redis tier's wake-ups. Sharded messages go only to that shard, so the coherence
//!   traffic of a prefix costs one shard, not a broadcast to every node (plain `PUBLISH`
//!   on a cluster reaches every node and is not tied to a slot).
//! - **A failover of that shard.** The subscription ends when its connection closes (a
//!   master killed) or when the master gives the slot away (`CLUSTER FAILOVER`: it sends
//!   `sunsubscribe`), and when the instance's pings stop coming back for a `lease` (a
//!   master frozen or cut off and replaced without the connection closing). The instance
//!   then stops serving from memory, subscribes again on the slot's new master, and
//!   resyncs (clears its memory tier) before it serves from memory again, as after any
//!   lost subscription. Reads meanwhile go to Redis; writes wait for the new master through
//!   the cluster connection. `tests/two_tier_cluster.rs` runs the staleness checker
//!   through both kinds of failover; RELIABILITY.md at the repository root has its figures.
//! - **What is promised.** The guarantee above holds across a `CLUSTER FAILOVER` (nothing
//!   is lost) and across a master that crashes or stops, as long as `lease` is shorter
//!   than the cluster's `cluster-node-timeout` (default 15 s; the default lease is 2 s):
//!   an instance stops serving from memory at most 90% of a lease after the old master's
//!   last ping, before a replica can be elected and take a write, and resyncs before
//!   serving again. Redis replicates asynchronously, so the new master may lack the last
//!   lease renewals; that matters only where an instance still serves from memory on the
//!   old master's pings after the new one takes writes, which the timing above rules out
//!   except where the old master still runs after the promotion: **a network
//!   partition** that leaves instances on the minority side with the old master, which
//!   keeps renewing their leases until it stops taking writes (`cluster-node-timeout`),
//!   or a master stalled past `cluster-node-timeout` that renews leases queued during
//!   the stall before it learns it was demoted (it then sends `sunsubscribe`). Those
//!   instances may serve a value written on the new master for about a lease after the
//!   promotion (90% of a lease after the old master's last renewal). Keep `lease` short
//!   where that matters; a heartbeat that waits for a replica (`WAIT`) would close this,
//!   and is not built (a `WAIT` on the shared connection would hold every command behind
//!   it).
//! - **The entries themselves** are Redis's: a master that crashes may lose the last
//!   writes it acknowledged (Redis replicates asynchronously), an invalidation included,
//!   and every tier then serves the value from before them until the key is written again
//!   or expires. The promise above is about the memory tiers following Redis, not about
//!   Redis keeping what it acknowledged.
//! - **Costs and limits.** One more connection per instance (to the coherence shard's
//!   master); a memory hit costs the same as on one server. The shard subscription speaks
//!   plain TCP (`redis://`, with the client's username and password): TLS and Unix-socket
//!   clients are refused at build with [`Error::InvalidConfig`] (field `pubsub`). Slot
//!   migration of the coherence slot (resharding) looks like a failover: a resync.

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
use crate::expiring::Loaded;
use crate::memory::{Cache, Resolve};
use crate::redis::{Codec, JsonCodec, RedisCache, RedisCacheBuilder};
use crate::stats::CacheStats;
use crate::{Error, Result};

mod builder;
mod coherence;
mod shard;

pub use builder::TwoTierBuilder;
use coherence::{Leave, Source, beat, listen, subscribe};

/// Renews an instance's lease and pings it through the invalidation channel.
static HEARTBEAT: Script = Script::new(include_str!("redis/heartbeat.lua"));
/// Publishes an invalidation and reads the registry of live instances.
static ANNOUNCE: Script = Script::new(include_str!("redis/announce.lua"));

struct Inner<V, C, K> {
    local: Cache<String, V>,
    remote: RedisCache<V, C, K>,
    registry: String,
    channel: String,
    events: String,
    ack_prefix: String,
    ack_channel: String,
    /// On a cluster: sharded pub/sub (`SPUBLISH`) and a subscription that is re-made when
    /// pings stop coming back.
    cluster: bool,
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
    /// A memory hit is answered when the call is made (the future is ready).
    ///
    /// # Errors
    ///
    /// As [`RedisCache::get`].
    #[inline]
    pub fn get<'a>(&'a self, key: &'a str) -> impl Future<Output = Result<Option<V>>> + Send + 'a {
        match self.inner.hit(key, false) {
            Some(v) => Resolve::Hit(Some(v)),
            None => Resolve::Miss(Box::pin(self.get_from_redis(key))),
        }
    }

    async fn get_from_redis(&self, key: &str) -> Result<Option<V>> {
        let inner = &self.inner;
        let mark = inner.local.write_mark(key);
        let read = inner.remote.get_loaded(key).await;
        if let Err(Error::Backend { .. }) = &read {
            inner.lapse();
        }
        if let Ok(Loaded {
            value: Some(v),
            ttl,
        }) = &read
        {
            inner
                .local
                .insert_if_unchanged(key.to_owned(), mark, v.clone(), *ttl);
        }
        read.map(|l| l.value)
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

    crate::memory::loading_reads! {
        key: &'a str;
        /// The value for `key`, loading it with `loader` on a miss in both tiers (once per key
        /// across every process). See [`RedisCache::get_or_load`].
        ///
        /// # Errors
        ///
        /// As [`RedisCache::get_or_load`].
        get_or_load;
        /// The value for `key`, loading it with the fallible `loader` on a miss in both tiers.
        ///
        /// # Errors
        ///
        /// As [`RedisCache::try_get_or_load`].
        try_get_or_load;
        /// Like [`try_get_or_load`](Self::try_get_or_load) for a loader that may find nothing
        /// (negative caching in both tiers).
        ///
        /// # Errors
        ///
        /// As [`RedisCache::try_get_or_load_optional`].
        try_get_or_load_optional;
        /// Like [`try_get_or_load_optional`](Self::try_get_or_load_optional) for a loader
        /// that chooses each entry's lifetime ([`Expiring`](crate::Expiring)). The Redis
        /// entry lives that long; a memory copy lives at most `local_ttl` and never past
        /// the Redis entry's expiry (see the module docs).
        ///
        /// # Errors
        ///
        /// As [`RedisCache::try_get_or_load_optional`].
        try_get_or_load_expiring;
    }

    /// Reads `key`, loading it on a miss in both tiers; a memory hit is answered now.
    pub(crate) fn resolve<'a, L, Fut>(
        &'a self,
        key: &'a str,
        load: L,
        want_value: bool,
    ) -> Resolve<'a, V>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = crate::memory::Load<V>> + Send + 'static,
    {
        match self.inner.hit(key, want_value) {
            Some(v) => Resolve::Hit(Some(v)),
            None => Resolve::Miss(Box::pin(self.resolve_slow(key, load, want_value))),
        }
    }

    async fn resolve_slow<L, Fut>(&self, key: &str, load: L, want_value: bool) -> Result<Option<V>>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = crate::memory::Load<V>> + Send + 'static,
    {
        let inner = &self.inner;
        if !inner.serving() {
            return inner
                .remote_resolve(key, load, want_value)
                .await
                .map(|l| l.value);
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
