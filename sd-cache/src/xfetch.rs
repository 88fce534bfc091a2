//! XFetch: optimal probabilistic early expiration (Vattani, Chierichetti, Lowenstein,
//! "Optimal Probabilistic Cache Stampede Prevention", PVLDB 8(8), 2015).
//!
//! Each entry stores its value, `delta` (how long the last load took) and its `expiry`.
//! A read at `now` refreshes early when
//!
//! ```text
//! now - delta * beta * ln(u) >= expiry        u uniform in (0, 1]
//! ```
//!
//! `-ln(u)` is exponential with mean 1, so the gap before expiry at which a read fires is
//! exponential with mean `delta * beta`: slow loads refresh earlier, and with many readers
//! exactly one of them usually refreshes, shortly before the expiry. `beta = 1` is the
//! paper's default; above 1 refreshes earlier, below 1 later.
//!
//! Everything here is pure: time and the random draw are arguments.

use std::time::Duration;

/// The paper's default `beta`.
pub const DEFAULT_BETA: f64 = 1.0;

/// The largest value `-ln(u)` can take for a draw `u >= 2^-53` (= 53 ln 2 ≈ 36.74).
///
/// A read more than `delta * beta * MAX_EXPONENTIAL` before expiry can never fire, so the
/// hit path skips the random draw entirely until [`refresh_window_start`].
pub const MAX_EXPONENTIAL: f64 = 36.736_800_569_677_1;

/// Clamps a draw into `(0, 1]`, mapping NaN and non-positive values to 2⁻⁵³.
pub fn clamp_unit(u: f64) -> f64 {
    const MIN: f64 = 1.0 / (1u64 << 53) as f64;
    if u.is_nan() || u < MIN {
        MIN
    } else if u > 1.0 {
        1.0
    } else {
        u
    }
}

/// Whether a read at `now` refreshes early, for the uniform draw `u` in `(0, 1]`.
///
/// Always true at or after `expiry`. With `delta == 0` it is true only at or after expiry.
/// `u` outside `(0, 1]` is clamped; `beta` is assumed positive and finite (the builders
/// check it).
pub fn should_refresh(now: Duration, expiry: Duration, delta: Duration, beta: f64, u: f64) -> bool {
    if now >= expiry {
        return true;
    }
    let gap = (expiry - now).as_secs_f64();
    let reach = delta.as_secs_f64() * beta * -clamp_unit(u).ln();
    reach >= gap
}

/// The probability that one read at `now` refreshes early: `exp(-(expiry - now) / (delta * beta))`,
/// and 1 at or after expiry.
pub fn refresh_probability(now: Duration, expiry: Duration, delta: Duration, beta: f64) -> f64 {
    if now >= expiry {
        return 1.0;
    }
    let scale = delta.as_secs_f64() * beta;
    if scale <= 0.0 {
        return 0.0;
    }
    (-(expiry - now).as_secs_f64() / scale).exp()
}

/// The earliest time at which [`should_refresh`] can return true for any draw `u >= 2^-53`:
/// `expiry - delta * beta * MAX_EXPONENTIAL` (saturating at zero).
pub fn refresh_window_start(expiry: Duration, delta: Duration, beta: f64) -> Duration {
    let reach = delta.as_secs_f64() * beta * MAX_EXPONENTIAL;
    // Keep a nanosecond of margin for float rounding.
    let reach = Duration::try_from_secs_f64(reach).unwrap_or(Duration::MAX);
    expiry
        .saturating_sub(reach)
        .saturating_sub(Duration::from_nanos(1))
}

/// Checks `beta` for the builders.
pub(crate) fn check_beta(beta: f64) -> crate::Result<()> {
    if beta.is_finite() && beta > 0.0 && beta <= 1_000.0 {
        Ok(())
    } else {
        Err(crate::Error::InvalidConfig {
            field: "beta",
            reason: "must be finite, above 0 and at most 1000; use 1.0 (the paper's default)"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{RandomSource, SeededRandom};
    use proptest::prelude::*;

    const MIN_U: f64 = 1.0 / (1u64 << 53) as f64;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn fires_at_and_after_expiry_for_every_draw() {
        for u in [MIN_U, 0.001, 0.5, 1.0] {
            assert!(should_refresh(ms(100), ms(100), ms(10), 1.0, u));
            assert!(should_refresh(ms(101), ms(100), ms(0), 1.0, u));
        }
    }

    #[test]
    fn zero_delta_never_fires_early() {
        assert!(!should_refresh(ms(99), ms(100), ms(0), 1.0, MIN_U));
        assert_eq!(refresh_probability(ms(99), ms(100), ms(0), 1.0), 0.0);
    }

    #[test]
    fn bad_beta_is_rejected_with_the_field() {
        for b in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = check_beta(b).unwrap_err();
            assert!(err.to_string().contains("`beta`"), "{err}");
        }
        assert!(check_beta(1.0).is_ok());
    }

    /// With a fixed clock and a seeded random source, the fraction of reads that fire
    /// matches the probability the formula gives, within 5 standard deviations.
    #[test]
    fn early_refresh_fires_with_the_formula_probability() {
        let rng = SeededRandom::new(0x5eed);
        let expiry = ms(1_000);
        let delta = ms(50);
        for (now_ms, beta) in [
            (900, 1.0),
            (950, 1.0),
            (980, 1.0),
            (990, 2.0),
            (999, 0.5),
            (850, 1.0),
        ] {
            let now = ms(now_ms);
            let p = refresh_probability(now, expiry, delta, beta);
            let n = 200_000u32;
            let fired = (0..n)
                .filter(|_| should_refresh(now, expiry, delta, beta, rng.unit()))
                .count() as f64;
            let observed = fired / f64::from(n);
            let sigma = (p * (1.0 - p) / f64::from(n)).sqrt();
            assert!(
                (observed - p).abs() <= 5.0 * sigma + 1e-9,
                "now={now_ms} beta={beta}: p={p} observed={observed}"
            );
        }
    }

    proptest! {
        #[test]
        fn firing_is_monotonic_in_time(
            now in 0u64..10_000, later in 0u64..10_000, expiry in 0u64..10_000,
            delta in 0u64..5_000, beta in 0.01f64..10.0, u in 0.0f64..=1.0,
        ) {
            let (a, b) = (now.min(later), now.max(later));
            if should_refresh(ms(a), ms(expiry), ms(delta), beta, u) {
                prop_assert!(should_refresh(ms(b), ms(expiry), ms(delta), beta, u));
            }
        }

        #[test]
        fn firing_is_monotonic_in_the_draw(
            now in 0u64..10_000, expiry in 0u64..10_000, delta in 0u64..5_000,
            beta in 0.01f64..10.0, u in 0.0f64..=1.0, v in 0.0f64..=1.0,
        ) {
            // A smaller draw reaches further, so it fires whenever a larger one does.
            let (small, large) = (u.min(v), u.max(v));
            if should_refresh(ms(now), ms(expiry), ms(delta), beta, large) {
                prop_assert!(should_refresh(ms(now), ms(expiry), ms(delta), beta, small));
            }
        }

        #[test]
        fn nothing_fires_before_the_window(
            now in 0u64..100_000, expiry in 0u64..100_000, delta in 0u64..1_000,
            beta in 0.01f64..10.0, u in 0.0f64..=1.0,
        ) {
            let start = refresh_window_start(ms(expiry), ms(delta), beta);
            if ms(now) < start {
                prop_assert!(!should_refresh(ms(now), ms(expiry), ms(delta), beta, u));
            }
        }

        #[test]
        fn the_probability_is_the_measure_of_firing_draws(
            now in 0u64..1_000, expiry in 1u64..1_000, delta in 1u64..500, beta in 0.1f64..4.0,
        ) {
            // u fires iff u <= p, so draws just below and above p bracket the threshold.
            let p = refresh_probability(ms(now), ms(expiry), ms(delta), beta);
            prop_assert!((0.0..=1.0).contains(&p));
            if p > 1e-12 && p < 1.0 - 1e-9 {
                prop_assert!(should_refresh(ms(now), ms(expiry), ms(delta), beta, p * (1.0 - 1e-9)));
                prop_assert!(!should_refresh(ms(now), ms(expiry), ms(delta), beta, (p * (1.0 + 1e-9)).min(1.0)));
            }
        }

        #[test]
        fn no_input_panics(now: u64, expiry: u64, delta: u64, beta in proptest::num::f64::ANY, u in proptest::num::f64::ANY) {
            let _ = should_refresh(Duration::from_nanos(now), Duration::from_nanos(expiry), Duration::from_nanos(delta), beta, u);
            let _ = refresh_probability(Duration::from_nanos(now), Duration::from_nanos(expiry), Duration::from_nanos(delta), beta);
            let _ = refresh_window_start(Duration::from_nanos(expiry), Duration::from_nanos(delta), beta);
        }
    }
}
