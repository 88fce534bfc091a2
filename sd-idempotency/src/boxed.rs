//! [`BoxStore`]: any [`Store`] behind one type, for a backend chosen at run time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::store::{Claim, ClaimOutcome, Fingerprint, Store, StoredResponse};

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

sd_core::boxed_twin! {
    impl Store for BoxStore via DynStore;
    fn claim(scope: &str, key: &str, fingerprint: &Fingerprint; lock_ttl: Duration) -> ClaimOutcome;
    fn complete(claim: &Claim, response: &StoredResponse; retention: Duration) -> ();
    fn release(claim: &Claim;) -> ();
    fn extend(claim: &Claim; lock_ttl: Duration) -> ();
    fn sweep(;) -> u64;
    fn poll_claim(scope: &str, key: &str, fingerprint: &Fingerprint; lock_ttl: Duration) -> ClaimOutcome;
}
