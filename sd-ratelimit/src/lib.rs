//! Rate limiting: GCRA, token bucket and leaky bucket on memory and Redis, with a tower
//! layer and client IPs that cannot be spoofed.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod algorithm;
pub mod client_ip;
mod error;
pub mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;

pub use crate::algorithm::{Decision, Limit, MAX_SLIDING_WINDOW_LIMIT, Quota};
pub use crate::error::{Error, Result};

/// A backend the tower layer (or any async caller) can ask: memory or Redis.
///
/// Contract: one call decides one request of `cost` for `key` atomically with respect
/// to every other call on the same key; a cost over the capacity is
/// [`Error::InsufficientCapacity`].
pub trait RateLimiter: Send + Sync + 'static {
    /// Decides one request.
    fn check_key<'a>(
        &'a self,
        key: &'a str,
        cost: u32,
    ) -> impl std::future::Future<Output = Result<Decision>> + Send + 'a;
}

impl<C, S> RateLimiter for memory::KeyedLimiter<String, C, S>
where
    C: memory::Clock,
    S: std::hash::BuildHasher + Clone + Send + Sync + 'static,
{
    fn check_key<'a>(
        &'a self,
        key: &'a str,
        cost: u32,
    ) -> impl std::future::Future<Output = Result<Decision>> + Send + 'a {
        std::future::ready(self.check_n(key, cost))
    }
}

#[cfg(feature = "redis")]
impl<C> RateLimiter for redis::RedisLimiter<C>
where
    C: ::redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    fn check_key<'a>(
        &'a self,
        key: &'a str,
        cost: u32,
    ) -> impl std::future::Future<Output = Result<Decision>> + Send + 'a {
        self.check_n(key, cost)
    }
}
