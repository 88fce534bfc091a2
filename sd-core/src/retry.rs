//! Retry policies: exponential backoff with jitter and a bound on attempts, the one
//! policy every crate's retries use (a saga step, a relay's publish, a lock attempt).
//!
//! The wait after failed attempt `n` (1-based) is
//! `min(initial × multiplier^(n-1), max_interval) × (1 - jitter × u)` with `u` drawn
//! uniformly from `[0, 1)`. `jitter` 0 waits exactly; 1 is "full jitter" (a uniform draw
//! below the ceiling); 0.5 waits between half and all of it. Jitter keeps many clients
//! that failed together from retrying together.
//!
//! The defaults are Temporal's: the first retry waits 1 s, each later one twice the one
//! before, capped at 100 times the first, shortened by up to 20 %, three attempts in
//! all. Each crate states the policy it uses where it takes one.

use std::num::NonZeroU32;
use std::time::Duration;

use crate::error::ConfigError;

/// How an operation is retried; build one with [`RetryPolicy::builder`].
///
/// ```
/// use std::time::Duration;
/// use sd_core::RetryPolicy;
///
/// let policy = RetryPolicy::builder()
///     .initial_interval(Duration::from_millis(100))
///     .max_attempts(5)
///     .jitter(0.0)
///     .build()?;
/// assert_eq!(policy.delay(1, 0.5), Duration::from_millis(100));
/// assert_eq!(policy.delay(3, 0.5), Duration::from_millis(400));
/// assert_eq!(policy.delay(20, 0.5), Duration::from_secs(10)); // capped at 100x
/// assert!(policy.allows_retry_after(4));
/// assert!(!policy.allows_retry_after(5));
/// # Ok::<(), sd_core::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    initial: Duration,
    multiplier: f64,
    max_interval: Duration,
    max_attempts: Option<NonZeroU32>,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// 1 s, ×2, capped at 100 s, 20 % jitter, at most 3 attempts.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(100),
            max_attempts: NonZeroU32::new(3),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A builder starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder::default()
    }

    /// Like [`Default`] but 10 attempts (about 5 minutes of waiting in all): for work
    /// that must finish, such as a saga's compensations.
    pub fn persistent() -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::new(10),
            ..RetryPolicy::default()
        }
    }

    /// One attempt, no retry.
    pub fn no_retry() -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::new(1),
            ..RetryPolicy::default()
        }
    }

    /// The wait before the first retry.
    pub fn initial_interval(&self) -> Duration {
        self.initial
    }

    /// The factor between successive waits.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The longest wait.
    pub fn max_interval(&self) -> Duration {
        self.max_interval
    }

    /// The most attempts, `None` for unlimited.
    pub fn max_attempts(&self) -> Option<NonZeroU32> {
        self.max_attempts
    }

    /// The fraction (0 to 1) by which jitter may shorten a wait.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// True when another attempt may follow attempt number `attempt` (1-based) that failed.
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max.get())
    }

    /// The wait after failed attempt number `attempt` (1-based), with `unit` a random
    /// number in `[0, 1)` that picks the jitter: `min(initial × multiplier^(attempt-1),
    /// max_interval) × (1 - jitter × unit)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = if base.is_finite() {
            base.min(self.max_interval.as_secs_f64())
        } else {
            self.max_interval.as_secs_f64()
        };
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Duration::from_secs_f64(capped * (1.0 - self.jitter * unit))
    }

    /// [`delay`](Self::delay) with a random jitter.
    pub fn random_delay(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

/// Builds a [`RetryPolicy`]; [`build`](Self::build) checks every field.
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    initial: Duration,
    multiplier: f64,
    max_interval: Option<Duration>,
    max_attempts: Option<u32>,
    jitter: f64,
}

impl Default for RetryPolicyBuilder {
    fn default() -> Self {
        RetryPolicyBuilder {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: None,
            max_attempts: Some(3),
            jitter: 0.2,
        }
    }
}

impl RetryPolicyBuilder {
    /// The wait before the first retry (default 1 s); must be above zero.
    pub fn initial_interval(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }

    /// The factor between successive waits (default 2.0); at least 1.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// The longest wait (default 100 × `initial_interval`); at least `initial_interval`.
    pub fn max_interval(mut self, max: Duration) -> Self {
        self.max_interval = Some(max);
        self
    }

    /// The most attempts, the first included (default 3); at least 1.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// No bound on attempts: the step is retried until it succeeds or fails with a
    /// non-retryable error.
    pub fn unlimited_attempts(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// The fraction by which jitter may shorten a wait (default 0.2); 0 to 1.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The policy, or a [`ConfigError`] naming the first field out of range.
    pub fn build(self) -> Result<RetryPolicy, ConfigError> {
        if self.initial.is_zero() {
            return Err(ConfigError::new("initial_interval", "must be above zero"));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(ConfigError::new(
                "multiplier",
                format!("{} must be a finite number of at least 1", self.multiplier),
            ));
        }
        let max_interval = match self.max_interval {
            Some(max) if max < self.initial => {
                return Err(ConfigError::new(
                    "max_interval",
                    format!(
                        "{max:?} is shorter than `initial_interval` {:?}",
                        self.initial
                    ),
                ));
            }
            Some(max) => max,
            None => self.initial.saturating_mul(100),
        };
        let max_attempts = match self.max_attempts {
            None => None,
            Some(n) => Some(NonZeroU32::new(n).ok_or_else(|| {
                ConfigError::new(
                    "max_attempts",
                    "must be at least 1 (use `unlimited_attempts` for no bound)",
                )
            })?),
        };
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::new(
                "jitter",
                format!("{} must be between 0 and 1", self.jitter),
            ));
        }
        Ok(RetryPolicy {
            initial: self.initial,
            multiplier: self.multiplier,
            max_interval,
            max_attempts,
            jitter: self.jitter,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_are_temporals() {
        let p = RetryPolicy::default();
        assert_eq!(p.initial_interval(), Duration::from_secs(1));
        assert_eq!(p.multiplier(), 2.0);
        assert_eq!(p.max_interval(), Duration::from_secs(100));
        assert_eq!(p.delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(p.delay(2, 0.0), Duration::from_secs(2));
        assert_eq!(p.delay(8, 0.0), Duration::from_secs(100));
        assert_eq!(p.delay(u32::MAX, 0.0), Duration::from_secs(100));
        assert!(p.allows_retry_after(2) && !p.allows_retry_after(3));
        assert_eq!(RetryPolicy::builder().build().unwrap(), p);
    }

    #[test]
    fn invalid_fields_are_named() {
        let field = |b: RetryPolicyBuilder| match b.build() {
            Err(ConfigError { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let b = RetryPolicy::builder;
        assert_eq!(
            field(b().initial_interval(Duration::ZERO)),
            "initial_interval"
        );
        assert_eq!(field(b().multiplier(0.5)), "multiplier");
        assert_eq!(field(b().multiplier(f64::NAN)), "multiplier");
        assert_eq!(
            field(b().max_interval(Duration::from_millis(10))),
            "max_interval"
        );
        assert_eq!(field(b().max_attempts(0)), "max_attempts");
        assert_eq!(field(b().jitter(1.5)), "jitter");
        assert!(
            b().unlimited_attempts()
                .build()
                .unwrap()
                .allows_retry_after(u32::MAX)
        );
    }

    proptest! {
        #[test]
        fn delays_grow_and_stay_within_bounds(
            initial_ms in 1u64..5_000,
            multiplier in 1.0f64..4.0,
            cap in 1u64..200,
            jitter in 0.0f64..=1.0,
            attempt in 1u32..100,
            unit in 0.0f64..1.0,
        ) {
            let p = RetryPolicy::builder()
                .initial_interval(Duration::from_millis(initial_ms))
                .multiplier(multiplier)
                .max_interval(Duration::from_millis(initial_ms * cap))
                .jitter(jitter)
                .build()
                .unwrap();
            let d = p.delay(attempt, unit);
            let full = p.delay(attempt, 0.0);
            prop_assert!(d <= full);
            prop_assert!(full <= p.max_interval());
            prop_assert!(d.as_secs_f64() >= full.as_secs_f64() * (1.0 - jitter) - 1e-9);
            prop_assert!(p.delay(attempt + 1, 0.0) >= full);
        }
    }
}
