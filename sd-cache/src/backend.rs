//! One trait over every cache ([`CacheBackend`]), and [`BoxCache`], the handle that lets a
//! service pick memory, Redis or two-tier from its configuration at run time.
//!
//! The trait is the part of the API the three caches share, keyed by `&str`: `get`,
//! `insert`, `invalidate` and a read-through load. The load takes a boxed [`Loader`] (make
//! one with [`loader`]), so the trait has a boxed twin: [`BoxCache`] is `Clone`, holds any
//! backend behind an `Arc`, and is itself a [`CacheBackend`], on the model of tower's
//! `BoxCloneService`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sd_cache::{BoxCache, Cache, CacheBackend, loader};
//!
//! // A service would pick the backend from its configuration.
//! let cache: BoxCache<u64> = BoxCache::new(Cache::<String, u64>::builder().build()?);
//! let n = cache
//!     .try_get_or_load_optional("answer", loader(|| async { Ok::<_, std::io::Error>(Some(42)) }))
//!     .await?;
//! assert_eq!(n, Some(42));
//! assert_eq!(cache.get("answer").await?, Some(42));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sd_core::BoxError;

use crate::{Cache, Result};

/// A read-through loader, boxed so the trait stays object-safe: `Ok(None)` means "not
/// found" (cached for the negative TTL). Make one with [`loader`].
pub type Loader<V> = Box<
    dyn FnOnce() -> Pin<Box<dyn Future<Output = std::result::Result<Option<V>, BoxError>> + Send>>
        + Send,
>;

/// Boxes a loader closure whose error is anything that converts into a [`BoxError`] (your
/// own error type, `anyhow::Error`, a `&str`).
pub fn loader<V, E, F, Fut>(load: F) -> Loader<V>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<Option<V>, E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::new(move || Box::pin(async move { load().await.map_err(Into::into) }))
}

/// What every cache of this crate does, keyed by `&str`: the memory [`Cache`] (keyed by
/// `String`), the Redis tier and the two-tier cache. See each type for its guarantees; the
/// contract they share is the one `sd_cache::conformance` checks (feature
/// `test-util`).
pub trait CacheBackend<V>: Clone + Send + Sync + 'static {
    /// The fresh value for `key`, if any; `None` for a miss and for a cached "not found".
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<V>>> + Send;

    /// Stores `value` for `key`, fresh for the TTL.
    fn insert(&self, key: &str, value: &V) -> impl Future<Output = Result<()>> + Send;

    /// Removes `key`; a load that began before the call does not store its result.
    fn invalidate(&self, key: &str) -> impl Future<Output = Result<()>> + Send;

    /// The value for `key`, running `loader` on a miss: one load per key at a time
    /// (concurrent misses share it), its error shared and not cached, "not found" cached
    /// for the negative TTL.
    fn try_get_or_load_optional(
        &self,
        key: &str,
        loader: Loader<V>,
    ) -> impl Future<Output = Result<Option<V>>> + Send;
}

impl<V> CacheBackend<V> for Cache<String, V>
where
    V: Clone + Send + Sync + 'static,
{
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<V>>> + Send {
        std::future::ready(Ok(Cache::get(self, &key.to_owned())))
    }

    fn insert(&self, key: &str, value: &V) -> impl Future<Output = Result<()>> + Send {
        Cache::insert(self, key.to_owned(), value.clone());
        std::future::ready(Ok(()))
    }

    fn invalidate(&self, key: &str) -> impl Future<Output = Result<()>> + Send {
        Cache::invalidate(self, &key.to_owned());
        std::future::ready(Ok(()))
    }

    fn try_get_or_load_optional(
        &self,
        key: &str,
        loader: Loader<V>,
    ) -> impl Future<Output = Result<Option<V>>> + Send {
        Cache::try_get_or_load_optional(self, key.to_owned(), loader)
    }
}

#[cfg(feature = "redis")]
mod redis_impls {
    use std::future::Future;

    use redis::aio::ConnectionLike;

    use super::{CacheBackend, Loader};
    use crate::Result;
    use crate::redis::{Codec, RedisCache};
    use crate::two_tier::TwoTier;

    /// The Redis and two-tier caches have the trait's methods as inherent ones.
    macro_rules! delegate {
        ($cache:ident) => {
            impl<V, C, K> CacheBackend<V> for $cache<V, C, K>
            where
                V: Clone + Send + Sync + 'static,
                C: ConnectionLike + Clone + Send + Sync + 'static,
                K: Codec<V>,
            {
                fn get(&self, key: &str) -> impl Future<Output = Result<Option<V>>> + Send {
                    async move { $cache::get(self, key).await }
                }

                fn insert(&self, key: &str, value: &V) -> impl Future<Output = Result<()>> + Send {
                    $cache::insert(self, key, value)
                }

                fn invalidate(&self, key: &str) -> impl Future<Output = Result<()>> + Send {
                    $cache::invalidate(self, key)
                }

                fn try_get_or_load_optional(
                    &self,
                    key: &str,
                    loader: Loader<V>,
                ) -> impl Future<Output = Result<Option<V>>> + Send {
                    async move { $cache::try_get_or_load_optional(self, key, loader).await }
                }
            }
        };
    }

    delegate!(RedisCache);
    delegate!(TwoTier);
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`CacheBackend`], implemented for every backend.
trait DynCache<V>: Send + Sync {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<V>>>;
    fn insert<'a>(&'a self, key: &'a str, value: &'a V) -> BoxFuture<'a, Result<()>>;
    fn invalidate<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
    fn load<'a>(&'a self, key: &'a str, loader: Loader<V>) -> BoxFuture<'a, Result<Option<V>>>;
}

impl<V, T> DynCache<V> for T
where
    V: Send + Sync + 'static,
    T: CacheBackend<V>,
{
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<V>>> {
        Box::pin(CacheBackend::get(self, key))
    }

    fn insert<'a>(&'a self, key: &'a str, value: &'a V) -> BoxFuture<'a, Result<()>> {
        Box::pin(CacheBackend::insert(self, key, value))
    }

    fn invalidate<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(CacheBackend::invalidate(self, key))
    }

    fn load<'a>(&'a self, key: &'a str, loader: Loader<V>) -> BoxFuture<'a, Result<Option<V>>> {
        Box::pin(CacheBackend::try_get_or_load_optional(self, key, loader))
    }
}

/// Any [`CacheBackend`] of values `V`, chosen at run time: cheap to clone (an `Arc`
/// inside), and itself a [`CacheBackend`]. See the [module docs](self).
pub struct BoxCache<V> {
    inner: Arc<dyn DynCache<V>>,
}

impl<V> BoxCache<V> {
    /// Boxes `cache`.
    pub fn new(cache: impl CacheBackend<V>) -> Self
    where
        V: Send + Sync + 'static,
    {
        BoxCache {
            inner: Arc::new(cache),
        }
    }
}

impl<V> Clone for BoxCache<V> {
    fn clone(&self) -> Self {
        BoxCache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V> fmt::Debug for BoxCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxCache").finish_non_exhaustive()
    }
}

impl<V> CacheBackend<V> for BoxCache<V>
where
    V: Send + Sync + 'static,
{
    async fn get(&self, key: &str) -> Result<Option<V>> {
        self.inner.get(key).await
    }

    async fn insert(&self, key: &str, value: &V) -> Result<()> {
        self.inner.insert(key, value).await
    }

    async fn invalidate(&self, key: &str) -> Result<()> {
        self.inner.invalidate(key).await
    }

    async fn try_get_or_load_optional(&self, key: &str, loader: Loader<V>) -> Result<Option<V>> {
        self.inner.load(key, loader).await
    }
}
