//! Each pattern on memory, or on Redis / PostgreSQL: one enum per pattern, because the
//! crates' traits use static dispatch and the backend is picked at run time.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_cache::{Cache, CacheStats, redis::RedisCache};
use sd_hashring::{HashRing, Node};
use sd_idempotency::{Fingerprint, MemoryStore, Outcome, RunError, RunOnce};
use sd_lock::{Lease, Lock, memory::MemoryLock, redis::RedisLock};
use sd_ratelimit::{Decision, RateLimiter, memory::KeyedLimiter, redis::RedisLimiter};
use tonic::Status;

use super::grpc::OrderReply;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One value per Redis server, and the ring that maps a key to its server.
#[derive(Debug)]
pub(crate) struct Shards<T> {
    ring: HashRing,
    nodes: Vec<T>,
    /// Keys sent to each server.
    picks: Vec<AtomicU64>,
}

impl<T> Shards<T> {
    /// `nodes` named `redis-0`, `redis-1`, ... on a consistent-hash ring.
    pub(crate) fn new(nodes: Vec<T>) -> Result<Self, BoxError> {
        if nodes.is_empty() {
            return Err("at least one Redis server is needed to shard".into());
        }
        let ring = HashRing::new((0..nodes.len()).map(|i| Node::new(format!("redis-{i}"))))?;
        let picks = nodes.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Shards { ring, nodes, picks })
    }

    /// The server that owns `key`.
    pub(crate) fn pick(&self, key: &str) -> &T {
        let index = self.index(key);
        if let Some(n) = self.picks.get(index) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        &self.nodes[index]
    }

    /// How many keys went to each server.
    pub(crate) fn picks(&self) -> Vec<u64> {
        self.picks
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

/// The per-client limiter of the order service.
#[derive(Debug)]
pub(crate) enum Limiter {
    Memory(KeyedLimiter<String>),
    Redis(RedisLimiter<ConnectionManager>),
}

impl RateLimiter for Limiter {
    async fn check_key<'a>(&'a self, key: &'a str, cost: u32) -> sd_ratelimit::Result<Decision> {
        match self {
            Limiter::Memory(l) => l.check_n(key, cost),
            Limiter::Redis(l) => l.check_n(key, cost).await,
        }
    }
}

/// A product of the catalogue.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Product {
    pub(crate) sku: String,
    pub(crate) price_cents: u64,
}

/// The catalogue behind sd-cache (XFetch refreshes hot products before they expire).
#[derive(Debug)]
pub(crate) struct Catalogue {
    cache: CatalogueCache,
    prices: Arc<BTreeMap<String, u64>>,
    /// Queries that reached the catalogue "database".
    pub(crate) queries: Arc<AtomicU64>,
}

#[derive(Debug)]
enum CatalogueCache {
    Memory(Cache<String, Product>),
    Redis(Shards<RedisCache<Product, ConnectionManager>>),
}

impl Catalogue {
    pub(crate) fn new(
        prices: BTreeMap<String, u64>,
        redis: Option<Shards<RedisCache<Product, ConnectionManager>>>,
        ttl: Duration,
    ) -> Result<Self, BoxError> {
        let cache = match redis {
            Some(shards) => CatalogueCache::Redis(shards),
            None => CatalogueCache::Memory(Cache::builder().ttl(ttl).build()?),
        };
        Ok(Catalogue {
            cache,
            prices: Arc::new(prices),
            queries: Arc::default(),
        })
    }

    /// The product, through the cache; `None` for an unknown SKU (cached briefly too).
    pub(crate) async fn get(&self, sku: &str) -> Result<Option<Product>, Status> {
        let (prices, queries, sku_owned) =
            (self.prices.clone(), self.queries.clone(), sku.to_owned());
        // The "database": a 5 ms query.
        let load = move || async move {
            queries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, Infallible>(prices.get(&sku_owned).map(|p| Product {
                sku: sku_owned.clone(),
                price_cents: *p,
            }))
        };
        let found = match &self.cache {
            CatalogueCache::Memory(c) => c.try_get_or_load_optional(sku.to_owned(), load).await,
            CatalogueCache::Redis(s) => s.pick(sku).try_get_or_load_optional(sku, load).await,
        };
        found.map_err(|e| Status::unavailable(format!("catalogue: {e}")))
    }

    /// Hits, misses, loads and early refreshes, summed over the shards.
    pub(crate) fn stats(&self) -> CacheStats {
        match &self.cache {
            CatalogueCache::Memory(c) => c.stats(),
            CatalogueCache::Redis(s) => {
                s.nodes
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
        }
    }

    /// Keys per Redis server (empty on memory).
    pub(crate) fn picks(&self) -> Vec<u64> {
        match &self.cache {
            CatalogueCache::Memory(_) => Vec::new(),
            CatalogueCache::Redis(s) => s.picks(),
        }
    }
}

/// Leases on stock, one per SKU.
#[derive(Debug)]
pub(crate) enum Locks {
    Memory(MemoryLock),
    Redis(Shards<RedisLock<ConnectionManager>>),
}

/// How long a stock lease lasts, and how long a caller waits for one.
const LEASE_TTL: Duration = Duration::from_secs(1);
const LEASE_WAIT: Duration = Duration::from_secs(20);

impl Locks {
    pub(crate) async fn acquire(&self, resource: &str) -> sd_lock::Result<Lease> {
        match self {
            Locks::Memory(l) => l.acquire(resource, LEASE_TTL, LEASE_WAIT).await,
            Locks::Redis(s) => {
                s.pick(resource)
                    .acquire(resource, LEASE_TTL, LEASE_WAIT)
                    .await
            }
        }
    }

    /// Releases `lease`; an expired one is left to its expiry (the fence keeps it safe).
    pub(crate) async fn release(&self, lease: Lease) {
        let _ = match self {
            Locks::Memory(l) => l.release(lease).await,
            Locks::Redis(s) => {
                let node = &s.nodes[s.index(lease.resource())];
                node.release(lease).await
            }
        };
    }

    /// Keys per Redis server (empty on memory).
    pub(crate) fn picks(&self) -> Vec<u64> {
        match self {
            Locks::Memory(_) => Vec::new(),
            Locks::Redis(s) => s.picks(),
        }
    }
}

impl<T> Shards<T> {
    /// The index of the server that owns `key`, without counting a pick.
    fn index(&self, key: &str) -> usize {
        self.ring
            .node(key)
            .and_then(|n| {
                n.id()
                    .as_str()
                    .strip_prefix("redis-")?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|i| *i < self.nodes.len())
            .unwrap_or(0)
    }
}

/// The idempotency store of the order service.
#[derive(Debug)]
pub(crate) enum Keys {
    Memory(RunOnce<MemoryStore>),
    Redis(RunOnce<sd_idempotency::redis::RedisStore<ConnectionManager>>),
    Postgres(RunOnce<sd_idempotency::postgres::PostgresStore>),
}

impl Keys {
    /// Runs `work` once per `(scope, key)`; see [`RunOnce::run`].
    pub(crate) async fn run<F>(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        work: F,
    ) -> Result<Outcome<OrderReply>, RunError<Status>>
    where
        F: Future<Output = Result<OrderReply, Status>>,
    {
        match self {
            Keys::Memory(r) => r.run(scope, key, fingerprint, work).await,
            Keys::Redis(r) => r.run(scope, key, fingerprint, work).await,
            Keys::Postgres(r) => r.run(scope, key, fingerprint, work).await,
        }
    }
}
