//! Injected time and randomness, so tests drive the cache without sleeping.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonic clock. `now` is the time since an arbitrary origin fixed when the clock was
/// created; only differences matter.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time since the clock's origin.
    fn now(&self) -> Duration;
}

/// The default clock: `quanta` (TSC where available), a few nanoseconds a read.
#[derive(Debug, Clone)]
pub struct SystemClock {
    clock: quanta::Clock,
    origin: quanta::Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let origin = clock.now();
        Self { clock, origin }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Duration {
        self.clock.now().saturating_duration_since(self.origin)
    }
}

/// A clock that follows tokio's time, so `tokio::time::pause()` and `advance()` drive it.
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is tokio's now.
    pub fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.origin)
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(saturating_nanos(by), Ordering::SeqCst);
    }

    /// Sets the clock to `to` (it may move backwards: a test of clock jumps).
    pub fn set(&self, to: Duration) {
        self.nanos.store(saturating_nanos(to), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
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

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        assert_eq!(c.now(), Duration::ZERO);
        c.advance(Duration::from_millis(5));
        assert_eq!(c.clone().now(), Duration::from_millis(5));
    }
}
