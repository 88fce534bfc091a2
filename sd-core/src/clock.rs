//! One clock trait and the clocks the crates use, each named for what it is.
//!
//! [`Clock::now`] returns a [`Duration`] since the clock's origin. What the origin is
//! depends on the clock, and the name says it:
//!
//! | clock | origin | goes back? | use it for |
//! |---|---|---|---|
//! | [`MonotonicClock`] | when it was made | never | rates, intervals, TTLs inside one process |
//! | [`SystemClock`] | the Unix epoch | when the wall clock is stepped | timestamps written where other processes read them |
//! | [`TokioClock`] | when it was made | never; follows `tokio::time::pause` | code tested with paused tokio time |
//! | [`ManualClock`] | zero, or where you start it | only when you set it back | tests: time moves when the test says |
//!
//! A crate that needs wall time says so on the type that takes the clock; everywhere
//! else, a [`MonotonicClock`] is the default.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of time: the [`Duration`] since the clock's origin (see the
/// [module docs](self) for each clock's origin).
pub trait Clock: Send + Sync + Debug + 'static {
    /// The time since the clock's origin.
    fn now(&self) -> Duration;

    /// [`now`](Self::now) in whole nanoseconds, saturating after 584 years. Clocks that
    /// count nanoseconds answer without building a [`Duration`], for hot paths that
    /// compute in integer time (a rate limiter's decision).
    #[inline]
    fn now_nanos(&self) -> u64 {
        to_nanos(self.now())
    }
}

/// A clock behind a smart pointer reads the clock it points to.
macro_rules! forward_clock {
    ($($ptr:ident),+) => {$(
        impl<C: Clock + ?Sized> Clock for $ptr<C> {
            #[inline]
            fn now(&self) -> Duration {
                (**self).now()
            }

            #[inline]
            fn now_nanos(&self) -> u64 {
                (**self).now_nanos()
            }
        }
    )+};
}

forward_clock!(Arc, Box);

/// The monotonic clock: time since it was made, read from the CPU's counter (TSC where
/// available, through `quanta`) in a few nanoseconds. Never goes back.
#[derive(Debug, Clone)]
pub struct MonotonicClock {
    clock: quanta::Clock,
    /// The counter's raw reading at the origin.
    origin: u64,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let origin = clock.raw();
        MonotonicClock { clock, origin }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    #[inline]
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }

    /// The raw counter's delta since the origin, scaled to nanoseconds: no `Duration` on
    /// the way.
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.clock.delta_as_nanos(self.origin, self.clock.raw())
    }
}

/// The wall clock: time since the Unix epoch, from [`SystemTime`]. It is not
/// monotonic: it goes back when the system clock is stepped. A time before the epoch
/// reads as zero.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A monotonic clock on tokio's time: it stands still under `tokio::time::pause` and
/// moves with `tokio::time::advance`, so code that both sleeps and reads this clock
/// can be tested without waiting.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose origin is now (tokio's now: paused time if paused).
    pub fn new() -> Self {
        TokioClock {
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

/// A clock for tests: it reads what the test set, and its clones share one time.
///
/// ```
/// use std::time::Duration;
/// use sd_core::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let seen_by_the_code = clock.clone();
/// clock.advance(Duration::from_millis(1500));
/// assert_eq!(seen_by_the_code.now(), Duration::from_millis(1500));
/// clock.set(Duration::from_secs(1));
/// assert_eq!(seen_by_the_code.now(), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock at `start` (for code that reads a wall clock, a time after the epoch such
    /// as `Duration::from_secs(1_700_000_000)`).
    pub fn starting_at(start: Duration) -> Self {
        let clock = Self::new();
        clock.set(start);
        clock
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(to_nanos(by), Ordering::SeqCst);
    }

    /// Sets the clock to `to`, forward or back.
    pub fn set(&self, to: Duration) {
        self.nanos.store(to_nanos(to), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }

    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::SeqCst)
    }
}

/// Nanoseconds in a `u64` (584 years), saturating.
fn to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_back() {
        let clock = MonotonicClock::new();
        let mut last = clock.now();
        let mut last_nanos = clock.now_nanos();
        for _ in 0..10_000 {
            let now = clock.now();
            let nanos = clock.now_nanos();
            assert!(now >= last && nanos >= last_nanos);
            // Read in this order, the nanoseconds are never behind the Duration.
            assert!(u128::from(nanos) >= now.as_nanos());
            (last, last_nanos) = (now, nanos);
        }
    }

    #[test]
    fn system_clock_reads_the_epoch() {
        let now = SystemClock.now();
        // Later than 2020-01-01 and earlier than 2200.
        assert!(now > Duration::from_secs(1_577_836_800));
        assert!(now < Duration::from_secs(7_258_118_400));
    }

    #[test]
    fn manual_clock_clones_share_time_and_start_where_told() {
        let clock = ManualClock::starting_at(Duration::from_secs(1000));
        let other = clock.clone();
        other.advance(Duration::from_nanos(7));
        assert_eq!(
            clock.now(),
            Duration::from_secs(1000) + Duration::from_nanos(7)
        );
        assert_eq!(ManualClock::new().now(), Duration::ZERO);
        assert_eq!(ManualClock::default().now(), Duration::ZERO);
        clock.set(Duration::MAX);
        assert_eq!(other.now(), Duration::from_nanos(u64::MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(clock.now(), Duration::from_secs(5));
        let shared: Arc<dyn Clock> = Arc::new(clock);
        assert_eq!(shared.now(), Duration::from_secs(5));
    }
}
