//! The relays' retry policy ([`sd_core::RetryPolicy`]) and the options every relay shares.

use std::time::Duration;

use sd_core::RetryPolicy;

use crate::error::{Error, Result};

/// The relays' default policy: 100 ms doubling to 30 s, each wait a random point in the
/// upper half of its window (jitter 0.5), no bound of its own on attempts (the relay's
/// `max_attempts` dead-letters).
pub(crate) fn default_retry() -> RetryPolicy {
    // Every field is in range, so `build` cannot refuse; the fallback is never taken.
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(100))
        .multiplier(2.0)
        .max_interval(Duration::from_secs(30))
        .jitter(0.5)
        .unlimited_attempts()
        .build()
        .unwrap_or_default()
}

/// Failed attempts after which an event is dead-lettered: the relay's `max_attempts`,
/// or the policy's own bound if that is lower.
pub(crate) fn attempts_limit(max_attempts: u32, retry: &RetryPolicy) -> u32 {
    retry
        .max_attempts()
        .map_or(max_attempts, |n| n.get().min(max_attempts))
}

/// Checks the options every relay shares, in this order: `batch_size` (1 to 10,000),
/// `poll_interval`, `max_attempts`; the error names the first field at fault.
pub(crate) fn check_relay_options(
    batch_size: usize,
    poll_interval: Duration,
    max_attempts: u32,
) -> Result<()> {
    if !(1..=10_000).contains(&batch_size) {
        return Err(Error::config("batch_size", "must be 1 to 10,000"));
    }
    if poll_interval.is_zero() {
        return Err(Error::config("poll_interval", "must be longer than zero"));
    }
    if max_attempts == 0 {
        return Err(Error::config("max_attempts", "must be at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delay_stays_in_the_upper_half_of_its_window(
            attempt in 1u32..200,
            unit in 0.0f64..1.0,
        ) {
            let p = default_retry();
            let d = p.delay(attempt, unit);
            let full = p.delay(attempt, 0.0);
            prop_assert!(d <= full && full <= Duration::from_secs(30));
            prop_assert!(d.as_secs_f64() >= full.as_secs_f64() / 2.0 - 1e-9);
            prop_assert!(d >= Duration::from_millis(50));
        }
    }

    #[test]
    fn doubles_from_100_ms_then_caps_at_30_s_without_a_bound() {
        let p = default_retry();
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(p.delay(4, 0.0), Duration::from_millis(800));
        assert_eq!(p.delay(500, 0.0), Duration::from_secs(30));
        assert_eq!(p.delay(500, 1.0), Duration::from_secs(15));
        assert!(p.allows_retry_after(u32::MAX - 1));
        assert_eq!(attempts_limit(10, &p), 10);
        assert_eq!(attempts_limit(10, &RetryPolicy::default()), 3);
    }
}
