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
    nanos(clock.now())
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

/// The hot path's words for `params` (see [`LimitCell::gcra`]).
fn gcra_words(params: Params) -> [u64; 3] {
    params
        .gcra()
        .map_or([0; 3], |(unit, cap, burst)| [unit, cap, burst])
}

impl LimitCell {
    fn new(limit: Limit, params: Params) -> Self {
        LimitCell {
            version: AtomicU64::new(0),
            gcra: gcra_words(params).map(AtomicU64::new),
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

    fn store(&self, limit: Limit, params: Params) {
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
        for (word, value) in self.gcra.iter().zip(gcra_words(params)) {
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
}

impl<C: Clock> Core<C> {
    fn new(limit: Limit, clock: C, shadow: bool, count_denials: bool) -> Result<Self> {
        let params = limit.params(TICK_NS)?;
        Ok(Core {
            limit: LimitCell::new(limit, params),
            clock,
            shadow,
            plain: !shadow && !count_denials,
            stats: Stats::new(count_denials),
        })
    }

    fn set_limit(&self, limit: Limit) -> Result<()> {
        let params = limit.params(TICK_NS)?;
        if !self.limit.params().same_state(&params) {
            return Err(Error::config("limit", crate::algorithm::OTHER_STATE));
        }
        self.limit.store(limit, params);
        Ok(())
    }

    #[inline(always)]
    fn finish(&self, step: &Step) -> Decision {
        let d = step.decision(TICK_NS);
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
}

const STATE_IS_TIME: u64 = u64::MAX;

impl Cell {
    fn new(p: &Params) -> Self {
        Cell {
            state: AtomicU64::new(0),
            full_at: AtomicU64::new(if p.state_is_time() { STATE_IS_TIME } else { 0 }),
        }
    }

    #[inline]
    fn apply(&self, p: &Params, now: u64, cost: u32) -> Step {
        let step = apply(&self.state, p, now, cost);
        if step.state.is_some() && !p.state_is_time() {
            self.full_at
                .fetch_max(now.saturating_add(step.reset_after), Ordering::AcqRel);
        }
        step
    }

    fn is_full(&self, now: u64) -> bool {
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
pub struct Builder<C = MonotonicClock> {
    limit: Limit,
    clock: C,
    shadow: bool,
    max_keys: usize,
    idle_grace: Duration,
    count_denials: bool,
}

/// The default cap on keys of a [`KeyedLimiter`]: 1,048,576 (about 64 MiB at most).
pub const DEFAULT_MAX_KEYS: usize = 1 << 20;

impl Builder<MonotonicClock> {
    /// Options with `limit`, the monotonic clock, enforcement on, the default key cap.
    pub fn new(limit: Limit) -> Self {
        Builder {
            limit,
            clock: MonotonicClock::new(),
            shadow: false,
            max_keys: DEFAULT_MAX_KEYS,
            idle_grace: Duration::from_secs(1),
            count_denials: false,
        }
    }
}

impl<C: Clock> Builder<C> {
    /// Uses `clock` (a [`ManualClock`] in tests).
    pub fn clock<C2: Clock>(self, clock: C2) -> Builder<C2> {
        Builder {
            limit: self.limit,
            clock,
            shadow: self.shadow,
            max_keys: self.max_keys,
            idle_grace: self.idle_grace,
            count_denials: self.count_denials,
        }
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

    /// A limiter for the whole process.
    pub fn direct(self) -> Result<DirectLimiter<C>> {
        Ok(DirectLimiter {
            core: Core::new(self.limit, self.clock, self.shadow, self.count_denials)?,
            state: AtomicU64::new(0),
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
        Ok(KeyedLimiter {
            core: Core::new(self.limit, self.clock, self.shadow, self.count_denials)?,
            map: DashMap::with_hasher_and_shard_amount(hasher, shard_amount()),
            max_keys: self.max_keys,
            idle_grace: nanos(self.idle_grace),
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

/// One limit for the whole process.
///
/// ```
/// use sd_ratelimit::{Limit, Quota, memory::{Builder, ManualClock}};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let limiter = Builder::new(Limit::gcra(Quota::per_second(2)?)).clock(clock.clone()).direct()?;
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
    core: Core<C>,
    state: AtomicU64,
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
            return gcra_take(&self.state, unit, cap, now_ns(&self.core.clock));
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
        let step = apply(&self.state, &p, now_ns(&self.core.clock), cost);
        Ok(self.core.finish(&step))
    }

    /// Replaces the limit. The state is kept, so the change hands out no fresh burst:
    /// what was used under the old limit stays used.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming `limit` when the new limit stores its state
    /// differently (another algorithm, a token bucket with another refill, a sliding
    /// window of another length): the kept state would be misread.
    pub fn set_limit(&self, limit: Limit) -> Result<()> {
        self.core.set_limit(limit)
    }

    /// The current limit.
    pub fn limit(&self) -> Limit {
        self.core.limit.limit()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// Waits until a request of `cost` is admitted, then returns its decision. For a
    /// leaky queue the wait is the reserved slot (FIFO); otherwise it retries after
    /// `retry_after`.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn until_ready(&self, cost: u32) -> Result<Decision> {
        wait_until(|| self.check_n(cost)).await
    }
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

/// One state per key, bounded.
///
/// Memory stays bounded with no housekeeping call: the map holds at most `max_keys`
/// keys, and keys whose state is back to full (indistinguishable from a new key) are
/// removed by a sweep that runs on insertion, amortised to O(1) per new key. When the map
/// is full of keys that are all still limited, a new key gets
/// [`Error::TooManyKeys`] (the caller decides: deny, or admit unlimited).
///
/// ```
/// use sd_ratelimit::{Limit, Quota, memory::Builder};
///
/// let limiter = Builder::new(Limit::gcra(Quota::per_minute(1)?)).keyed::<String>()?;
/// assert!(limiter.check("alice")?.allowed);
/// assert!(!limiter.check("alice")?.allowed);
/// assert!(limiter.check("bob")?.allowed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct KeyedLimiter<K, C = MonotonicClock, S = foldhash::fast::RandomState> {
    core: Core<C>,
    map: DashMap<K, Cell, S>,
    max_keys: usize,
    idle_grace: u64,
    len: AtomicUsize,
    inserts_since_sweep: AtomicUsize,
    sweeping: std::sync::Mutex<()>,
}

impl<K: Hash + Eq + fmt::Debug, C: fmt::Debug, S> fmt::Debug for KeyedLimiter<K, C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("limit", &self.core.limit.limit())
            .field("keys", &self.len.load(Ordering::Relaxed))
            .field("max_keys", &self.max_keys)
            .field("shadow", &self.core.shadow)
            .finish_non_exhaustive()
    }
}

impl<K, C, S> KeyedLimiter<K, C, S>
where
    K: Hash + Eq + Clone,
    C: Clock,
    S: BuildHasher + Clone,
{
    /// Decides one request of cost 1 for `key` under the default limit.
    #[inline(always)]
    pub fn check<Q>(&self, key: &Q) -> Result<Decision>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_n(key, 1)
    }

    /// Decides one request of cost 1 for `key` and answers only whether it is admitted:
    /// the leanest check (for GCRA and the leaky meter on a known key: no [`Decision`]
    /// is built). A key over the cap ([`Error::TooManyKeys`]) is not admitted. Use
    /// [`Self::check`] for the wait, the remaining capacity and the reset time.
    #[inline]
    pub fn allow<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if self.core.plain
            && let Some((unit, cap, _)) = self.core.limit.gcra()
            && let Some(cell) = self.map.get(key)
        {
            // Time is read while the key's shard is held (see `step`).
            return gcra_take(&cell.state, unit, cap, now_ns(&self.core.clock));
        }
        self.check(key).is_ok_and(|d| d.allowed)
    }

    /// Decides one request of cost `cost` for `key` under the default limit.
    #[inline(always)]
    pub fn check_n<Q>(&self, key: &Q, cost: u32) -> Result<Decision>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some((unit, cap, burst)) = self.core.limit.gcra()
            && u64::from(cost) <= burst
            && let Some(cell) = self.map.get(key)
        {
            // Time is read while the key's shard is held (see `step`).
            let now = now_ns(&self.core.clock);
            let step = gcra_apply(&cell.state, unit, cap, burst, now, cost);
            return Ok(self.core.finish(&step));
        }
        let step = self.step(key, &self.core.limit.params(), cost)?;
        Ok(self.core.finish(&step))
    }

    /// Decides one request for `key` under `limit` instead of the default (per-key
    /// quotas: pass the key's own limit on every call). Keys checked under different
    /// limits must be distinct (prefix them).
    pub fn check_with<Q>(&self, key: &Q, limit: &Limit, cost: u32) -> Result<Decision>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let params = limit.params(TICK_NS)?;
        let step = self.step(key, &params, cost)?;
        Ok(self.core.finish(&step))
    }

    /// Checks several limits at once (per IP and per user, say): all are consumed or
    /// none is. Returns the tightest decision ([`Decision::combine`]).
    ///
    /// Limits are taken in order; when one denies, those already taken are given back.
    /// A concurrent request may therefore see a limit briefly taken and be denied, but no
    /// limit ever admits more than its quota.
    pub fn check_all<Q>(&self, checks: &[(&Q, &Limit, u32)]) -> Result<Decision>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let params = checks
            .iter()
            .map(|(_, limit, cost)| {
                let p = limit.params(TICK_NS)?;
                p.check_cost(*cost)?;
                Ok(p)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut steps = Vec::with_capacity(checks.len());
        for (i, ((key, _, cost), p)) in checks.iter().zip(&params).enumerate() {
            let step = self.step(*key, p, *cost)?;
            steps.push(step);
            if !step.allowed && !self.core.shadow {
                // Give back what the earlier limits took, then report every limit.
                for ((key, _, cost), p) in checks[..i].iter().zip(&params) {
                    if let Some(cell) = self.map.get(*key) {
                        give_back(&cell.state, p, now_ns(&self.core.clock), *cost);
                    }
                }
                for ((key, _, cost), p) in checks[i + 1..].iter().zip(&params[i + 1..]) {
                    steps.push(self.peek(*key, p, *cost));
                }
                break;
            }
        }
        let decisions: Vec<Decision> = steps.iter().map(|s| s.decision(TICK_NS)).collect();
        let combined =
            Decision::combine(&decisions).ok_or(Error::config("checks", "must not be empty"))?;
        Ok(self.core.stats.record(combined, self.core.shadow))
    }

    /// The decision a request would get, without taking anything.
    fn peek<Q>(&self, key: &Q, p: &Params, cost: u32) -> Step
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let state = self
            .map
            .get(key)
            .map_or(0, |c| c.state.load(Ordering::Acquire));
        algorithm::decide(p, state, now_ns(&self.core.clock), cost)
    }

    fn step<Q>(&self, key: &Q, p: &Params, cost: u32) -> Result<Step>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        p.check_cost(cost)?;
        if let Some(cell) = self.map.get(key) {
            // Time is read while the key's shard is held, so a sweep that removed the key
            // as "back to full" happened at an earlier time than this decision.
            return Ok(cell.apply(p, now_ns(&self.core.clock), cost));
        }
        let fresh = algorithm::decide(p, 0, now_ns(&self.core.clock), cost);
        if fresh.state.is_none() || self.core.shadow && !fresh.allowed {
            return Ok(fresh);
        }
        self.make_room()?;
        match self.map.entry(key.to_owned()) {
            Entry::Occupied(cell) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
                Ok(cell.get().apply(p, now_ns(&self.core.clock), cost))
            }
            Entry::Vacant(slot) => {
                let cell = slot.insert(Cell::new(p));
                Ok(cell.apply(p, now_ns(&self.core.clock), cost))
            }
        }
    }

    /// Reserves a slot for a new key: sweeps keys back to full when due, and refuses
    /// when the map is full of limited keys.
    fn make_room(&self) -> Result<()> {
        let inserts = self.inserts_since_sweep.fetch_add(1, Ordering::Relaxed) + 1;
        let len = self.len.fetch_add(1, Ordering::Relaxed) + 1;
        // A sweep costs O(len). Below the cap it runs once half the keys are new since the
        // last sweep (and at least 4096 are), and
        // removes keys idle for `idle_grace` (so busy keys are not removed and re-added
        // over and over); at the cap it runs after max_keys / 8 attempts and removes every
        // key back to full. Either way it is amortised O(1) per new key.
        let at_cap = len > self.max_keys;
        let due =
            inserts >= (len / 2).max(4096) || (at_cap && inserts >= (self.max_keys / 8).max(1));
        if due && let Ok(_guard) = self.sweeping.try_lock() {
            self.inserts_since_sweep.store(0, Ordering::Relaxed);
            self.sweep_idle(if at_cap { 0 } else { self.idle_grace });
        }
        if self.len.load(Ordering::Relaxed) > self.max_keys {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::TooManyKeys {
                max_keys: self.max_keys,
            });
        }
        Ok(())
    }

    /// Removes every key whose state is back to full. Runs by itself as keys are added;
    /// call it only to release memory right after a flood.
    pub fn sweep(&self) {
        self.sweep_idle(0);
    }

    /// Removes keys back to full for at least `grace` nanoseconds.
    fn sweep_idle(&self, grace: u64) {
        let now = now_ns(&self.core.clock).saturating_sub(grace);
        let mut removed = 0;
        self.map.retain(|_, cell| {
            let full = cell.is_full(now);
            removed += usize::from(full);
            !full
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
        if removed > self.map.capacity() / 2 {
            self.map.shrink_to_fit();
        }
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The most keys tracked.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Replaces the default limit. Keys keep their state, so the change hands out no
    /// fresh burst (exactly so for GCRA and leaky buckets, whose state is a time).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming `limit` when the new limit stores its state
    /// differently (another algorithm, a token bucket with another refill, a sliding
    /// window of another length): the kept state would be misread.
    pub fn set_limit(&self, limit: Limit) -> Result<()> {
        self.core.set_limit(limit)
    }

    /// The default limit.
    pub fn limit(&self) -> Limit {
        self.core.limit.limit()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// Waits until a request of `cost` for `key` is admitted. For a leaky queue the wait
    /// is the slot reserved at the call, so waiters on one key proceed in FIFO order.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub async fn until_ready<Q>(&self, key: &Q, cost: u32) -> Result<Decision>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        wait_until(|| self.check_n(key, cost)).await
    }
}
