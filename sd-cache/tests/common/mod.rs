//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::ConnectionManager;
pub(crate) use sd_testkit::{eventually, runtime};

/// Runs `test(url, prefix)` on a runtime: `url` is the Redis the tests share, `prefix` a
/// fresh key prefix named after `stem`, so tests sharing the server do not see each other.
pub(crate) fn on_shared_redis<F, Fut>(stem: &str, test: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name(stem);
    runtime().block_on(test(server.url().to_owned(), prefix));
}

/// A connection that gives up after `timeout` (a hang guard, and how a frozen server
/// turns into a typed error) and retries a lost connection once.
pub(crate) async fn manager_with_timeout(url: &str, timeout: Duration) -> ConnectionManager {
    sd_testkit::redis_manager(url, timeout, timeout).await
}

/// A store that records what it was given, by key; it never fails.
#[derive(Default)]
pub(crate) struct Rows<V>(Mutex<HashMap<String, V>>);

impl<V: Clone + Send + Sync + 'static> sd_cache::Store<String, V> for Rows<V> {
    type Error = Infallible;

    async fn write(&self, key: &String, op: &sd_cache::WriteOp<V>) -> Result<(), Infallible> {
        let mut rows = self.0.lock().unwrap();
        match op {
            sd_cache::WriteOp::Put(v) => rows.insert(key.clone(), v.clone()),
            sd_cache::WriteOp::Delete => rows.remove(key),
        };
        Ok(())
    }
}

/// Builds `builder` over a connection manager to `url` (5 s timeouts) and waits until
/// the instance serves from its memory tier.
pub(crate) async fn serving(
    url: &str,
    builder: sd_cache::TwoTierBuilder<u64, sd_cache::JsonCodec>,
) -> sd_cache::TwoTier<u64, ConnectionManager> {
    let cache = builder
        .build(
            manager_with_timeout(url, Duration::from_secs(5)).await,
            redis::Client::open(url).unwrap(),
        )
        .await
        .unwrap();
    let c = cache.clone();
    eventually("serving from memory", move || {
        std::future::ready(c.is_serving_local())
    })
    .await;
    cache
}
