//! The two-tier instances the two-tier test files share.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_cache::{RedisCache, TwoTier};

use crate::common::{eventually, manager_with_timeout, on_shared_redis};

pub(crate) mod oracle;

/// A two-tier cache of `u64` over a connection manager.
pub(crate) type Tier = TwoTier<u64, ConnectionManager>;

/// An independent instance ("process"): its own command connection, subscription and lease.
pub(crate) async fn instance(url: &str, prefix: &str, fallback: bool) -> Tier {
    TwoTier::builder(
        RedisCache::builder(prefix)
            .ttl(Duration::from_secs(30))
            .fallback_to_loader(fallback),
    )
    .local_ttl(Duration::from_secs(10))
    .lease(Duration::from_millis(600))
    .build(
        manager_with_timeout(url, Duration::from_secs(2)).await,
        redis::Client::open(url).unwrap(),
    )
    .await
    .unwrap()
}

/// `n` instances sharing `prefix`; instance `i` reads around a dead server with the
/// loader when `fallback(i)`.
pub(crate) async fn instances(
    url: &str,
    prefix: &str,
    n: usize,
    fallback: impl Fn(usize) -> bool,
) -> Vec<Tier> {
    let mut instances = Vec::with_capacity(n);
    for i in 0..n {
        instances.push(instance(url, prefix, fallback(i)).await);
    }
    instances
}

/// The shared Redis's URL, a fresh prefix in it, and instances on that prefix that do not
/// fall back to the loader.
pub(crate) struct Fleet {
    pub(crate) url: String,
    pub(crate) prefix: String,
    pub(crate) tiers: Vec<Tier>,
}

/// Runs `test` on a [`Fleet`] of `n` instances on the shared Redis.
pub(crate) fn on_fleet<F, Fut>(n: usize, test: F)
where
    F: FnOnce(Fleet) -> Fut,
    Fut: Future<Output = ()>,
{
    on_shared_redis("two-tier", |url, prefix| async move {
        let tiers = instances(&url, &prefix, n, |_| false).await;
        test(Fleet { url, prefix, tiers }).await;
    });
}

/// Waits until every instance serves from memory (`true`) or none does (`false`).
pub(crate) async fn until_serving<C>(instances: &[TwoTier<u64, C>], serving: bool)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    for i in instances {
        let i = i.clone();
        eventually(
            if serving {
                "serving from memory"
            } else {
                "not serving from memory"
            },
            move || std::future::ready(i.is_serving_local() == serving),
        )
        .await;
    }
}
