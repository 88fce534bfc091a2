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
use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::error::Result;
use crate::lease::{Lease, Release, RetryPolicy};
use crate::redlock::Redlock;

/// Leases on one Redis server. Cheap to clone.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::{Lock, redis::RedisLock};
///
/// let conn = redis::Client::open("redis://127.0.0.1/")?.get_connection_manager().await?;
/// let lock = RedisLock::new(conn).with_prefix("jobs")?;
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

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLock<C> {
    /// Leases on the server behind `conn`, prefix `lock`, 1 s request timeout.
    pub fn new(conn: C) -> Self {
        RedisLock {
            inner: Redlock::single(conn, Duration::from_secs(1)),
        }
    }

    /// The key prefix (default `lock`); no `{` or `}`.
    pub fn with_prefix(self, prefix: &str) -> Result<Self> {
        Ok(RedisLock {
            inner: self.inner.with_prefix(prefix)?,
        })
    }

    /// How long one request may take (default 1 s). A request that times out is
    /// [`crate::Error::Timeout`], and any key it may have set is released.
    pub fn with_timeout(self, timeout: Duration) -> Result<Self> {
        Ok(RedisLock {
            inner: self.inner.with_node_timeout(timeout)?,
        })
    }

    /// The retry policy of [`crate::Lock::acquire`].
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

impl<C: ConnectionLike + Clone + Send + Sync + 'static> crate::Lock for RedisLock<C> {
    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Lease>> + Send + 'a {
        self.inner.try_acquire(resource, ttl)
    }

    fn extend<'a>(
        &'a self,
        lease: &'a mut Lease,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        self.inner.extend(lease, ttl)
    }

    fn release(&self, lease: Lease) -> impl Future<Output = Result<Release>> + Send + '_ {
        self.inner.release(lease)
    }

    fn retry_policy(&self) -> RetryPolicy {
        crate::Lock::retry_policy(&self.inner)
    }
}
