//! The conformance checks on every backend: memory, Redis (plain, batched, with a deny
//! cache), and a `BoxLimiter` chosen from a configuration string at run time.
#![cfg(all(feature = "test-util", feature = "redis"))]
#![allow(clippy::unwrap_used)] // Tests may unwrap (helpers outside #[test] included).

use sd_ratelimit::memory::MemoryLimiterBuilder;
use sd_ratelimit::redis::{FailurePolicy, RedisLimiterBuilder};
use sd_ratelimit::{BoxLimiter, Limit, conformance};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a service does with its `rate_limiter` setting: `memory`, or a Redis URL.
async fn limiter_from_config(config: &str, limit: Limit) -> Result<BoxLimiter, BoxError> {
    if config == "memory" {
        return Ok(BoxLimiter::new(
            MemoryLimiterBuilder::new(limit).keyed::<String>()?,
        ));
    }
    if config.starts_with("redis://") {
        let conn = redis::Client::open(config)?
            .get_connection_manager()
            .await?;
        let limiter = RedisLimiterBuilder::new(limit)
            .prefix(sd_testkit::unique_name("conformance"))
            // A test must see Redis fail, not a limiter that admits everything.
            .on_failure(FailurePolicy::Closed)
            .build(conn)?;
        return Ok(BoxLimiter::new(limiter));
    }
    Err(format!("unknown rate limiter `{config}`: use `memory` or a redis:// URL").into())
}

#[tokio::test]
async fn the_memory_limiter_conforms() {
    let limiter = MemoryLimiterBuilder::new(conformance::limit().unwrap())
        .keyed::<String>()
        .unwrap();
    conformance::run(&limiter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_limiter_conforms_plain_batched_and_with_a_deny_cache() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let builder = || {
        RedisLimiterBuilder::new(conformance::limit().unwrap())
            .prefix(sd_testkit::unique_name("conformance"))
            .on_failure(FailurePolicy::Closed)
    };
    conformance::run(&builder().build(conn.clone()).unwrap()).await;
    conformance::run(&builder().batch(8).build(conn.clone()).unwrap()).await;
    conformance::run(&builder().deny_cache(64).build(conn).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boxed_limiter_chosen_from_configuration_conforms() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    for config in ["memory", server.url()] {
        let limiter = limiter_from_config(config, conformance::limit().unwrap())
            .await
            .unwrap();
        conformance::run(&limiter).await;
        // Clones share one limiter.
        conformance::run(&limiter.clone()).await;
    }
    let unknown = limiter_from_config("memcached://127.0.0.1", conformance::limit().unwrap());
    assert!(unknown.await.is_err());
}
