//! The penalty after a limit is exceeded: a key the limit denies is then refused outright
//! for a fixed time (rate-limiter-flexible's `blockDuration`), whatever its limit would
//! admit meanwhile. Pure, on the same integer ticks as the kernel; the Redis scripts
//! port it line by line.

use std::time::Duration;

use super::Step;
use crate::error::{Error, Result};

/// A penalty in ticks of `tick_ns`, rounded up (a coarser tick never shortens it); zero
/// is off. Longer than `max_ticks` is refused, naming the `penalty` setter.
pub(crate) fn penalty_ticks(penalty: Duration, tick_ns: u64, max_ticks: u64) -> Result<u64> {
    let ticks = u64::try_from(penalty.as_nanos().div_ceil(u128::from(tick_ns)))
        .ok()
        .filter(|t| *t <= max_ticks);
    ticks.ok_or_else(|| {
        Error::config(
            "penalty",
            "too long to count exactly (about 290 years in memory, 70 in Redis); shorten it, or use `Duration::ZERO` for no penalty",
        )
    })
}

/// Applies a penalty of `penalty` ticks (zero: off) to `step`, the kernel's decision at
/// `now` for a key blocked until `blocked_until` (zero or a past time: not blocked).
///
/// - While blocked, the request is refused and takes nothing (`state: None`), with
///   `retry_after` and `reset_after` at least the time left.
/// - A request the limit denies starts a block of `penalty`: the refusal says so, and
///   the new end of the block is returned to be stored with the key.
///
/// Either way `penalty` is set on the step, `remaining` is zero, and `retry_after` is
/// the longer of the block and the limit's own wait, so a client that waits it out is
/// not blocked again at once.
#[inline]
pub(crate) fn penalize(
    mut step: Step,
    blocked_until: u64,
    now: u64,
    penalty: u64,
) -> (Step, Option<u64>) {
    let (left, start) = if blocked_until > now {
        (blocked_until - now, None)
    } else if !step.allowed && penalty > 0 {
        (penalty, Some(now.saturating_add(penalty)))
    } else {
        return (step, None);
    };
    step.allowed = false;
    step.penalty = true;
    step.state = None;
    step.delay = 0;
    step.remaining = 0;
    step.retry_after = step.retry_after.max(left);
    step.reset_after = step.reset_after.max(left);
    (step, start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::{Limit, Quota, decide};

    fn params() -> crate::algorithm::Params {
        let q = Quota::per_second(10).unwrap().with_burst(2).unwrap();
        Limit::gcra(q).params(1).unwrap()
    }

    #[test]
    fn a_denial_starts_a_block_and_the_block_refuses_what_the_limit_admits() {
        let p = params();
        let now = 1_000_000_000;
        // Two admitted, the third denied: the block starts.
        let s1 = decide(&p, 0, now, 1).state.unwrap();
        let s2 = decide(&p, s1, now, 1).state.unwrap();
        let denied = decide(&p, s2, now, 1);
        let (step, until) = penalize(denied, 0, now, 5_000);
        assert_eq!(until, Some(now + 5_000));
        assert!(!step.allowed && step.penalty);
        // The limit's own wait (100 ms) is longer than this short penalty.
        assert_eq!(step.retry_after, denied.retry_after.max(5_000));
        // Much later the limit admits, but the block still refuses and takes nothing.
        let later = now + 3_000_000_000;
        let admitted = decide(&p, s2, later, 1);
        assert!(admitted.allowed);
        let (step, until) = penalize(admitted, later + 7, later, 5_000);
        assert_eq!(until, None);
        assert!(!step.allowed && step.penalty && step.state.is_none());
        assert_eq!((step.retry_after, step.remaining, step.delay), (7, 0, 0));
        // At the end of the block the limit decides again.
        let (step, until) = penalize(admitted, later, later, 5_000);
        assert_eq!((step, until), (admitted, None));
    }

    #[test]
    fn zero_is_off_and_too_long_is_refused() {
        let p = params();
        let s = decide(&p, decide(&p, 0, 0, 2).state.unwrap(), 0, 1);
        assert_eq!(penalize(s, 0, 0, 0), (s, None));
        assert_eq!(penalty_ticks(Duration::ZERO, 1000, 10).unwrap(), 0);
        assert_eq!(
            penalty_ticks(Duration::from_nanos(1001), 1000, 10).unwrap(),
            2
        );
        let e = penalty_ticks(Duration::from_micros(11), 1000, 10).unwrap_err();
        assert!(matches!(
            e,
            Error::InvalidConfig {
                field: "penalty",
                ..
            }
        ));
    }
}
