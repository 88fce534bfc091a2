//! One behaviour suite, three backends: the memory cache, the Redis tier and the two-tier
//! cache each run `sd_cache::conformance::contract` (round trip, one loader for concurrent
//! misses, a shared and uncached loader error, negative caching, a load that began before
//! an invalidation is not stored, a write is read back without loading), directly and
//! through a `BoxCache` chosen from a configuration string at run time.
#![cfg(all(feature = "redis", feature = "test-util"))]
#![allow(clippy::unwrap_used)]

use sd_cache::conformance::contract;
use sd_cache::{BoxCache, Cache, RedisCache, TwoTier};

mod common;
use common::{on_shared_redis, runtime};

async fn manager(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).unwrap();
    client.get_connection_manager().await.unwrap()
}

async fn redis_cache(url: &str, prefix: &str) -> RedisCache<u64, redis::aio::ConnectionManager> {
    let conn = manager(url).await;
    RedisCache::builder(prefix)
        .notifications(redis::Client::open(url).unwrap())
        .build(conn)
        .await
        .unwrap()
}

/// A two-tier cache that serves from memory (its first heartbeat came back).
async fn two_tier(url: &str, prefix: &str) -> TwoTier<u64, redis::aio::ConnectionManager> {
    let conn = manager(url).await;
    let cache = TwoTier::builder(RedisCache::builder(prefix))
        .build(conn, redis::Client::open(url).unwrap())
        .await
        .unwrap();
    common::eventually("serving from memory", || {
        std::future::ready(cache.is_serving_local())
    })
    .await;
    cache
}

/// The cache a service's configuration names: `memory`, a Redis URL (the Redis tier) or
/// `two-tier+` and a Redis URL.
async fn from_config(config: &str, prefix: &str) -> BoxCache<u64> {
    if config == "memory" {
        BoxCache::new(Cache::<String, u64>::builder().build().unwrap())
    } else if let Some(url) = config.strip_prefix("two-tier+") {
        BoxCache::new(two_tier(url, prefix).await)
    } else if config.starts_with("redis://") {
        BoxCache::new(redis_cache(config, prefix).await)
    } else {
        panic!("unknown cache configuration `{config}`")
    }
}

#[test]
fn memory_honours_the_contract() {
    runtime().block_on(contract(Cache::<String, u64>::builder().build().unwrap()));
}

#[test]
fn redis_honours_the_contract() {
    on_shared_redis("contract", |url, prefix| async move {
        contract(redis_cache(&url, &prefix).await).await;
    });
}

#[test]
fn two_tier_honours_the_contract() {
    on_shared_redis("contract", |url, prefix| async move {
        let cache = two_tier(url.as_str(), &prefix).await;
        contract(cache.clone()).await;
        assert!(cache.stats().hits > 0, "the memory tier took part");
    });
}

#[test]
fn a_boxed_cache_chosen_by_configuration_honours_the_contract() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let configs = [
        "memory".to_owned(),
        server.url().to_owned(),
        format!("two-tier+{}", server.url()),
    ];
    runtime().block_on(async {
        for config in &configs {
            let prefix = sd_testkit::unique_name("boxed");
            contract(from_config(config, &prefix).await).await;
        }
    });
}
