//! Feature `metrics`: every count of `CacheStats` is also a metric, with the documented
//! names and labels: hits (in steps, exact once published) and misses, one load for a stampede of three and its two joins,
//! the load's time.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use std::sync::Arc;

use sd_cache::{Cache, Error};
use sd_core::observe::{Capture, backend, label};
use tokio::sync::Notify;

#[tokio::test(start_paused = true)]
async fn a_stampede_counts_one_load_and_its_joins() {
    let capture = Capture::new();
    let cache: Cache<u32, u32> = capture.build(|| Cache::builder().name("users").build().unwrap());
    let of = [(label::NAME, "users"), (label::BACKEND, backend::MEMORY)];
    let with = |o| [of[0], of[1], (label::OUTCOME, o)];
    let gate = Arc::new(Notify::new());
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (cache, gate) = (cache.clone(), gate.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(1, move || async move {
                        gate.notified().await;
                        7
                    })
                    .await
            })
        })
        .collect();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    gate.notify_one();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 7);
    }
    assert_eq!(cache.get(&1), Some(7));
    let r: Result<u32, Error> = cache
        .try_get_or_load(2, || async { Err::<u32, &str>("db down") })
        .await;
    assert!(r.is_err());

    let s = cache.stats();
    assert_eq!(
        (
            s.hits,
            s.misses,
            s.loads,
            s.load_errors,
            s.coalesced_waiters
        ),
        (1, 4, 2, 1, 2)
    );
    assert_eq!(capture.counter("sd.cache.lookups", &with("miss")), s.misses);

    // Hits reach the recorder in steps of 64 per thread; `publish` brings them up to date.
    let hits = || capture.counter("sd.cache.lookups", &with("hit"));
    for _ in 0..200 {
        assert_eq!(cache.get(&1), Some(7));
    }
    let all = cache.stats().hits;
    assert_eq!(all, s.hits + 200);
    assert!(
        hits() <= all && all - hits() < 64,
        "{} of {all} in steps",
        hits()
    );
    sd_core::observe::publish();
    assert_eq!(hits(), all);
    assert_eq!(capture.counter("sd.cache.loads", &of), s.loads);
    assert_eq!(capture.counter("sd.cache.load_errors", &of), s.load_errors);
    assert_eq!(
        capture.counter("sd.cache.stampede.joins", &of),
        s.coalesced_waiters
    );
    assert_eq!(capture.samples("sd.cache.load.duration", &of).len(), 2);
}
