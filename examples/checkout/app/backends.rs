//! Each pattern on memory, or on Redis / PostgreSQL, chosen from the configuration at run
//! time: every crate has an object-safe boxed handle (`BoxLimiter`, `BoxCache`, `BoxLock`,
//! the idempotency and saga `BoxStore`s), so the app names one type per pattern whatever
//! the backend. Sharding over several Redis servers is a backend too: [`Shards`] is a
//! `Lock` and a `CacheBackend` that sends each key to the server sd-hashring gives it,
//! and is boxed like any other.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_cache::{BoxCache, Cache, CacheBackend, CacheStats, Loader, loader, redis::RedisCache};
use sd_hashring::{HashRing, Node};
use sd_idempotency::RunOnce;
use sd_lock::semaphore::{BoxSemaphore, memory::MemorySemaphore, redis::RedisSemaphore};
use sd_lock::{BoxLock, Lease, Lock, Release, RetryPolicy, memory::MemoryLock, redis::RedisLock};
use sd_ratelimit::{BoxLimiter, Limit, memory::MemoryLimiterBuilder, redis::RedisLimiterBuilder};
use sd_saga::{Orchestrator, Saga};
use sqlx::PgPool;
use tonic::Status;

use super::events::OrderData;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The idempotency keys of the order service, on whichever store was configured.
pub(crate) type Keys = RunOnce<sd_idempotency::BoxStore>;

/// The saga log of the order service, on whichever store was configured.
pub(crate) type Sagas = Orchestrator<OrderData, sd_saga::BoxStore>;

/// Keys sent to each Redis server (empty on memory). Cheap to clone: clones share the
/// counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Picks(Arc<[AtomicU64]>);

impl Picks {
    fn count(&self, index: usize) {
        if let Some(n) = self.0.get(index) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many keys went to each server.
    pub(crate) fn get(&self) -> Vec<u64> {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }
}

/// Calls to each Redis server in flight now, and calls that failed so far: what a fault
/// test reads while it holds a server frozen, to know the freeze met the load. Cheap to
/// clone: clones share the counters; sized by the first [`Shards`] built with it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardProbe(Arc<std::sync::OnceLock<Box<[ServerCalls]>>>);

/// Per server: calls in flight, calls failed.
type ServerCalls = (AtomicU64, AtomicU64);

/// One call in flight on a server, counted until dropped.
struct InFlight<'a>(Option<&'a AtomicU64>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ShardProbe {
    fn init(&self, servers: usize) {
        self.0
            .get_or_init(|| (0..servers).map(|_| Default::default()).collect());
    }

    fn slot(&self, server: usize) -> Option<&ServerCalls> {
        self.0.get().and_then(|s| s.get(server))
    }

    fn enter(&self, server: usize) -> InFlight<'_> {
        let n = self.slot(server).map(|(n, _)| n);
        if let Some(n) = n {
            n.fetch_add(1, Ordering::Relaxed);
        }
        InFlight(n)
    }

    fn failed(&self, server: usize) {
        if let Some((_, n)) = self.slot(server) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (calls in flight now, calls failed so far) on `server`.
    #[cfg_attr(not(test), allow(dead_code))] // read by examples/tests/checkout.rs
    pub(crate) fn read(&self, server: usize) -> (u64, u64) {
        self.slot(server).map_or((0, 0), |(a, b)| {
            (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed))
        })
    }
}

/// One value per Redis server, and the ring that maps a key to its server. Cheap to
/// clone: clones share the servers and the counters.
#[derive(Debug)]
pub(crate) struct Shards<T>(Arc<ShardsInner<T>>);

#[derive(Debug)]
struct ShardsInner<T> {
    ring: HashRing,
    nodes: Vec<T>,
    picks: Picks,
    probe: ShardProbe,
}

impl<T> Clone for Shards<T> {
    fn clone(&self) -> Self {
        Shards(Arc::clone(&self.0))
    }
}

impl<T> Shards<T> {
    /// `nodes` named `redis-0`, `redis-1`, ... on a consistent-hash ring; calls to them
    /// are counted in `probe`.
    pub(crate) fn new(nodes: Vec<T>, probe: &ShardProbe) -> Result<Self, BoxError> {
        if nodes.is_empty() {
            return Err("at least one Redis server is needed to shard".into());
        }
        let ring = HashRing::new((0..nodes.len()).map(|i| Node::new(format!("redis-{i}"))))?;
        let picks = Picks(nodes.iter().map(|_| AtomicU64::new(0)).collect());
        probe.init(nodes.len());
        let probe = probe.clone();
        Ok(Shards(Arc::new(ShardsInner {
            ring,
            nodes,
            picks,
            probe,
        })))
    }

    /// The counters of keys sent to each server.
    pub(crate) fn picks(&self) -> Picks {
        self.0.picks.clone()
    }

    /// The index of the server that owns `key`.
    fn index(&self, key: &str) -> usize {
        self.0
            .ring
            .node(key)
            .and_then(|n| {
                n.id()
                    .as_str()
                    .strip_prefix("redis-")?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|i| *i < self.0.nodes.len())
            .unwrap_or(0)
    }

    /// The server that owns `key`, without counting a pick.
    fn owner(&self, key: &str) -> &T {
        &self.0.nodes[self.index(key)]
    }

    /// The server that owns `key`, counting a pick.
    fn pick(&self, key: &str) -> &T {
        let index = self.index(key);
        self.0.picks.count(index);
        &self.0.nodes[index]
    }
}

/// Each resource's lease on the server that owns it; a lease taken counts a pick.
impl<T: Lock> Lock for Shards<T> {
    async fn try_acquire(&self, resource: &str, ttl: Duration) -> sd_lock::Result<Lease> {
        let index = self.index(resource);
        let call = self.0.probe.enter(index);
        let lease = self.0.nodes[index].try_acquire(resource, ttl).await;
        drop(call);
        if matches!(
            lease,
            Err(sd_lock::Error::Backend { .. } | sd_lock::Error::Timeout { .. })
        ) {
            self.0.probe.failed(index);
        }
        let lease = lease?;
        self.0.picks.count(index);
        Ok(lease)
    }

    fn extend<'a>(
        &'a self,
        lease: &'a mut Lease,
        ttl: Duration,
    ) -> impl Future<Output = sd_lock::Result<()>> + Send + 'a {
        let node = self.owner(lease.resource());
        node.extend(lease, ttl)
    }

    fn release(&self, lease: Lease) -> impl Future<Output = sd_lock::Result<Release>> + Send + '_ {
        let node = self.owner(lease.resource());
        node.release(lease)
    }

    fn retry_policy(&self) -> RetryPolicy {
        // Every shard is built alike; `new` refuses an empty list.
        self.0.nodes[0].retry_policy()
    }
}

/// Each key cached on the server that owns it; every call counts a pick.
impl<V, T> CacheBackend<V> for Shards<T>
where
    V: Send + Sync + 'static,
    T: CacheBackend<V>,
{
    fn get(&self, key: &str) -> impl Future<Output = sd_cache::Result<Option<V>>> + Send {
        self.pick(key).get(key)
    }

    fn insert(&self, key: &str, value: &V) -> impl Future<Output = sd_cache::Result<()>> + Send {
        self.pick(key).insert(key, value)
    }

    fn invalidate(&self, key: &str) -> impl Future<Output = sd_cache::Result<()>> + Send {
        self.pick(key).invalidate(key)
    }

    fn try_get_or_load_optional(
        &self,
        key: &str,
        loader: Loader<V>,
    ) -> impl Future<Output = sd_cache::Result<Option<V>>> + Send {
        let index = self.index(key);
        self.0.picks.count(index);
        let read = self.0.nodes[index].try_get_or_load_optional(key, loader);
        async move {
            let call = self.0.probe.enter(index);
            let value = read.await;
            drop(call);
            if value.is_err() {
                self.0.probe.failed(index);
            }
            value
        }
    }
}

/// The per-client limiter of the order service: on the first Redis server, or memory.
pub(crate) fn limiter(
    conns: &[ConnectionManager],
    limit: Limit,
    run: &str,
) -> Result<BoxLimiter, BoxError> {
    Ok(match conns.first() {
        Some(c) => BoxLimiter::new(
            RedisLimiterBuilder::new(limit)
                .prefix(format!("{run}:rl"))
                .build(c.clone())?,
        ),
        None => BoxLimiter::new(MemoryLimiterBuilder::new(limit).keyed::<String>()?),
    })
}

/// A product of the catalogue.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Product {
    pub(crate) sku: String,
    pub(crate) price_cents: u64,
}

/// The counters of the concrete cache behind a [`BoxCache`], which does not expose them:
/// the app keeps this reader beside the handle.
struct StatsReader(Box<dyn Fn() -> CacheStats + Send + Sync>);

impl fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StatsReader").field(&(self.0)()).finish()
    }
}

/// The catalogue behind sd-cache (XFetch refreshes hot products before they expire).
#[derive(Debug)]
pub(crate) struct Catalogue {
    cache: BoxCache<Product>,
    stats: StatsReader,
    picks: Picks,
    prices: Arc<BTreeMap<String, u64>>,
    /// Queries that reached the catalogue "database".
    pub(crate) queries: Arc<AtomicU64>,
}

impl Catalogue {
    /// The catalogue of `prices`, cached on memory, or sharded over the Redis servers
    /// `conns`; entries live `ttl`.
    pub(crate) async fn new(
        prices: BTreeMap<String, u64>,
        conns: &[ConnectionManager],
        run: &str,
        ttl: Duration,
        probe: &ShardProbe,
    ) -> Result<Self, BoxError> {
        let (cache, stats, picks) = if conns.is_empty() {
            let cache: Cache<String, Product> = Cache::builder().ttl(ttl).build()?;
            let reader = cache.clone();
            let stats = StatsReader(Box::new(move || reader.stats()));
            (BoxCache::new(cache), stats, Picks::default())
        } else {
            let mut caches = Vec::new();
            for c in conns {
                let cache = RedisCache::<Product>::builder(format!("{run}:catalogue"))
                    .ttl(ttl)
                    .build(c.clone())
                    .await?;
                caches.push(cache);
            }
            let readers = caches.clone();
            let stats = StatsReader(Box::new(move || sum_stats(&readers)));
            let shards = Shards::new(caches, probe)?;
            let picks = shards.picks();
            (BoxCache::new(shards), stats, picks)
        };
        Ok(Catalogue {
            cache,
            stats,
            picks,
            prices: Arc::new(prices),
            queries: Arc::default(),
        })
    }

    /// The product, through the cache; `None` for an unknown SKU (cached briefly too).
    pub(crate) async fn get(&self, sku: &str) -> Result<Option<Product>, Status> {
        let (prices, queries, sku_owned) =
            (self.prices.clone(), self.queries.clone(), sku.to_owned());
        // The "database": a 5 ms query.
        let load = loader(move || async move {
            queries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, Infallible>(prices.get(&sku_owned).map(|p| Product {
                sku: sku_owned.clone(),
                price_cents: *p,
            }))
        });
        self.cache
            .try_get_or_load_optional(sku, load)
            .await
            .map_err(|e| Status::unavailable(format!("catalogue: {e}")))
    }

    /// Hits, misses, loads and early refreshes, summed over the shards.
    pub(crate) fn stats(&self) -> CacheStats {
        (self.stats.0)()
    }

    /// Keys per Redis server (empty on memory).
    pub(crate) fn picks(&self) -> Vec<u64> {
        self.picks.get()
    }
}

/// The counters of several Redis caches, summed.
fn sum_stats(caches: &[RedisCache<Product, ConnectionManager>]) -> CacheStats {
    caches
        .iter()
        .map(RedisCache::stats)
        .fold(CacheStats::default(), |mut sum, s| {
            sum.hits += s.hits;
            sum.misses += s.misses;
            sum.loads += s.loads;
            sum.early_refreshes += s.early_refreshes;
            sum
        })
}

/// Leases on stock, one per SKU: sharded over the Redis servers `conns`, or memory; with
/// the leases taken on each server.
pub(crate) fn locks(
    conns: &[ConnectionManager],
    run: &str,
    probe: &ShardProbe,
) -> Result<(BoxLock, Picks), BoxError> {
    if conns.is_empty() {
        return Ok((BoxLock::new(MemoryLock::new()), Picks::default()));
    }
    let prefix = format!("{run}-lock");
    let locks = conns
        .iter()
        .map(|c| RedisLock::builder(c.clone()).prefix(&prefix).build())
        .collect::<Result<Vec<_>, _>>()?;
    let shards = Shards::new(locks, probe)?;
    let picks = shards.picks();
    Ok((BoxLock::new(shards), picks))
}

/// The permits of the payment provider's cap: `permits` of them, on the first Redis
/// server (shared by every replica), else memory.
pub(crate) fn provider_permits(
    conns: &[ConnectionManager],
    run: &str,
    permits: u32,
) -> Result<BoxSemaphore, BoxError> {
    Ok(match conns.first() {
        Some(c) => BoxSemaphore::new(
            RedisSemaphore::builder(c.clone())
                .permits(permits)
                .prefix(format!("{run}-psp"))
                .build()?,
        ),
        None => BoxSemaphore::new(MemorySemaphore::builder().permits(permits).build()?),
    })
}

/// The idempotency keys: on the first Redis server, else PostgreSQL, else memory.
pub(crate) async fn keys(
    conns: &[ConnectionManager],
    pg: Option<&PgPool>,
    run: &str,
    lock_ttl: Duration,
) -> Result<Keys, BoxError> {
    let store = if let Some(c) = conns.first() {
        sd_idempotency::BoxStore::new(
            sd_idempotency::redis::RedisStore::builder()
                .prefix(format!("{run}:idem"))
                .build(c.clone())?,
        )
    } else if let Some(pool) = pg {
        let store = sd_idempotency::postgres::PostgresStore::builder()
            .table("checkout_idempotency")
            .build(pool.clone())?;
        store.migrate().await?;
        sd_idempotency::BoxStore::new(store)
    } else {
        sd_idempotency::BoxStore::new(sd_idempotency::MemoryStore::new())
    };
    Ok(RunOnce::builder(store).lock_ttl(lock_ttl).build()?)
}

/// The saga log, on PostgreSQL or memory, running `saga` as `owner`.
pub(crate) async fn sagas(
    pg: Option<&PgPool>,
    saga: Saga<OrderData>,
    owner: String,
) -> Result<Sagas, BoxError> {
    let store = match pg {
        Some(pool) => {
            let store = sd_saga::postgres::PostgresStore::builder()
                .table("checkout_sagas")
                .build(pool.clone())?;
            store.migrate().await?;
            sd_saga::BoxStore::new(store)
        }
        None => sd_saga::BoxStore::new(sd_saga::MemoryStore::new()),
    };
    Ok(Orchestrator::builder(saga, store).owner(owner).build()?)
}
