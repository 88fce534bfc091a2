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
    /// every `refill_interval` (in steps, not continuously). A request of cost `n` takes
    /// `n` tokens.
    pub fn token_bucket(
        capacity: u32,
        refill_amount: u32,
        refill_interval: Duration,
    ) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::config("capacity", "must be at least 1"));
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
            Params::Virtual {
                tick: 1,
                per_tick: 1,
                unit,
                cap: unit * u64::from(quota.burst),
                burst: u64::from(quota.burst),
                max_wait,
            }
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
                Params::Virtual {
                    tick,
                    per_tick: u64::from(refill_amount),
                    unit: 1,
                    cap: u64::from(capacity),
                    burst: u64::from(capacity),
                    max_wait: None,
                }
            }
            Kind::SlidingWindow { limit, window_ns } => Params::Window {
                window: window_ns.div_ceil(1000),
                limit: u64::from(limit),
                scale: (1000 / tick_ns).max(1),
            },
        })
    }
}

/// A limit in tick units, ready for [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Params {
    /// The virtual-scheduling kernel (GCRA, token bucket, leaky bucket).
    Virtual {
        tick: u64,
        per_tick: u64,
        unit: u64,
        cap: u64,
        /// `cap / unit`, the most cost units admitted at once.
        burst: u64,
        /// `Some` for the leaky queue: the longest delay a request may be given.
        max_wait: Option<u64>,
    },
    /// The sliding-window counter.
    ///
    /// The window counts in whole microseconds on every backend (`window` is in µs and
    /// `scale` ticks make one µs), so memory and Redis weigh the previous window alike.
    Window { window: u64, limit: u64, scale: u64 },
}

impl Params {
    /// Whether a state written under `self` means the same under `other`, so a limit can
    /// change without misreading what is stored: the virtual-scheduling state is a point
    /// on a clock whose scale is `(tick, per_tick)` (any GCRA, leaky bucket or leaky
    /// queue share one; a token bucket's depends on its refill), the sliding window's is
    /// a window index and two counts for one window length.
    pub(crate) fn same_state(&self, other: &Params) -> bool {
        match (self, other) {
            (
                Params::Virtual { tick, per_tick, .. },
                Params::Virtual {
                    tick: t,
                    per_tick: p,
                    ..
                },
            ) => tick == t && per_tick == p,
            (
                Params::Window { window, scale, .. },
                Params::Window {
                    window: w,
                    scale: s,
                    ..
                },
            ) => window == w && scale == s,
            _ => false,
        }
    }
}

/// Why [`Params::same_state`] refused a new limit.
pub(crate) const OTHER_STATE: &str = "stores its state differently from the current limit \
    (another algorithm, a token bucket with another refill, or a sliding window of another \
    length), so existing state would be misread: build a new limiter (on Redis, with a new \
    prefix) instead";

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
        }
        Some(out)
    }
}

/// A decision in ticks, with the state to store when admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) allowed: bool,
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) retry_after: u64,
    pub(crate) reset_after: u64,
    pub(crate) delay: u64,
    /// The new state; `None` when nothing changes (denied, or cost zero).
    pub(crate) state: Option<u64>,
}

impl Step {
    /// Converts tick counts to durations.
    #[inline]
    pub(crate) fn decision(&self, tick_ns: u64) -> Decision {
        let d = |t: u64| Duration::from_nanos(t.saturating_mul(tick_ns));
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Decision {
            allowed: self.allowed,
            limit: clamp(self.limit),
            remaining: clamp(self.remaining),
            retry_after: d(self.retry_after),
            reset_after: d(self.reset_after),
            delay: d(self.delay),
        }
    }
}

impl Params {
    /// The parameters as seven words, for lock-free publication (see `memory`).
    pub(crate) fn to_words(self) -> [u64; 7] {
        match self {
            Params::Virtual {
                tick,
                per_tick,
                unit,
                cap,
                burst,
                max_wait,
            } => [
                u64::from(max_wait.is_some()),
                tick,
                per_tick,
                unit,
                cap,
                burst,
                max_wait.unwrap_or(0),
            ],
            Params::Window {
                window,
                limit,
                scale,
            } => [2, window, limit, scale, 0, 0, 0],
        }
    }

    /// The inverse of [`Params::to_words`].
    #[inline]
    pub(crate) fn from_words(w: [u64; 7]) -> Self {
        match w[0] {
            2 => Params::Window {
                window: w[1],
                limit: w[2],
                scale: w[3],
            },
            queue => Params::Virtual {
                tick: w[1],
                per_tick: w[2],
                unit: w[3],
                cap: w[4],
                burst: w[5],
                max_wait: (queue == 1).then_some(w[6]),
            },
        }
    }

    /// `(unit, cap, burst)` for GCRA and the leaky meter (tick 1, no queue), which take
    /// the fast path [`gcra_decide`].
    #[inline]
    pub(crate) fn gcra(&self) -> Option<(u64, u64, u64)> {
        match *self {
            Params::Virtual {
                tick: 1,
                unit,
                cap,
                burst,
                max_wait: None,
                ..
            } => Some((unit, cap, burst)),
            _ => None,
        }
    }

    /// Whether the state is the (tick) time at which the key is back to full: GCRA and
    /// leaky buckets.
    #[inline]
    pub(crate) fn state_is_time(&self) -> bool {
        matches!(self, Params::Virtual { tick: 1, .. })
    }

    /// The most cost units admitted at once.
    pub(crate) fn capacity(&self) -> u64 {
        match *self {
            Params::Virtual { burst, .. } => burst,
            Params::Window { limit, .. } => limit,
        }
    }

    /// Fails with [`Error::InsufficientCapacity`] when `cost` can never be admitted.
    pub(crate) fn check_cost(&self, cost: u32) -> Result<()> {
        let capacity = self.capacity();
        if u64::from(cost) > capacity {
            return Err(Error::InsufficientCapacity {
                cost,
                capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            });
        }
        Ok(())
    }
}

/// Decides one request of `cost` at `now` on `state`. The caller has checked the cost
/// with [`Params::check_cost`]; a larger cost is simply denied here.
#[inline]
pub(crate) fn decide(p: &Params, state: u64, now: u64, cost: u32) -> Step {
    if let Some((unit, cap, burst)) = p.gcra() {
        return gcra_decide(unit, cap, burst, state, now, cost);
    }
    match *p {
        Params::Virtual {
            tick,
            per_tick,
            unit,
            cap,
            burst,
            max_wait,
        } => virtual_decide(tick, per_tick, unit, cap, burst, max_wait, state, now, cost),
        Params::Window {
            window,
            limit,
            scale,
        } => {
            let mut step = window_decide(window, limit, state, now / scale, cost);
            step.retry_after *= scale;
            step.reset_after *= scale;
            step
        }
    }
}

/// Whether `state` is back to full at `now`, so the key can be forgotten.
#[cfg(test)]
pub(crate) fn is_full(p: &Params, state: u64, now: u64) -> bool {
    match *p {
        Params::Virtual { tick, per_tick, .. } => state <= virtual_clock(now, tick, per_tick),
        Params::Window { window, scale, .. } => {
            let (_, prev, cur) = window_view(window, state, now / scale);
            prev == 0 && cur == 0
        }
    }
}

/// Gives back `cost` consumed from `state` (all-or-none multi-limit checks undo the
/// limits they took when a later one denies). Never gives back more than was taken.
pub(crate) fn refund(p: &Params, state: u64, now: u64, cost: u32) -> u64 {
    match *p {
        Params::Virtual { unit, .. } => state.saturating_sub(u64::from(cost) * unit),
        Params::Window { window, scale, .. } => {
            let (idx, prev, cur) = unpack_window(state);
            // Taken in the stored window, current or just ended (or read backwards).
            let delta = ((now / scale / window) as u32).wrapping_sub(idx);
            if delta <= 1 || delta >= 1 << 31 {
                pack_window(idx, prev, cur.saturating_sub(u64::from(cost)))
            } else {
                state
            }
        }
    }
}

/// The virtual clock `floor(now / tick) * per_tick`; GCRA (`tick == 1`, hence
/// `per_tick == 1`) skips the division.
#[inline]
fn virtual_clock(now: u64, tick: u64, per_tick: u64) -> u64 {
    if tick == 1 {
        now
    } else {
        now / tick * per_tick
    }
}

/// The first tick at which the virtual clock reaches `v`.
#[inline]
fn time_of(v: u64, tick: u64, per_tick: u64) -> u64 {
    if tick == 1 {
        v
    } else {
        v.div_ceil(per_tick).saturating_mul(tick)
    }
}

/// [`virtual_decide`] for GCRA and the leaky meter (`tick == per_tick == 1`, no queue),
/// with the fewest operations: the memory backend's hot path. Same answers (the
/// property tests run every GCRA decision through here, `virtual_decide` is the
/// reference in `gcra_fast_path_equals_the_kernel`).
#[inline]
pub(crate) fn gcra_decide(unit: u64, cap: u64, burst: u64, s: u64, now: u64, cost: u32) -> Step {
    let base = s.max(now);
    let next = base.saturating_add(u64::from(cost) * unit);
    let used = next - now;
    if used <= cap {
        Step {
            allowed: true,
            limit: burst,
            remaining: units(cap - used, unit),
            retry_after: 0,
            reset_after: used,
            delay: 0,
            state: (cost > 0).then_some(next),
        }
    } else {
        Step {
            allowed: false,
            limit: burst,
            // A denied request of cost 1 leaves less than one unit.
            remaining: if cost <= 1 {
                0
            } else {
                units(cap.saturating_sub(base - now), unit)
            },
            retry_after: used - cap,
            reset_after: base - now,
            delay: 0,
            state: None,
        }
    }
}

/// `room / unit`, in 32 bits when both fit (a 64-bit division is several times slower
/// on common x86 cores).
#[inline]
fn units(room: u64, unit: u64) -> u64 {
    match (u32::try_from(room), u32::try_from(unit)) {
        (Ok(r), Ok(u)) => u64::from(r / u),
        _ => room / unit,
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn virtual_decide(
    tick: u64,
    per_tick: u64,
    unit: u64,
    cap: u64,
    burst: u64,
    max_wait: Option<u64>,
    s: u64,
    now: u64,
    cost: u32,
) -> Step {
    let x = virtual_clock(now, tick, per_tick);
    let base = s.max(x);
    let next = base.saturating_add(u64::from(cost) * unit);
    let limit = burst;
    // The first moment the request fits: x(t) >= next - cap.
    let fits_at = time_of(next.saturating_sub(cap), tick, per_tick);
    let wait = fits_at.saturating_sub(now);
    let admitted = next - x <= cap || max_wait.is_some_and(|m| wait <= m);
    let after = if admitted { next } else { base };
    // A denied request of cost 1 leaves less than one unit: skip the division.
    let remaining = match cap.saturating_sub(after - x) {
        0 => 0,
        room if unit == 1 => room,
        _ if !admitted && cost <= 1 => 0,
        room => room / unit,
    };
    Step {
        allowed: admitted,
        limit,
        remaining,
        retry_after: if admitted {
            0
        } else {
            wait - max_wait.unwrap_or(0).min(wait)
        },
        reset_after: time_of(after, tick, per_tick).saturating_sub(now),
        delay: if admitted { wait } else { 0 },
        state: (admitted && cost > 0).then_some(next),
    }
}

fn pack_window(idx: u32, prev: u64, cur: u64) -> u64 {
    (u64::from(idx) << 32) | (prev.min(0xffff) << 16) | cur.min(0xffff)
}

fn unpack_window(s: u64) -> (u32, u64, u64) {
    ((s >> 32) as u32, (s >> 16) & 0xffff, s & 0xffff)
}

/// The counts as seen at `now`: `(elapsed in the current window, previous, current)`.
/// A clock that went backwards is read at the start of the stored window, the most
/// conservative reading.
fn window_view(window: u64, s: u64, now: u64) -> (u64, u64, u64) {
    let (idx, prev, cur) = unpack_window(s);
    let now_idx = (now / window) as u32;
    let elapsed = now % window;
    match now_idx.wrapping_sub(idx) {
        0 => (elapsed, prev, cur),
        1 => (elapsed, cur, 0),
        d if d >= 1 << 31 => (0, prev, cur),
        _ => (elapsed, 0, 0),
    }
}

fn window_decide(window: u64, limit: u64, s: u64, now: u64, cost: u32) -> Step {
    let (idx, _, _) = unpack_window(s);
    let now_idx = (now / window) as u32;
    let backwards = now_idx.wrapping_sub(idx) >= 1 << 31;
    let (e, prev, cur) = window_view(window, s, now);
    let n = u64::from(cost);
    let w = u128::from(window);
    // Allowed iff prev * (w - e) / w + cur + n <= limit, in integers.
    let weight = |prev: u64, e: u64| u128::from(prev) * (w - u128::from(e));
    let fits = |prev: u64, cur: u64, e: u64| {
        weight(prev, e) + u128::from(cur + n) * w <= u128::from(limit) * w
    };
    let admitted = n <= limit && fits(prev, cur, e);
    let cur_after = if admitted { cur + n } else { cur };
    let room = (u128::from(limit) * w).saturating_sub(weight(prev, e)) / w;
    let remaining = u64::try_from(room)
        .unwrap_or(u64::MAX)
        .saturating_sub(cur_after);
    let retry_after = if admitted || n > limit {
        0
    } else if cur + n <= limit {
        // Blocked by the previous window's weight, which fades within this window.
        let slack = u128::from(limit - cur - n) * w / u128::from(prev.max(1));
        let at = w.saturating_sub(slack) as u64;
        at.saturating_sub(e)
    } else {
        // Needs the next window, where this window's count becomes the weight.
        let slack = u128::from(limit - n) * w / u128::from(cur.max(1));
        let at = w.saturating_sub(slack) as u64;
        (window - e) + at
    };
    let reset_after = if cur_after > 0 {
        (window - e) + window
    } else if prev > 0 {
        window - e
    } else {
        0
    };
    let stored_idx = if backwards { idx } else { now_idx };
    Step {
        allowed: admitted,
        limit,
        remaining,
        retry_after,
        reset_after,
        delay: 0,
        state: (admitted && n > 0).then(|| {
            let (_, p, _) = window_view(window, s, now);
            pack_window(stored_idx, p, cur_after)
        }),
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(
            f(Limit::token_bucket(0, 1, Duration::from_secs(1))),
            "capacity"
        );
        assert_eq!(
            f(Limit::token_bucket(1, 0, Duration::from_secs(1))),
            "refill_amount"
        );
        assert_eq!(
            f(Limit::token_bucket(1, 1, Duration::ZERO)),
            "refill_interval"
        );
        assert_eq!(
            f(Limit::token_bucket(10, 10, Duration::from_nanos(5))),
            "refill_amount"
        );
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
        let p = Limit::token_bucket(5, 2, Duration::from_secs(1))
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
                let p = Limit::token_bucket(capacity, amount, Duration::from_nanos(interval)).unwrap().params(1).unwrap();
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
                    virtual_decide(1, 1, unit, cap, burst, None, s, now, cost)
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
                    Limit::token_bucket(5, 1, Duration::from_millis(200)).unwrap(),
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
}
