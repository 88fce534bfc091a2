//! [`BoxLimiter`]: any [`RateLimiter`] behind one type, chosen at run time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::{Decision, RateLimiter, Result};

/// A boxed decision, as the object-safe twin returns it.
type BoxFuture<'a> = Pin<Box<dyn Future<Output = Result<Decision>> + Send + 'a>>;

/// The object-safe twin of [`RateLimiter`]: the same call, its future boxed.
trait DynLimiter: Send + Sync + 'static {
    fn check_key_boxed<'a>(&'a self, key: &'a str, cost: u32) -> BoxFuture<'a>;
}

impl<L: RateLimiter> DynLimiter for L {
    fn check_key_boxed<'a>(&'a self, key: &'a str, cost: u32) -> BoxFuture<'a> {
        Box::pin(self.check_key(key, cost))
    }
}

/// Any [`RateLimiter`] (memory, Redis, your own) behind one type, so a service can pick
/// its backend from configuration at run time, as tower's `BoxCloneService` does for
/// services. Cloning shares the limiter (an `Arc` inside); each decision costs one
/// boxed future on top of the backend's own work.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use sd_ratelimit::{BoxLimiter, Limit, Quota, RateLimiter, memory::MemoryLimiterBuilder};
///
/// let config = "memory"; // read from the service's configuration
/// let limit = Limit::gcra(Quota::per_minute(1)?);
/// let limiter = match config {
///     "memory" => BoxLimiter::new(MemoryLimiterBuilder::new(limit).keyed::<String>()?),
///     other => return Err(format!("unknown rate limiter `{other}`").into()),
/// };
/// assert!(limiter.check_key("alice", 1).await?.allowed);
/// assert!(!limiter.clone().check_key("alice", 1).await?.allowed);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BoxLimiter(Arc<dyn DynLimiter>);

impl BoxLimiter {
    /// Boxes `limiter`.
    pub fn new(limiter: impl RateLimiter) -> Self {
        BoxLimiter(Arc::new(limiter))
    }
}

impl fmt::Debug for BoxLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxLimiter").finish_non_exhaustive()
    }
}

impl RateLimiter for BoxLimiter {
    fn check_key<'a>(
        &'a self,
        key: &'a str,
        cost: u32,
    ) -> impl Future<Output = Result<Decision>> + Send + 'a {
        self.0.check_key_boxed(key, cost)
    }
}
