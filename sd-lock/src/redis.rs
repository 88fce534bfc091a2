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
