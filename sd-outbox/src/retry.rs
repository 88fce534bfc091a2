//! Retry delays: exponential with a cap and jitter, pure so it can be tested.

use std::time::Duration;

use crate::error::{Error, Result};

/// Exponential backoff: `initial × 2^(attempt-1)`, capped at `max`, then scaled by a
/// jitter factor in `[0.5, 1.0]` so relays that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure (before jitter).
    pub initial: Duration,
    /// The longest delay (before jitter).
    pub max: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 30 s.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before retrying after `attempt` failures (`attempt` >= 1), with
    /// `jitter` in `[0, 1]` picking a point in the upper half of the window.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let base = self
            .initial
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// [`Self::delay`] with a random jitter.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

/// Checks the options every relay shares, in this order: `batch_size` (1 to 10,000),
/// `poll_interval`, `max_attempts`, `backoff`; the error names the first field at fault.
pub(crate) fn check_relay_options(
    batch_size: usize,
    poll_interval: Duration,
    max_attempts: u32,
    backoff: Backoff,
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
    if backoff.initial.is_zero() || backoff.max < backoff.initial {
        return Err(Error::config(
            "backoff",
            "initial must be longer than zero and max at least initial",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delay_stays_in_its_window(
            initial_ms in 1u64..10_000,
            max_ms in 1u64..600_000,
            attempt in 1u32..200,
            jitter in 0.0f64..=1.0,
        ) {
            let b = Backoff { initial: Duration::from_millis(initial_ms), max: Duration::from_millis(max_ms.max(initial_ms)) };
            let d = b.delay(attempt, jitter);
            prop_assert!(d <= b.max);
            prop_assert!(d >= b.initial.min(b.max) / 2);
            // Never shorter than half the previous attempt's longest delay: it grows.
            let prev_max = b.delay(attempt.saturating_sub(1).max(1), 1.0);
            prop_assert!(d * 2 >= prev_max.min(b.max) || attempt == 1);
        }
    }

    #[test]
    fn doubles_then_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(b.delay(4, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(5, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(500, 0.0), Duration::from_millis(500));
    }
}
