//! [`BoxStore`]: any [`SagaStore`] behind one type, for a log chosen at run time.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::store::{Lease, NewSaga, SagaRecord, SagaStore, StoreStats, StoredEvent, Write};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`SagaStore`]: the same methods, returning boxed futures.
trait DynStore: Send + Sync + 'static {
    fn create<'a>(&'a self, saga: &'a NewSaga<'_>) -> BoxFuture<'a, Result<Lease>>;
    fn write<'a>(&'a self, lease: &'a Lease, write: &'a Write<'_>) -> BoxFuture<'a, Result<Lease>>;
    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, Result<()>>;
    fn claim_expired<'a>(
        &'a self,
        saga_type: &'a str,
        owner: &'a str,
        ttl: Duration,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<SagaRecord>>>;
    fn claim_stuck<'a>(
        &'a self,
        saga_type: &'a str,
        id: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<SagaRecord>>;
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>>>;
    fn events<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<StoredEvent>>>;
    fn stats<'a>(&'a self, saga_type: &'a str) -> BoxFuture<'a, Result<StoreStats>>;
    fn type_name(&self) -> &'static str;
}

impl<S: SagaStore> DynStore for S {
    fn create<'a>(&'a self, saga: &'a NewSaga<'_>) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(SagaStore::create(self, saga))
    }
    fn write<'a>(&'a self, lease: &'a Lease, write: &'a Write<'_>) -> BoxFuture<'a, Result<Lease>> {
        Box::pin(SagaStore::write(self, lease, write))
    }
    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(SagaStore::renew(self, lease, ttl))
    }
    fn claim_expired<'a>(
        &'a self,
        saga_type: &'a str,
        owner: &'a str,
        ttl: Duration,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<SagaRecord>>> {
        Box::pin(SagaStore::claim_expired(self, saga_type, owner, ttl, limit))
    }
    fn claim_stuck<'a>(
        &'a self,
        saga_type: &'a str,
        id: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<SagaRecord>> {
        Box::pin(SagaStore::claim_stuck(self, saga_type, id, owner, ttl))
    }
    fn load<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>>> {
        Box::pin(SagaStore::load(self, id))
    }
    fn events<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Vec<StoredEvent>>> {
        Box::pin(SagaStore::events(self, id))
    }
    fn stats<'a>(&'a self, saga_type: &'a str) -> BoxFuture<'a, Result<StoreStats>> {
        Box::pin(SagaStore::stats(self, saga_type))
    }
    fn type_name(&self) -> &'static str {
        std::any::type_name::<S>()
    }
}

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

impl SagaStore for BoxStore {
    async fn create(&self, saga: &NewSaga<'_>) -> Result<Lease> {
        self.inner.create(saga).await
    }

    async fn write(&self, lease: &Lease, write: &Write<'_>) -> Result<Lease> {
        self.inner.write(lease, write).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<()> {
        self.inner.renew(lease, ttl).await
    }

    async fn claim_expired(
        &self,
        saga_type: &str,
        owner: &str,
        ttl: Duration,
        limit: usize,
    ) -> Result<Vec<SagaRecord>> {
        self.inner.claim_expired(saga_type, owner, ttl, limit).await
    }

    async fn claim_stuck(
        &self,
        saga_type: &str,
        id: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<SagaRecord> {
        self.inner.claim_stuck(saga_type, id, owner, ttl).await
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>> {
        self.inner.load(id).await
    }

    async fn events(&self, id: &str) -> Result<Vec<StoredEvent>> {
        self.inner.events(id).await
    }

    async fn stats(&self, saga_type: &str) -> Result<StoreStats> {
        self.inner.stats(saga_type).await
    }
}
