//! The memory backend: contention, bounded keys, multi-limit, runtime changes, shadow
//! mode, and a differential test against governor.

#![allow(clippy::unwrap_used)] // Tests may unwrap (helpers outside #[test] included).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::clock::FakeRelativeClock;
use proptest::prelude::*;
use sd_ratelimit::memory::{KeyedLimiter, ManualClock, MemoryLimiterBuilder};
use sd_ratelimit::{Error, Limit, Quota};

/// A limiter keyed by `String`, 10 per second with a burst of 10, on `clock`.
fn keyed_on(clock: &ManualClock) -> KeyedLimiter<String, ManualClock> {
    MemoryLimiterBuilder::new(gcra(10, 10))
        .clock(clock.clone())
        .keyed::<String>()
        .unwrap()
}

fn gcra(per_second: u32, burst: u32) -> Limit {
    Limit::gcra(
        Quota::per_second(per_second)
            .unwrap()
            .with_burst(burst)
            .unwrap(),
    )
}

#[test]
fn sixty_four_threads_on_one_key_admit_exactly_the_burst() {
    for algorithm in [
        gcra(1, 100),
        Limit::token_bucket()
            .capacity(100)
            .refill_amount(1)
            .refill_interval(Duration::from_secs(1))
            .build()
            .unwrap(),
        Limit::sliding_window(100, Duration::from_secs(1)).unwrap(),
    ] {
        let clock = ManualClock::new();
        clock.advance(Duration::from_secs(10));
        let keyed = Arc::new(
            MemoryLimiterBuilder::new(algorithm)
                .count_denials(true)
                .clock(clock.clone())
                .keyed::<String>()
                .unwrap(),
        );
        let direct = Arc::new(
            MemoryLimiterBuilder::new(algorithm)
                .clock(clock.clone())
                .direct()
                .unwrap(),
        );
        // The lean `allow()` paths, on limiters of their own.
        let keyed_allow = Arc::new(
            MemoryLimiterBuilder::new(algorithm)
                .clock(clock.clone())
                .keyed::<String>()
                .unwrap(),
        );
        let direct_allow = Arc::new(
            MemoryLimiterBuilder::new(algorithm)
                .clock(clock)
                .direct()
                .unwrap(),
        );
        let admitted = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let (keyed, direct, admitted) = (keyed.clone(), direct.clone(), admitted.clone());
                let (keyed_allow, direct_allow) = (keyed_allow.clone(), direct_allow.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        for allowed in [
                            keyed.check("hot").unwrap().allowed,
                            direct.check().unwrap().allowed,
                            keyed_allow.allow("hot"),
                            direct_allow.allow(),
                        ] {
                            if allowed {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 400, "{algorithm:?}");
        assert_eq!(keyed.stats().denied(), 64 * 50 - 100);
    }
}

#[test]
fn a_million_distinct_keys_stay_bounded() {
    let clock = ManualClock::new();
    let max_keys = 10_000;
    let limiter = MemoryLimiterBuilder::new(gcra(10, 5))
        .clock(clock.clone())
        .max_keys(max_keys)
        .keyed::<u64>()
        .unwrap();
    let mut too_many = 0;
    for key in 0..1_000_000u64 {
        // 1 µs per request: keys come back to full after 100 ms, i.e. 100,000 keys later.
        clock.advance(Duration::from_micros(1));
        match limiter.check(&key) {
            Ok(d) => assert!(d.allowed),
            Err(Error::TooManyKeys { max_keys: m }) => {
                assert_eq!(m, max_keys);
                too_many += 1;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(limiter.len() <= max_keys, "{} keys at {key}", limiter.len());
    }
    // The cap held. A key is limited for 100 ms (100,000 requests), so at most 10,000 of
    // every 100,000 new keys fit; sweeps freed the room of keys back to full each time,
    // so about that many were served.
    let served = 1_000_000 - too_many;
    assert!(served >= 50_000, "served {served}");
    // Once every key is idle, the next sweep empties the map without a housekeeping call.
    clock.advance(Duration::from_secs(1));
    for key in 0..(max_keys as u64) {
        let _ = limiter.check(&(2_000_000 + key));
    }
    assert!(limiter.len() <= max_keys);
    limiter.sweep();
    clock.advance(Duration::from_secs(1));
    limiter.sweep();
    assert_eq!(limiter.len(), 0);
}

#[test]
fn keys_back_to_full_are_removed_without_a_cap() {
    let clock = ManualClock::new();
    let limiter = MemoryLimiterBuilder::new(gcra(1000, 1))
        .clock(clock.clone())
        .idle_grace(Duration::from_millis(10))
        .keyed::<u64>()
        .unwrap();
    for key in 0..200_000u64 {
        clock.advance(Duration::from_micros(10));
        assert!(limiter.check(&key).unwrap().allowed);
    }
    // Each key is full again 1 ms (100 keys) after its request and removable 10 ms
    // later: sweeps keep the map near the keys of the last ~11 ms plus one sweep period
    // (4096 keys), not the 200,000 seen.
    assert!(limiter.len() < 20_000, "{}", limiter.len());
}

#[test]
fn several_limits_are_all_or_none() {
    let clock = ManualClock::new();
    let limiter = keyed_on(&clock);
    let per_ip = gcra(10, 3);
    let per_user = gcra(1, 5);
    let check = |ip: &str| {
        let ip = format!("ip:{ip}");
        limiter
            .check_all(&[(ip.as_str(), &per_ip, 1), ("user:ann", &per_user, 1)])
            .unwrap()
    };
    // The IP limit binds first: three pass, the fourth is denied and takes nothing from
    // the user's limit.
    for _ in 0..3 {
        assert!(check("1.1.1.1").allowed);
    }
    let denied = check("1.1.1.1");
    assert!(!denied.allowed);
    assert_eq!(denied.retry_after, Duration::from_millis(100));
    // The user has 2 left (5 - 3): the denied request did not consume one.
    assert!(check("2.2.2.2").allowed);
    assert!(check("2.2.2.2").allowed);
    let user_denied = check("3.3.3.3");
    assert!(!user_denied.allowed);
    // The user limit denied after the IP limit took one: it was given back.
    let fresh_ip = limiter.check_with("ip:3.3.3.3", &per_ip, 3).unwrap();
    assert!(fresh_ip.allowed, "{fresh_ip:?}");
}

#[test]
fn changing_the_quota_at_runtime_hands_out_no_fresh_burst() {
    let clock = ManualClock::new();
    let limiter = keyed_on(&clock);
    for _ in 0..10 {
        assert!(limiter.check("k").unwrap().allowed);
    }
    // Raise the burst: the key has used 10 of the old quota, which stays used.
    limiter.set_limit(gcra(10, 12)).unwrap();
    assert!(limiter.check("k").unwrap().allowed);
    assert!(limiter.check("k").unwrap().allowed);
    assert!(!limiter.check("k").unwrap().allowed);
    // Lower it: now over the new burst, so denied until the excess drains.
    limiter.set_limit(gcra(10, 5)).unwrap();
    let d = limiter.check("k").unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Duration::from_millis(800));
}

/// Switching a direct limiter between GCRA (the fast path) and a leaky queue (the
/// general kernel, same state: a time) takes effect on the next check, for `check` and
/// `allow` alike, and keeps what was used.
#[test]
fn switching_algorithms_at_runtime_leaves_the_fast_path() {
    let clock = ManualClock::new();
    let limiter = MemoryLimiterBuilder::new(gcra(1, 1))
        .clock(clock.clone())
        .direct()
        .unwrap();
    assert!(limiter.allow());
    assert!(!limiter.check().unwrap().allowed);
    // A leaky queue of 1 per second that may delay up to 3 s decides from now on: the
    // slot used under GCRA stays used, so the next request waits 1 s, then 2 s, ...
    limiter
        .set_limit(
            Limit::leaky_queue(Quota::per_second(1).unwrap(), Duration::from_secs(3)).unwrap(),
        )
        .unwrap();
    let d = limiter.check().unwrap();
    assert!(d.allowed, "queued by the leaky queue: {d:?}");
    assert_eq!(d.delay, Duration::from_secs(1));
    assert_eq!(limiter.check().unwrap().delay, Duration::from_secs(2));
    assert_eq!(limiter.check().unwrap().delay, Duration::from_secs(3));
    assert!(!limiter.allow() && !limiter.check().unwrap().allowed);
    // Back to GCRA, burst 5: the fast path again, still owing the queued slots.
    limiter.set_limit(gcra(1, 5)).unwrap();
    let d = limiter.check().unwrap();
    assert_eq!(d.limit, 5);
    assert!(d.allowed, "3 s owed, 4 s of burst left: {d:?}");
    clock.advance(Duration::from_secs(60));
    assert_eq!(limiter.check().unwrap().remaining, 4);
}

/// A limit whose state means something else (another algorithm family, another token
/// refill, another window) is refused with a typed error, and the old limit stays: the
/// kept state is never misread.
#[test]
fn a_limit_that_would_misread_the_state_is_refused() {
    let window = || Limit::sliding_window(3, Duration::from_secs(3600)).unwrap();
    let direct = MemoryLimiterBuilder::new(gcra(1, 1)).direct().unwrap();
    assert!(direct.allow());
    assert!(matches!(
        direct.set_limit(window()),
        Err(Error::InvalidConfig { field: "limit", .. })
    ));
    assert_eq!(direct.limit(), gcra(1, 1));
    assert!(!direct.allow(), "still the GCRA limit, its burst used");

    let keyed = MemoryLimiterBuilder::new(window())
        .keyed::<String>()
        .unwrap();
    for _ in 0..3 {
        assert!(keyed.check("k").unwrap().allowed);
    }
    for other in [
        gcra(1, 5),
        Limit::sliding_window(3, Duration::from_secs(60)).unwrap(),
        Limit::token_bucket()
            .capacity(10)
            .refill_amount(1)
            .refill_interval(Duration::from_secs(1))
            .build()
            .unwrap(),
    ] {
        assert!(matches!(
            keyed.set_limit(other),
            Err(Error::InvalidConfig { field: "limit", .. })
        ));
    }
    assert!(
        !keyed.check("k").unwrap().allowed,
        "the window still counts 3"
    );
    // Same state, another count: accepted, and the 3 already counted stay counted.
    keyed
        .set_limit(Limit::sliding_window(4, Duration::from_secs(3600)).unwrap())
        .unwrap();
    assert!(keyed.check("k").unwrap().allowed);
    assert!(!keyed.check("k").unwrap().allowed);

    let bucket = |refill| {
        Limit::token_bucket()
            .capacity(10)
            .refill_amount(refill)
            .refill_interval(Duration::from_secs(1))
            .build()
            .unwrap()
    };
    let tb = MemoryLimiterBuilder::new(bucket(1)).direct().unwrap();
    tb.set_limit(
        Limit::token_bucket()
            .capacity(20)
            .refill_amount(1)
            .refill_interval(Duration::from_secs(1))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(matches!(
        tb.set_limit(bucket(2)),
        Err(Error::InvalidConfig { field: "limit", .. })
    ));
}

#[test]
fn cost_over_capacity_is_distinct_from_try_later() {
    let limiter = MemoryLimiterBuilder::new(gcra(10, 5)).direct().unwrap();
    assert!(matches!(
        limiter.check_n(6),
        Err(Error::InsufficientCapacity {
            cost: 6,
            capacity: 5
        })
    ));
    let keyed = MemoryLimiterBuilder::new(gcra(10, 5))
        .keyed::<String>()
        .unwrap();
    assert!(matches!(
        keyed.check_n("a", 6),
        Err(Error::InsufficientCapacity { .. })
    ));
    assert_eq!(keyed.len(), 0);
}

#[test]
fn shadow_mode_counts_but_admits() {
    let limiter = MemoryLimiterBuilder::new(gcra(1, 2))
        .clock(ManualClock::new())
        .shadow(true)
        .keyed::<String>()
        .unwrap();
    for _ in 0..5 {
        assert!(limiter.check("k").unwrap().allowed);
    }
    assert_eq!(limiter.stats().shadow_denied(), 3);
    assert_eq!(limiter.stats().denied(), 0);
    // `allow()` takes the same bookkeeping path.
    assert!(limiter.allow("k"));
    assert_eq!(limiter.stats().shadow_denied(), 4);
    let direct = MemoryLimiterBuilder::new(gcra(1, 1))
        .clock(ManualClock::new())
        .shadow(true)
        .direct()
        .unwrap();
    assert!(direct.allow() && direct.allow());
    assert_eq!(direct.stats().shadow_denied(), 1);
}

#[test]
fn zero_max_keys_is_a_config_error() {
    assert!(matches!(
        MemoryLimiterBuilder::new(gcra(1, 1))
            .max_keys(0)
            .keyed::<String>(),
        Err(Error::InvalidConfig {
            field: "max_keys",
            ..
        })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The same quota and request sequence on governor's direct limiter and ours give
    /// the same decisions and the same waits.
    #[test]
    fn identical_to_governor(interval_us in 1u64..1_000_000, burst in 1u32..20,
                             events in prop::collection::vec((0u64..2_000_000, 1u32..25), 1..300)) {
        let interval = Duration::from_micros(interval_us);
        let ours_clock = ManualClock::new();
        let ours = MemoryLimiterBuilder::new(Limit::gcra(Quota::with_interval(interval).unwrap().with_burst(burst).unwrap()))
            .clock(ours_clock.clone())
            .direct()
            .unwrap();
        let gov_clock = FakeRelativeClock::default();
        let quota = governor::Quota::with_period(interval).unwrap().allow_burst(NonZeroU32::new(burst).unwrap());
        let gov = governor::RateLimiter::direct_with_clock(quota, gov_clock.clone());
        for (dt, cost) in events {
            let dt = Duration::from_micros(dt);
            ours_clock.advance(dt);
            gov_clock.advance(dt);
            let ours = ours.check_n(cost);
            let theirs = gov.check_n(NonZeroU32::new(cost).unwrap());
            match (ours, theirs) {
                (Err(Error::InsufficientCapacity { capacity, .. }), Err(governor::InsufficientCapacity(c))) => {
                    prop_assert_eq!(capacity, c);
                }
                (Ok(d), Ok(Ok(()))) => prop_assert!(d.allowed),
                (Ok(d), Ok(Err(not_until))) => {
                    prop_assert!(!d.allowed);
                    use governor::clock::Clock as _;
                    prop_assert_eq!(d.retry_after, not_until.wait_time_from(gov_clock.now()));
                }
                (ours, theirs) => prop_assert!(false, "ours {:?}, governor {:?}", ours, theirs),
            }
        }
    }
}

/// Waiters on a leaky queue get their slots in call order and sleep exactly until them.
#[cfg(feature = "tokio")]
#[tokio::test(start_paused = true)]
async fn until_ready_waits_in_fifo_order() {
    use sd_ratelimit::memory::TokioClock;
    let q = Quota::per_second(10).unwrap().with_burst(1).unwrap();
    let limiter = Arc::new(
        MemoryLimiterBuilder::new(Limit::leaky_queue(q, Duration::from_secs(10)).unwrap())
            .clock(TokioClock::default())
            .keyed::<String>()
            .unwrap(),
    );
    let start = tokio::time::Instant::now();
    let order = Arc::new(std::sync::Mutex::new(vec![]));
    let mut tasks = vec![];
    for i in 0..5 {
        let (limiter, order) = (limiter.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let d = limiter.until_ready("k", 1).await.unwrap();
            order.lock().unwrap().push((i, d.delay, start.elapsed()));
        }));
        // Let task i reserve its slot before task i + 1 starts.
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<_> = order.iter().map(|(i, _, _)| *i).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    for (i, delay, elapsed) in order {
        assert_eq!(delay, Duration::from_millis(100 * i as u64));
        assert_eq!(elapsed, delay);
    }
}
