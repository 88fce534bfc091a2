//! The Redis tier: one entry per key in a hash (value, delta, expiry, version), shared by
//! every process, with one loader per key cluster-wide.
//!
//! - **Keys**: `{prefix}:{<key>}` holds the entry and `{prefix}:{<key>}:lock` the load
//!   lock. Both carry the same `{hash tag}`, so the scripts run on Redis Cluster.
//! - **Reads** are one round trip: a plain `HMGET` of the entry's hash (no script), judged
//!   against the server's clock as this process estimates it from a `TIME` sent along at
//!   most once a second. The estimate errs late, so an entry is never taken as fresh after
//!   its expiry; freshness and XFetch use the server's clock, so app servers with skewed
//!   clocks agree. Only a miss's leader and an early refresh run a script: it reads the
//!   entry with the server's `TIME` and takes the load lock in the same round trip.
//! - **Misses**: in-process callers coalesce first (single-flight), then the leader takes a
//!   short `SET NX PX` lock. The lock holder loads and writes; every other process waits
//!   for a message on `{prefix}:events` (when [`RedisCacheBuilder::notifications`] is
//!   given a client) and otherwise re-reads with exponential backoff (10 ms doubling to
//!   200 ms), taking the lock itself if the holder died.
//! - **Versions**: each write bumps the entry's version; a load writes only if the version
//!   it saw when it took the lock still holds, so it never overwrites a newer write or an
//!   invalidation (which leaves a tombstone with a bumped version).
//!
//! When Redis fails, calls return [`Error::Backend`]; with
//! [`fallback_to_loader`](RedisCacheBuilder::fallback_to_loader), reads that have a loader
//! run it instead (still coalesced in-process) and return its value uncached.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use redis::aio::ConnectionLike;
use sd_core::KeyPrefix;
use sd_core::redis::Script;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::observe::redis_span;
use sd_core::observe::operation;

use crate::clock::{RandomSource, ThreadRandom};
use crate::error::short_key;
use crate::expiring::Loaded;
use crate::policy::Policy;
use crate::singleflight::SingleFlight;
use crate::stats::{CacheStats, Counters};
use crate::{Error, Result, SharedError};

mod builder;
mod codec;
mod load;
mod server_clock;

pub use builder::RedisCacheBuilder;
pub use codec::{Codec, JsonCodec};
use server_clock::ServerClock;

/// Reads an entry with the server's `TIME` and takes the load lock (a miss's leader, an
/// early refresh). Plain reads are an `HMGET`, not this script.
static READ_AND_LOCK: Script = Script::new(include_str!("redis/read.lua"));
static WRITE: Script = Script::new(include_str!("redis/write.lua"));
static INVALIDATE: Script = Script::new(include_str!("redis/invalidate.lua"));
static UNLOCK: Script = Script::new(include_str!("redis/unlock.lua"));

/// What a [`RedisCacheBuilder`] sets and the built cache reads, handed over whole.
struct Settings<K> {
    /// The `sd.name` of the cache's metrics and spans.
    name: String,
    policy: Policy,
    lock_ttl: Duration,
    wait_timeout: Duration,
    fallback_to_loader: bool,
    codec: K,
    random: Arc<dyn RandomSource>,
}

impl<K> Settings<K> {
    /// The same settings with `codec` in place of the current one.
    fn with_codec<K2>(self, codec: K2) -> Settings<K2> {
        Settings {
            name: self.name,
            policy: self.policy,
            lock_ttl: self.lock_ttl,
            wait_timeout: self.wait_timeout,
            fallback_to_loader: self.fallback_to_loader,
            codec,
            random: self.random,
        }
    }
}

struct RedisInner<V, C, K> {
    conn: C,
    prefix: KeyPrefix,
    channel: String,
    settings: Settings<K>,
    /// Loads after a miss; callers join them for the value.
    flights: SingleFlight<String, Load<V>>,
    /// Early refreshes, kept apart from `flights`: a refresh that finds another process
    /// refreshing answers "skipped", which a miss joining it would take for "not found".
    refreshes: SingleFlight<String, Load<V>>,
    counters: Counters,
    waiters: Arc<DashMap<String, Arc<Notify>>>,
    subscribed: bool,
    server_clock: ServerClock,
}

type Shared<V> = Result<Option<V>>;

/// A value with how long a memory tier in front (two-tier) may keep it: what is left of
/// its lifetime in Redis less one mean early-refresh gap (see [`RedisCache::keep_in_memory`]),
/// or `Some(ZERO)` for a value that was not stored.
type Load<V> = Result<Loaded<V>>;

/// An entry's fields as `HMGET` returns them: value, delta ms, expiry ms, negative, version.
type Fields = (
    Option<Vec<u8>>,
    Option<u64>,
    Option<u64>,
    Option<u8>,
    Option<String>,
);

/// A cache shared by every process that uses the same Redis and prefix. See the
/// [module docs](self) for the protocol. Cloning is cheap; clones share state.
///
/// `C` is the connection: any redis-rs `ConnectionLike + Clone` (a `ConnectionManager`, a
/// cluster connection); it defaults to a `MultiplexedConnection`, so `RedisCache<V>` names
/// the common case and `RedisCache::<V>::builder(..)` starts one.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_cache::RedisCache;
///
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let conn = client.get_multiplexed_async_connection().await?;
/// let cache: RedisCache<String> = RedisCache::builder("users")
///     .ttl(Duration::from_secs(60))
///     .build(conn)
///     .await?;
/// let name = cache.get_or_load("42", || async { "ada".to_owned() }).await?;
/// assert_eq!(name, "ada");
/// # Ok(())
/// # }
/// ```
pub struct RedisCache<V, C = redis::aio::MultiplexedConnection, K = JsonCodec> {
    inner: Arc<RedisInner<V, C, K>>,
}

impl<V, C, K> Clone for RedisCache<V, C, K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V, C, K: fmt::Debug> fmt::Debug for RedisCache<V, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.inner.prefix)
            .field("policy", &self.inner.settings.policy)
            .field("codec", &self.inner.settings.codec)
            .field("stats", &self.inner.counters.snapshot())
            .finish()
    }
}

/// One entry as the read script returns it.
struct Read<V> {
    /// `Some(None)` for a cached "not found"; `None` for a miss (absent or expired).
    fresh: Option<Option<V>>,
    /// The value of an expired entry still inside its stale-on-error window.
    stale: Option<V>,
    delta: Duration,
    expiry: Duration,
    now: Duration,
    version: String,
    locked: bool,
}

impl<V> Read<V> {
    /// What is left of the entry's lifetime (zero for a miss).
    fn remaining(&self) -> Duration {
        self.expiry.saturating_sub(self.now)
    }
}

impl<V, C, K> RedisCache<V, C, K> {
    /// How long a memory tier may keep a value with `left` of its Redis lifetime, loaded
    /// in `delta`: `left` less `delta * beta` (XFetch's mean early-refresh gap) while early
    /// refresh is on, so the reads of an entry's last stretch reach Redis, where they can
    /// refresh it early, instead of all being answered from memory until it expires.
    pub(crate) fn keep_in_memory(&self, left: Duration, delta: Duration) -> Duration {
        let policy = &self.inner.settings.policy;
        if policy.early_refresh {
            left.saturating_sub(delta.mul_f64(policy.beta))
        } else {
            left
        }
    }

    /// [`Self::keep_in_memory`] for an entry as read.
    fn memory_ttl(&self, read: &Read<V>) -> Duration {
        self.keep_in_memory(read.remaining(), read.delta)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lock<'a> {
    Never,
    IfMissing,
    /// An early refresh of the entry with this version: lock only if it is still in place.
    Refresh(&'a str),
}

impl<V, C, K> RedisCache<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    /// The Redis key holding `key`'s entry.
    pub fn data_key(&self, key: &str) -> String {
        self.inner.prefix.tagged(key)
    }

    fn lock_key(&self, key: &str) -> String {
        let mut lock = self.inner.prefix.tagged(key);
        lock.push_str(":lock");
        lock
    }

    /// The checked key prefix.
    pub(crate) fn key_prefix(&self) -> &KeyPrefix {
        &self.inner.prefix
    }

    fn check_key(key: &str) -> Result<()> {
        if key.is_empty() || key.starts_with('}') {
            return Err(Error::InvalidKey {
                key: short_key(key),
                reason: "must be non-empty and must not start with `}` (it is the hash tag)",
            });
        }
        Ok(())
    }

    /// Counters since the cache was built (this process only).
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// The fresh value for `key`, if any (one round trip). `None` for a miss and for a
    /// cached "not found".
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when Redis fails, [`Error::Codec`] when the value does not decode.
    pub async fn get(&self, key: &str) -> Result<Option<V>> {
        self.get_loaded(key).await.map(|l| l.value)
    }

    /// [`Self::get`] with what is left of the entry's lifetime.
    pub(crate) async fn get_loaded(&self, key: &str) -> Load<V> {
        Self::check_key(key)?;
        let read = self.read(key, Lock::Never, "").await?;
        let ttl = Some(self.memory_ttl(&read));
        if let Some(value) = read.fresh {
            self.inner.counters.hits.bump();
            Ok(Loaded { value, ttl })
        } else {
            Counters::bump(&self.inner.counters.misses);
            Ok(Loaded { value: None, ttl })
        }
    }

    /// The cache's name (the `sd.name` of its metrics and spans).
    pub(crate) fn name(&self) -> &str {
        &self.inner.counters.name
    }

    /// Stores `value` for `key` (cache-aside), fresh for the TTL, and tells every process.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`], [`Error::Codec`].
    pub async fn insert(&self, key: &str, value: &V) -> Result<()> {
        Self::check_key(key)?;
        self.write(key, Some(value), None, Duration::ZERO, None, "")
            .await
            .map(|_| ())
    }

    /// Removes `key` for every process. A load running anywhere will not store its (older)
    /// result.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`].
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        Self::check_key(key)?;
        let settings = &self.inner.settings;
        let tomb = ms(settings.policy.ttl.max(settings.lock_ttl * 2));
        let mut conn = self.inner.conn.clone();
        INVALIDATE
            .call(1)
            .arg(self.data_key(key))
            .arg(tomb)
            .arg(&self.inner.channel)
            .arg(key)
            .invoke::<i64>(&mut conn)
            .instrument(redis_span(&self.inner.counters.name, operation::INVALIDATE))
            .await
            .map_err(backend("invalidate"))?;
        self.forget(key);
        Ok(())
    }

    /// Detaches this process's running load of `key`, so calls that start from now on do
    /// not receive its (older) result.
    pub(crate) fn forget(&self, key: &str) {
        let key = key.to_owned();
        self.inner.flights.forget(&key);
        self.inner.refreshes.forget(&key);
    }

    /// Detaches every running load in this process.
    pub(crate) fn forget_all(&self) {
        self.inner.flights.forget_all();
        self.inner.refreshes.forget_all();
    }

    /// Wakes this process's callers waiting for another process's load of `key`.
    pub(crate) fn wake(&self, key: &str) {
        if let Some(n) = self.inner.waiters.get(key) {
            n.notify_waiters();
        }
    }

    /// The channel every write and invalidation of this prefix is published on.
    pub(crate) fn events_channel(&self) -> &str {
        &self.inner.channel
    }

    /// Loader calls made around a failed Redis so far.
    pub(crate) fn fallback_count(&self) -> u64 {
        self.inner
            .counters
            .fallbacks
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The connection commands go through.
    pub(crate) fn connection(&self) -> C {
        self.inner.conn.clone()
    }

    crate::memory::loading_reads! {
        key: &'a str;
        /// The value for `key`, loading it with `loader` on a miss: once per key across every
        /// process that shares the prefix. See [`crate::Cache::get_or_load`].
        ///
        /// # Errors
        ///
        /// [`Error::Backend`] when Redis fails (unless `fallback_to_loader`),
        /// [`Error::LoadTimeout`], [`Error::Codec`], or a shared [`Error::Loader`] / [`Error::NotFound`]
        /// from a fallible or optional loader of the same key in this process.
        get_or_load;
        /// The value for `key`, loading it with the fallible `loader` on a miss. A loader error is
        /// shared with every caller coalesced on it in this process, and not cached.
        ///
        /// # Errors
        ///
        /// As [`get_or_load`](Self::get_or_load), plus [`Error::Loader`].
        try_get_or_load;
        /// Like [`try_get_or_load`](Self::try_get_or_load) for a loader that may find nothing;
        /// `Ok(None)` is cached for the negative TTL.
        ///
        /// # Errors
        ///
        /// As [`try_get_or_load`](Self::try_get_or_load).
        try_get_or_load_optional;
        /// Like [`try_get_or_load_optional`](Self::try_get_or_load_optional) for a loader
        /// that chooses each entry's lifetime ([`Expiring`](crate::Expiring)); the entry
        /// expires on the server's clock after that lifetime (cut to `max_ttl`; zero: not
        /// stored). See [`crate::Cache::try_get_or_load_expiring`].
        ///
        /// # Errors
        ///
        /// As [`try_get_or_load`](Self::try_get_or_load).
        try_get_or_load_expiring;
    }

    async fn read(&self, key: &str, lock: Lock<'_>, token: &str) -> Result<Read<V>> {
        type Reply = (
            Option<Vec<u8>>,
            Option<u64>,
            Option<u64>,
            Option<u8>,
            String,
            u64,
            u8,
        );
        let mut conn = self.inner.conn.clone();
        let (mode, seen) = match lock {
            Lock::Never => return self.read_plain(key).await,
            Lock::IfMissing => ("1", ""),
            Lock::Refresh(version) => ("2", version),
        };
        let (value, delta, expiry, negative, version, now, locked): Reply = READ_AND_LOCK
            .call(2)
            .arg(self.data_key(key))
            .arg(self.lock_key(key))
            .arg(token)
            .arg(ms(self.inner.settings.lock_ttl))
            .arg(mode)
            .arg(seen)
            .invoke(&mut conn)
            .instrument(redis_span(&self.inner.counters.name, operation::READ))
            .await
            .map_err(backend("read"))?;
        self.decode_read(
            key,
            (value, delta, expiry, negative, Some(version)),
            now,
            locked == 1,
        )
    }

    /// A read that takes no lock: a plain `HMGET` (no script), judged against the server's
    /// clock as estimated from the last `TIME` (re-read, in the same round trip, at most a
    /// second ago). The estimate is an upper bound of the server's time, late by at most
    /// the round trip of that `TIME`, so an entry is never taken as fresh after its expiry,
    /// only up to one round trip early as expired.
    async fn read_plain(&self, key: &str) -> Result<Read<V>> {
        let mut conn = self.inner.conn.clone();
        let clock = &self.inner.server_clock;
        let sent = clock.local_us();
        let synced = clock
            .synced_at_us
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut pipe = redis::pipe();
        let resync = synced == u64::MAX || sent.saturating_sub(synced) > 1_000_000;
        if resync {
            pipe.cmd("TIME");
        }
        pipe.cmd("HMGET")
            .arg(self.data_key(key))
            .arg(&["v", "d", "e", "n", "ver"]);
        let entry: Fields = if resync {
            let ((secs, micros), entry): ((u64, u64), Fields) = pipe
                .query_async(&mut conn)
                .instrument(redis_span(&self.inner.counters.name, operation::READ))
                .await
                .map_err(backend("read"))?;
            clock.sync(sent, secs.saturating_mul(1_000_000).saturating_add(micros));
            entry
        } else {
            let (entry,): (Fields,) = pipe
                .query_async(&mut conn)
                .instrument(redis_span(&self.inner.counters.name, operation::READ))
                .await
                .map_err(backend("read"))?;
            entry
        };
        self.decode_read(key, entry, clock.server_ms(), false)
    }

    fn decode_read(&self, key: &str, fields: Fields, now: u64, locked: bool) -> Result<Read<V>> {
        let (value, delta, expiry, negative, version) = fields;
        let version = version.unwrap_or_else(|| "0".to_owned());
        let now = Duration::from_millis(now);
        let expiry = expiry.map(Duration::from_millis);
        let decoded = match (value, negative) {
            (_, Some(1)) | (None, _) => None,
            (Some(bytes), _) => Some(self.inner.settings.codec.decode(&bytes).map_err(
                |source| Error::Codec {
                    direction: "decode",
                    key: short_key(key),
                    source,
                },
            )?),
        };
        let is_entry = expiry.is_some();
        let fresh_now = expiry.is_some_and(|e| now < e);
        let (fresh, stale) = if fresh_now {
            (Some(decoded), None)
        } else if is_entry {
            (None, decoded)
        } else {
            (None, None)
        };
        Ok(Read {
            fresh,
            stale,
            delta: Duration::from_millis(delta.unwrap_or(0)),
            expiry: expiry.unwrap_or_default(),
            now,
            version,
            locked,
        })
    }

    /// Writes `value` (fresh for `ttl` if the loader chose it, else for the policy's),
    /// when the entry still has version `expected`, and releases the lock held with
    /// `token`. Returns the new version (-1: not written) and the lifetime written (`None`
    /// when nothing may be stored; the lock is then released).
    async fn write(
        &self,
        key: &str,
        value: Option<&V>,
        ttl: Option<Duration>,
        delta: Duration,
        expected: Option<&str>,
        token: &str,
    ) -> Result<(i64, Option<Duration>)> {
        let settings = &self.inner.settings;
        let Some(life) = settings
            .policy
            .lifetime(value.is_none(), ttl, settings.random.as_ref())
        else {
            if !token.is_empty() {
                self.unlock(key, token).await?;
            }
            return Ok((-1, None));
        };
        let bytes = match value {
            Some(v) => settings.codec.encode(v).map_err(|source| Error::Codec {
                direction: "encode",
                key: short_key(key),
                source,
            })?,
            None => Vec::new(),
        };
        let stale = if value.is_some() {
            settings.policy.stale_if_error
        } else {
            Duration::ZERO
        };
        let mut conn = self.inner.conn.clone();
        WRITE
            .call(2)
            .arg(self.data_key(key))
            .arg(self.lock_key(key))
            .arg(bytes)
            .arg(ms(delta))
            .arg(ms(life).max(1))
            .arg(ms(stale))
            .arg(if value.is_some() { "0" } else { "1" })
            .arg(expected.unwrap_or(""))
            .arg(token)
            .arg(&self.inner.channel)
            .arg(key)
            .invoke::<i64>(&mut conn)
            .instrument(redis_span(&self.inner.counters.name, operation::WRITE))
            .await
            .map(|version| (version, Some(life)))
            .map_err(backend("write"))
    }

    /// Releases the load lock if `token` still holds it, and wakes the waiters.
    async fn unlock(&self, key: &str, token: &str) -> Result<()> {
        let mut conn = self.inner.conn.clone();
        UNLOCK
            .call(1)
            .arg(self.lock_key(key))
            .arg(token)
            .arg(&self.inner.channel)
            .arg(key)
            .invoke::<i64>(&mut conn)
            .instrument(redis_span(&self.inner.counters.name, operation::UNLOCK))
            .await
            .map(|_| ())
            .map_err(backend("unlock"))
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn backend(operation: &'static str) -> impl FnOnce(redis::RedisError) -> Error {
    move |e| Error::Backend {
        backend: "redis",
        operation,
        source: Arc::new(e),
    }
}
