//! [`BoxStore`]: any [`Store`] behind one type, for a backend chosen at run time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::store::{Claim, ClaimOutcome, Fingerprint, Store, StoredResponse};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Writes the object-safe twin of [`Store`] (`DynStore`: the same methods, returning
/// boxed futures), its blanket impl for every store, and [`BoxStore`]'s [`Store`] impl,
/// from one list of the trait's methods: the borrowed arguments before the `;` (the twin
/// borrows each for the future's life), the owned ones after it.
///
/// [`BoxStore`]'s methods are `async fn`: a boxed future borrowing several arguments has
/// one lifetime, their intersection, which a return-position `impl Future` cannot name.
macro_rules! boxed_store {
    ($(fn $name:ident($($arg:ident: &$ty:ty),* ; $($own:ident: $oty:ty),*) -> $out:ty;)*) => {
        trait DynStore: Send + Sync {
            $(
                fn $name<'a>(&'a self $(, $arg: &'a $ty)* $(, $own: $oty)*)
                    -> BoxFuture<'a, Result<$out>>;
            )*
        }

        impl<S: Store> DynStore for S {
            $(
                fn $name<'a>(&'a self $(, $arg: &'a $ty)* $(, $own: $oty)*)
                    -> BoxFuture<'a, Result<$out>> {
                    Box::pin(Store::$name(self $(, $arg)* $(, $own)*))
                }
            )*
        }

        impl Store for BoxStore {
            $(
                async fn $name(&self $(, $arg: &$ty)* $(, $own: $oty)*) -> Result<$out> {
                    self.inner.$name($($arg,)* $($own),*).await
                }
            )*
        }
    };
}

boxed_store! {
    fn claim(scope: &str, key: &str, fingerprint: &Fingerprint; lock_ttl: Duration) -> ClaimOutcome;
    fn complete(claim: &Claim, response: &StoredResponse; retention: Duration) -> ();
    fn release(claim: &Claim;) -> ();
    fn extend(claim: &Claim; lock_ttl: Duration) -> ();
    fn sweep(;) -> u64;
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
