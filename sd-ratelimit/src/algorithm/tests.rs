//! Unit and property tests of the algorithms.

use super::kernel::{Virtual, virtual_decide};
use super::*;

fn gcra(count: u32, per: Duration, burst: u32) -> Params {
    Limit::gcra(Quota::new(count, per).unwrap().with_burst(burst).unwrap())
        .params(1)
        .unwrap()
}

#[test]
fn quota_validation_names_the_field() {
    let field = |r: Result<Quota>| match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert_eq!(field(Quota::per_second(0)), "count");
    assert_eq!(field(Quota::new(1, Duration::ZERO)), "period");
    assert_eq!(field(Quota::new(1, Duration::MAX)), "period");
    assert_eq!(
        field(Quota::per_second(1).and_then(|q| q.with_burst(0))),
        "burst"
    );
    assert_eq!(
        field(
            Quota::per_hour(1)
                .and_then(|q| q.with_burst(u32::MAX))
                .and_then(|q| q.with_burst(u32::MAX))
        ),
        "burst"
    );
    let f = |r: Result<Limit>| match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    let second = Duration::from_secs(1);
    for (capacity, refill_amount, refill_interval, field) in [
        (0, 1, second, "capacity"),
        (1, 0, second, "refill_amount"),
        (1, 1, Duration::ZERO, "refill_interval"),
        // Ten tokens every 5 ns: more than one per microsecond.
        (10, 10, Duration::from_nanos(5), "refill_amount"),
    ] {
        let bucket = Limit::token_bucket()
            .capacity(capacity)
            .refill_amount(refill_amount)
            .refill_interval(refill_interval)
            .build();
        assert_eq!(f(bucket), field);
    }
    assert_eq!(f(Limit::sliding_window(0, Duration::from_secs(1))), "limit");
    assert_eq!(
        f(Limit::sliding_window(70_000, Duration::from_secs(1))),
        "limit"
    );
    assert_eq!(f(Limit::sliding_window(10, Duration::ZERO)), "window");
}

#[test]
fn gcra_admits_burst_then_one_per_interval() {
    let p = gcra(10, Duration::from_secs(1), 3);
    let mut s = 0;
    let now = 5_000_000_000;
    for i in 0..3 {
        let step = decide(&p, s, now, 1);
        assert!(step.allowed, "request {i}");
        assert_eq!(step.remaining, 2 - i);
        s = step.state.unwrap();
    }
    let denied = decide(&p, s, now, 1);
    assert!(!denied.allowed);
    assert_eq!(denied.retry_after, 100_000_000);
    assert_eq!(denied.reset_after, 300_000_000);
    assert!(decide(&p, s, now + 100_000_000, 1).allowed);
    assert!(!decide(&p, s, now + 99_999_999, 1).allowed);
}

#[test]
fn cost_over_capacity_never_fits() {
    let p = gcra(10, Duration::from_secs(1), 3);
    assert!(p.check_cost(3).is_ok());
    assert!(matches!(
        p.check_cost(4),
        Err(Error::InsufficientCapacity {
            cost: 4,
            capacity: 3
        })
    ));
}

#[test]
fn token_bucket_refills_in_steps() {
    let p = Limit::token_bucket()
        .capacity(5)
        .refill_amount(2)
        .refill_interval(Duration::from_secs(1))
        .build()
        .unwrap()
        .params(1)
        .unwrap();
    let mut s = 0;
    let t0 = 10_000_000_000;
    let step = decide(&p, s, t0, 5);
    assert!(step.allowed);
    s = step.state.unwrap();
    // Half a second later: still empty (refills come in whole steps).
    let d = decide(&p, s, t0 + 500_000_000, 1);
    assert!(!d.allowed);
    assert_eq!(d.retry_after, 500_000_000);
    let d = decide(&p, s, t0 + 1_000_000_000, 2);
    assert!(d.allowed);
    assert_eq!(d.remaining, 0);
    assert!(!decide(&p, s, t0 + 1_000_000_000, 3).allowed);
}

#[test]
fn leaky_queue_delays_in_fifo_order() {
    let q = Quota::per_second(10).unwrap().with_burst(1).unwrap();
    let p = Limit::leaky_queue(q, Duration::from_millis(250))
        .unwrap()
        .params(1)
        .unwrap();
    let mut s = 0;
    let mut delays = vec![];
    for _ in 0..4 {
        let step = decide(&p, s, 1_000_000_000, 1);
        if let Some(n) = step.state {
            s = n;
        }
        delays.push((step.allowed, step.delay / 1_000_000));
    }
    assert_eq!(
        delays,
        vec![(true, 0), (true, 100), (true, 200), (false, 0)]
    );
}

#[test]
fn sliding_window_weights_the_previous_window() {
    let p = Limit::sliding_window(10, Duration::from_secs(1))
        .unwrap()
        .params(1)
        .unwrap();
    let mut s = 0;
    for _ in 0..10 {
        let step = decide(&p, s, 5_000_000_000, 1);
        assert!(step.allowed);
        s = step.state.unwrap();
    }
    let d = decide(&p, s, 5_900_000_000, 1);
    assert!(!d.allowed);
    // Next window at 25% elapsed: prev weight 7.5, so 2 more fit, not 3.
    let mut s2 = s;
    let mut n = 0;
    while let Some(next) = decide(&p, s2, 6_250_000_000, 1).state {
        s2 = next;
        n += 1;
    }
    assert_eq!(n, 2);
    let d = decide(&p, s, 5_900_000_000, 1);
    let at = 5_900_000_000 + d.retry_after;
    assert!(decide(&p, s, at, 1).allowed);
    assert!(!decide(&p, s, at - 1, 1).allowed);
}

#[test]
fn refund_restores_capacity() {
    let p = gcra(1, Duration::from_secs(1), 2);
    let s = decide(&p, 0, 7, 2).state.unwrap();
    assert!(!decide(&p, s, 7, 1).allowed);
    let back = refund(&p, s, 7, 2);
    assert!(decide(&p, back, 7, 2).allowed);
    assert!(is_full(&p, back, 7));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Events: (time step, cost). Steps are in ns; a limit's interval is ms-sized.
    fn events(max_step: u64, max_cost: u32) -> impl Strategy<Value = Vec<(u64, u32)>> {
        prop::collection::vec((0..max_step, 0..=max_cost), 1..200)
    }

    /// Runs `events` through `p` from time `t0`, returning (time, cost, step) of each.
    fn run(p: &Params, t0: u64, events: &[(u64, u32)]) -> Vec<(u64, u32, Step)> {
        let mut state = 0;
        let mut now = t0;
        let mut out = vec![];
        for &(dt, cost) in events {
            now += dt;
            let step = if p.check_cost(cost).is_ok() {
                decide(p, state, now, cost)
            } else {
                continue;
            };
            if let Some(next) = step.state {
                state = next;
            }
            out.push((now, cost, step));
        }
        out
    }

    /// The most admitted cost over any window [a, b] of admitted requests.
    fn check_windows(log: &[(u64, u32, Step)], bound: impl Fn(u64, u64) -> u64) {
        let admitted: Vec<(u64, u64)> = log
            .iter()
            .filter(|(_, _, s)| s.allowed)
            .map(|(t, c, s)| (t + s.delay, u64::from(*c)))
            .collect();
        for i in 0..admitted.len() {
            let mut sum = 0;
            for j in i..admitted.len() {
                sum += admitted[j].1;
                let b = bound(admitted[i].0, admitted[j].0);
                assert!(
                    sum <= b,
                    "admitted {sum} in [{}, {}], bound {b}",
                    admitted[i].0,
                    admitted[j].0
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// GCRA equals an independent credit model (continuous token bucket in ns):
        /// same admissions, exact retry_after; windows stay within burst + rate * T.
        #[test]
        fn gcra_matches_credit_model(count in 1u32..20, period_ms in 1u64..3000, burst in 1u32..10,
                                     t0 in 0u64..1 << 50, evs in events(400_000_000, 11)) {
            let q = Quota::new(count, Duration::from_millis(period_ms)).unwrap().with_burst(burst).unwrap();
            let p = Limit::gcra(q).params(1).unwrap();
            let t = q.interval_ns;
            let cap = t * u64::from(burst);
            let log = run(&p, t0, &evs);
            let (mut credit, mut last) = (cap, t0);
            for &(now, cost, step) in &log {
                credit = (credit + (now - last)).min(cap);
                last = now;
                let need = u64::from(cost) * t;
                prop_assert_eq!(step.allowed, credit >= need, "at {} cost {}", now, cost);
                if step.allowed {
                    credit -= need;
                    prop_assert_eq!(step.remaining, credit / t);
                    prop_assert_eq!(step.reset_after, cap - credit);
                } else {
                    prop_assert_eq!(step.retry_after, need - credit);
                }
            }
            check_windows(&log, |a, b| u64::from(burst) + (b - a) / t);
        }

        /// The token bucket equals a plain bucket with discrete refills.
        #[test]
        fn token_bucket_matches_bucket_model(capacity in 1u32..20, amount in 1u32..5, interval_ms in 1u64..2000,
                                             t0 in 0u64..1 << 50, evs in events(300_000_000, 21)) {
            let interval = interval_ms * 1_000_000;
            let p = Limit::token_bucket().capacity(capacity).refill_amount(amount).refill_interval(Duration::from_nanos(interval)).build().unwrap().params(1).unwrap();
            let log = run(&p, t0, &evs);
            let (mut tokens, mut last_tick) = (u64::from(capacity), t0 / interval);
            for &(now, cost, step) in &log {
                let tick = now / interval;
                tokens = (tokens + (tick - last_tick) * u64::from(amount)).min(u64::from(capacity));
                last_tick = tick;
                prop_assert_eq!(step.allowed, tokens >= u64::from(cost));
                if step.allowed {
                    tokens -= u64::from(cost);
                    prop_assert_eq!(step.remaining, tokens);
                } else {
                    let missing = u64::from(cost) - tokens;
                    let ticks = missing.div_ceil(u64::from(amount));
                    prop_assert_eq!(step.retry_after, (tick + ticks) * interval - now);
                }
            }
            check_windows(&log, |a, b| u64::from(capacity) + (b / interval - a / interval) * u64::from(amount));
        }

        /// The sliding window equals the formula applied to a log of admissions, and
        /// never admits more than `limit` in one fixed window.
        #[test]
        fn sliding_window_matches_log_model(limit in 1u32..30, window_ms in 1u64..2000,
                                            t0 in 0u64..1 << 50, evs in events(200_000_000, 31)) {
            let w = window_ms * 1_000_000;
            let p = Limit::sliding_window(limit, Duration::from_nanos(w)).unwrap().params(1).unwrap();
            // Windows count in whole microseconds.
            let evs: Vec<(u64, u32)> = evs.iter().map(|&(dt, c)| (dt / 1000 * 1000, c)).collect();
            let log = run(&p, t0 / 1000 * 1000, &evs);
            let mut admitted: Vec<(u64, u64)> = vec![];
            for (i, &(now, cost, step)) in log.iter().enumerate() {
                let idx = now / w;
                let count = |i: u64| admitted.iter().filter(|(t, _)| t / w == i).map(|(_, c)| c).sum::<u64>();
                let (prev, cur) = (if idx > 0 { count(idx - 1) } else { 0 }, count(idx));
                let e = now % w;
                let fits = u128::from(prev) * u128::from(w - e) + u128::from(cur + u64::from(cost)) * u128::from(w)
                    <= u128::from(limit) * u128::from(w);
                prop_assert_eq!(step.allowed, fits);
                if step.allowed {
                    admitted.push((now, u64::from(cost)));
                } else {
                    // At retry_after it fits, one tick earlier it does not. The state
                    // is the one this step saw: only the steps before it, not later
                    // steps that share its timestamp.
                    let s = run_state(&p, &log[..i], now);
                    prop_assert!(decide(&p, s, now + step.retry_after, cost).allowed);
                    prop_assert!(!decide(&p, s, now + step.retry_after - 1, cost).allowed);
                }
            }
            check_windows(&log, |a, b| u64::from(limit) * (b / w - a / w + 1));
        }

        /// The GCRA fast path answers exactly as the general kernel, on any state and
        /// time (clock jumps and states far ahead included) and any cost that fits.
        #[test]
        fn gcra_fast_path_equals_the_kernel(unit in 1u64..1 << 40, burst in 1u64..1000,
                                            s in prop_oneof![0u64..1 << 45, any::<u64>()],
                                            now in prop_oneof![0u64..1 << 45, any::<u64>()],
                                            cost in 0u32..1000) {
            let cost = cost.min(u32::try_from(burst).unwrap());
            let cap = unit * burst;
            prop_assert_eq!(
                gcra_decide(unit, cap, burst, s, now, cost),
                virtual_decide(
                    &Virtual { tick: 1, per_tick: 1, unit, cap, burst, max_wait: None },
                    s,
                    now,
                    cost
                )
            );
        }

        /// A clock that jumps backwards hands out nothing: what is denied at `t` is
        /// denied at any earlier time, and fewer remain.
        #[test]
        fn backwards_clock_gives_nothing(which in 0usize..4, t0 in 1_000_000_000u64..1 << 50,
                                         evs in events(100_000_000, 3), back in 0u64..5_000_000_000) {
            let q = Quota::new(5, Duration::from_secs(1)).unwrap();
            let limits = [
                Limit::gcra(q),
                Limit::token_bucket().capacity(5).refill_amount(1).refill_interval(Duration::from_millis(200)).build().unwrap(),
                Limit::sliding_window(5, Duration::from_secs(1)).unwrap(),
                Limit::leaky_queue(q, Duration::from_millis(300)).unwrap(),
            ];
            let p = limits[which].params(1).unwrap();
            let log = run(&p, t0, &evs);
            let (now, _, _) = log.last().copied().unwrap_or((t0, 0, decide(&p, 0, t0, 0)));
            let s = run_state(&p, &log, u64::MAX);
            let earlier = now.saturating_sub(back);
            for cost in 1..=3 {
                let later = decide(&p, s, now, cost);
                let before = decide(&p, s, earlier, cost);
                prop_assert!(later.allowed || !before.allowed);
                prop_assert!(decide(&p, s, earlier, 0).remaining <= decide(&p, s, now, 0).remaining);
                prop_assert!(before.delay >= later.delay || !later.allowed || !before.allowed);
            }
        }
    }

    /// The state after every logged step up to `until`.
    fn run_state(_p: &Params, log: &[(u64, u32, Step)], until: u64) -> u64 {
        let mut state = 0;
        for (t, _, step) in log {
            if *t <= until
                && let Some(n) = step.state
            {
                state = n;
            }
        }
        state
    }
}
