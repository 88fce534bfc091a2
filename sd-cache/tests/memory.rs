//! The memory cache under contention, across expiry, and when loaders misbehave.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sd_cache::clock::{FixedRandom, SeededRandom};
use sd_cache::{Cache, Error, ManualClock, TokioClock};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
#[error("database down")]
struct DbDown;

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// Spawns `get_or_load(1)` whose loader waits for `gate`, then returns `value` (or panics
/// when `value` is `None`).
fn spawn_gated(
    cache: &Cache<u32, u32>,
    gate: &Arc<Notify>,
    value: Option<u32>,
) -> tokio::task::JoinHandle<Result<u32, Error>> {
    let (cache, gate) = (cache.clone(), gate.clone());
    tokio::spawn(async move {
        cache
            .get_or_load(1, move || async move {
                gate.notified().await;
                value.expect("loader bug")
            })
            .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_misses_run_the_loader_once() {
    let cache: Cache<&'static str, u64> = Cache::builder().build().unwrap();
    let calls = counter();
    let mut tasks = Vec::new();
    for _ in 0..1_000 {
        let (cache, calls) = (cache.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_load("hot", move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    42
                })
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 42);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let s = cache.stats();
    assert_eq!(s.loads, 1);
    assert_eq!(s.hits + s.misses, 1_000);
    assert!(s.coalesced_waiters <= s.misses);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_leader_hands_the_load_to_a_waiter() {
    let cache: Cache<u32, &'static str> = Cache::builder().build().unwrap();
    let leader = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(1, || async { std::future::pending::<&'static str>().await })
                .await
        })
    };
    tokio::task::yield_now().await;
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load(1, || async {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        "waiter"
                    })
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    leader.abort();
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap(), "waiter");
    }
    assert_eq!(cache.get(&1), Some("waiter"));
    assert_eq!(
        cache.stats().loads,
        1,
        "the aborted load never finished; one waiter loaded"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_loader_fails_only_its_own_caller() {
    let cache: Cache<u32, u32> = Cache::builder().build().unwrap();
    let gate = Arc::new(Notify::new());
    let leader = spawn_gated(&cache, &gate, None);
    tokio::task::yield_now().await;
    let waiter = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get_or_load(1, || async { 7 }).await })
    };
    tokio::task::yield_now().await;
    gate.notify_one();
    assert!(leader.await.unwrap_err().is_panic());
    assert_eq!(waiter.await.unwrap().unwrap(), 7);
}

#[tokio::test(start_paused = true)]
async fn a_loader_error_is_shared_with_every_waiter_and_not_cached() {
    let cache: Cache<u32, u32> = Cache::builder().build().unwrap();
    let calls = counter();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (cache, calls) = (cache.clone(), calls.clone());
            tokio::spawn(async move {
                cache
                    .try_get_or_load(1, move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Err::<u32, _>(DbDown)
                    })
                    .await
            })
        })
        .collect();
    let mut sources = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Err(Error::Loader { source }) => sources.push(source),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "waiters did not retry the loader"
    );
    assert!(
        sources.iter().all(|s| Arc::ptr_eq(s, &sources[0])),
        "one error, shared"
    );
    assert!(sources[0].downcast_ref::<DbDown>().is_some());
    // Errors are not cached: the next call loads again.
    assert_eq!(
        cache
            .try_get_or_load(1, || async { Ok::<_, DbDown>(3) })
            .await
            .unwrap(),
        3
    );
}

/// A hot key read continuously across several expiries: after the first load no reader
/// ever waits, because XFetch refreshes it early in the background.
#[tokio::test(start_paused = true)]
async fn a_hot_key_never_makes_a_reader_wait_after_the_first_load() {
    let cache: Cache<&'static str, u64> = Cache::builder()
        .ttl(Duration::from_secs(1))
        .clock(TokioClock::new())
        .random(SeededRandom::new(11))
        .build()
        .unwrap();
    let calls = counter();
    let waited = counter();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (cache, calls, waited) = (cache.clone(), calls.clone(), waited.clone());
            tokio::spawn(async move {
                for i in 0..5_000u64 {
                    let start = tokio::time::Instant::now();
                    let calls = calls.clone();
                    let v = cache
                        .get_or_load("hot", move || async move {
                            let n = calls.fetch_add(1, Ordering::SeqCst) as u64;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            n
                        })
                        .await
                        .unwrap();
                    let _ = v;
                    if i > 0 && start.elapsed() > Duration::ZERO {
                        waited.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    let s = cache.stats();
    // 5,000 ms of reads over a 1 s TTL: at least 4 refreshes, all early.
    assert!(s.early_refreshes >= 4, "{s:?}");
    assert_eq!(waited.load(Ordering::SeqCst), 0, "{s:?}");
    assert_eq!(s.loads as usize, calls.load(Ordering::SeqCst));
    assert_eq!(
        s.loads,
        s.early_refreshes + 1,
        "one cold load, the rest early: {s:?}"
    );
}

#[tokio::test]
async fn not_found_is_cached_for_the_negative_ttl() {
    let clock = ManualClock::new();
    let cache: Cache<u32, String> = Cache::builder()
        .negative_ttl(Duration::from_secs(2))
        .clock(clock.clone())
        .build()
        .unwrap();
    let calls = counter();
    let load = |calls: Arc<AtomicUsize>| {
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<Option<String>, DbDown>(None)
        }
    };
    // A read of key 9 that may find "not found", loading through `load`.
    let read = || cache.try_get_or_load_optional(9, load(calls.clone()));
    for _ in 0..100 {
        assert_eq!(read().await.unwrap(), None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get(&9), None);
    // A non-optional read does not accept the cached "not found" as a value.
    assert_eq!(
        cache
            .get_or_load(9, || async { "x".to_owned() })
            .await
            .unwrap(),
        "x"
    );
    cache.invalidate(&9);
    assert_eq!(read().await.unwrap(), None);
    clock.advance(Duration::from_secs(3));
    assert_eq!(read().await.unwrap(), None);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_failed_reload_serves_the_stale_value_for_a_bounded_time() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .ttl(Duration::from_secs(10))
        .stale_if_error(Duration::from_secs(5))
        .early_refresh(false)
        .clock(clock.clone())
        .build()
        .unwrap();
    cache.insert(1, 100);
    let failing = || async { Err::<u32, _>(DbDown) };
    clock.advance(Duration::from_secs(12));
    assert_eq!(cache.get(&1), None, "expired");
    assert_eq!(cache.try_get_or_load(1, failing).await.unwrap(), 100);
    assert_eq!(cache.stats().stale_served, 1);
    clock.advance(Duration::from_secs(4));
    match cache.try_get_or_load(1, failing).await {
        Err(e) => assert!(e.loader_error().is_some()),
        Ok(v) => panic!("served {v} past the stale window"),
    }
    assert_eq!(
        cache
            .try_get_or_load(1, || async { Ok::<_, DbDown>(5) })
            .await
            .unwrap(),
        5
    );
}

#[tokio::test]
async fn ttl_jitter_spreads_expiries_within_its_bound() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .ttl(Duration::from_secs(10))
        .ttl_jitter(Duration::from_secs(4))
        .early_refresh(false)
        .clock(clock.clone())
        .random(SeededRandom::new(3))
        .build()
        .unwrap();
    for k in 0..200 {
        cache.insert(k, k);
    }
    clock.set(Duration::from_millis(9_999));
    assert_eq!((0..200).filter(|k| cache.get(k).is_some()).count(), 200);
    clock.set(Duration::from_secs(12));
    let fresh = (0..200).filter(|k| cache.get(k).is_some()).count();
    assert!(
        (40..160).contains(&fresh),
        "about half expire by ttl + jitter/2: {fresh}"
    );
    clock.set(Duration::from_secs(14));
    assert_eq!((0..200).filter(|k| cache.get(k).is_some()).count(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_during_a_load_keeps_the_old_result_out() {
    let cache: Cache<u32, u32> = Cache::builder().build().unwrap();
    let gate = Arc::new(Notify::new());
    let load = spawn_gated(&cache, &gate, Some(1));
    tokio::task::yield_now().await;
    cache.invalidate(&1);
    gate.notify_one();
    assert_eq!(
        load.await.unwrap().unwrap(),
        1,
        "the caller still gets its load"
    );
    assert_eq!(
        cache.get(&1),
        None,
        "but the value loaded before the invalidation is not stored"
    );
}

#[tokio::test]
async fn early_refresh_fires_near_expiry_and_readers_keep_the_current_value() {
    let clock = ManualClock::new();
    // u = 0.5: fires when the gap to expiry is at most delta * ln 2.
    let cache: Cache<u32, u32> = Cache::builder()
        .ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .random(FixedRandom(0.5))
        .build()
        .unwrap();
    let c2 = clock.clone();
    cache
        .get_or_load(1, move || async move {
            c2.advance(Duration::from_secs(1)); // the load "takes" 1 s
            1
        })
        .await
        .unwrap();
    // Loaded at t=1 s, expires at 11 s; fires from 11 - ln 2 ≈ 10.307 s.
    clock.set(Duration::from_millis(10_200));
    assert_eq!(cache.get_or_load(1, || async { 2 }).await.unwrap(), 1);
    tokio::task::yield_now().await;
    assert_eq!(cache.stats().early_refreshes, 0);
    clock.set(Duration::from_millis(10_400));
    assert_eq!(
        cache.get_or_load(1, || async { 2 }).await.unwrap(),
        1,
        "current value, at once"
    );
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(cache.stats().early_refreshes, 1);
    assert_eq!(cache.get(&1), Some(2), "refreshed in the background");
}

#[test]
fn invalid_settings_fail_at_build_naming_the_field() {
    let b = Cache::<u32, u32>::builder;
    for (builder, field) in [
        (b().max_capacity(0), "max_capacity"),
        (b().ttl(Duration::ZERO), "ttl"),
        (b().beta(f64::NAN), "beta"),
    ] {
        match builder.build() {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn evictions_are_counted() {
    let cache: Cache<u32, u32> = Cache::builder().max_capacity(10).build().unwrap();
    for k in 0..1_000 {
        cache.insert(k, k);
        let _ = cache.get(&(k % 10));
    }
    cache.run_pending_tasks();
    assert!(cache.entry_count() <= 10);
    assert!(cache.stats().evictions > 0);
}

#[tokio::test(start_paused = true)]
async fn an_infallible_read_waiting_on_a_failed_load_gets_the_shared_error() {
    let cache: Cache<u32, u32> = Cache::builder().build().unwrap();
    let failing = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .try_get_or_load(1, || async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Err::<u32, _>(DbDown)
                })
                .await
        })
    };
    tokio::task::yield_now().await;
    let plain = cache.get_or_load(1, || async { 1 }).await;
    assert!(matches!(plain, Err(Error::Loader { .. })));
    assert!(failing.await.unwrap().is_err());
}

/// A hot key read by 1,000 concurrent tasks inside its refresh window, with an injected
/// clock and a draw that always fires (the worst case for XFetch): one early refresh per
/// expiry, however many readers fire together, and none once the refreshed entry is in
/// place. Readers never wait for the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_most_one_early_refresh_per_expiry_under_many_readers() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u64> = Cache::builder()
        .ttl(Duration::from_secs(10))
        .clock(clock.clone())
        .random(FixedRandom(0.0))
        .build()
        .unwrap();
    let calls = counter();
    let load_time = Duration::from_millis(100);
    let c2 = clock.clone();
    cache
        .get_or_load(1, move || async move {
            c2.advance(load_time);
            0
        })
        .await
        .unwrap();
    // Loaded at 0.1 s (the load "took" 100 ms): expires at 10.1 s; with u -> 0 every read in
    // the last 36.7 x 100 ms fires.
    let mut expiry = Duration::from_millis(10_100);
    for cycle in 1..=3u64 {
        clock.set(expiry - Duration::from_secs(1));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let readers: Vec<_> = (0..1_000)
            .map(|_| {
                let (cache, calls, gate, clock) =
                    (cache.clone(), calls.clone(), gate.clone(), clock.clone());
                tokio::spawn(async move {
                    for _ in 0..5 {
                        let (calls, gate, clock) = (calls.clone(), gate.clone(), clock.clone());
                        let v = cache
                            .get_or_load(1, move || async move {
                                calls.fetch_add(1, Ordering::SeqCst);
                                gate.acquire().await.unwrap().forget();
                                clock.advance(load_time);
                                cycle
                            })
                            .await
                            .unwrap();
                        assert_eq!(v, cycle - 1, "the current value, at once");
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for r in readers {
            r.await.unwrap();
        }
        assert_eq!(
            calls.load(Ordering::SeqCst) as u64,
            cycle,
            "one refresh in flight for 5,000 firing reads"
        );
        gate.add_permits(1_000);
        while cache.get(&1) != Some(cycle) {
            tokio::task::yield_now().await;
        }
        // The refreshed entry is in place (expires 10 s after now): reads at the same
        // instant are outside its window and start nothing.
        for _ in 0..1_000 {
            let v = cache
                .get_or_load(1, move || async move { u64::MAX })
                .await
                .unwrap();
            assert_eq!(v, cycle);
        }
        assert_eq!(calls.load(Ordering::SeqCst) as u64, cycle);
        expiry = expiry - Duration::from_secs(1) + load_time + Duration::from_secs(10);
    }
    let stats = cache.stats();
    assert_eq!(stats.early_refreshes, 3);
    assert_eq!(stats.loads, 4, "the first load and one per expiry");
}

/// A hit through the loader API is a lookup and a branch: its future is answered when the
/// call is made (ready on the first poll, the loader untouched) and does not carry the
/// miss path's state (a few words, not the hundreds of bytes of the single-flight and
/// load futures).
#[test]
fn a_hit_through_the_loader_api_is_a_small_ready_future() {
    use futures::FutureExt;

    let cache: Cache<u64, u64> = Cache::builder().build().unwrap();
    cache.insert(1, 10);
    let calls = counter();
    let c = calls.clone();
    let hit = cache.get_or_load(1, move || async move {
        c.fetch_add(1, Ordering::SeqCst);
        0
    });
    let size = std::mem::size_of_val(&hit);
    assert!(size <= 96, "a hit's future is {size} bytes");
    // No runtime here: a hit needs none.
    assert_eq!(hit.now_or_never().unwrap().unwrap(), 10);
    let optional = cache.try_get_or_load_optional(1, || async { Ok::<_, Error>(Some(0)) });
    assert!(std::mem::size_of_val(&optional) <= 96);
    assert_eq!(optional.now_or_never().unwrap().unwrap(), Some(10));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().hits, 2);
}
