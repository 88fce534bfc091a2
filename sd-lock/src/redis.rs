//! The Redis backend: one server (feature `redis`).
//!
//! - **Acquire** is one script, one round trip: `SET key value NX PX ttl` and, when it
//!   succeeds, the fencing counter `max(last + 1, server time in µs)` in the same
//!   atomic step (`redis/acquire.lua`). `value` is 128 random bits, new per attempt.
//! - **Extend** and **release** are compare-by-value scripts: `PEXPIRE` or `DEL` only
//!   if the key still holds our value, so nobody extends or frees another holder's
//!   lease.
//! - Scripts go by `EVALSHA`, falling back to `EVAL` once after `NOSCRIPT`.
//! - Keys are `{prefix}:{{resource}}` and `{prefix}:{{resource}}:token`: one hash tag,
//!   so the same code runs on a Redis Cluster connection.
//! - Guarantees: mutual exclusion while the server keeps its data and its clock. A
//!   failover to a replica that missed the write, or a restart without persistence,
//!   frees the lease early; tokens still increase across such a restart (they follow
//!   the server clock), so the fence refuses the old holder's writes.
//! - Optional: [`wait_for_replicas`](RedisLockBuilder::wait_for_replicas) makes a
//!   grant or an extension count only once `WAIT` says that many replicas hold it.
//!
//! This is [`crate::redlock::Redlock`] with one master and a fixed 1 s request timeout.

use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::error::{Error, Result};
use crate::lease::RetryPolicy;
use crate::redlock::{Redlock, RedlockBuilder};

/// Leases on one Redis server. Cheap to clone.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::{Lock, redis::RedisLock};
///
/// let conn = redis::Client::open("redis://127.0.0.1/")?.get_connection_manager().await?;
/// let lock = RedisLock::builder(conn).prefix("jobs").build()?;
/// let lease = lock.try_acquire("charge:42", Duration::from_secs(10)).await?;
/// println!("token {}", lease.token());
/// let _ = lock.release(lease).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisLock<C> {
    inner: Redlock<C>,
}

impl<C> fmt::Debug for RedisLock<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("inner", &self.inner)
            .finish()
    }
}

/// Options of a [`RedisLock`]; [`build`](Self::build) checks them and names the setter
/// of a value out of range. The options of a one-master [`Redlock`] underneath.
pub struct RedisLockBuilder<C> {
    inner: RedlockBuilder<C>,
}

impl<C> fmt::Debug for RedisLockBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLockBuilder")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLockBuilder<C> {
    /// The key prefix (default `lock`): keys are `{prefix}:{{resource}}` and
    /// `{prefix}:{{resource}}:token`, sd adds the colon. No `{`, `}` or trailing `:`.
    pub fn prefix(self, prefix: impl Into<String>) -> Self {
        RedisLockBuilder {
            inner: self.inner.prefix(prefix),
        }
    }

    /// How long one request may take (default 1 s; above zero). A request that times out
    /// is [`crate::Error::Timeout`], and any key it may have set is released.
    pub fn timeout(self, timeout: Duration) -> Self {
        RedisLockBuilder {
            inner: self.inner.node_timeout(timeout),
        }
    }

    /// The retry policy of [`crate::Lock::acquire`] (default
    /// [`crate::lease::default_retry`]).
    pub fn retry(self, retry: RetryPolicy) -> Self {
        RedisLockBuilder {
            inner: self.inner.retry(retry),
        }
    }

    /// The lock's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`, registered by [`build`](Self::build)) and field of its spans.
    pub fn name(self, name: impl Into<String>) -> Self {
        RedisLockBuilder {
            inner: self.inner.name(name),
        }
    }

    /// Off by default. When set, a grant (and an extension) counts only once `count`
    /// replicas acknowledged it: after the acquire script, one more request to the
    /// lease's master writes the lease again unchanged (if it is still ours) and sends
    /// `WAIT count timeout` (milliseconds, rounded up) behind it. Fewer acknowledgements
    /// within `timeout` is [`crate::Error::NotReplicated`] (not contention: `acquire`
    /// does not retry it), and the grant is released again, best effort; a lease that
    /// vanished from the master meanwhile counts as 0 replicas. The wait adds to the
    /// request [`timeout`](Self::timeout), and must stay below the connection's own
    /// response timeout (2 s for sd-core's `FailoverConnection`).
    ///
    /// What it promises: a lease you hold was in the memory of `count` replicas when
    /// you got it, so a failover that promotes one of them keeps it (and its token
    /// counter), and no later holder gets the lease or its token while it lasts.
    ///
    /// What it does not: it is not durability on disk (a replica that restarts
    /// without persistence forgets it); a failover may still promote a replica that
    /// missed it when `count` is below the number of replicas (Sentinel and Cluster
    /// prefer the most up-to-date replica, but do not know about `WAIT`); writes can
    /// still be lost in a partition, and `WAIT` does not make Redis a consensus system.
    /// Fence your writes with the lease's token either way. Some managed services
    /// refuse or restrict `WAIT` (Huawei Cloud DCS disables it on its Redis 4.0 Proxy
    /// Cluster instances; a Redis Enterprise database has one replica to wait for);
    /// where it is refused every grant fails with [`crate::Error::Backend`]. `count` 0 or a zero `timeout` fails
    /// [`build`](Self::build) with field `wait_for_replicas`.
    pub fn wait_for_replicas(self, count: u32, timeout: Duration) -> Self {
        RedisLockBuilder {
            inner: self.inner.wait_for_replicas(count, timeout),
        }
    }

    /// The lock, or [`crate::Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<RedisLock<C>> {
        match self.inner.build() {
            Ok(inner) => Ok(RedisLock { inner }),
            // Redlock's setter for the request timeout is `node_timeout`; here `timeout`.
            Err(Error::InvalidConfig {
                field: "node_timeout",
                reason,
            }) => Err(Error::InvalidConfig {
                field: "timeout",
                reason,
            }),
            Err(e) => Err(e),
        }
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLock<C> {
    /// Leases on the server behind `conn` with the defaults: prefix `lock`, 1 s request
    /// timeout.
    pub fn new(conn: C) -> Self {
        Self::builder(conn)
            .build()
            .expect("the default options are valid")
    }

    /// Options for leases on the server behind `conn`.
    pub fn builder(conn: C) -> RedisLockBuilder<C> {
        RedisLockBuilder {
            inner: RedlockBuilder::single(conn),
        }
    }

    /// The same lock with another retry policy for [`crate::Lock::acquire`].
    pub fn with_retry(self, retry: RetryPolicy) -> Self {
        RedisLock {
            inner: self.inner.with_retry(retry),
        }
    }

    /// The lease key of `resource`.
    pub fn key(&self, resource: &str) -> String {
        self.inner.key(resource)
    }
}

forward_lock!([C: ConnectionLike + Clone + Send + Sync + 'static] RedisLock<C> => Lock inner);
