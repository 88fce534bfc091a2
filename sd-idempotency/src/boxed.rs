//! [`BoxStore`]: any [`Store`] behind one type, for a backend chosen at run time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::store::{Claim, ClaimOutcome, Fingerprint, Store, StoredResponse};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`Store`]: the same methods returning boxed futures.
trait DynStore: Send + Sync {
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        fingerprint: &'a Fingerprint,
        lock_ttl: Duration,
    ) -> BoxFuture<'a, Result<ClaimOutcome>>;
    fn complete<'a>(
        &'a self,
        claim: &'a Claim,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<()>>;
    fn release<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<()>>;
    fn extend<'a>(&'a self, claim: &'a Claim, lock_ttl: Duration) -> BoxFuture<'a, Result<()>>;
    fn sweep(&self) -> BoxFuture<'_, Result<u64>>;
}

impl<S: Store> DynStore for S {
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        fingerprint: &'a Fingerprint,
        lock_ttl: Duration,
    ) -> BoxFuture<'a, Result<ClaimOutcome>> {
        Box::pin(Store::claim(self, scope, key, fingerprint, lock_ttl))
    }

    fn complete<'a>(
        &'a self,
        claim: &'a Claim,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(Store::complete(self, claim, response, retention))
    }

    fn release<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<()>> {
        Box::pin(Store::release(self, claim))
    }

    fn extend<'a>(&'a self, claim: &'a Claim, lock_ttl: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(Store::extend(self, claim, lock_ttl))
    }

    fn sweep(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(Store::sweep(self))
    }
}

/// Any [`Store`] behind one type, so a service can pick memory, Redis or PostgreSQL from
/// its configuration at run time (as tower's `BoxCloneService` does for services).
/// Cheap to clone: clones share the store. It is a [`Store`] itself, so the middleware
/// and [`RunOnce`](crate::RunOnce) take it; each call costs one allocation for its boxed
/// future.
///
/// ```
/// use std::time::Duration;
/// use sd_idempotency::{BoxStore, ClaimOutcome, Fingerprint, MemoryStore, Store};
///
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let backend = "memory"; // from the service's configuration
/// let store = match backend {
///     "memory" => BoxStore::new(MemoryStore::new()),
///     // "redis" => BoxStore::new(RedisStore::builder().build(conn)?),
///     other => panic!("unknown store {other}"),
/// };
/// let fp = Fingerprint::of("body");
/// let outcome = store.claim("alice", "key-1", &fp, Duration::from_secs(30)).await?;
/// assert!(matches!(outcome, ClaimOutcome::Claimed(_)));
/// # Ok::<(), sd_idempotency::Error>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct BoxStore {
    inner: Arc<dyn DynStore>,
}

impl BoxStore {
    /// Boxes `store`.
    pub fn new<S: Store + 'static>(store: S) -> Self {
        BoxStore {
            inner: Arc::new(store),
        }
    }
}

impl fmt::Debug for BoxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxStore").finish_non_exhaustive()
    }
}

// `async fn`: a boxed future borrowing several arguments has one lifetime, their
// intersection, which a return-position `impl Future` cannot name.
impl Store for BoxStore {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<ClaimOutcome> {
        self.inner.claim(scope, key, fingerprint, lock_ttl).await
    }

    async fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<()> {
        self.inner.complete(claim, response, retention).await
    }

    async fn release(&self, claim: &Claim) -> Result<()> {
        self.inner.release(claim).await
    }

    async fn extend(&self, claim: &Claim, lock_ttl: Duration) -> Result<()> {
        self.inner.extend(claim, lock_ttl).await
    }

    fn sweep(&self) -> impl Future<Output = Result<u64>> + Send {
        self.inner.sweep()
    }
}
