//! One behaviour suite, three backends: the memory cache, the Redis tier and the two-tier
//! cache each run the same contract assertions (round trip, one loader for concurrent
//! misses, a shared and uncached loader error, negative caching, a load that began before
//! an invalidation is not stored, a write is read back without loading).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_cache::{Cache, Error, RedisCache, TwoTier};
use tokio::sync::Notify;

mod common;
use common::runtime;

#[derive(Debug, thiserror::Error)]
#[error("database down")]
struct DbDown;

type Loaded = Result<Option<u64>, DbDown>;

/// What the suite needs from a backend.
trait Backend: Clone + Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Option<u64>> + Send;
    fn insert(&self, key: &str, value: u64) -> impl Future<Output = ()> + Send;
    fn invalidate(&self, key: &str) -> impl Future<Output = ()> + Send;
    /// `try_get_or_load_optional`.
    fn load<F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> impl Future<Output = Result<Option<u64>, Error>> + Send
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Loaded> + Send + 'static;
}

impl Backend for Cache<String, u64> {
    async fn get(&self, key: &str) -> Option<u64> {
        Cache::get(self, &key.to_owned())
    }
    async fn insert(&self, key: &str, value: u64) {
        Cache::insert(self, key.to_owned(), value);
    }
    async fn invalidate(&self, key: &str) {
        Cache::invalidate(self, &key.to_owned());
    }
    fn load<F, Fut>(
        &self,
        key: &str,
        loader: F,
    ) -> impl Future<Output = Result<Option<u64>, Error>> + Send
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Loaded> + Send + 'static,
    {
        let (this, key) = (self.clone(), key.to_owned());
        async move { this.try_get_or_load_optional(key, loader).await }
    }
}

/// The Redis and two-tier caches share one async, `&str`-keyed API.
macro_rules! redis_backend {
    ($ty:ty) => {
        impl Backend for $ty {
            async fn get(&self, key: &str) -> Option<u64> {
                <$ty>::get(self, key).await.unwrap()
            }
            async fn insert(&self, key: &str, value: u64) {
                <$ty>::insert(self, key, &value).await.unwrap();
            }
            async fn invalidate(&self, key: &str) {
                <$ty>::invalidate(self, key).await.unwrap();
            }
            fn load<F, Fut>(
                &self,
                key: &str,
                loader: F,
            ) -> impl Future<Output = Result<Option<u64>, Error>> + Send
            where
                F: FnOnce() -> Fut + Send + 'static,
                Fut: Future<Output = Loaded> + Send + 'static,
            {
                let (this, key) = (self.clone(), key.to_owned());
                async move { this.try_get_or_load_optional(&key, loader).await }
            }
        }
    };
}

redis_backend!(RedisCache<u64, ConnectionManager>);
redis_backend!(TwoTier<u64, ConnectionManager>);

/// A loader that counts its calls, waits `wait`, then returns `result`.
fn counted(
    calls: &Arc<AtomicUsize>,
    wait: Duration,
    result: fn() -> Loaded,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Loaded> + Send>> + Send + 'static {
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(wait).await;
            result()
        })
    }
}

async fn contract<B: Backend>(cache: B) {
    // Round trip.
    assert_eq!(cache.get("rt").await, None);
    cache.insert("rt", 1).await;
    assert_eq!(cache.get("rt").await, Some(1));
    cache.invalidate("rt").await;
    assert_eq!(cache.get("rt").await, None);

    // A write is read back without loading.
    cache.insert("w", 7).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let got = cache
        .load("w", counted(&calls, Duration::ZERO, || Ok(Some(0))))
        .await;
    assert_eq!(got.unwrap(), Some(7));
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // 200 concurrent misses run one loader.
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .load(
                        "hot",
                        counted(&calls, Duration::from_millis(50), || Ok(Some(3))),
                    )
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Some(3));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one loader");

    // A loader error is shared with the callers coalesced on it, and not cached.
    let calls = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .load(
                        "err",
                        counted(&calls, Duration::from_millis(50), || Err(DbDown)),
                    )
                    .await
            })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.loader_error().is_some(), "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the error is shared");
    let again = cache
        .load("err", counted(&calls, Duration::ZERO, || Ok(Some(4))))
        .await;
    assert_eq!(again.unwrap(), Some(4), "and not cached");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Negative caching: "not found" reaches the loader once.
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..4 {
        let got = cache
            .load("ghost", counted(&calls, Duration::ZERO, || Ok(None)))
            .await;
        assert_eq!(got.unwrap(), None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A load that began before an invalidation is not stored.
    let (gate, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let load = {
        let (cache, gate, started) = (cache.clone(), gate.clone(), started.clone());
        tokio::spawn(async move {
            cache
                .load("late", move || async move {
                    started.notify_one();
                    gate.notified().await;
                    Ok(Some(5))
                })
                .await
        })
    };
    started.notified().await;
    cache.invalidate("late").await;
    gate.notify_one();
    assert_eq!(
        load.await.unwrap().unwrap(),
        Some(5),
        "the caller gets what it loaded"
    );
    assert_eq!(cache.get("late").await, None, "but it was not stored");
}

#[test]
fn memory_honours_the_contract() {
    runtime().block_on(contract(Cache::<String, u64>::builder().build().unwrap()));
}

#[test]
fn redis_honours_the_contract() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("contract");
    runtime().block_on(async {
        let conn = redis::Client::open(server.url())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        let cache: RedisCache<u64, _> = RedisCache::builder(prefix.as_str())
            .notifications(redis::Client::open(server.url()).unwrap())
            .build(conn)
            .await
            .unwrap();
        contract(cache).await;
    });
}

#[test]
fn two_tier_honours_the_contract() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("contract");
    runtime().block_on(async {
        let conn = redis::Client::open(server.url())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        let cache: TwoTier<u64, _> = TwoTier::builder(RedisCache::builder(prefix.as_str()))
            .build(conn, redis::Client::open(server.url()).unwrap())
            .await
            .unwrap();
        for _ in 0..500 {
            if cache.is_serving_local() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(cache.is_serving_local());
        contract(cache.clone()).await;
        assert!(cache.stats().hits > 0, "the memory tier took part");
    });
}
