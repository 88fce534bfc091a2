//! [`BoxStore`]: any [`SagaStore`] behind one type, for a log chosen at run time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::store::{
    Claimant, Lease, NewSaga, SagaRecord, SagaStore, StoreStats, StoredEvent, Write,
};

/// Any [`SagaStore`] behind one type, so a service picks its log (memory or PostgreSQL)
/// from its configuration at run time, as tower's `BoxCloneService` does for services.
/// Cheap to clone (an `Arc` inside); it is a [`SagaStore`] itself, so an
/// [`Orchestrator`](crate::Orchestrator) takes it as it takes any log. Each call costs one
/// allocation for the boxed future.
///
/// ```
/// use sd_saga::{BoxStore, MemoryStore, SagaStore};
///
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let config = "memory";
/// let store = match config {
///     "memory" => BoxStore::new(MemoryStore::new()),
///     // "postgres://..." => BoxStore::new(PostgresStore::builder().build(pool)?),
///     other => panic!("unknown saga log `{other}`"),
/// };
/// assert!(store.load("order-1").await?.is_none());
/// # Ok::<(), sd_saga::Error>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct BoxStore {
    inner: Arc<dyn DynStore>,
}

impl BoxStore {
    /// Boxes `store`.
    pub fn new<S: SagaStore>(store: S) -> Self {
        BoxStore {
            inner: Arc::new(store),
        }
    }
}

impl fmt::Debug for BoxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BoxStore")
            .field(&self.inner.type_name())
            .finish()
    }
}

sd_core::boxed_twin! {
    impl SagaStore for BoxStore via DynStore;
    fn create(saga: &NewSaga<'_>;) -> Lease;
    fn write(lease: &Lease, write: &Write<'_>;) -> Lease;
    fn renew(lease: &Lease; ttl: Duration) -> ();
    fn claim_expired(by: &Claimant<'_>; limit: usize) -> Vec<SagaRecord>;
    fn claim_stuck(by: &Claimant<'_>, id: &str;) -> SagaRecord;
    fn cancel(id: &str, reason: &str;) -> SagaRecord;
    fn load(id: &str;) -> Option<SagaRecord>;
    fn events(id: &str;) -> Vec<StoredEvent>;
    fn stats(saga_type: &str;) -> StoreStats;
}
