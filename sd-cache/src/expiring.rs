//! A value with the lifetime its loader chose for it ([`Expiring`]).
//!
//! Most data lives as long as the cache's `ttl`. Some carries its own lifetime: an HTTP
//! response's `Cache-Control: max-age`, a token that expires at a given time, a record
//! with a validity date. A loader passed to `try_get_or_load_expiring` returns the value
//! with that lifetime, and everything the cache does by time works from it: the entry
//! expires after its own lifetime, XFetch refreshes it early within its own last moments
//! (the window depends on how long its load took, measured back from its own expiry),
//! TTL jitter is applied in proportion (`ttl_jitter / ttl` of the chosen lifetime), and a
//! "not found" can be cached for its own time too.
//!
//! Limits: a lifetime longer than the builder's `max_ttl` (default: the `ttl`) is cut to
//! it; a lifetime of zero means "do not cache" (as `Cache-Control: no-store` or
//! `max-age=0`): the value is returned to this call and the calls that waited on it, and
//! nothing is stored; a "not found" is cached only while negative caching is on.

use std::time::Duration;

/// A loaded value (or "not found") with the lifetime the loader chose for it.
///
/// ```
/// use std::time::Duration;
/// use sd_cache::Expiring;
///
/// let page = Expiring::new("<html>", Duration::from_secs(30)); // Cache-Control: max-age=30
/// assert_eq!(page.ttl, Duration::from_secs(30));
/// let gone = Expiring::<&str>::not_found(Duration::from_secs(5));
/// assert!(gone.value.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Expiring<V> {
    /// The value; `None` for "not found".
    pub value: Option<V>,
    /// How long it stays fresh; zero means "do not cache".
    pub ttl: Duration,
}

impl<V> Expiring<V> {
    /// `value`, fresh for `ttl`.
    pub fn new(value: V, ttl: Duration) -> Self {
        Self {
            value: Some(value),
            ttl,
        }
    }

    /// "Not found", cached for `ttl` (when negative caching is on).
    pub fn not_found(ttl: Duration) -> Self {
        Self { value: None, ttl }
    }
}

/// What one load produced, as the backends store it: the value and, when the loader
/// chose it, its lifetime (`None`: the cache's own).
#[derive(Debug, Clone)]
pub(crate) struct Loaded<V> {
    pub(crate) value: Option<V>,
    pub(crate) ttl: Option<Duration>,
}

impl<V> Loaded<V> {
    /// A value (or "not found") fresh for the cache's own lifetime.
    pub(crate) fn plain(value: Option<V>) -> Self {
        Self { value, ttl: None }
    }
}

impl<V> From<Expiring<V>> for Loaded<V> {
    fn from(e: Expiring<V>) -> Self {
        Self {
            value: e.value,
            ttl: Some(e.ttl),
        }
    }
}
