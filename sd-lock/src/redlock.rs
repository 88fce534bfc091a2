//! Redlock over N independent Redis masters (feature `redis`).
//!
//! The algorithm of the Redis documentation, with the figures of its implementations:
//!
//! 1. Read the monotonic clock; send the acquire (`SET NX PX` then `TIME`, pipelined:
//!    one write, no script, no transaction) to every master **in parallel** (all written
//!    before any reply is awaited, over the masters' multiplexed connections, no task
//!    per master), bounded by a per-node timeout of 5 % of the TTL (at least 1 ms), so
//!    one slow or dead master costs no more than that.
//! 2. The attempt waits for **every** master's answer (or the per-node deadline), not
//!    only the first quorum: requests whose futures are dropped are never sent, so
//!    stopping at the quorum would leave the lease on exactly N/2+1 masters, and one of
//!    them restarting empty would let a second holder in. The lock is held when a
//!    **quorum of N/2+1** masters granted it and validity is left:
//!    `validity = ttl - elapsed - (ttl / 100 + 2 ms)`.
//! 3. Otherwise the attempt **releases on every master** (compare-and-delete by its
//!    random value, so no other holder is touched) before it returns
//!    [`Error::NoQuorum`] with the masters that failed and why ([`NodeFailure`]). The
//!    one exception: when every master answered that another holder has the key, none
//!    set ours and the release round trip is skipped (rslock sends it anyway), so a
//!    contended waiter retries sooner.
//!
//! # What Redlock guarantees, and what not
//!
//! - Mutual exclusion holds only in a *synchronous* model: bounded network delay,
//!   bounded process pauses, and masters whose clocks run at nearly the same rate (the
//!   1 % drift margin). A pause of the holder, a clock step on a master, or a master
//!   that restarts **empty** within a TTL (no `appendfsync always`, no delayed restart)
//!   can let two holders in at once. The tests show the last one.
//! - The **fencing token** is the largest of the quorum's per-master tokens, each the
//!   master's clock in µs (`TIME`) just after it granted the lease: nothing is stored
//!   for it, so a master that restarts empty still hands out larger tokens, and a grant
//!   costs the master a `SET` and a `TIME`, far less than a script with a stored
//!   counter (rslock sends a bare `SET NX PX` and hands out no token). It is not a
//!   consensus number: it increases from one holder to the next when the masters'
//!   clocks agree to within the time between the two acquisitions (milliseconds at
//!   least: the first lease must expire or be released). That is the same synchronous
//!   assumption, so fence writes with it and treat a rejected write as "the lease was
//!   lost".
//! - Use Redlock for efficiency (rarely doing work twice) with high availability:
//!   it keeps working with a minority of masters down. For correctness, prefer the
//!   PostgreSQL or etcd backends, and fence either way.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use redis::aio::ConnectionLike;
use sd_core::KeyPrefix;
use sd_core::redis::{Replication, Script, ScriptCall};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Lease, OnCancel, Release, RetryPolicy};
use crate::observe::Meters;

static ACQUIRE: Script = Script::new(include_str!("redis/acquire.lua"));
static EXTEND: Script = Script::new(include_str!("redis/extend.lua"));
static RELEASE: Script = Script::new(include_str!("redis/release.lua"));
static CONFIRM: Script = Script::new(include_str!("redis/confirm.lua"));

/// One request, built once and sent as is to every master in one round trip: a script
/// call (`EVALSHA`; after a `NOSCRIPT` reply, from a master that restarted or was
/// flushed, once more as `EVAL`, which also caches the script there), or a pipeline of
/// plain commands.
enum Call {
    Script(ScriptCall<'static>),
    Pipeline(redis::Pipeline),
}

impl From<ScriptCall<'static>> for Call {
    fn from(script: ScriptCall<'static>) -> Self {
        Call::Script(script)
    }
}

impl Call {
    /// `SET key holder NX PX ttl` then `TIME`, pipelined in one write (no `MULTI`): the
    /// reply is the master's clock just after it granted the lease, or nil with the time
    /// when it did not. No transaction is needed for the token to order holders: a later
    /// holder's `SET` succeeds only once this key is gone, and it cannot be gone before
    /// this `TIME` runs unless the whole TTL passed in between, which makes this
    /// attempt's elapsed time exceed the TTL and the attempt fail.
    fn acquire(key: &str, holder: &str, ttl_ms: u64) -> Call {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(key)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .cmd("TIME");
        Call::Pipeline(pipe)
    }

    async fn query<R: redis::FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> redis::RedisResult<R> {
        match self {
            Call::Script(script) => script.invoke(conn).await,
            Call::Pipeline(pipe) => pipe.query_async(conn).await,
        }
    }
}

/// Why one master did not grant (or extend, or release) the lock.
#[derive(Debug)]
#[non_exhaustive]
pub enum NodeFailure {
    /// The master holds the resource for another holder (or, for extend and release,
    /// no longer holds it for us).
    Held {
        /// The master's name.
        node: String,
    },
    /// The master did not answer within the per-node timeout.
    TimedOut {
        /// The master's name.
        node: String,
        /// The per-node timeout.
        after: Duration,
    },
    /// The master granted it, but fewer of its replicas than
    /// [`wait_for_replicas`](crate::redis::RedisLockBuilder::wait_for_replicas) asks for
    /// acknowledged the write within the wait.
    NotReplicated {
        /// The master's name.
        node: String,
        /// Replicas that acknowledged it.
        acked: u32,
        /// Replicas asked for.
        wanted: u32,
    },
    /// The master answered with an error, or the connection failed.
    Failed {
        /// The master's name.
        node: String,
        /// The client error.
        source: redis::RedisError,
    },
}

impl NodeFailure {
    /// The master's name.
    pub fn node(&self) -> &str {
        match self {
            NodeFailure::Held { node }
            | NodeFailure::TimedOut { node, .. }
            | NodeFailure::NotReplicated { node, .. }
            | NodeFailure::Failed { node, .. } => node,
        }
    }

    /// The failure as this crate's error, for a single-node lock.
    fn into_error(self, resource: &str) -> Error {
        match self {
            NodeFailure::Held { .. } => Error::Held {
                resource: resource.to_owned(),
            },
            NodeFailure::TimedOut { after, .. } => Error::Timeout { after },
            NodeFailure::NotReplicated { acked, wanted, .. } => Error::NotReplicated {
                resource: resource.to_owned(),
                acked,
                wanted,
            },
            NodeFailure::Failed { source, .. } => Error::from(source),
        }
    }
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeFailure::Held { node } => write!(f, "{node}: held by another holder"),
            NodeFailure::TimedOut { node, after } => {
                write!(f, "{node}: no answer within {after:?}")
            }
            NodeFailure::NotReplicated {
                node,
                acked,
                wanted,
            } => write!(f, "{node}: {acked} of {wanted} replicas acknowledged"),
            NodeFailure::Failed { node, source } => write!(f, "{node}: {source}"),
        }
    }
}

#[derive(Debug)]
struct Node<C> {
    name: String,
    conn: C,
}

/// `WAIT` for this many replicas, this long, before a grant counts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Replicas {
    pub(crate) count: u32,
    pub(crate) timeout: Duration,
}

impl Replicas {
    pub(crate) fn check(self) -> Result<()> {
        if self.count == 0 {
            return Err(Error::InvalidConfig {
                field: "wait_for_replicas",
                reason: "wait for at least 1 replica, or leave it unset to not wait".into(),
            });
        }
        if self.timeout.is_zero() {
            return Err(Error::InvalidConfig {
                field: "wait_for_replicas",
                reason: "the timeout must be above zero (`WAIT` with 0 blocks for ever)".into(),
            });
        }
        Ok(())
    }
}

/// How the per-node timeout is chosen.
#[derive(Debug, Clone, Copy)]
enum NodeTimeout {
    /// A fraction of the TTL (Redlock: 0.05).
    Factor(f64),
    /// A fixed duration.
    Fixed(Duration),
}

/// Redlock over N independent masters. Cheap to clone; clones share the connections.
///
/// `C` is any redis-rs async connection: a `ConnectionManager` (reconnects by itself,
/// recommended) or a `MultiplexedConnection`, one per master.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::{Lock, redlock::Redlock};
///
/// let mut masters = Vec::new();
/// for url in ["redis://10.0.0.1/", "redis://10.0.0.2/", "redis://10.0.0.3/"] {
///     masters.push((url, redis::Client::open(url)?.get_connection_manager().await?));
/// }
/// let lock = Redlock::builder(masters).prefix("reports").build()?;
/// let lease = lock.acquire("nightly-report", Duration::from_secs(30), Duration::from_secs(5)).await?;
/// // ... work, passing lease.token() to every write ...
/// let _ = lock.release(lease).await?;
/// # Ok(()) }
/// ```
pub struct Redlock<C> {
    nodes: Arc<[Node<C>]>,
    prefix: KeyPrefix,
    node_timeout: NodeTimeout,
    retry: RetryPolicy,
    replicas: Option<Replicas>,
    tokens: Tokens,
    meters: Meters,
}

/// Where a master's fencing token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tokens {
    /// The master's clock just after the grant (`SET NX PX` + `TIME`; Redlock).
    Clock,
    /// `max(stored counter + 1, clock)` in the acquire script (the single-node backend):
    /// strictly increasing while the counter lives, even if the clock steps back.
    Counter,
}

impl<C> Clone for Redlock<C> {
    fn clone(&self) -> Self {
        Redlock {
            nodes: self.nodes.clone(),
            prefix: self.prefix.clone(),
            node_timeout: self.node_timeout,
            retry: self.retry,
            replicas: self.replicas,
            tokens: self.tokens,
            meters: self.meters.clone(),
        }
    }
}

impl<C> fmt::Debug for Redlock<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redlock")
            .field("nodes", &names(&self.nodes))
            .field("prefix", &self.prefix)
            .field("node_timeout", &self.node_timeout)
            .finish_non_exhaustive()
    }
}

/// What one round over the masters returned.
struct Round<T> {
    ok: Vec<T>,
    failures: Vec<NodeFailure>,
    elapsed: Duration,
}

/// The masters' names, for `Debug`.
fn names<C>(nodes: &[Node<C>]) -> Vec<&str> {
    nodes.iter().map(|n| n.name.as_str()).collect()
}

/// Options of a [`Redlock`]; [`build`](Self::build) checks them and names the setter
/// of a value out of range.
pub struct RedlockBuilder<C> {
    nodes: Vec<Node<C>>,
    prefix: String,
    node_timeout: NodeTimeout,
    retry: RetryPolicy,
    replicas: Option<Replicas>,
    tokens: Tokens,
    name: String,
}

impl<C> fmt::Debug for RedlockBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedlockBuilder")
            .field("nodes", &names(&self.nodes))
            .field("prefix", &self.prefix)
            .field("node_timeout", &self.node_timeout)
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedlockBuilder<C> {
    /// The key prefix (default `lock`): the lease key is `{prefix}:{{resource}}`, sd adds
    /// the colon. No `{`, `}` or trailing `:` (sd-core's `KeyPrefix` rule).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The per-node timeout as a fraction of the TTL (default 0.05; redsync's
    /// `timeoutFactor`), in `(0, 0.5]`. Replaces a [`node_timeout`](Self::node_timeout).
    pub fn timeout_factor(mut self, factor: f64) -> Self {
        self.node_timeout = NodeTimeout::Factor(factor);
        self
    }

    /// A fixed per-node timeout (above zero) instead of a fraction of the TTL.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = NodeTimeout::Fixed(timeout);
        self
    }

    /// The retry policy of [`crate::Lock::acquire`] (default
    /// [`lease::default_retry`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The lock's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`, registered by [`build`](Self::build)) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The lock, or [`Error::InvalidConfig`] naming the setter at fault (`masters` when
    /// none was given).
    pub fn build(self) -> Result<Redlock<C>> {
        if self.nodes.is_empty() {
            return Err(Error::InvalidConfig {
                field: "masters",
                reason: "needs at least one master (use 3 or 5 for Redlock)".into(),
            });
        }
        let prefix = KeyPrefix::parse("prefix", &self.prefix)?;
        self.node_timeout.check()?;
        if let Some(replicas) = self.replicas {
            replicas.check()?;
        }
        Ok(Redlock {
            nodes: self.nodes.into(),
            prefix,
            node_timeout: self.node_timeout,
            retry: self.retry,
            replicas: self.replicas,
            tokens: self.tokens,
            meters: Meters::new(&self.name, sd_core::observe::backend::REDIS),
        })
    }

    /// `WAIT` for `count` replicas, up to `timeout`, before a grant or an extension
    /// counts (the single-node lock's option).
    pub(crate) fn wait_for_replicas(mut self, count: u32, timeout: Duration) -> Self {
        self.replicas = Some(Replicas { count, timeout });
        self
    }

    /// Options for one master named `redis` with a fixed request timeout of 1 s and the
    /// counter script for tokens: the single-node backend's.
    pub(crate) fn single(conn: C) -> Self {
        RedlockBuilder {
            node_timeout: NodeTimeout::Fixed(Duration::from_secs(1)),
            tokens: Tokens::Counter,
            ..Redlock::builder([("redis", conn)])
        }
    }
}

impl NodeTimeout {
    fn check(self) -> Result<()> {
        match self {
            NodeTimeout::Factor(f) if !(f > 0.0 && f <= 0.5) => Err(Error::InvalidConfig {
                field: "timeout_factor",
                reason: format!("{f} must be in (0, 0.5]; 0.05 is the Redlock figure").into(),
            }),
            NodeTimeout::Fixed(d) if d.is_zero() => Err(Error::InvalidConfig {
                field: "node_timeout",
                reason: "must be longer than zero".into(),
            }),
            _ => Ok(()),
        }
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Redlock<C> {
    /// Redlock over `masters` (name, connection) with the defaults: key prefix `lock`,
    /// per-node timeout 5 % of the TTL. At least one master; use an odd number (3 or 5).
    pub fn new<N: Into<String>>(masters: impl IntoIterator<Item = (N, C)>) -> Result<Self> {
        Self::builder(masters).build()
    }

    /// Options for Redlock over `masters` (name, connection).
    pub fn builder<N: Into<String>>(
        masters: impl IntoIterator<Item = (N, C)>,
    ) -> RedlockBuilder<C> {
        RedlockBuilder {
            nodes: masters
                .into_iter()
                .map(|(name, conn)| Node {
                    name: name.into(),
                    conn,
                })
                .collect(),
            prefix: "lock".into(),
            node_timeout: NodeTimeout::Factor(0.05),
            retry: lease::default_retry(),
            replicas: None,
            tokens: Tokens::Clock,
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    /// The same lock with another retry policy for [`crate::Lock::acquire`].
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The number of masters.
    pub fn masters(&self) -> usize {
        self.nodes.len()
    }

    /// The quorum: N/2+1.
    pub fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    /// The per-node timeout for `ttl`.
    pub fn node_timeout(&self, ttl: Duration) -> Duration {
        match self.node_timeout {
            NodeTimeout::Factor(f) => ttl.mul_f64(f).max(Duration::from_millis(1)),
            NodeTimeout::Fixed(d) => d,
        }
    }

    /// The lease key of `resource`.
    pub fn key(&self, resource: &str) -> String {
        self.prefix.tagged(resource)
    }

    /// Sends `call` to every master at once (each connection is multiplexed: no task per
    /// master) and collects the replies as they come, all under one deadline `timeout`
    /// from now: a master still silent then is [`NodeFailure::TimedOut`]. `granted` turns
    /// a reply into `Some(value)` for a master that did what was asked.
    async fn round<T, R, F>(&self, timeout: Duration, call: &Call, granted: F) -> Round<T>
    where
        R: redis::FromRedisValue,
        F: Fn(R) -> Option<T>,
    {
        let start = Instant::now();
        let mut calls: Vec<_> = self
            .nodes
            .iter()
            .map(|node| {
                let mut conn = node.conn.clone();
                Some(Box::pin(async move { call.query::<R>(&mut conn).await }))
            })
            .collect();
        let mut deadline = pin!(tokio::time::sleep(timeout));
        let mut round = Round {
            ok: Vec::with_capacity(calls.len()),
            failures: Vec::new(),
            elapsed: Duration::ZERO,
        };
        let mut left = calls.len();
        poll_fn(|cx| {
            for (node, slot) in self.nodes.iter().zip(calls.iter_mut()) {
                let Some(fut) = slot else { continue };
                let Poll::Ready(reply) = fut.as_mut().poll(cx) else {
                    continue;
                };
                *slot = None;
                left -= 1;
                match reply {
                    Ok(r) => match granted(r) {
                        Some(v) => round.ok.push(v),
                        None => round.failures.push(NodeFailure::Held {
                            node: node.name.clone(),
                        }),
                    },
                    Err(source) => round.failures.push(NodeFailure::Failed {
                        node: node.name.clone(),
                        source,
                    }),
                }
            }
            if left == 0 {
                return Poll::Ready(());
            }
            if deadline.as_mut().poll(cx).is_ready() {
                for (node, slot) in self.nodes.iter().zip(calls.iter_mut()) {
                    if slot.take().is_some() {
                        round.failures.push(NodeFailure::TimedOut {
                            node: node.name.clone(),
                            after: timeout,
                        });
                    }
                }
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        round.elapsed = start.elapsed();
        round
    }

    /// Compare-and-delete `holder`'s key on every master, waiting for every answer (or
    /// the deadline); the number of deletions.
    async fn release_all(&self, key: &str, holder: &str, timeout: Duration) -> Round<()> {
        let mut script = RELEASE.call(1);
        script.arg(key).arg(holder);
        self.round(timeout, &script.into(), |deleted: i64| {
            (deleted == 1).then_some(())
        })
        .await
    }

    /// With `wait_for_replicas`: whether every master holds `holder`'s write on the
    /// replicas asked for (a `WAIT` after a confirming write of the lease, in one
    /// request per master), within the per-node timeout plus the wait.
    async fn replicated(
        &self,
        key: &str,
        holder: &str,
        timeout: Duration,
    ) -> std::result::Result<(), NodeFailure> {
        let Some(replicas) = self.replicas else {
            return Ok(());
        };
        let mut confirm = CONFIRM.call(1);
        confirm.arg(key).arg(holder);
        let after = timeout + replicas.timeout;
        for node in self.nodes.iter() {
            let mut conn = node.conn.clone();
            let waited = tokio::time::timeout(
                after,
                sd_core::redis::wait_for_replicas(
                    &mut conn,
                    &confirm,
                    replicas.count,
                    replicas.timeout,
                ),
            )
            .await;
            let acked = match waited {
                Err(_) => {
                    return Err(NodeFailure::TimedOut {
                        node: node.name.clone(),
                        after,
                    });
                }
                Ok(Err(source)) => {
                    return Err(NodeFailure::Failed {
                        node: node.name.clone(),
                        source,
                    });
                }
                // The lease is gone from the master (lost in a failover): nobody holds it.
                Ok(Ok(Replication::Missing)) => 0,
                Ok(Ok(Replication::Acked(n))) => n,
            };
            if acked < replicas.count {
                return Err(NodeFailure::NotReplicated {
                    node: node.name.clone(),
                    acked,
                    wanted: replicas.count,
                });
            }
        }
        Ok(())
    }

    fn no_quorum(&self, resource: &str, acquired: usize, mut failures: Vec<NodeFailure>) -> Error {
        if self.nodes.len() == 1
            && let Some(f) = failures.pop()
        {
            return f.into_error(resource);
        }
        Error::NoQuorum {
            resource: resource.to_owned(),
            acquired,
            needed: self.quorum(),
            failures,
        }
    }

    /// [`crate::Lock::try_acquire`].
    pub async fn try_acquire(&self, resource: &str, ttl: Duration) -> Result<Lease> {
        lease::validate(resource, ttl, Duration::from_millis(1))?;
        let key = self.key(resource);
        let holder = lease::new_holder();
        let timeout = self.node_timeout(ttl);
        let ttl_ms = lease::ceil_millis(ttl);
        // Dropped before the end (cancelled): release everywhere, in the background.
        // (Owned copies are made only then.)
        let cleanup = OnCancel::new(|| {
            let (this, key, holder) = (self.clone(), key.clone(), holder.clone());
            lease::spawn_detached(async move {
                let _ = this.release_all(&key, &holder, timeout).await;
            });
        });
        let start = Instant::now();
        // Every master is waited for (up to the deadline), not just a quorum: a lease set
        // on every reachable master survives one of them restarting empty, and requests
        // dropped before they were sent would never reach the others.
        let mut round = match self.tokens {
            Tokens::Clock => {
                let call = Call::acquire(&key, &holder, ttl_ms);
                self.round(
                    timeout,
                    &call,
                    |(granted, (secs, micros)): (Option<redis::Value>, (u64, u64))| {
                        granted.map(|_| secs.saturating_mul(1_000_000).saturating_add(micros))
                    },
                )
                .await
            }
            Tokens::Counter => {
                let mut script = ACQUIRE.call(2);
                script
                    .arg(&key)
                    .arg(format!("{key}:token"))
                    .arg(&holder)
                    .arg(ttl_ms);
                self.round(timeout, &script.into(), |token: Option<u64>| token)
                    .await
            }
        };
        // With `wait_for_replicas`, a grant counts once its replicas hold it; if they do
        // not, it is released below like any missed attempt.
        if self.replicas.is_some() && round.ok.len() >= self.quorum() {
            if let Err(failure) = self.replicated(&key, &holder, timeout).await {
                round.ok.clear();
                round.failures.push(failure);
            }
            round.elapsed = start.elapsed();
        }
        let span = tracing::debug_span!("redlock.acquire", resource, granted = round.ok.len());
        let _enter = span.enter();
        // Every master answered that another holder has the key: none set ours, so
        // there is nothing to release (the usual miss under contention, which then
        // retries a round trip sooner).
        let nothing_set = round.ok.is_empty()
            && round
                .failures
                .iter()
                .all(|f| matches!(f, NodeFailure::Held { .. }));
        let result = if round.ok.len() >= self.quorum() {
            match lease::validity(ttl, round.elapsed) {
                Some(validity) => {
                    cleanup.disarm();
                    return Ok(Lease {
                        resource: resource.to_owned(),
                        token: FencingToken(round.ok.iter().copied().max().unwrap_or(0)),
                        ttl,
                        valid_until: start + round.elapsed + validity,
                        holder,
                        handle: 0,
                    });
                }
                None => Error::ValidityExhausted {
                    resource: resource.to_owned(),
                    ttl,
                    elapsed: round.elapsed,
                },
            }
        } else {
            self.no_quorum(resource, round.ok.len(), round.failures)
        };
        // Missed: a master that timed out may have set the key after all, so release
        // everywhere, not only where it was granted.
        if !nothing_set {
            let _ = self.release_all(&key, &holder, timeout).await;
        }
        cleanup.disarm();
        tracing::debug!(error = %result, "lock not acquired");
        Err(result)
    }

    /// [`crate::Lock::extend`]: needs a quorum within the lease's validity.
    pub async fn extend(&self, lease: &mut Lease, ttl: Duration) -> Result<()> {
        lease::validate_ttl(ttl, Duration::from_millis(1))?;
        let expired = || Error::LeaseExpired {
            resource: lease.resource.clone(),
        };
        if !lease.is_valid() {
            return Err(expired());
        }
        let key = self.key(&lease.resource);
        let timeout = self.node_timeout(ttl).min(lease.remaining());
        let mut script = EXTEND.call(1);
        script
            .arg(&key)
            .arg(&lease.holder)
            .arg(lease::ceil_millis(ttl));
        let start = Instant::now();
        let round = self
            .round(timeout, &script.into(), |n: i64| (n == 1).then_some(()))
            .await;
        let not_ours = round
            .failures
            .iter()
            .filter(|f| matches!(f, NodeFailure::Held { .. }))
            .count();
        if round.ok.len() >= self.quorum() {
            // With `wait_for_replicas`, the extension counts once its replicas hold it.
            if let Err(failure) = self.replicated(&key, &lease.holder, timeout).await {
                return Err(failure.into_error(&lease.resource));
            }
            let elapsed = start.elapsed();
            if let Some(validity) = lease::validity(ttl, elapsed) {
                lease.valid_until = start + elapsed + validity;
                lease.ttl = ttl;
                return Ok(());
            }
            return Err(expired());
        }
        if not_ours > self.nodes.len() - self.quorum() {
            return Err(expired());
        }
        Err(self.no_quorum(&lease.resource, round.ok.len(), round.failures))
    }

    /// [`crate::Lock::release`]: compare-and-delete on every master. Released when any
    /// master still held it for us; expired when every master answered and none did.
    pub async fn release(&self, lease: Lease) -> Result<Release> {
        let key = self.key(&lease.resource);
        let timeout = self.node_timeout(lease.ttl);
        let round = self.release_all(&key, &lease.holder, timeout).await;
        if !round.ok.is_empty() {
            return Ok(Release::Released);
        }
        if round
            .failures
            .iter()
            .all(|f| matches!(f, NodeFailure::Held { .. }))
        {
            return Ok(Release::Expired);
        }
        let failures = round
            .failures
            .into_iter()
            .filter(|f| !matches!(f, NodeFailure::Held { .. }))
            .collect();
        Err(self.no_quorum(&lease.resource, 0, failures))
    }
}

forward_lock!([C: ConnectionLike + Clone + Send + Sync + 'static] Redlock<C>, retry: retry, meters: meters);
