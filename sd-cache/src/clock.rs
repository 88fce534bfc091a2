//! Injected time and randomness, so tests drive the cache without sleeping.
//!
//! The clocks are sd-core's, re-exported: the memory tier reads a [`MonotonicClock`] by
//! default; tests pass a [`ManualClock`] or a [`TokioClock`] (which follows
//! `tokio::time::pause`).

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use sd_core::clock::{Clock, ManualClock, MonotonicClock, TokioClock};

/// A cache's clock: the default [`MonotonicClock`] read directly (no virtual call on the
/// hit path), or any injected [`Clock`].
#[derive(Debug, Clone)]
pub(crate) enum CacheClock {
    Monotonic(MonotonicClock),
    Injected(std::sync::Arc<dyn Clock>),
}

impl CacheClock {
    /// `clock`, read directly when it is a [`MonotonicClock`].
    pub(crate) fn new<C: Clock>(clock: C) -> Self {
        match (&clock as &dyn std::any::Any).downcast_ref::<MonotonicClock>() {
            Some(monotonic) => CacheClock::Monotonic(monotonic.clone()),
            None => CacheClock::Injected(std::sync::Arc::new(clock)),
        }
    }

    #[inline]
    pub(crate) fn now_nanos(&self) -> u64 {
        match self {
            CacheClock::Monotonic(c) => c.now_nanos(),
            CacheClock::Injected(c) => c.now_nanos(),
        }
    }

    #[inline]
    pub(crate) fn now(&self) -> Duration {
        match self {
            CacheClock::Monotonic(c) => c.now(),
            CacheClock::Injected(c) => c.now(),
        }
    }
}

pub(crate) fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A source of uniform random numbers in `(0, 1]`, used by XFetch and TTL jitter.
pub trait RandomSource: Send + Sync + Debug + 'static {
    /// A uniform draw in `(0, 1]` with at least 2⁻⁵³ resolution (never 0).
    fn unit(&self) -> f64;
}

/// The default random source: the thread-local generator of `rand`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadRandom;

impl RandomSource for ThreadRandom {
    fn unit(&self) -> f64 {
        // `random::<f64>()` is uniform in [0, 1) on a 2^-53 grid; 1 - x is in (0, 1].
        1.0 - rand::random::<f64>()
    }
}

/// A seeded, reproducible random source (SplitMix64), for tests and statistical checks.
#[derive(Debug, Default)]
pub struct SeededRandom {
    state: AtomicU64,
}

impl SeededRandom {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }
}

impl RandomSource for SeededRandom {
    fn unit(&self) -> f64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Top 53 bits, shifted into (0, 1].
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// A random source that always returns the same value (clamped into `(0, 1]`).
#[derive(Debug, Clone, Copy)]
pub struct FixedRandom(pub f64);

impl RandomSource for FixedRandom {
    fn unit(&self) -> f64 {
        crate::xfetch::clamp_unit(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_random_stays_in_the_unit_interval() {
        let r = SeededRandom::new(7);
        for _ in 0..100_000 {
            let u = r.unit();
            assert!(u > 0.0 && u <= 1.0, "{u}");
        }
    }
}
