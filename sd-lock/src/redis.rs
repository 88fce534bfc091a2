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

use sd_core::KeyPrefix;

use crate::error::{Error, Result};
use crate::lease::{self, RetryPolicy};
use crate::redlock::Redlock;

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
/// of a value out of range.
pub struct RedisLockBuilder<C> {
    conn: C,
    prefix: String,
    timeout: Duration,
    retry: RetryPolicy,
}

impl<C> fmt::Debug for RedisLockBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLockBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLockBuilder<C> {
    /// The key prefix (default `lock`): keys are `{prefix}:{{resource}}` and
    /// `{prefix}:{{resource}}:token`, sd adds the colon. No `{`, `}` or trailing `:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one request may take (default 1 s; above zero). A request that times out
    /// is [`crate::Error::Timeout`], and any key it may have set is released.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The retry policy of [`crate::Lock::acquire`] (default
    /// [`crate::lease::default_retry`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The lock, or [`crate::Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<RedisLock<C>> {
        let prefix = KeyPrefix::parse("prefix", &self.prefix)?;
        if self.timeout.is_zero() {
            return Err(Error::InvalidConfig {
                field: "timeout",
                reason: "must be longer than zero".into(),
            });
        }
        Ok(RedisLock {
            inner: Redlock::single(self.conn, prefix, self.timeout, self.retry),
        })
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLock<C> {
    /// Leases on the server behind `conn` with the defaults: prefix `lock`, 1 s request
    /// timeout.
    pub fn new(conn: C) -> Self {
        RedisLock {
            inner: Redlock::single(
                conn,
                KeyPrefix::parse("prefix", "lock").expect("`lock` is a valid prefix"),
                Duration::from_secs(1),
                lease::default_retry(),
            ),
        }
    }

    /// Options for leases on the server behind `conn`.
    pub fn builder(conn: C) -> RedisLockBuilder<C> {
        RedisLockBuilder {
            conn,
            prefix: "lock".into(),
            timeout: Duration::from_secs(1),
            retry: lease::default_retry(),
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

forward_lock!([C: ConnectionLike + Clone + Send + Sync + 'static] RedisLock<C> => inner);
