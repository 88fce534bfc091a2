//! The in-memory backend: one process, no server, no background task.
//!
//! - [`DirectLimiter`]: one limit for the whole process (one key).
//! - [`KeyedLimiter`]: one state per key (client IP, user, route), with a cap on keys
//!   and automatic removal of keys whose state is back to full.
//!
//! Each key's state is one `AtomicU64`; a decision is one load and, when it admits, one
//! compare-and-swap (retried only when another thread changed the same key meanwhile).
//! `check` returns a full [`Decision`]; `allow` answers only admitted or not, the
//! cheapest call (GCRA and the leaky meter skip building a decision).
//! Time comes from an injected [`Clock`] (sd-core's: a [`MonotonicClock`] by default, a
//! [`ManualClock`] in tests), so tests never sleep.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::algorithm::{self, Decision, Limit, Params, Step};
use crate::error::{Error, Result};

/// Memory keeps time in nanoseconds.
const TICK_NS: u64 = 1;

#[doc(no_inline)]
pub use sd_core::{Clock, ManualClock, MonotonicClock, TokioClock};

/// A clock's reading in nanoseconds, the memory backend's ticks (saturating after 584
/// years).
#[inline(always)]
fn now_ns<C: Clock>(clock: &C) -> u64 {
    clock.now_nanos()
}

#[inline(always)]
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// Counters a user can export. Allowed requests are not counted (that would put a shared
/// write on the hot path); count them at the call site if needed.
#[derive(Debug, Default)]
pub struct Stats {
    denied: AtomicU64,
    shadow_denied: AtomicU64,
    backend_errors: AtomicU64,
    count_denials: bool,
}

impl Stats {
    /// Counters; denials are counted only when `count_denials`.
    pub(crate) fn new(count_denials: bool) -> Self {
        Stats {
            count_denials,
            ..Stats::default()
        }
    }

    /// Requests denied (always counted by Redis; by memory limiters only when built
    /// with `count_denials(true)`, which keeps a shared write off the hot path).
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Requests that shadow mode admitted but would have denied.
    pub fn shadow_denied(&self) -> u64 {
        self.shadow_denied.load(Ordering::Relaxed)
    }

    /// Backend failures (Redis errors and timeouts) handled by the failure policy.
    pub fn backend_errors(&self) -> u64 {
        self.backend_errors.load(Ordering::Relaxed)
    }

    #[cfg(feature = "redis")]
    pub(crate) fn record_error(&self) {
        self.backend_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies shadow mode and counts a denial.
    pub(crate) fn record(&self, mut d: Decision, shadow: bool) -> Decision {
        if !d.allowed {
            if shadow {
                self.shadow_denied.fetch_add(1, Ordering::Relaxed);
                d.allowed = true;
                d.retry_after = Duration::ZERO;
            } else if self.count_denials {
                self.denied.fetch_add(1, Ordering::Relaxed);
            }
        }
        d
    }
}

/// The default limit, readable without a lock or a write to shared memory: a sequence
/// lock over atomic words (readers retry if a writer was active meanwhile).
#[derive(Debug)]
struct LimitCell {
    version: AtomicU64,
    /// `(unit, cap, burst)` of a GCRA or leaky-meter limit, zeros for any other (a unit
    /// is never zero): what the hot path reads.
    gcra: [AtomicU64; 3],
    words: [AtomicU64; 7],
    limit: std::sync::Mutex<Limit>,
}

/// The hot path's words for `params` (see [`LimitCell::gcra`]); zeros unless `fast`.
fn gcra_words(params: Params, fast: bool) -> [u64; 3] {
    params
        .gcra()
        .filter(|_| fast)
        .map_or([0; 3], |(unit, cap, burst)| [unit, cap, burst])
}

impl LimitCell {
    /// `fast`: whether GCRA and the leaky meter may take the hot path (not with a
    /// penalty, which the hot path does not read).
    fn new(limit: Limit, params: Params, fast: bool) -> Self {
        LimitCell {
            version: AtomicU64::new(0),
            gcra: gcra_words(params, fast).map(AtomicU64::new),
            words: params.to_words().map(AtomicU64::new),
            limit: std::sync::Mutex::new(limit),
        }
    }

    #[inline]
    fn params(&self) -> Params {
        loop {
            let before = self.version.load(Ordering::Acquire);
            let words = [0, 1, 2, 3, 4, 5, 6].map(|i| self.words[i].load(Ordering::Relaxed));
            std::sync::atomic::fence(Ordering::Acquire);
            if before & 1 == 0 && self.version.load(Ordering::Relaxed) == before {
                return Params::from_words(words);
            }
            std::hint::spin_loop();
        }
    }

    /// `(unit, cap, burst)` when the limit is GCRA or a leaky meter (the hot path reads
    /// three words, not seven, and skips the general kernel); `None` otherwise.
    #[inline(always)]
    fn gcra(&self) -> Option<(u64, u64, u64)> {
        loop {
            let before = self.version.load(Ordering::Acquire);
            let [unit, cap, burst] = [0, 1, 2].map(|i| self.gcra[i].load(Ordering::Relaxed));
            std::sync::atomic::fence(Ordering::Acquire);
            if before & 1 == 0 && self.version.load(Ordering::Relaxed) == before {
                return (unit != 0).then_some((unit, cap, burst));
            }
            std::hint::spin_loop();
        }
    }

    fn store(&self, limit: Limit, params: Params, fast: bool) {
        let mut current = self
            .limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = self.version.load(Ordering::Relaxed);
        self.version.store(v + 1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        for (word, value) in self.words.iter().zip(params.to_words()) {
            word.store(value, Ordering::Relaxed);
        }
        for (word, value) in self.gcra.iter().zip(gcra_words(params, fast)) {
            word.store(value, Ordering::Relaxed);
        }
        self.version.store(v + 2, Ordering::Release);
        *current = limit;
    }

    fn limit(&self) -> Limit {
        *self
            .limit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What every memory limiter shares: the default limit, the clock, shadow mode, stats.
#[derive(Debug)]
struct Core<C> {
    limit: LimitCell,
    clock: C,
    shadow: bool,
    /// Neither shadow mode nor denial counting: a denial needs no bookkeeping.
    plain: bool,
    stats: Stats,
    /// The penalty in nanoseconds; zero when off (and in shadow mode, which blocks
    /// nothing).
    penalty: u64,
    meters: crate::observe::Meters,
}

impl<C: Clock> Core<C> {
    /// The core of a limiter built from `options`, on the clock they were given.
    fn new(options: MemoryLimiterBuilder<C>) -> Result<Self> {
        let params = options.limit.params(TICK_NS)?;
        let penalty = algorithm::penalty_ticks(options.penalty, TICK_NS, u64::MAX / 2)?;
        let penalty = if options.shadow { 0 } else { penalty };
        Ok(Core {
            limit: LimitCell::new(options.limit, params, penalty == 0),
            clock: options.clock,
            shadow: options.shadow,
            plain: !options.shadow && !options.count_denials,
            stats: Stats::new(options.count_denials),
            penalty,
            meters: crate::observe::Meters::new(&options.name, sd_core::observe::backend::MEMORY),
        })
    }

    fn set_limit(&self, limit: Limit) -> Result<()> {
        let params = limit.params(TICK_NS)?;
        if !self.limit.params().same_state(&params) {
            return Err(Error::config("limit", crate::algorithm::OTHER_STATE));
        }
        self.limit.store(limit, params, self.penalty == 0);
        Ok(())
    }

    #[inline(always)]
    fn finish(&self, step: &Step) -> Decision {
        let d = step.decision(TICK_NS);
        self.meters.decided(d.allowed, self.shadow);
        if self.plain || d.allowed {
            return d;
        }
        self.stats.record(d, self.shadow)
    }
}

/// GCRA's admit-or-deny on one state, nothing else: the state is the time the key is
/// back to full; a request fits when, after it, that time is at most `cap` ahead.
///
/// Relaxed ordering suffices: the decision reads and writes only this one word, and
/// compare-and-swap on one word is totally ordered whatever the ordering argument.
#[inline]
fn gcra_take(cell: &AtomicU64, unit: u64, cap: u64, now: u64) -> bool {
    let mut s = cell.load(Ordering::Relaxed);
    loop {
        let next = s.max(now).saturating_add(unit);
        if next - now > cap {
            return false;
        }
        match cell.compare_exchange_weak(s, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(actual) => s = actual,
        }
    }
}

/// [`apply`] for GCRA and the leaky meter, through the kernel's GCRA fast path.
#[inline(always)]
fn gcra_apply(cell: &AtomicU64, unit: u64, cap: u64, burst: u64, now: u64, cost: u32) -> Step {
    let mut current = cell.load(Ordering::Relaxed);
    loop {
        let step = algorithm::gcra_decide(unit, cap, burst, current, now, cost);
        let Some(next) = step.state else {
            return step;
        };
        match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return step,
            Err(actual) => current = actual,
        }
    }
}

/// [`apply`] under a penalty of `penalty` ticks (zero: off) whose block ends at the time
/// in `blocked`: a blocked key is decided without taking anything and refused; a
/// denial starts a block. The block word is read before the state is changed, so every
/// decision that starts after a block was stored is refused; one decided at the same
/// moment as the denial that starts it may still be admitted, as it would have been a
/// moment earlier.
#[inline]
fn apply_penalized(
    cell: &AtomicU64,
    blocked: &AtomicU64,
    p: &Params,
    now: u64,
    cost: u32,
    penalty: u64,
) -> Step {
    if penalty == 0 {
        return apply(cell, p, now, cost);
    }
    let until = blocked.load(Ordering::Acquire);
    let step = if until > now {
        algorithm::decide(p, cell.load(Ordering::Acquire), now, cost)
    } else {
        apply(cell, p, now, cost)
    };
    let (step, start) = algorithm::penalize(step, until, now, penalty);
    if let Some(end) = start {
        blocked.fetch_max(end, Ordering::AcqRel);
    }
    step
}

/// One state, updated with a compare-and-swap loop: decides on the value read and
/// publishes the new state only if nobody changed it meanwhile.
#[inline]
fn apply(cell: &AtomicU64, p: &Params, now: u64, cost: u32) -> Step {
    let mut current = cell.load(Ordering::Acquire);
    loop {
        let step = algorithm::decide(p, current, now, cost);
        let Some(next) = step.state else {
            return step;
        };
        match cell.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return step,
            Err(actual) => current = actual,
        }
    }
}

/// The state of one key: the algorithm's word and, for sweeps (which must not depend on
/// which limit the key was checked under), when it is back to full.
///
/// GCRA and leaky-bucket states are themselves the time the key is back to full, so
/// those keys mark `full_at` with [`STATE_IS_TIME`] and the hot path writes nothing more
/// than its compare-and-swap.
#[derive(Debug)]
struct Cell {
    state: AtomicU64,
    full_at: AtomicU64,
    /// The end of the key's penalty (see [`apply_penalized`]); zero when never blocked.
    blocked_until: AtomicU64,
}

const STATE_IS_TIME: u64 = u64::MAX;

impl Cell {
    fn new(p: &Params) -> Self {
        Cell {
            state: AtomicU64::new(0),
            full_at: AtomicU64::new(if p.state_is_time() { STATE_IS_TIME } else { 0 }),
            blocked_until: AtomicU64::new(0),
        }
    }

    #[inline]
    fn apply(&self, p: &Params, now: u64, cost: u32, penalty: u64) -> Step {
        let step = apply_penalized(&self.state, &self.blocked_until, p, now, cost, penalty);
        if step.state.is_some() && !p.state_is_time() {
            self.full_at
                .fetch_max(now.saturating_add(step.reset_after), Ordering::AcqRel);
        }
        step
    }

    /// Whether the key is back to full and serves no penalty, so it can be forgotten.
    fn is_full(&self, now: u64) -> bool {
        if self.blocked_until.load(Ordering::Acquire) > now {
            return false;
        }
        match self.full_at.load(Ordering::Acquire) {
            STATE_IS_TIME => self.state.load(Ordering::Acquire) <= now,
            at => at <= now,
        }
    }
}

/// Gives back what an all-or-none check took before a later limit denied.
fn give_back(cell: &AtomicU64, p: &Params, now: u64, cost: u32) {
    // `fetch_update` with a closure that always returns `Some` cannot fail.
    let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
        Some(algorithm::refund(p, s, now, cost))
    });
}

/// Options shared by both memory limiters.
#[derive(Debug, Clone)]
pub struct MemoryLimiterBuilder<C = MonotonicClock> {
    limit: Limit,
    clock: C,
    shadow: bool,
    max_keys: usize,
    idle_grace: Duration,
    count_denials: bool,
    penalty: Duration,
    name: String,
}

/// The default cap on keys of a [`KeyedLimiter`]: 1,048,576 (about 72 MiB at most).
pub const DEFAULT_MAX_KEYS: usize = 1 << 20;

impl MemoryLimiterBuilder<MonotonicClock> {
    /// Options with `limit`, the monotonic clock, enforcement on, the default key cap.
    pub fn new(limit: Limit) -> Self {
        MemoryLimiterBuilder {
            limit,
            clock: MonotonicClock::new(),
            shadow: false,
            max_keys: DEFAULT_MAX_KEYS,
            idle_grace: Duration::from_secs(1),
            count_denials: false,
            penalty: Duration::ZERO,
            name: sd_core::observe::DEFAULT_NAME.to_owned(),
        }
    }
}

impl<C: Clock> MemoryLimiterBuilder<C> {
    /// Uses `clock` (a [`ManualClock`] in tests).
    pub fn clock<C2: Clock>(self, clock: C2) -> MemoryLimiterBuilder<C2> {
        MemoryLimiterBuilder {
            limit: self.limit,
            clock,
            shadow: self.shadow,
            max_keys: self.max_keys,
            idle_grace: self.idle_grace,
            count_denials: self.count_denials,
            penalty: self.penalty,
            name: self.name,
        }
    }

    /// The limiter's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`). Name it after its purpose (`"login"`, `"api"`), never after
    /// a client: a label's values must stay few.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Shadow mode: decide and count, but admit everything (a dark launch). Denials
    /// are counted in [`Stats::shadow_denied`] and change no state.
    pub fn shadow(mut self, on: bool) -> Self {
        self.shadow = on;
        self
    }

    /// Counts denials in [`Stats::denied`] (off by default: a shared atomic write per
    /// denial costs throughput under attack).
    pub fn count_denials(mut self, on: bool) -> Self {
        self.count_denials = on;
        self
    }

    /// The most keys a [`KeyedLimiter`] tracks (default [`DEFAULT_MAX_KEYS`]).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Below the key cap, keys are removed once back to full for `grace` (default 1 s),
    /// so busy keys are not removed and re-added over and over. At the cap, every key
    /// back to full is removed.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.idle_grace = grace;
        self
    }

    /// A penalty after the limit is exceeded: a key the limit denies is then refused
    /// outright for `penalty`, whatever its limit would admit meanwhile
    /// ([`Decision::penalty`] says so, and `retry_after` is the time left). Requests
    /// refused during the block take nothing and do not extend it; after it, the limit
    /// decides again on what the key had left. The login-abuse case: five attempts a
    /// minute, then fifteen minutes of nothing.
    ///
    /// `Duration::ZERO` (the default) is no penalty, and keeps GCRA on its fastest path.
    /// Shadow mode starts no penalty (its denials change no state). Longer than about
    /// 290 years fails in `build` naming `penalty`.
    ///
    /// A blocked key is never swept, so its block survives until it ends. The block is
    /// read before the key's state is changed: every decision that starts after a
    /// refusal has returned honours the block it began.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_ratelimit::{Limit, Quota, memory::{ManualClock, MemoryLimiterBuilder}};
    ///
    /// // Five login attempts a minute, then fifteen minutes of nothing.
    /// let clock = ManualClock::new();
    /// let logins = MemoryLimiterBuilder::new(Limit::gcra(Quota::per_minute(5)?))
    ///     .penalty(Duration::from_secs(15 * 60))
    ///     .clock(clock.clone())
    ///     .keyed::<String>()?;
    /// for _ in 0..5 {
    ///     assert!(logins.check("alice")?.allowed);
    /// }
    /// let refused = logins.check("alice")?;
    /// assert!(!refused.allowed && refused.penalty);
    /// assert_eq!(refused.retry_after, Duration::from_secs(15 * 60));
    /// // Ten minutes on the limit would admit five more; the penalty admits none.
    /// clock.advance(Duration::from_secs(10 * 60));
    /// assert_eq!(logins.check("alice")?.retry_after, Duration::from_secs(5 * 60));
    /// clock.advance(Duration::from_secs(5 * 60));
    /// assert!(logins.check("alice")?.allowed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn penalty(mut self, penalty: Duration) -> Self {
        self.penalty = penalty;
        self
    }

    /// A limiter for the whole process.
    pub fn direct(self) -> Result<DirectLimiter<C>> {
        Ok(DirectLimiter {
            core: Core::new(self)?,
            state: AtomicU64::new(0),
            blocked_until: AtomicU64::new(0),
        })
    }

    /// A limiter per key, with the default (fast, randomly seeded) hasher.
    pub fn keyed<K: Hash + Eq + Clone>(self) -> Result<KeyedLimiter<K, C>> {
        self.keyed_with_hasher(foldhash::fast::RandomState::default())
    }

    /// A limiter per key with the hasher `hasher`.
    pub fn keyed_with_hasher<K: Hash + Eq + Clone, S: BuildHasher + Clone>(
        self,
        hasher: S,
    ) -> Result<KeyedLimiter<K, C, S>> {
        if self.max_keys == 0 {
            return Err(Error::config("max_keys", "must be at least 1"));
        }
        let (max_keys, idle_grace) = (self.max_keys, nanos(self.idle_grace));
        Ok(KeyedLimiter {
            core: Core::new(self)?,
            map: DashMap::with_hasher_and_shard_amount(hasher, shard_amount()),
            max_keys,
            idle_grace,
            len: AtomicUsize::new(0),
            inserts_since_sweep: AtomicUsize::new(0),
            sweeping: std::sync::Mutex::new(()),
        })
    }
}

/// Shards of a keyed map: 32 per core (dashmap's default is 4). A lookup write-locks
/// nothing but does write its shard's reader count, so two threads on different keys of
/// one shard bounce that cache line between cores; with 32 shards per core they rarely
/// meet. The cost is about 128 bytes per shard.
fn shard_amount() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores * 32).next_power_of_two().clamp(4, 4096)
}

#[cfg(feature = "tokio")]
async fn wait_until(mut check: impl FnMut() -> Result<Decision>) -> Result<Decision> {
    loop {
        let d = check()?;
        if d.allowed {
            if !d.delay.is_zero() {
                tokio::time::sleep(d.delay).await;
            }
            return Ok(d);
        }
        tokio::time::sleep(d.retry_after.max(Duration::from_nanos(1))).await;
    }
}

/// `set_limit`, `limit` and `stats` of a limiter over a [`Core`] in `self.core`: the
/// same on both limiters but for the first words of the docs of the first two.
macro_rules! core_accessors {
    (set_limit: $set_limit:literal, limit: $limit:literal) => {
        #[doc = $set_limit]
        ///
        /// # Errors
        ///
        /// [`Error::InvalidConfig`] naming `limit` when the new limit stores its state
        /// differently (another algorithm, a token bucket with another refill, a sliding
        /// window of another length): the kept state would be misread.
        pub fn set_limit(&self, limit: Limit) -> Result<()> {
            self.core.set_limit(limit)
        }

        #[doc = $limit]
        pub fn limit(&self) -> Limit {
            self.core.limit.limit()
        }

        /// Counters.
        pub fn stats(&self) -> &Stats {
            &self.core.stats
        }
    };
}

mod direct;
mod keyed;

pub use direct::DirectLimiter;
pub use keyed::KeyedLimiter;
