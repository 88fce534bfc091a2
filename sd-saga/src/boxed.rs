//! [`BoxStore`]: any [`SagaStore`] behind one type, for a log chosen at run time.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::store::{
    Claimant, Lease, NewSaga, SagaRecord, SagaStore, StoreStats, StoredEvent, Write,
};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Writes the object-safe twin of [`SagaStore`] (`DynStore`: the same methods, returning
/// boxed futures), its blanket impl for every store, and [`BoxStore`]'s [`SagaStore`]
/// impl, from one list of the trait's methods: the borrowed arguments before the `;`
/// (the twin borrows each for the future's life), the owned ones after it.
macro_rules! boxed_store {
    ($(fn $name:ident($($arg:ident: &$ty:ty),* ; $($own:ident: $oty:ty),*) -> $out:ty;)*) => {
        trait DynStore: Send + Sync + 'static {
            $(
                fn $name<'a>(&'a self $(, $arg: &'a $ty)* $(, $own: $oty)*)
                    -> BoxFuture<'a, Result<$out>>;
            )*
            fn type_name(&self) -> &'static str;
        }

        impl<S: SagaStore> DynStore for S {
            $(
                fn $name<'a>(&'a self $(, $arg: &'a $ty)* $(, $own: $oty)*)
                    -> BoxFuture<'a, Result<$out>> {
                    Box::pin(SagaStore::$name(self $(, $arg)* $(, $own)*))
                }
            )*
            fn type_name(&self) -> &'static str {
                std::any::type_name::<S>()
            }
        }

        impl SagaStore for BoxStore {
            $(
                async fn $name(&self $(, $arg: &$ty)* $(, $own: $oty)*) -> Result<$out> {
                    self.inner.$name($($arg,)* $($own),*).await
                }
            )*
        }
    };
}

boxed_store! {
    fn create(saga: &NewSaga<'_>;) -> Lease;
    fn write(lease: &Lease, write: &Write<'_>;) -> Lease;
    fn renew(lease: &Lease; ttl: Duration) -> ();
    fn claim_expired(by: &Claimant<'_>; limit: usize) -> Vec<SagaRecord>;
    fn claim_stuck(by: &Claimant<'_>, id: &str;) -> SagaRecord;
    fn load(id: &str;) -> Option<SagaRecord>;
    fn events(id: &str;) -> Vec<StoredEvent>;
    fn stats(saga_type: &str;) -> StoreStats;
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
