//! The contract every [`CacheBackend`] honours, as a test any backend can run (feature
//! `test-util`). The memory, Redis and two-tier caches run it in this crate's tests; a
//! new backend, or a [`BoxCache`](crate::BoxCache) built from configuration, runs the
//! same.
//!
//! [`contract`] checks, on a fresh cache (no key it uses may exist): a round trip, a
//! write read back without loading, 200 concurrent misses running one loader, a loader
//! error shared with the callers coalesced on it and not cached, "not found" reaching
//! the loader once, and a load that began before an invalidation not being stored. It
//! panics on the first broken promise. It spawns tasks, so it needs a multi-thread tokio
//! runtime, and it waits on real time (loads of 50 ms).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = sd_cache::Cache::<String, u64>::builder().build()?;
//! sd_cache::conformance::contract(cache).await;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::{CacheBackend, loader};
use crate::{Error, Result};

/// The loader error the contract uses.
#[derive(Debug, thiserror::Error)]
#[error("database down")]
struct DbDown;

type Loaded = std::result::Result<Option<u64>, DbDown>;

/// A loader that counts its calls, waits `wait`, then returns `result`.
fn counted(
    calls: &Arc<AtomicUsize>,
    wait: Duration,
    result: fn() -> Loaded,
) -> impl FnOnce() -> Pin<Box<dyn Future<Output = Loaded> + Send>> + Send + 'static {
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(wait).await;
            result()
        })
    }
}

async fn load<B, F, Fut>(cache: &B, key: &str, load: F) -> Result<Option<u64>>
where
    B: CacheBackend<u64>,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Loaded> + Send + 'static,
{
    cache.try_get_or_load_optional(key, loader(load)).await
}

async fn get<B: CacheBackend<u64>>(cache: &B, key: &str) -> Option<u64> {
    match cache.get(key).await {
        Ok(value) => value,
        Err(e) => panic!("get({key}) failed: {e}"),
    }
}

fn done<T>(what: &str, result: Result<T>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

/// `n` concurrent loads of `key`, each through a loader counted in `calls` that takes
/// 50 ms and answers `result`; what each load returned.
async fn concurrent_loads<B: CacheBackend<u64>>(
    cache: &B,
    key: &'static str,
    n: usize,
    calls: &Arc<AtomicUsize>,
    result: fn() -> Loaded,
) -> Vec<Result<Option<u64>>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                let wait = Duration::from_millis(50);
                load(&cache, key, counted(&calls, wait, result)).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(joined(t.await));
    }
    results
}

fn joined<T>(joined: std::result::Result<T, tokio::task::JoinError>) -> T {
    match joined {
        Ok(value) => value,
        Err(e) => panic!("a task of the contract failed: {e}"),
    }
}

/// Runs the contract against `cache`; panics on the first broken promise (see the
/// [module docs](self)).
pub async fn contract<B: CacheBackend<u64>>(cache: B) {
    // Round trip.
    assert_eq!(get(&cache, "rt").await, None);
    done("insert", cache.insert("rt", &1).await);
    assert_eq!(get(&cache, "rt").await, Some(1));
    done("invalidate", cache.invalidate("rt").await);
    assert_eq!(get(&cache, "rt").await, None);

    // A write is read back without loading.
    done("insert", cache.insert("w", &7).await);
    let calls = Arc::new(AtomicUsize::new(0));
    let got = load(&cache, "w", counted(&calls, Duration::ZERO, || Ok(Some(0)))).await;
    assert_eq!(done("load", got), Some(7));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a written value is not loaded"
    );

    // 200 concurrent misses run one loader.
    let calls = Arc::new(AtomicUsize::new(0));
    for result in concurrent_loads(&cache, "hot", 200, &calls, || Ok(Some(3))).await {
        assert_eq!(done("load", result), Some(3));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one loader");

    // A loader error is shared with the callers coalesced on it, and not cached.
    let calls = Arc::new(AtomicUsize::new(0));
    for result in concurrent_loads(&cache, "err", 50, &calls, || Err(DbDown)).await {
        match result {
            Err(err @ Error::Loader { .. }) => assert!(err.loader_error().is_some()),
            other => panic!("expected the shared loader error, got {other:?}"),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the error is shared");
    let again = load(
        &cache,
        "err",
        counted(&calls, Duration::ZERO, || Ok(Some(4))),
    )
    .await;
    assert_eq!(done("load", again), Some(4), "and not cached");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Negative caching: "not found" reaches the loader once.
    let calls = Arc::new(AtomicUsize::new(0));
    for _ in 0..4 {
        let got = load(
            &cache,
            "ghost",
            counted(&calls, Duration::ZERO, || Ok(None)),
        )
        .await;
        assert_eq!(done("load", got), None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not found is cached");

    // A load that began before an invalidation is not stored.
    let (gate, started) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let late = {
        let (cache, gate, started) = (cache.clone(), gate.clone(), started.clone());
        tokio::spawn(async move {
            load(&cache, "late", move || async move {
                started.notify_one();
                gate.notified().await;
                Ok(Some(5))
            })
            .await
        })
    };
    started.notified().await;
    done("invalidate", cache.invalidate("late").await);
    gate.notify_one();
    assert_eq!(
        done("load", joined(late.await)),
        Some(5),
        "the caller gets what it loaded"
    );
    assert_eq!(get(&cache, "late").await, None, "but it was not stored");
}
