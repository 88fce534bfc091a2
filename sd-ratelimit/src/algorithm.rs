//! The algorithms, pure and synchronous, on integer time.
//!
//! Every algorithm keeps the state of one key in a single `u64`, so the memory backend
//! updates it with one compare-and-swap and the Redis backend stores one integer. The
//! state `0` is a fresh key.
//!
//! Time is an integer count of *ticks* since an origin: nanoseconds in memory,
//! microseconds in Redis (Lua numbers are doubles, exact only below 2^53).
//! `Limit::params` turns a limit into tick units once; `decide` is then
//! pure integer arithmetic, the same in Rust and in the Lua port.
//!
//! # GCRA, token bucket and leaky bucket share one kernel
//!
//! The *virtual-scheduling* kernel keeps `s`, the virtual time at which the key is back
//! to full. The virtual clock reads `x(now) = floor(now / tick) * per_tick`. A request
//! of cost `n` moves `s' = max(s, x) + n * unit` and is admitted when `s' - x <= cap`.
//!
//! - GCRA: `tick = per_tick = 1`, `unit = T` (emission interval), `cap = burst * T`:
//!   `s` is the theoretical arrival time.
//! - Token bucket that adds `k` tokens every `I`: `tick = I`, `per_tick = k`, `unit = 1`,
//!   `cap = capacity`: `s - x` is the number of tokens missing from the bucket.
//! - Leaky bucket as a meter is GCRA (the same virtual scheduling, as in ITU-T I.371);
//!   as a queue it admits a request that does not fit *after a delay*, as long as the
//!   delay stays under `max_delay`, and the state reserves its slot (FIFO per key).
//!
//! The sliding-window counter (Cloudflare's two-counter approximation) packs
//! `[window index: 32 bits | previous count: 16 | current count: 16]`.

use std::time::Duration;

use crate::error::{Error, Result};

/// How many requests per period, and how many at once.
///
/// A quota is a rate (`count` per `period`) and a `burst` (the most admitted at one
/// instant; `count` unless changed with [`Quota::with_burst`]). The emission interval
/// is `period / count`, rounded up to a whole nanosecond so that rounding never admits
/// more than the quota.
///
/// ```
/// use std::time::Duration;
/// use sd_ratelimit::Quota;
///
/// let q = Quota::per_second(10)?.with_burst(20)?;
/// assert_eq!(q.interval(), Duration::from_millis(100));
/// assert_eq!(q.burst(), 20);
/// assert!(Quota::per_second(0).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    interval_ns: u64,
    burst: u32,
}

impl Quota {
    /// `count` requests per `period`, with a burst of `count`.
    pub fn new(count: u32, period: Duration) -> Result<Self> {
        if count == 0 {
            return Err(Error::config("count", "must be at least 1"));
        }
        let period_ns = u64::try_from(period.as_nanos())
            .map_err(|_| Error::config("period", "must be under 584 years"))?;
        if period_ns == 0 {
            return Err(Error::config("period", "must be longer than zero"));
        }
        let interval_ns = period_ns.div_ceil(u64::from(count));
        Self::check(interval_ns, count)
    }

    /// `count` requests per second.
    pub fn per_second(count: u32) -> Result<Self> {
        Self::new(count, Duration::from_secs(1))
    }

    /// `count` requests per minute.
    pub fn per_minute(count: u32) -> Result<Self> {
        Self::new(count, Duration::from_secs(60))
    }

    /// `count` requests per hour.
    pub fn per_hour(count: u32) -> Result<Self> {
        Self::new(count, Duration::from_secs(3600))
    }

    /// One request every `interval`, with a burst of one.
    pub fn with_interval(interval: Duration) -> Result<Self> {
        let interval_ns = u64::try_from(interval.as_nanos())
            .map_err(|_| Error::config("interval", "must be under 584 years"))?;
        if interval_ns == 0 {
            return Err(Error::config("interval", "must be longer than zero"));
        }
        Self::check(interval_ns, 1)
    }

    /// The same rate with a different burst (the most admitted at one instant).
    pub fn with_burst(self, burst: u32) -> Result<Self> {
        if burst == 0 {
            return Err(Error::config("burst", "must be at least 1"));
        }
        Self::check(self.interval_ns, burst)
    }

    fn check(interval_ns: u64, burst: u32) -> Result<Self> {
        if interval_ns.checked_mul(u64::from(burst)).is_none() {
            return Err(Error::config(
                "burst",
                "burst times the interval overflows 584 years; lower `burst` or the period",
            ));
        }
        Ok(Quota { interval_ns, burst })
    }

    /// The emission interval: one request is replenished every `interval`.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// The most requests admitted at one instant.
    pub fn burst(&self) -> u32 {
        self.burst
    }
}

/// One limit: an algorithm and its numbers. Build it with the constructors; invalid
/// numbers fail here, never per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Gcra(Quota),
    LeakyBucket(Quota),
    LeakyQueue {
        quota: Quota,
        max_delay_ns: u64,
    },
    TokenBucket {
        capacity: u32,
        refill_amount: u32,
        refill_interval_ns: u64,
    },
    SlidingWindow {
        limit: u32,
        window_ns: u64,
    },
}

/// The largest per-window limit of [`Limit::sliding_window`] (counts are 16-bit).
pub const MAX_SLIDING_WINDOW_LIMIT: u32 = u16::MAX as u32;

fn duration_ns(field: &'static str, d: Duration) -> Result<u64> {
    let ns =
        u64::try_from(d.as_nanos()).map_err(|_| Error::config(field, "must be under 584 years"))?;
    if ns == 0 {
        return Err(Error::config(field, "must be longer than zero"));
    }
    Ok(ns)
}

impl Limit {
    /// GCRA (the default algorithm): smooth, exact, one integer of state.
    pub fn gcra(quota: Quota) -> Self {
        Limit {
            kind: Kind::Gcra(quota),
        }
    }

    /// A leaky bucket used as a meter: the bucket drains one request per interval and
    /// holds `burst`. It decides exactly as GCRA does (the same virtual scheduling).
    pub fn leaky_bucket(quota: Quota) -> Self {
        Limit {
            kind: Kind::LeakyBucket(quota),
        }
    }

    /// A leaky bucket used as a queue (traffic shaping): a request that does not fit is
    /// still admitted with [`Decision::delay`] set, its slot reserved in FIFO order, as
    /// long as the delay would not exceed `max_delay`; beyond that it is denied.
    pub fn leaky_queue(quota: Quota, max_delay: Duration) -> Result<Self> {
        let max_delay_ns = u64::try_from(max_delay.as_nanos())
            .map_err(|_| Error::config("max_delay", "must be under 584 years"))?;
        Ok(Limit {
            kind: Kind::LeakyQueue {
                quota,
                max_delay_ns,
            },
        })
    }

    /// A token bucket holding `capacity` tokens, refilled with `refill_amount` tokens
    /// (default 1) every `refill_interval` (in steps, not continuously). A request of
    /// cost `n` takes `n` tokens.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_ratelimit::Limit;
    ///
    /// let limit = Limit::token_bucket()
    ///     .capacity(10)
    ///     .refill_amount(2)
    ///     .refill_interval(Duration::from_secs(1))
    ///     .build()?;
    /// assert_eq!(limit.capacity(), 10);
    /// assert_eq!(limit.window(), Duration::from_secs(5));
    /// # Ok::<(), sd_ratelimit::Error>(())
    /// ```
    pub fn token_bucket() -> TokenBucketBuilder {
        TokenBucketBuilder {
            capacity: 0,
            refill_amount: 1,
            refill_interval: Duration::ZERO,
        }
    }

    /// A sliding-window counter: at most about `limit` requests in any `window`,
    /// estimated from the counts of the current and the previous fixed window.
    /// `limit` is at most [`MAX_SLIDING_WINDOW_LIMIT`].
    pub fn sliding_window(limit: u32, window: Duration) -> Result<Self> {
        if limit == 0 {
            return Err(Error::config("limit", "must be at least 1"));
        }
        if limit > MAX_SLIDING_WINDOW_LIMIT {
            return Err(Error::config(
                "limit",
                "a sliding window counts at most 65535 per window; use GCRA for larger limits",
            ));
        }
        let window_ns = duration_ns("window", window)?;
        if window_ns % 1000 != 0 {
            return Err(Error::config(
                "window",
                "must be a whole number of microseconds",
            ));
        }
        Ok(Limit {
            kind: Kind::SlidingWindow { limit, window_ns },
        })
    }

    /// The most requests (cost units) admitted at one instant.
    pub fn capacity(&self) -> u32 {
        match self.kind {
            Kind::Gcra(q) | Kind::LeakyBucket(q) | Kind::LeakyQueue { quota: q, .. } => q.burst,
            Kind::TokenBucket { capacity, .. } => capacity,
            Kind::SlidingWindow { limit, .. } => limit,
        }
    }

    /// The window over which the limit is usually quoted: `burst * interval` for GCRA and
    /// leaky buckets, the time to refill an empty token bucket, the sliding window.
    pub fn window(&self) -> Duration {
        let ns = match self.kind {
            Kind::Gcra(q) | Kind::LeakyBucket(q) | Kind::LeakyQueue { quota: q, .. } => {
                q.interval_ns * u64::from(q.burst)
            }
            Kind::TokenBucket {
                capacity,
                refill_amount,
                refill_interval_ns,
            } => u64::from(capacity)
                .div_ceil(u64::from(refill_amount))
                .saturating_mul(refill_interval_ns),
            Kind::SlidingWindow { window_ns, .. } => window_ns,
        };
        Duration::from_nanos(ns)
    }

    /// Parameters in ticks of `tick_ns` nanoseconds (1 in memory, 1000 for Redis).
    /// Durations are rounded up to whole ticks, so coarser ticks never admit more.
    pub(crate) fn params(&self, tick_ns: u64) -> Result<Params> {
        let to_ticks = |ns: u64| ns.div_ceil(tick_ns);
        let virt = |quota: Quota, max_wait: Option<u64>| {
            let unit = to_ticks(quota.interval_ns);
            Params::Virtual(Virtual {
                tick: 1,
                per_tick: 1,
                unit,
                cap: unit * u64::from(quota.burst),
                burst: u64::from(quota.burst),
                max_wait,
            })
        };
        Ok(match self.kind {
            Kind::Gcra(q) | Kind::LeakyBucket(q) => virt(q, None),
            Kind::LeakyQueue {
                quota,
                max_delay_ns,
            } => virt(quota, Some(to_ticks(max_delay_ns))),
            Kind::TokenBucket {
                capacity,
                refill_amount,
                refill_interval_ns,
            } => {
                let tick = to_ticks(refill_interval_ns);
                if u64::from(refill_amount) > tick {
                    return Err(Error::config(
                        "refill_amount",
                        "more than one token per microsecond, which the Redis backend cannot count exactly; lengthen `refill_interval`",
                    ));
                }
                Params::Virtual(Virtual {
                    tick,
                    per_tick: u64::from(refill_amount),
                    unit: 1,
                    cap: u64::from(capacity),
                    burst: u64::from(capacity),
                    max_wait: None,
                })
            }
            Kind::SlidingWindow { limit, window_ns } => Params::Window {
                window: window_ns.div_ceil(1000),
                limit: u64::from(limit),
                scale: (1000 / tick_ns).max(1),
            },
        })
    }
}

/// A token bucket's numbers, from [`Limit::token_bucket`]; [`build`](Self::build) checks
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct TokenBucketBuilder {
    capacity: u32,
    refill_amount: u32,
    refill_interval: Duration,
}

impl TokenBucketBuilder {
    /// The most tokens the bucket holds (required, at least 1): the burst.
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// Tokens added at each refill (default 1).
    pub fn refill_amount(mut self, amount: u32) -> Self {
        self.refill_amount = amount;
        self
    }

    /// Time between refills (required, longer than zero).
    pub fn refill_interval(mut self, interval: Duration) -> Self {
        self.refill_interval = interval;
        self
    }

    /// The limit, or [`Error::InvalidConfig`] naming the field at fault.
    pub fn build(self) -> Result<Limit> {
        let TokenBucketBuilder {
            capacity,
            refill_amount,
            refill_interval,
        } = self;
        if capacity == 0 {
            return Err(Error::config(
                "capacity",
                "must be at least 1; set `capacity`",
            ));
        }
        if refill_amount == 0 {
            return Err(Error::config("refill_amount", "must be at least 1"));
        }
        let refill_interval_ns = duration_ns("refill_interval", refill_interval)?;
        if u64::from(refill_amount) > refill_interval_ns {
            return Err(Error::config(
                "refill_amount",
                "more than one token per nanosecond; lengthen `refill_interval`",
            ));
        }
        Ok(Limit {
            kind: Kind::TokenBucket {
                capacity,
                refill_amount,
                refill_interval_ns,
            },
        })
    }
}

/// The answer to one request.
///
/// A cost larger than the limit's capacity is not a decision: it is
/// [`Error::InsufficientCapacity`] ("can never fit"), distinct from "try later".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request is admitted (possibly after [`Self::delay`]).
    pub allowed: bool,
    /// The most requests admitted at once (the burst or capacity).
    pub limit: u32,
    /// How many more unit requests would be admitted right now.
    pub remaining: u32,
    /// When denied, how long until this request would be admitted; zero when allowed.
    pub retry_after: Duration,
    /// How long until the key is back to full capacity.
    pub reset_after: Duration,
    /// For a leaky queue: how long the caller must wait before acting on an admitted
    /// request (its reserved slot). Zero for every other algorithm.
    pub delay: Duration,
    /// Whether the request was refused as a penalty: its key exceeded the limit and is
    /// refused outright until [`Self::retry_after`] has passed, whatever the limit
    /// would admit meanwhile (a limiter built with a `penalty`, as
    /// [`MemoryLimiterBuilder::penalty`](crate::memory::MemoryLimiterBuilder::penalty)).
    /// Set on the refusal that starts the block and on every refusal during it; always
    /// `false` when allowed.
    pub penalty: bool,
}

impl Decision {
    /// The tightest of several decisions: allowed only if all are, the longest waits and
    /// the fewest remaining.
    pub fn combine(decisions: &[Decision]) -> Option<Decision> {
        let mut iter = decisions.iter();
        let mut out = *iter.next()?;
        for d in iter {
            if d.remaining < out.remaining {
                out.remaining = d.remaining;
                out.limit = d.limit;
            }
            out.allowed &= d.allowed;
            out.retry_after = out.retry_after.max(d.retry_after);
            out.reset_after = out.reset_after.max(d.reset_after);
            out.delay = out.delay.max(d.delay);
            out.penalty |= d.penalty;
        }
        Some(out)
    }
}

mod kernel;
mod penalty;

#[cfg(test)]
pub(crate) use kernel::is_full;
pub(crate) use kernel::{OTHER_STATE, Params, Step, Virtual, decide, gcra_decide, refund};
pub(crate) use penalty::{penalize, penalty_ticks};

#[cfg(test)]
mod tests;
