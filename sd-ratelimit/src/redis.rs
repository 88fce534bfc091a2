//! The Redis backend: one limit shared by every replica of a service.
//!
//! - **One round trip per decision**: `EVALSHA` of one Lua script (a port of the pure
//!   module: `gcra.lua` for GCRA and leaky buckets without a queue, with less server
//!   work, `limit.lua` for the rest and for [`RedisLimiter::check_all`]); on
//!   `NOSCRIPT` (a restarted or failed-over server) the script is sent with `EVAL`
//!   once, which caches it again.
//! - **Server time**: the script reads Redis's `TIME`, so app servers whose clocks drift
//!   still agree. Arithmetic is in integer microseconds.
//! - **Expiring keys**: every write sets `PX` to the time the key is back to full, so
//!   idle keys vanish and memory stays proportional to the keys being limited.
//! - **Cluster-safe keys**: `{prefix}:{{key}}`, the key a hash tag, so the same code
//!   runs on Redis Cluster. [`RedisLimiter::check_all`] puts several keys in one script:
//!   on a cluster they must share a slot (give them the same `{tag}`), or Redis answers
//!   `CROSSSLOT`.
//! - **Failure policy**: when Redis errs or times out, [`FailurePolicy`] admits, denies,
//!   or decides on a local memory limiter. Errors are counted and logged.
//! - **Shadow mode**: decide, count what would be denied, admit everything.
//! - **Batching** (opt-in, [`RedisLimiterBuilder::batch`]): concurrent decisions share one `EVALSHA`,
//!   each still one round trip and decided on its own; nothing waits to fill a batch.
//! - **Deny cache** (opt-in, [`RedisLimiterBuilder::deny_cache`]): a key Redis denied is answered
//!   locally until it could be admitted, with exactly stated semantics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::ConnectionLike;
use sd_core::KeyPrefix;
use sd_core::deadline::timeout;
use sd_core::redis::{Script, ScriptCall};
use tokio::sync::oneshot;

use crate::algorithm::{Decision, Limit, Params, Step};
use crate::error::{Error, Result};
use crate::memory::{self, KeyedLimiter, Stats};
use crate::observe::{Failure, Meters};
use sd_core::observe::{backend, operation};

mod batch;
mod deny_cache;

pub use batch::MAX_BATCHES_IN_FLIGHT;
use batch::{BatchState, Batcher};
use deny_cache::DenyCache;

/// Redis keeps time in microseconds.
const TICK_NS: u64 = 1000;

/// Lua numbers are doubles: every value the script computes must stay below 2^53.
const LUA_EXACT: u64 = 1 << 53;

/// Every algorithm, several limits at once (mode `all`) or a batch (mode `each`):
/// `prelude.lua` then `limit.lua`.
static SCRIPT: Script = Script::new(concat!(
    include_str!("redis/prelude.lua"),
    include_str!("redis/limit.lua")
));

/// GCRA and the leaky meter only, one decision or a batch, with less server work:
/// `prelude.lua` then `gcra.lua`.
static GCRA: Script = Script::new(concat!(
    include_str!("redis/prelude.lua"),
    include_str!("redis/gcra.lua")
));

/// Whether `args` ([`script_args`]) describe a limit `gcra.lua` decides: virtual
/// scheduling with tick 1 and no queue.
fn gcra_only(args: &[i64; 6]) -> bool {
    args[0] == 1 && args[1] == 1 && args[5] < 0
}

/// What a decision does when Redis errs or does not answer within the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Admit (the service stays up; the limit is off while Redis is down).
    Open,
    /// Deny, with `retry_after` of one second.
    Closed,
    /// Decide on a limiter in this process, every key under the given limit (typically
    /// the shared limit divided by the number of replicas).
    Local(Limit),
}

/// Options of a [`RedisLimiter`].
#[derive(Debug, Clone)]
pub struct RedisLimiterBuilder {
    limit: Limit,
    prefix: String,
    timeout: Duration,
    policy: FailurePolicy,
    shadow: bool,
    batch: usize,
    deny_cache: usize,
    penalty: Duration,
    name: String,
}

impl RedisLimiterBuilder {
    /// Options with `limit`, prefix `rl`, a 100 ms timeout, and [`FailurePolicy::Open`].
    pub fn new(limit: Limit) -> Self {
        RedisLimiterBuilder {
            limit,
            prefix: "rl".into(),
            timeout: Duration::from_millis(100),
            policy: FailurePolicy::Open,
            shadow: false,
            batch: 1,
            deny_cache: 0,
            penalty: Duration::ZERO,
            name: sd_core::observe::DEFAULT_NAME.to_owned(),
        }
    }

    /// The limiter's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`) and field of its spans. Name it after its purpose (`"login"`,
    /// `"api"`), never after a client: a label's values must stay few.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The key prefix (default `rl`): keys are `{prefix}:{{key}}`. Checked by
    /// [`build`](Self::build) with sd-core's one rule ([`KeyPrefix`]): 1 to 64 printable
    /// bytes, no `{`, `}`, spaces or trailing `:` (sd adds the colon).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a decision waits for Redis before the failure policy applies.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do when Redis fails.
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Shadow mode: decide and count ([`Stats::shadow_denied`]) but admit everything.
    pub fn shadow(mut self, on: bool) -> Self {
        self.shadow = on;
        self
    }

    /// Batches concurrent decisions: up to `max` single-limit decisions waiting at the
    /// same moment go to Redis in one `EVALSHA` (each still decided on its own: an
    /// admitted one is consumed whatever the others get). Default 1 (off).
    ///
    /// Nothing waits to fill a batch: a decision is sent at once when fewer than
    /// [`MAX_BATCHES_IN_FLIGHT`] batches are in flight, and otherwise joins the next
    /// batch, which leaves as soon as one of those returns. Each decision still costs
    /// one round trip; under load Redis runs one script for many decisions, which is
    /// where the throughput comes from. Multi-limit checks ([`RedisLimiter::check_all`])
    /// and [`RedisLimiter::check_at`] are never batched.
    ///
    /// For one server (or a proxy in front of a cluster). On Redis Cluster a batch whose
    /// keys span slots is answered `CROSSSLOT` and is then re-sent one decision per
    /// command, correct but slower: leave batching off there.
    pub fn batch(mut self, max: usize) -> Self {
        self.batch = max;
        self
    }

    /// Remembers up to `max_keys` keys that Redis denied, and answers them locally
    /// (no round trip) until they could be admitted. Default 0 (off).
    ///
    /// Exactly: when Redis denies a request of cost `c` on key `k` under the default
    /// limit with `retry_after = R`, and the request was sent at local time `t`, then a
    /// request on `k` of cost at least `c` before `t + R` is denied locally, with
    /// `retry_after` the time left. Such an answer is one Redis would have given too:
    /// Redis decided at or after `t`, a denial writes nothing, and other callers only
    /// consume more, so nothing can be admitted on `k` for that cost before `t + R`.
    /// Exceptions, all on the side of denying a little longer, by at most `R`: the key
    /// deleted or Redis restarted empty meanwhile. [`RedisLimiter::set_limit`] empties
    /// the cache; `check_with`, `check_all` and `check_at` never use it. Local denials
    /// count in [`Stats::denied`] (or [`Stats::shadow_denied`] in shadow mode).
    ///
    /// This is Envoy's "local cache of keys over the limit": under attack, abusive keys
    /// stop costing Redis anything. When full, expired entries are swept out (amortised
    /// over insertions); if all are live, new denials are not cached.
    pub fn deny_cache(mut self, max_keys: usize) -> Self {
        self.deny_cache = max_keys;
        self
    }

    /// A penalty after the limit is exceeded: a key the limit denies is then refused
    /// outright for `penalty`, whatever its limit would admit meanwhile
    /// ([`Decision::penalty`] says so, and `retry_after` is the time left), as the
    /// memory limiter's [`penalty`](memory::MemoryLimiterBuilder::penalty) does and with
    /// the same decisions.
    ///
    /// The block is a key of its own beside the key's state (`{prefix}:{{key}}:b`, in
    /// the same hash slot), holding the block's end in server time and expiring with
    /// it; the same script that decides reads it and starts it, so the check and the
    /// block are one atomic step. Every call honours it ([`RedisLimiter::check_with`]
    /// and [`RedisLimiter::check_all`] too: in a multi-limit check each key whose limit
    /// denies is blocked). `Duration::ZERO` (the default) is no penalty and costs
    /// nothing; shadow mode starts no penalty. With
    /// [`deny_cache`](Self::deny_cache), a key refused as a penalty is answered locally
    /// for every cost until the block ends. Longer than about 70 years fails in `build`
    /// naming `penalty`.
    pub fn penalty(mut self, penalty: Duration) -> Self {
        self.penalty = penalty;
        self
    }

    /// A limiter on `conn`: a `ConnectionManager` or `MultiplexedConnection` for one
    /// server, a `cluster_async::ClusterConnection` for a cluster.
    pub fn build<C: ConnectionLike + Clone + Send + Sync>(
        self,
        conn: C,
    ) -> Result<RedisLimiter<C>> {
        if self.timeout.is_zero() {
            return Err(Error::config("timeout", "must be longer than zero"));
        }
        let prefix = KeyPrefix::parse("prefix", &self.prefix)?;
        if self.batch == 0 {
            return Err(Error::config(
                "batch",
                "must be at least 1 (1 turns batching off)",
            ));
        }
        let params = redis_params(&self.limit)?;
        let penalty = crate::algorithm::penalty_ticks(self.penalty, TICK_NS, LUA_EXACT / 4)?;
        let penalty = if self.shadow { 0 } else { penalty };
        let local = match self.policy {
            FailurePolicy::Local(limit) => Some(
                memory::MemoryLimiterBuilder::new(limit)
                    .penalty(self.penalty)
                    .name(self.name.clone())
                    .keyed::<String>()?,
            ),
            _ => None,
        };
        Ok(RedisLimiter {
            conn: conn.clone(),
            prefix,
            limit: ArcSwap::from_pointee((self.limit, params)),
            timeout: self.timeout,
            policy: self.policy,
            local,
            shadow: self.shadow,
            penalty,
            stats: Stats::new(true),
            meters: Meters::new(&self.name, sd_core::observe::backend::REDIS),
            name: self.name,
            denied: (self.deny_cache > 0).then(|| DenyCache {
                entries: dashmap::DashMap::default(),
                max_keys: self.deny_cache,
                refused: std::sync::atomic::AtomicUsize::new(0),
            }),
            batcher: (self.batch > 1).then(|| {
                Arc::new(Batcher {
                    conn,
                    timeout: self.timeout,
                    max: self.batch,
                    penalty,
                    state: Mutex::new(BatchState::default()),
                })
            }),
        })
    }
}

/// The limit in microseconds, checked to stay exact in Lua.
fn redis_params(limit: &Limit) -> Result<Params> {
    let p = limit.params(TICK_NS)?;
    let ok = match p {
        Params::Virtual(v) => v.cap < LUA_EXACT / 4,
        Params::Window { window, limit, .. } => window.saturating_mul(limit + 1) < LUA_EXACT,
    };
    if !ok {
        return Err(Error::config(
            "window",
            "too long for exact arithmetic in Redis (about 70 years of burst, or limit × window over 2^53 µs); shorten it",
        ));
    }
    Ok(p)
}

/// A limiter whose state lives in Redis.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use sd_ratelimit::{Limit, Quota, redis::{FailurePolicy, RedisLimiterBuilder}};
///
/// let client = redis::Client::open("redis://127.0.0.1/")?;
/// let conn = client.get_connection_manager().await?;
/// let limiter = RedisLimiterBuilder::new(Limit::gcra(Quota::per_second(10)?))
///     .on_failure(FailurePolicy::Open)
///     .build(conn)?;
/// let decision = limiter.check("user:42").await?;
/// println!("allowed: {}, remaining {}", decision.allowed, decision.remaining);
/// # Ok(()) }
/// ```
pub struct RedisLimiter<C> {
    conn: C,
    prefix: KeyPrefix,
    limit: ArcSwap<(Limit, Params)>,
    timeout: Duration,
    policy: FailurePolicy,
    local: Option<KeyedLimiter<String>>,
    shadow: bool,
    /// The penalty in microseconds; zero when off.
    penalty: u64,
    stats: Stats,
    meters: Meters,
    name: String,
    denied: Option<DenyCache>,
    batcher: Option<Arc<Batcher<C>>>,
}

impl<C> std::fmt::Debug for RedisLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.prefix)
            .field("limit", &self.limit.load().0)
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("shadow", &self.shadow)
            .field("penalty", &Duration::from_micros(self.penalty))
            .field("batch", &self.batcher.as_ref().map_or(1, |b| b.max))
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLimiter<C> {
    /// Decides one request of cost 1 for `key` under the default limit.
    pub async fn check(&self, key: &str) -> Result<Decision> {
        self.check_n(key, 1).await
    }

    /// Decides one request of cost `cost` for `key` under the default limit.
    pub async fn check_n(&self, key: &str, cost: u32) -> Result<Decision> {
        if let Some(d) = self.denied.as_ref().and_then(|c| c.get(key, cost)) {
            self.meters.decided(d.allowed, self.shadow);
            return Ok(self.stats.record(d, self.shadow));
        }
        let limit = self.limit.load_full();
        self.run(&[(key, limit.0, limit.1, cost)], None, self.denied.as_ref())
            .await
    }

    /// Decides one request for `key` under its own `limit` (per-key quotas, or limits
    /// changed on the fly: the limit travels with every call). A key's limits must store
    /// their state alike (see [`Self::set_limit`]): the script cannot tell a GCRA time
    /// from a window count.
    pub async fn check_with(&self, key: &str, limit: &Limit, cost: u32) -> Result<Decision> {
        let params = redis_params(limit)?;
        self.run(&[(key, *limit, params, cost)], None, None).await
    }

    /// Decides several limits in one script, all consumed or none (atomic in Redis).
    /// On a cluster the keys must share a hash slot. Each limit needs its own key: a key
    /// given twice is refused with [`Error::DuplicateKey`], since the script reads every
    /// state before it writes.
    pub async fn check_all(&self, checks: &[(&str, &Limit, u32)]) -> Result<Decision> {
        for (i, (key, _, _)) in checks.iter().enumerate() {
            if checks[..i].iter().any(|(earlier, _, _)| earlier == key) {
                return Err(Error::DuplicateKey {
                    key: (*key).to_owned(),
                });
            }
        }
        let items = checks
            .iter()
            .map(|(key, limit, cost)| Ok((*key, **limit, redis_params(limit)?, *cost)))
            .collect::<Result<Vec<_>>>()?;
        self.run(&items, None, None).await
    }

    /// Decides at a given time instead of the server's `TIME`: for tests and replays.
    /// `now` is the time since the Unix epoch (`SystemClock.now()`, with
    /// [`SystemClock`](crate::SystemClock) and [`Clock`](crate::Clock) in scope).
    pub async fn check_at(
        &self,
        key: &str,
        limit: &Limit,
        cost: u32,
        now: Duration,
    ) -> Result<Decision> {
        let params = redis_params(limit)?;
        let now_us = u64::try_from(now.as_micros()).unwrap_or(u64::MAX);
        self.run(&[(key, *limit, params, cost)], Some(now_us), None)
            .await
    }

    /// Waits until a request of `cost` for `key` is admitted. With a leaky queue the slot
    /// is reserved in Redis at the call, so waiters across all replicas proceed in the
    /// order their calls reached Redis; otherwise it retries after `retry_after`.
    pub async fn until_ready(&self, key: &str, cost: u32) -> Result<Decision> {
        loop {
            let d = self.check_n(key, cost).await?;
            if d.allowed {
                tokio::time::sleep(d.delay).await;
                return Ok(d);
            }
            tokio::time::sleep(d.retry_after.max(Duration::from_micros(1))).await;
        }
    }

    /// Replaces the default limit. State in Redis is kept: no fresh burst.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming `limit` when the new limit stores its state
    /// differently (another algorithm, a token bucket with another refill, a sliding
    /// window of another length): the state in Redis would be misread. Every replica
    /// sharing a prefix must use limits that store their state alike; give a new
    /// algorithm a new [`RedisLimiterBuilder::prefix`].
    pub fn set_limit(&self, limit: Limit) -> Result<()> {
        let params = redis_params(&limit)?;
        if !self.limit.load().1.same_state(&params) {
            return Err(Error::config("limit", crate::algorithm::OTHER_STATE));
        }
        self.limit.store(Arc::new((limit, params)));
        if let Some(cache) = &self.denied {
            cache.entries.clear();
        }
        Ok(())
    }

    /// Counters: denials, shadow denials, backend errors.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The Redis key holding `key`'s state.
    pub fn redis_key(&self, key: &str) -> String {
        self.prefix.tagged(key)
    }

    /// Decides `items` in Redis; a denial of a single item is remembered in `cache`.
    async fn run(
        &self,
        items: &[(&str, Limit, Params, u32)],
        now: Option<u64>,
        cache: Option<&DenyCache>,
    ) -> Result<Decision> {
        let sent = tokio::time::Instant::now();
        let started = std::time::Instant::now();
        for (_, _, p, cost) in items {
            p.check_cost(*cost)?;
        }
        let reply = match (&self.batcher, items, now) {
            (Some(batcher), [(key, _, p, cost)], None) => {
                batcher
                    .decide(self.redis_key(key), script_args(p), *cost)
                    .await
            }
            _ => {
                let now = now.map(|n| n.to_string()).unwrap_or_default();
                let keys: Vec<String> = items.iter().map(|(k, ..)| self.redis_key(k)).collect();
                let call = match items {
                    [(_, _, p, cost)] if gcra_only(&script_args(p)) => {
                        // Only unit and cap: gcra.lua knows the kind.
                        let a = script_args(p);
                        let mut call = with_keys(&GCRA, &keys, self.penalty);
                        call.arg(now)
                            .arg(self.penalty)
                            .arg(a[3])
                            .arg(a[4])
                            .arg(*cost);
                        call
                    }
                    _ => {
                        let mut call = with_keys(&SCRIPT, &keys, self.penalty);
                        call.arg(now).arg("all").arg(self.penalty);
                        for (_, _, p, cost) in items {
                            call.arg(&script_args(p)[..]).arg(*cost);
                        }
                        call
                    }
                };
                let span = tracing::debug_span!(
                    "ratelimit.redis",
                    sd.name = %self.name,
                    sd.backend = backend::REDIS,
                    sd.operation = operation::DECIDE,
                    keys = items.len(),
                );
                let reply = timeout(self.timeout, span, invoke(&self.conn, &call)).await;
                batch_reply(reply)
            }
        };
        self.meters.backend_since(started);
        let decision = reply.and_then(|values| decode(&values, items.len()));
        match decision {
            Ok(d) => {
                self.meters.decided(d.allowed, self.shadow);
                if let (Some(cache), [(key, _, _, cost)], false) = (cache, items, d.allowed) {
                    // A block refuses every cost.
                    let cost = if d.penalty { 0 } else { *cost };
                    cache.insert(key, cost, sent, d);
                }
                Ok(self.stats.record(d, self.shadow))
            }
            Err(e) => self.on_failure(e, items),
        }
    }

    fn on_failure(&self, error: Error, items: &[(&str, Limit, Params, u32)]) -> Result<Decision> {
        self.stats.record_error();
        tracing::warn!(%error, policy = ?self.policy, "rate-limit backend failed");
        let capacity = items
            .iter()
            .map(|(_, l, _, _)| l.capacity())
            .min()
            .unwrap_or(0);
        match (&self.policy, &self.local) {
            (FailurePolicy::Local(limit), Some(local)) => {
                // Every key of the call under the local limit.
                let checks: Vec<(&str, &Limit, u32)> =
                    items.iter().map(|(k, _, _, c)| (*k, limit, *c)).collect();
                self.meters.failed(Failure::Fallback);
                local
                    .check_all(&checks)
                    .map(|d| self.stats.record(d, self.shadow))
            }
            (FailurePolicy::Closed, _) => Ok({
                self.meters.failed(Failure::Closed);
                self.stats.record(
                    Decision {
                        allowed: false,
                        limit: capacity,
                        remaining: 0,
                        retry_after: Duration::from_secs(1),
                        reset_after: Duration::from_secs(1),
                        delay: Duration::ZERO,
                        penalty: false,
                    },
                    self.shadow,
                )
            }),
            _ => Ok({
                self.meters.failed(Failure::Open);
                Decision {
                    allowed: true,
                    limit: capacity,
                    remaining: capacity,
                    retry_after: Duration::ZERO,
                    reset_after: Duration::ZERO,
                    delay: Duration::ZERO,
                    penalty: false,
                }
            }),
        }
    }
}

/// The block key of the state key `key` (see [`RedisLimiterBuilder::penalty`]): the same
/// hash tag, so one script may touch both on a cluster.
fn block_key(key: &str) -> String {
    format!("{key}:b")
}

/// A call of `script` on the state keys `keys`, followed by their block keys when a
/// penalty is on.
fn with_keys(script: &'static Script, keys: &[String], penalty: u64) -> ScriptCall<'static> {
    let blocks = if penalty > 0 { keys.len() } else { 0 };
    let mut call = script.call(keys.len() + blocks);
    for key in keys {
        call.arg(key);
    }
    for key in &keys[..blocks] {
        call.arg(block_key(key));
    }
    call
}

/// Runs `call` on a clone of `conn` (`EVALSHA`, then `EVAL` once on `NOSCRIPT`).
async fn invoke<C: ConnectionLike + Clone>(
    conn: &C,
    call: &ScriptCall<'_>,
) -> redis::RedisResult<Vec<i64>> {
    call.invoke(&mut conn.clone()).await
}

/// A script's reply, or the Redis error or the time limit that passed instead.
fn batch_reply(
    reply: std::result::Result<redis::RedisResult<Vec<i64>>, sd_core::Elapsed>,
) -> Result<Vec<i64>> {
    Ok(reply??)
}

/// The 6 numbers that describe a limit to the script (kind first).
fn script_args(p: &Params) -> [i64; 6] {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match *p {
        Params::Virtual(v) => [
            1,
            i(v.tick),
            i(v.per_tick),
            i(v.unit),
            i(v.cap),
            v.max_wait.map_or(-1, i),
        ],
        Params::Window { window, limit, .. } => [2, i(window), i(limit), 0, 0, 0],
    }
}

fn decode(values: &[i64], n: usize) -> Result<Decision> {
    if values.len() != 6 * n {
        return Err(Error::UnexpectedReply {
            reason: "expected 6 integers per limit",
        });
    }
    let steps: Vec<Decision> = values
        .chunks_exact(6)
        .map(|v| {
            let u = |i: usize| u64::try_from(v[i]).unwrap_or(0);
            Step {
                allowed: v[0] == 1,
                penalty: v[0] == 2,
                limit: u(1),
                remaining: u(2),
                retry_after: u(3),
                reset_after: u(4),
                delay: u(5),
                state: None,
            }
            .decision(TICK_NS)
        })
        .collect();
    Decision::combine(&steps).ok_or(Error::UnexpectedReply { reason: "no limit" })
}
