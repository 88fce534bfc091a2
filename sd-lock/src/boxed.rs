//! [`BoxLock`]: any [`Lock`] behind one type, for a backend chosen at run time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::Lock;
use crate::error::Result;
use crate::lease::{Lease, Release, RetryPolicy};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`Lock`]: the same methods returning boxed futures.
trait DynLock: Send + Sync {
    fn try_acquire<'a>(&'a self, resource: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Lease>>;
    fn extend<'a>(&'a self, lease: &'a mut Lease, ttl: Duration) -> BoxFuture<'a, Result<()>>;
    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<Release>>;
    fn retry_policy(&self) -> RetryPolicy;
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Lease>>;
}

impl<L: Lock> DynLock for L {
    fn try_acquire<'a>(&'a self, resource: &'a str, ttl: Duration) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(Lock::try_acquire(self, resource, ttl))
    }

    fn extend<'a>(&'a self, lease: &'a mut Lease, ttl: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(Lock::extend(self, lease, ttl))
    }

    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<Release>> {
        Box::pin(Lock::release(self, lease))
    }

    fn retry_policy(&self) -> RetryPolicy {
        Lock::retry_policy(self)
    }

    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Lease>> {
        // The backend's own wait, which counts it once (feature `metrics`).
        Box::pin(Lock::acquire(self, resource, ttl, max_wait))
    }
}

/// Any [`Lock`] behind one type, so a service can pick memory, Redis, Redlock,
/// PostgreSQL or etcd from its configuration at run time (as tower's
/// `BoxCloneService` does for services). Cheap to clone: clones share the lock. It is a
/// [`Lock`] itself, so it goes wherever one does ([`crate::Watchdog`] included); each
/// call costs one allocation for its boxed future.
///
/// ```
/// use std::time::Duration;
/// use sd_lock::{BoxLock, Lock, Release, memory::MemoryLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = "memory"; // from the service's configuration
/// let lock = match backend {
///     "memory" => BoxLock::new(MemoryLock::new()),
///     // "redis" => BoxLock::new(sd_lock::redis::RedisLock::new(conn)),
///     other => return Err(format!("unknown lock backend {other}").into()),
/// };
/// let lease = lock.try_acquire("report", Duration::from_secs(10)).await?;
/// assert_eq!(lock.release(lease).await?, Release::Released);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BoxLock {
    inner: Arc<dyn DynLock>,
}

impl BoxLock {
    /// Boxes `lock`.
    pub fn new<L: Lock + 'static>(lock: L) -> Self {
        BoxLock {
            inner: Arc::new(lock),
        }
    }
}

impl fmt::Debug for BoxLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxLock").finish_non_exhaustive()
    }
}

forward_lock!([] BoxLock => inner);
