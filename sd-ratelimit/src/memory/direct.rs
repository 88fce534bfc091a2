//! [`DirectLimiter`]: one limit for the whole process.

use super::*;

/// One limit for the whole process.
///
/// ```
/// use sd_ratelimit::{Limit, Quota, memory::{ManualClock, MemoryLimiterBuilder}};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let limiter = MemoryLimiterBuilder::new(Limit::gcra(Quota::per_second(2)?)).clock(clock.clone()).direct()?;
/// assert!(limiter.check()?.allowed);
/// assert!(limiter.check()?.allowed);
/// let denied = limiter.check()?;
/// assert!(!denied.allowed);
/// assert_eq!(denied.retry_after, Duration::from_millis(500));
/// clock.advance(denied.retry_after);
/// assert!(limiter.check()?.allowed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct DirectLimiter<C = MonotonicClock> {
    pub(super) core: Core<C>,
    pub(super) state: AtomicU64,
    pub(super) blocked_until: AtomicU64,
}

impl<C: Clock> DirectLimiter<C> {
    /// Decides one request of cost 1.
    #[inline(always)]
    pub fn check(&self) -> Result<Decision> {
        if let Some((unit, cap, burst)) = self.core.limit.gcra() {
            let step = gcra_apply(&self.state, unit, cap, burst, now_ns(&self.core.clock), 1);
            return Ok(self.core.finish(&step));
        }
        self.check_n(1)
    }

    /// Decides one request of cost 1 and answers only whether it is admitted: the
    /// leanest check (for GCRA and the leaky meter: no [`Decision`] is built). Use
    /// [`Self::check`] for the wait, the remaining capacity and the reset time.
    #[inline]
    pub fn allow(&self) -> bool {
        if self.core.plain
            && let Some((unit, cap, _)) = self.core.limit.gcra()
        {
            let allowed = gcra_take(&self.state, unit, cap, now_ns(&self.core.clock));
            self.core.meters.decided(allowed, false);
            return allowed;
        }
        self.check().is_ok_and(|d| d.allowed)
    }

    /// Decides one request of cost `cost`; a cost over the capacity is
    /// [`Error::InsufficientCapacity`].
    ///
    /// Always inlined (the GCRA path is short; the rest is out of line), so fields of
    /// the [`Decision`] a caller never reads are not computed.
    #[inline(always)]
    pub fn check_n(&self, cost: u32) -> Result<Decision> {
        if let Some((unit, cap, burst)) = self.core.limit.gcra()
            && u64::from(cost) <= burst
        {
            let now = now_ns(&self.core.clock);
            let step = gcra_apply(&self.state, unit, cap, burst, now, cost);
            return Ok(self.core.finish(&step));
        }
        self.check_general(cost)
    }

    /// Every algorithm through the general kernel.
    #[inline(never)]
    fn check_general(&self, cost: u32) -> Result<Decision> {
        let p = self.core.limit.params();
        p.check_cost(cost)?;
        let now = now_ns(&self.core.clock);
        let penalty = self.core.penalty;
        let step = apply_penalized(&self.state, &self.blocked_until, &p, now, cost, penalty);
        Ok(self.core.finish(&step))
    }

    core_accessors!(
        set_limit: "Replaces the limit. The state is kept, so the change hands out no fresh \
                    burst: what was used under the old limit stays used.",
        limit: "The current limit."
    );

    /// Waits until a request of `cost` is admitted, then returns its decision. For a
    /// leaky queue the wait is the reserved slot (FIFO); otherwise it retries after
    /// `retry_after`.
    #[cfg(feature = "tokio")]
    pub async fn until_ready(&self, cost: u32) -> Result<Decision> {
        wait_until(|| self.check_n(cost)).await
    }
}
