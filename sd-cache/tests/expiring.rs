//! Lifetimes chosen by the loader (`try_get_or_load_expiring`) on every backend: each
//! entry expires at its own time, early refresh works back from its own expiry, a zero
//! lifetime stores nothing, and a two-tier memory copy never outlives its Redis entry.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use sd_cache::clock::FixedRandom;
use sd_cache::{Cache, Error, Expiring, ManualClock, RedisCache, TwoTier};

mod common;
use common::{eventually, manager_with_timeout, on_shared_redis, serving};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A loader that returns `value` for `ttl`, recording its key on each call.
fn expiring(
    calls: &Arc<Mutex<Vec<&'static str>>>,
    key: &'static str,
    ttl: Duration,
) -> impl FnOnce() -> std::future::Ready<Result<Expiring<u64>, Error>> + Send + 'static {
    let calls = Arc::clone(calls);
    move || {
        calls.lock().unwrap().push(key);
        std::future::ready(Ok(Expiring::new(7, ttl)))
    }
}

fn loads_of(calls: &Arc<Mutex<Vec<&'static str>>>, key: &str) -> usize {
    calls.lock().unwrap().iter().filter(|k| **k == key).count()
}

#[tokio::test(flavor = "current_thread")]
async fn memory_entries_expire_at_their_own_times() {
    let clock = ManualClock::new();
    let cache: Cache<&'static str, u64> = Cache::builder()
        .clock(clock.clone())
        .ttl(secs(60))
        .max_ttl(secs(3600))
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    for (key, ttl) in [("short", 2), ("long", 300), ("huge", 36_000)] {
        let v = cache
            .try_get_or_load_expiring(key, expiring(&calls, key, secs(ttl)))
            .await;
        assert_eq!(v.unwrap(), Some(7));
    }
    cache
        .try_get_or_load_optional("plain", || async { Ok::<_, Error>(Some(7)) })
        .await
        .unwrap();
    let fresh = |keys: &[&'static str]| {
        keys.iter()
            .map(|k| cache.get(k).is_some())
            .collect::<Vec<_>>()
    };
    let keys = ["short", "plain", "long", "huge"];
    // (time, which keys are still fresh): each at its own lifetime; "huge" cut to max_ttl.
    for (at, expect) in [
        (1_999, [true, true, true, true]),
        (2_000, [false, true, true, true]),
        (59_999, [false, true, true, true]),
        (60_000, [false, false, true, true]),
        (299_999, [false, false, true, true]),
        (300_000, [false, false, false, true]),
        (3_599_999, [false, false, false, true]),
        (3_600_000, [false, false, false, false]),
    ] {
        clock.set(Duration::from_millis(at));
        assert_eq!(fresh(&keys), expect, "at {at} ms");
    }
    // Each was loaded once: reading never reloaded them.
    assert_eq!(calls.lock().unwrap().len(), 3);
}

/// XFetch fires within `delta * beta * -ln(u)` of an entry's own expiry: with u = 1/e and
/// a load of one second, within the last second of each entry, whatever its lifetime.
#[tokio::test(flavor = "current_thread")]
async fn memory_early_refresh_works_back_from_each_entrys_own_expiry() {
    let clock = ManualClock::new();
    let cache: Cache<&'static str, u64> = Cache::builder()
        .clock(clock.clone())
        .ttl(secs(60))
        .max_ttl(secs(600))
        .random(FixedRandom((-1.0f64).exp()))
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    // Both loads take one second of the manual clock: a at 0..1 (expires at 11), b at
    // 1..2 (expires at 102).
    for (key, ttl) in [("a", 10), ("b", 100)] {
        let (c, calls) = (clock.clone(), Arc::clone(&calls));
        cache
            .try_get_or_load_expiring(key, move || async move {
                calls.lock().unwrap().push(key);
                c.advance(secs(1));
                Ok::<_, Error>(Expiring::new(1, Duration::from_secs(ttl)))
            })
            .await
            .unwrap();
    }
    let read = |key: &'static str| {
        let (cache, calls) = (cache.clone(), Arc::clone(&calls));
        async move {
            cache
                .try_get_or_load_expiring(
                    key,
                    expiring(&calls, key, secs(if key == "a" { 10 } else { 100 })),
                )
                .await
                .unwrap()
        }
    };
    let settle = || async {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    };
    // (time in ms, key read, its loads and the cache's early refreshes after it): 1.5 s
    // before an entry's own expiry nothing refreshes, 0.5 s before it does, in the
    // background (the reader gets the current value); b (100 s) stays out of a's window.
    for (at, key, loads, refreshes) in [
        (9_500, "a", 1, 0),
        (10_500, "b", 1, 0),
        (10_500, "a", 2, 1),
        (100_500, "b", 1, 1),
        (101_500, "b", 2, 2),
    ] {
        clock.set(Duration::from_millis(at));
        assert_eq!(read(key).await, Some(1), "{key} at {at} ms");
        settle().await;
        assert_eq!(loads_of(&calls, key), loads, "{key} at {at} ms");
        assert_eq!(cache.stats().early_refreshes, refreshes, "{key} at {at} ms");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn memory_zero_lifetime_stores_nothing_and_not_found_takes_its_own_lifetime() {
    let clock = ManualClock::new();
    let cache: Cache<&'static str, u64> = Cache::builder()
        .clock(clock.clone())
        .negative_ttl(secs(5))
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..2 {
        let v = cache
            .try_get_or_load_expiring("nostore", expiring(&calls, "nostore", Duration::ZERO))
            .await;
        assert_eq!(
            v.unwrap(),
            Some(7),
            "a zero lifetime still answers the call"
        );
    }
    assert_eq!(loads_of(&calls, "nostore"), 2, "and stores nothing");
    assert_eq!(cache.get(&"nostore"), None);

    let gone = Arc::new(AtomicUsize::new(0));
    let missing = || {
        let gone = Arc::clone(&gone);
        move || async move {
            gone.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(Expiring::<u64>::not_found(secs(30)))
        }
    };
    // (time, loads so far): beyond the negative TTL (5 s) but inside its own 30 s, the
    // "not found" is still answered from the cache.
    for (at, loads) in [(0, 1), (29, 1), (30, 2)] {
        clock.set(secs(at));
        let read = cache.try_get_or_load_expiring("gone", missing()).await;
        assert_eq!(read.unwrap(), None);
        assert_eq!(gone.load(Ordering::SeqCst), loads, "at {at} s");
    }

    let bad = Cache::<u64, u64>::builder()
        .ttl(secs(60))
        .max_ttl(secs(59))
        .build();
    assert!(matches!(
        bad,
        Err(Error::InvalidConfig {
            field: "max_ttl",
            ..
        })
    ));
}

/// The server's remaining lifetime of `key`'s entry, from its stored expiry and `TIME`.
async fn remaining_ms(conn: &mut redis::aio::ConnectionManager, data_key: &str) -> Option<u64> {
    let expiry: Option<u64> = conn.hget(data_key, "e").await.unwrap();
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    expiry.map(|e| e.saturating_sub(s * 1000 + us / 1000))
}

#[test]
fn redis_entries_expire_at_their_own_times() {
    on_shared_redis("expiring", |url, prefix| async move {
        let mut conn = manager_with_timeout(&url, secs(5)).await;
        let cache: RedisCache<u64, _> = RedisCache::builder(prefix.as_str())
            .ttl(secs(10))
            .max_ttl(secs(120))
            .build(conn.clone())
            .await
            .unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        for (key, ttl) in [
            ("brief", Duration::from_millis(400)),
            ("long", secs(90)),
            ("huge", secs(9_000)),
        ] {
            assert_eq!(
                cache
                    .try_get_or_load_expiring(key, expiring(&calls, key, ttl))
                    .await
                    .unwrap(),
                Some(7)
            );
        }
        cache.insert("plain", &7).await.unwrap();
        // The stored expiries are the loader's choices (cut to max_ttl) on the server's clock.
        for (key, low, high) in [
            ("brief", 1, 400),
            ("plain", 9_000, 10_000),
            ("long", 89_000, 90_000),
            ("huge", 119_000, 120_000),
        ] {
            let left = remaining_ms(&mut conn, &cache.data_key(key)).await.unwrap();
            assert!((low..=high).contains(&left), "{key}: {left} ms left");
        }
        // Redis time cannot be injected: wait out the short one.
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(cache.get("brief").await.unwrap(), None);
        assert_eq!(cache.get("long").await.unwrap(), Some(7));
        assert_eq!(cache.get("plain").await.unwrap(), Some(7));

        // Zero: answered, not stored, and the load lock is released at once.
        for _ in 0..2 {
            let v = cache
                .try_get_or_load_expiring("nostore", expiring(&calls, "nostore", Duration::ZERO))
                .await;
            assert_eq!(v.unwrap(), Some(7));
        }
        assert_eq!(loads_of(&calls, "nostore"), 2);
        let lock: bool = conn
            .exists(format!("{}:lock", cache.data_key("nostore")))
            .await
            .unwrap();
        assert!(!lock, "the lock of a value not stored is released");
        // "Not found" with its own lifetime.
        let gone = cache
            .try_get_or_load_expiring("gone", || async {
                Ok::<_, Error>(Expiring::<u64>::not_found(secs(30)))
            })
            .await;
        assert_eq!(gone.unwrap(), None);
        let left = remaining_ms(&mut conn, &cache.data_key("gone"))
            .await
            .unwrap();
        assert!(
            (29_000..=30_000).contains(&left),
            "not found: {left} ms left"
        );
    });
}

/// Runs [`refreshes_in_own_window`] through `$cache` (a Redis or a two-tier cache,
/// which share the method but no trait), counting early refreshes with `$stats`, and
/// checks a was loaded twice and b once.
macro_rules! own_window {
    ($cache:expr, $stats:ident) => {{
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (c, l) = ($cache.clone(), Arc::clone(&calls));
        let read = move |key: &'static str| {
            let (cache, load) = (c.clone(), slow(&l, key));
            Box::pin(async move { cache.try_get_or_load_expiring(key, load).await.unwrap() })
                as Read
        };
        let c = $cache.clone();
        refreshes_in_own_window(read, move || c.$stats().early_refreshes).await;
        assert_eq!((loads_of(&calls, "a"), loads_of(&calls, "b")), (2, 1));
    }};
}

/// On Redis the load's duration (`delta`) is real time: a 300 ms load and u = 1/e put the
/// window in the last 300 ms of each entry's own lifetime.
#[test]
fn redis_early_refresh_works_back_from_each_entrys_own_expiry() {
    on_shared_redis("expiring", |url, prefix| async move {
        let conn = manager_with_timeout(&url, secs(5)).await;
        let cache: RedisCache<u64, _> = RedisCache::builder(prefix.as_str())
            .ttl(secs(10))
            .max_ttl(secs(60))
            .random(FixedRandom((-1.0f64).exp()))
            .build(conn)
            .await
            .unwrap();
        own_window!(cache, stats);
    });
}

/// A read's boxed future.
type Read = std::pin::Pin<Box<dyn std::future::Future<Output = Option<u64>> + Send>>;

/// A loader taking 300 ms that gives "a" 2 s and any other key 40 s.
fn slow(
    calls: &Arc<Mutex<Vec<&'static str>>>,
    key: &'static str,
) -> impl FnOnce() -> Read2 + Send + 'static {
    let calls = Arc::clone(calls);
    let ttl = if key == "a" { secs(2) } else { secs(40) };
    move || {
        Box::pin(async move {
            calls.lock().unwrap().push(key);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, Error>(Expiring::new(1u64, ttl))
        }) as Read2
    }
}

/// A loader's boxed future.
type Read2 =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Expiring<u64>, Error>> + Send>>;

/// Loads "a" (2 s) and "b" (40 s) through `read` (the loader takes 300 ms; u = 1/e puts
/// the early-refresh window in the last 300 ms of each), reads both again 1.85 s after a
/// was loaded, and checks that a, and only a, is refreshed early.
async fn refreshes_in_own_window(
    read: impl Fn(&'static str) -> Read,
    early_refreshes: impl Fn() -> u64 + Send + 'static,
) {
    read("a").await;
    let loaded = tokio::time::Instant::now();
    read("b").await;
    tokio::time::sleep_until(loaded + Duration::from_millis(1_850)).await;
    assert_eq!(read("a").await, Some(1), "a, inside its window");
    assert_eq!(read("b").await, Some(1), "b, 38 s from its own");
    eventually("a's early refresh", move || {
        std::future::ready(early_refreshes() == 1)
    })
    .await;
}

/// Through a two-tier cache too: a memory copy ends one mean refresh gap (the load time)
/// before its Redis entry expires, so the reads of the last stretch reach Redis and
/// refresh it early there.
#[test]
fn two_tier_early_refresh_works_back_from_each_entrys_own_expiry() {
    on_shared_redis("expiring", |url, prefix| async move {
        let remote = RedisCache::builder(prefix.as_str())
            .ttl(secs(10))
            .max_ttl(secs(60))
            .random(FixedRandom((-1.0f64).exp()));
        let cache = serving(&url, TwoTier::builder(remote).local_ttl(secs(5))).await;
        own_window!(cache, remote_stats);
    });
}

/// A memory copy lives `min(local_ttl, what is left of the Redis entry)`: a one-second
/// token is not served from memory for the five seconds of `local_ttl`.
#[test]
fn two_tier_memory_copies_never_outlive_their_redis_entry() {
    on_shared_redis("expiring", |url, prefix| async move {
        let tier = || async {
            let remote = RedisCache::builder(prefix.as_str())
                .ttl(secs(10))
                .max_ttl(secs(60));
            serving(&url, TwoTier::builder(remote).local_ttl(secs(5))).await
        };
        let (one, two) = (tier().await, tier().await);
        let calls = Arc::new(Mutex::new(Vec::new()));
        for (key, ttl) in [("token", Duration::from_millis(800)), ("page", secs(30))] {
            assert_eq!(
                one.try_get_or_load_expiring(key, expiring(&calls, key, ttl))
                    .await
                    .unwrap(),
                Some(7)
            );
            // The other instance reads it through Redis into its memory tier.
            assert_eq!(two.get(key).await.unwrap(), Some(7));
        }
        let hits = (one.stats().hits, two.stats().hits);
        assert_eq!(one.get("token").await.unwrap(), Some(7));
        assert_eq!(two.get("token").await.unwrap(), Some(7));
        assert_eq!(
            (one.stats().hits, two.stats().hits),
            (hits.0 + 1, hits.1 + 1),
            "memory hits"
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        for t in [&one, &two] {
            assert_eq!(
                t.get("token").await.unwrap(),
                None,
                "expired in memory with Redis"
            );
            let before = t.stats().hits;
            assert_eq!(t.get("page").await.unwrap(), Some(7));
            assert_eq!(
                t.stats().hits,
                before + 1,
                "the 30 s page is still a memory hit"
            );
        }
        assert_eq!(loads_of(&calls, "token"), 1);
    });
}
