//! The kernel: limits in tick units ([`Params`]) and the pure decision on one `u64`
//! state ([`decide`]), the same in Rust and in the Lua port.

use std::time::Duration;

use super::Decision;
use crate::error::{Error, Result};

/// A limit of the virtual-scheduling kernel (GCRA, token bucket, leaky bucket) in tick
/// units: its clock advances `per_tick` for every `tick`, a cost unit takes `unit`, and
/// the state may run at most `cap` ahead of the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Virtual {
    pub(crate) tick: u64,
    pub(crate) per_tick: u64,
    pub(crate) unit: u64,
    pub(crate) cap: u64,
    /// `cap / unit`, the most cost units admitted at once.
    pub(crate) burst: u64,
    /// `Some` for the leaky queue: the longest delay a request may be given.
    pub(crate) max_wait: Option<u64>,
}

/// A limit in tick units, ready for [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Params {
    /// The virtual-scheduling kernel (GCRA, token bucket, leaky bucket).
    Virtual(Virtual),
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
            (Params::Virtual(a), Params::Virtual(b)) => {
                a.tick == b.tick && a.per_tick == b.per_tick
            }
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

/// A decision in ticks, with the state to store when admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) allowed: bool,
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) retry_after: u64,
    pub(crate) reset_after: u64,
    pub(crate) delay: u64,
    /// Refused as a penalty: the key exceeded its limit and is blocked (see
    /// [`super::penalize`]).
    pub(crate) penalty: bool,
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
            penalty: self.penalty,
        }
    }
}

impl Params {
    /// The parameters as seven words, for lock-free publication (see `memory`).
    pub(crate) fn to_words(self) -> [u64; 7] {
        match self {
            Params::Virtual(v) => [
                u64::from(v.max_wait.is_some()),
                v.tick,
                v.per_tick,
                v.unit,
                v.cap,
                v.burst,
                v.max_wait.unwrap_or(0),
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
            queue => Params::Virtual(Virtual {
                tick: w[1],
                per_tick: w[2],
                unit: w[3],
                cap: w[4],
                burst: w[5],
                max_wait: (queue == 1).then_some(w[6]),
            }),
        }
    }

    /// `(unit, cap, burst)` for GCRA and the leaky meter (tick 1, no queue), which take
    /// the fast path [`gcra_decide`].
    #[inline]
    pub(crate) fn gcra(&self) -> Option<(u64, u64, u64)> {
        match *self {
            Params::Virtual(Virtual {
                tick: 1,
                unit,
                cap,
                burst,
                max_wait: None,
                ..
            }) => Some((unit, cap, burst)),
            _ => None,
        }
    }

    /// Whether the state is the (tick) time at which the key is back to full: GCRA and
    /// leaky buckets.
    #[inline]
    pub(crate) fn state_is_time(&self) -> bool {
        matches!(self, Params::Virtual(Virtual { tick: 1, .. }))
    }

    /// The most cost units admitted at once.
    pub(crate) fn capacity(&self) -> u64 {
        match *self {
            Params::Virtual(v) => v.burst,
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
        Params::Virtual(v) => virtual_decide(&v, state, now, cost),
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
        Params::Virtual(v) => state <= virtual_clock(now, v.tick, v.per_tick),
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
        Params::Virtual(v) => state.saturating_sub(u64::from(cost) * v.unit),
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
            penalty: false,
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
            penalty: false,
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

#[inline]
pub(super) fn virtual_decide(v: &Virtual, s: u64, now: u64, cost: u32) -> Step {
    let Virtual {
        tick,
        per_tick,
        unit,
        cap,
        burst,
        max_wait,
    } = *v;
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
        penalty: false,
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
        penalty: false,
        state: (admitted && n > 0).then(|| {
            let (_, p, _) = window_view(window, s, now);
            pack_window(stored_idx, p, cur_after)
        }),
    }
}
