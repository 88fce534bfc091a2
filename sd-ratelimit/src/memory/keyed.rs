//! [`KeyedLimiter`]: one state per key, bounded, swept as keys are added.

use super::*;

/// One state per key, bounded.
///
/// Memory stays bounded with no housekeeping call: the map holds at most `max_keys`
/// keys, and keys whose state is back to full (indistinguishable from a new key) are
/// removed by a sweep that runs on insertion, amortised to O(1) per new key. When the map
/// is full of keys that are all still limited, a new key gets
/// [`Error::TooManyKeys`] (the caller decides: deny, or admit unlimited).
///
/// ```
/// use sd_ratelimit::{Limit, Quota, memory::MemoryLimiterBuilder};
///
/// let limiter = MemoryLimiterBuilder::new(Limit::gcra(Quota::per_minute(1)?)).keyed::<String>()?;
/// assert!(limiter.check("alice")?.allowed);
/// assert!(!limiter.check("alice")?.allowed);
/// assert!(limiter.check("bob")?.allowed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct KeyedLimiter<K, C = MonotonicClock, S = foldhash::fast::RandomState> {
    pub(super) core: Core<C>,
    pub(super) map: DashMap<K, Cell, S>,
    pub(super) max_keys: usize,
    pub(super) idle_grace: u64,
    pub(super) len: AtomicUsize,
    pub(super) inserts_since_sweep: AtomicUsize,
    pub(super) sweeping: std::sync::Mutex<()>,
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
            let allowed = gcra_take(&cell.state, unit, cap, now_ns(&self.core.clock));
            self.core.meters.decided(allowed, false);
            return allowed;
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
        self.core.meters.decided(combined.allowed, self.core.shadow);
        Ok(self.core.stats.record(combined, self.core.shadow))
    }

    /// The decision a request would get, without taking anything.
    fn peek<Q>(&self, key: &Q, p: &Params, cost: u32) -> Step
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (state, blocked_until) = self.map.get(key).map_or((0, 0), |c| {
            let state = c.state.load(Ordering::Acquire);
            (state, c.blocked_until.load(Ordering::Acquire))
        });
        let now = now_ns(&self.core.clock);
        // A block already stored shows; none starts here.
        algorithm::penalize(
            algorithm::decide(p, state, now, cost),
            blocked_until,
            now,
            0,
        )
        .0
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
            return Ok(cell.apply(p, now_ns(&self.core.clock), cost, self.core.penalty));
        }
        let fresh = algorithm::decide(p, 0, now_ns(&self.core.clock), cost);
        // A new key is stored when admitted with a cost, or denied under a penalty (to
        // keep its block).
        let keep = fresh.state.is_some() || !fresh.allowed && self.core.penalty > 0;
        if !keep || self.core.shadow && !fresh.allowed {
            return Ok(fresh);
        }
        self.make_room()?;
        match self.map.entry(key.to_owned()) {
            Entry::Occupied(cell) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
                Ok(cell
                    .get()
                    .apply(p, now_ns(&self.core.clock), cost, self.core.penalty))
            }
            Entry::Vacant(slot) => {
                let cell = slot.insert(Cell::new(p));
                Ok(cell.apply(p, now_ns(&self.core.clock), cost, self.core.penalty))
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

    core_accessors!(
        set_limit: "Replaces the default limit. Keys keep their state, so the change hands \
                    out no fresh burst (exactly so for GCRA and leaky buckets, whose state \
                    is a time).",
        limit: "The default limit."
    );

    /// Waits until a request of `cost` for `key` is admitted. For a leaky queue the wait
    /// is the slot reserved at the call, so waiters on one key proceed in FIFO order.
    #[cfg(feature = "tokio")]
    pub async fn until_ready<Q>(&self, key: &Q, cost: u32) -> Result<Decision>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        wait_until(|| self.check_n(key, cost)).await
    }
}
