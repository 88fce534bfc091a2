//! Batched loads (`BatchLoader`, `get_or_load_many`) on every backend: concurrent
//! resolvers share one batch call per window, hits never reach the batch function, and no
//! key is loaded twice (counted from the raw keys each batch call received, not a set).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_cache::{BatchLoader, Cache, Error, RedisCache, TwoTier};
use tokio::sync::Notify;

mod common;
use common::{manager_with_timeout, on_shared_redis, serving};

/// Every key each batch call received, in order, one `Vec` a call.
type Calls<K> = Arc<Mutex<Vec<Vec<K>>>>;

type Answer<K> = Pin<Box<dyn Future<Output = Result<HashMap<K, u64>, Error>> + Send>>;

/// A batch function over `calls` that finds `value(k)` for every key but multiples of 7.
fn source<K>(
    calls: &Calls<K>,
    value: fn(&K) -> Option<u64>,
) -> impl Fn(Vec<K>) -> Answer<K> + Send + Sync + 'static
where
    K: std::hash::Hash + Eq + Clone + Send + 'static,
{
    slow_source(calls, value, Duration::ZERO)
}

/// [`source`] taking `delay` to answer.
fn slow_source<K>(
    calls: &Calls<K>,
    value: fn(&K) -> Option<u64>,
    delay: Duration,
) -> impl Fn(Vec<K>) -> Answer<K> + Send + Sync + 'static
where
    K: std::hash::Hash + Eq + Clone + Send + 'static,
{
    let calls = Arc::clone(calls);
    move |keys: Vec<K>| {
        calls.lock().unwrap().push(keys.clone());
        let found = keys
            .into_iter()
            .filter_map(|k| value(&k).map(|v| (k, v)))
            .collect();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(found)
        })
    }
}

fn tenfold(k: &u64) -> Option<u64> {
    (!k.is_multiple_of(7)).then_some(k * 10)
}

#[allow(clippy::ptr_arg)] // A `fn(&K)` for `K = String`.
fn tenfold_named(k: &String) -> Option<u64> {
    k.strip_prefix('k')
        .and_then(|n| n.parse::<u64>().ok())
        .and_then(|n| tenfold(&n))
}

/// How many times each key was passed to the batch function, over every call.
fn loads_per_key<K: std::hash::Hash + Eq + Clone>(calls: &Calls<K>) -> HashMap<K, usize> {
    let mut per_key = HashMap::new();
    for key in calls.lock().unwrap().iter().flatten() {
        *per_key.entry(key.clone()).or_insert(0) += 1;
    }
    per_key
}

/// Resolver `i` of a wave over `keys` keys from `base`: a single `load` or a
/// `load_many` of four overlapping keys.
fn asks(i: u64, base: u64, keys: u64) -> Vec<u64> {
    if i.is_multiple_of(2) {
        vec![base + i % keys]
    } else {
        [i * 7, i * 13, i, i + 1]
            .iter()
            .map(|k| base + k % keys)
            .collect()
    }
}

/// 1,000 concurrent resolvers in one window make one batch call, a second wave of the same
/// keys none (all hits), and two groups a window apart two calls; no key is loaded twice.
#[tokio::test(start_paused = true)]
async fn memory_thousand_resolvers_one_batch_call_per_window() {
    let cache: Cache<u64, u64> = Cache::builder().build().unwrap();
    let calls: Calls<u64> = Arc::default();
    // Each batch call takes 30 ms: keys asked meanwhile join it.
    let loader = BatchLoader::builder(
        cache.clone(),
        slow_source(&calls, tenfold, Duration::from_millis(30)),
    )
    .window(Duration::from_millis(10))
    .build()
    .unwrap();
    let spawn_wave = |base: u64, keys: u64| {
        (0..1_000u64)
            .map(|i| {
                let loader = loader.clone();
                tokio::spawn(async move {
                    let want = asks(i, base, keys);
                    if want.len() == 1 {
                        assert_eq!(loader.load(want[0]).await.unwrap(), tenfold(&want[0]));
                    } else {
                        let got = loader.load_many(want.clone()).await.unwrap();
                        for k in want {
                            assert_eq!(got.get(&k).copied(), tenfold(&k), "key {k}");
                        }
                    }
                })
            })
            .collect::<Vec<_>>()
    };
    for t in spawn_wave(0, 300) {
        t.await.unwrap();
    }
    assert_eq!(calls.lock().unwrap().len(), 1, "one window, one batch call");
    let per_key = loads_per_key(&calls);
    assert_eq!(per_key.len(), 300, "every key asked was loaded");
    assert!(
        per_key.values().all(|n| *n == 1),
        "no key loaded twice: {per_key:?}"
    );
    assert_eq!(loader.batches(), 1);

    // The same keys again: hits (the not-found ones cached too), no batch call.
    for t in spawn_wave(0, 300) {
        t.await.unwrap();
    }
    assert_eq!(calls.lock().unwrap().len(), 1);

    // Two groups more than a window apart, the second asked while the first's batch is
    // loading (10 to 40 ms): its keys in that batch join it, the rest make a second call.
    let first = spawn_wave(300, 200);
    tokio::time::sleep(Duration::from_millis(25)).await;
    let second = spawn_wave(400, 200);
    for t in first.into_iter().chain(second) {
        t.await.unwrap();
    }
    let sizes: Vec<usize> = calls.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(
        sizes,
        [300, 200, 100],
        "300 keys, then 200, then the 100 not yet cached"
    );
    assert!(loads_per_key(&calls).values().all(|n| *n == 1));
}

/// A key another caller is loading is joined, not batched; a key in a batch is joined by
/// a plain `get_or_load`; an error or a panic of the batch function reaches every key of
/// the call and is not cached.
#[tokio::test(start_paused = true)]
async fn memory_joins_loads_in_flight_and_shares_failures() {
    let cache: Cache<u64, u64> = Cache::builder().build().unwrap();
    let gate = Arc::new(Notify::new());
    let gated = {
        let (cache, gate) = (cache.clone(), gate.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(1, move || async move {
                    gate.notified().await;
                    111
                })
                .await
        })
    };
    tokio::task::yield_now().await;
    let calls: Calls<u64> = Arc::default();
    let many = {
        let (cache, calls) = (cache.clone(), calls.clone());
        tokio::spawn(async move {
            cache
                .get_or_load_many([1, 2, 2, 3], source(&calls, tenfold))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        *calls.lock().unwrap(),
        [vec![2, 3]],
        "key 1 is joined, 2 asked once"
    );
    gate.notify_one();
    assert_eq!(gated.await.unwrap().unwrap(), 111);
    let found = many.await.unwrap().unwrap();
    assert_eq!(found, HashMap::from([(1, 111), (2, 20), (3, 30)]));

    // A plain get_or_load of a key waiting in a batch joins it.
    let loader = BatchLoader::builder(cache.clone(), source(&calls, tenfold))
        .window(Duration::from_millis(10))
        .build()
        .unwrap();
    let batched = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load(5).await }
    });
    tokio::task::yield_now().await;
    let own = Arc::new(AtomicUsize::new(0));
    let o = own.clone();
    let plain = cache.get_or_load(5, move || async move {
        o.fetch_add(1, Ordering::SeqCst);
        0
    });
    assert_eq!(plain.await.unwrap(), 50);
    assert_eq!(batched.await.unwrap().unwrap(), Some(50));
    assert_eq!(own.load(Ordering::SeqCst), 0);

    // Errors and panics: every key of the call fails, nothing is cached.
    let failing = |keys: Vec<u64>| async move {
        assert!(!keys.is_empty());
        Err::<HashMap<u64, u64>, _>("db down")
    };
    let err = cache.get_or_load_many([71, 72], failing).await.unwrap_err();
    assert_eq!(err.loader_error().unwrap().to_string(), "db down");
    let panicking = |keys: Vec<u64>| async move {
        assert!(keys.is_empty(), "batch bug");
        Ok::<HashMap<u64, u64>, Error>(HashMap::new())
    };
    let err = cache.get_or_load_many([71], panicking).await.unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    let again = cache
        .get_or_load_many([71, 72], source(&calls, tenfold))
        .await;
    assert_eq!(again.unwrap(), HashMap::from([(71, 710), (72, 720)]));

    let bad = BatchLoader::builder(cache, source(&calls, tenfold))
        .max_batch(0)
        .build();
    assert!(matches!(
        bad,
        Err(Error::InvalidConfig {
            field: "max_batch",
            ..
        })
    ));
}

fn names(keys: &[u64]) -> Vec<String> {
    keys.iter().map(|k| format!("k{k}")).collect()
}

/// 1,000 resolvers over two Redis clients ("processes") sharing a prefix: each key is
/// loaded once across both (the per-key load lock), in at most one batch call per client.
#[test]
fn redis_thousand_resolvers_across_two_processes_load_each_key_once() {
    on_shared_redis("batch", |url, prefix| async move {
        let calls: Calls<String> = Arc::default();
        let mut loaders = Vec::new();
        for _ in 0..2 {
            let cache: RedisCache<u64, _> = RedisCache::builder(prefix.as_str())
                .ttl(Duration::from_secs(30))
                .notifications(redis::Client::open(url.as_str()).unwrap())
                .build(manager_with_timeout(&url, Duration::from_secs(5)).await)
                .await
                .unwrap();
            // Real time: a window wide enough for 1,000 reads on two busy cores.
            loaders.push(
                BatchLoader::builder(cache, source(&calls, tenfold_named))
                    .window(Duration::from_millis(500))
                    .build()
                    .unwrap(),
            );
        }
        let tasks: Vec<_> = (0..1_000u64)
            .map(|i| {
                let loader = loaders[(i % 2) as usize].clone();
                tokio::spawn(async move {
                    let want = names(&asks(i, 0, 300));
                    let got = loader.load_many(want.clone()).await.unwrap();
                    for k in want {
                        assert_eq!(got.get(&k).copied(), tenfold_named(&k), "key {k}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let per_key = loads_per_key(&calls);
        assert_eq!(per_key.len(), 300);
        assert!(
            per_key.values().all(|n| *n == 1),
            "no key loaded twice: {per_key:?}"
        );
        let batch_calls = calls.lock().unwrap().len();
        assert!(
            batch_calls <= 2,
            "one window per process: {batch_calls} calls"
        );
        assert_eq!(
            loaders[0].batches() + loaders[1].batches(),
            batch_calls as u64
        );

        // get_or_load_many: hits stay out of the batch.
        let cache = RedisCache::<u64>::builder(prefix.as_str())
            .build(
                redis::Client::open(url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
        let more: Calls<String> = Arc::default();
        let found = cache
            .get_or_load_many(["k1", "k7", "k900", "k901"], source(&more, tenfold_named))
            .await
            .unwrap();
        assert_eq!(*more.lock().unwrap(), [names(&[900, 901])]);
        assert_eq!(
            found,
            HashMap::from([
                ("k1".to_owned(), 10),
                ("k900".to_owned(), 9000),
                ("k901".to_owned(), 9010)
            ])
        );
    });
}

/// The two-tier cache batches its misses the same way; memory hits never reach Redis or
/// the batch function.
#[test]
fn two_tier_batches_misses_and_answers_hits_from_memory() {
    on_shared_redis("batch", |url, prefix| async move {
        let remote = RedisCache::builder(prefix.as_str()).ttl(Duration::from_secs(30));
        let cache = serving(&url, TwoTier::builder(remote)).await;
        let calls: Calls<String> = Arc::default();
        let loader = BatchLoader::builder(cache.clone(), source(&calls, tenfold_named))
            .window(Duration::from_millis(300))
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..200u64)
            .map(|i| {
                let loader = loader.clone();
                tokio::spawn(async move {
                    let k = format!("k{}", i % 50);
                    assert_eq!(loader.load(k.clone()).await.unwrap(), tenfold_named(&k));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(calls.lock().unwrap().len(), 1);
        assert!(loads_per_key(&calls).values().all(|n| *n == 1));
        let hits = cache.stats().hits;
        let found = cache
            .get_or_load_many(names(&[1, 2, 3]), source(&calls, tenfold_named))
            .await
            .unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(cache.stats().hits, hits + 3, "answered from memory");
        assert_eq!(calls.lock().unwrap().len(), 1);
    });
}

/// Outside a tokio runtime a batched miss fails with a typed error (hits still answer).
#[test]
fn outside_a_runtime_a_miss_is_a_typed_error_not_a_panic() {
    use futures::FutureExt;

    let cache: Cache<u64, u64> = Cache::builder().build().unwrap();
    cache.insert(1, 10);
    let calls: Calls<u64> = Arc::default();
    let hit = cache.get_or_load_many([1], source(&calls, tenfold));
    assert_eq!(
        hit.now_or_never().unwrap().unwrap(),
        HashMap::from([(1, 10)])
    );
    let miss = cache.get_or_load_many([1, 2], source(&calls, tenfold));
    let err = miss.now_or_never().unwrap().unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
    assert!(calls.lock().unwrap().is_empty());
}
