//! Read-through caching without stampedes: single-flight and XFetch early refresh.
//!
//! When a hot key expires, hundreds of concurrent requests miss at once and all hit the
//! database. [`Cache`] prevents that at every level:
//!
//! - **single-flight**: concurrent misses on one key run the loader once; a dropped leader
//!   hands over to a waiter; a panicking loader fails only its own caller; a loader error is
//!   shared with every waiter (one `Arc`), never retried by each;
//! - **XFetch early refresh** (Vattani, Chierichetti, Lowenstein, VLDB 2015): every entry
//!   keeps how long its load took (`delta`); a read refreshes early, in the background, when
//!   `now - delta * beta * ln(rand()) >= expiry`, while readers keep the current value;
//! - **TTL jitter**, **negative caching** and bounded **serve-stale-on-error**.
//!
//! ```
//! use std::time::Duration;
//! use sd_cache::Cache;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cache: Cache<u64, String> = Cache::builder()
//!     .max_capacity(100_000)
//!     .ttl(Duration::from_secs(60))
//!     .ttl_jitter(Duration::from_secs(6))
//!     .build()?;
//!
//! let user = cache.get_or_load(42, || async { "ada".to_owned() /* SELECT ... */ }).await?;
//! assert_eq!(user, "ada");
//! assert_eq!(cache.get(&42).as_deref(), Some("ada"));
//! assert_eq!(cache.stats().loads, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Engine
//!
//! The memory tier stores entries in [moka](https://docs.rs/moka) `sync::Cache` (TinyLFU
//! admission, LRU eviction, per-entry expiry on timer wheels, no background threads).
//! quick_cache is a little faster on a bare hit and has a better hit ratio on some traces,
//! but has no per-entry expiry: we need the engine to reclaim an entry when its
//! stale-on-error window closes, and moka does that with an `Expiry`.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
mod error;
pub mod memory;
mod policy;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod singleflight;
mod stats;
pub mod write;
pub mod xfetch;

pub use clock::{Clock, ManualClock, RandomSource, SystemClock, TokioClock};
pub use error::{Error, Result, SharedError};
pub use memory::{Cache, CacheBuilder};
pub use stats::CacheStats;
pub use write::{CacheTier, DeadLetter, Store, WriteBehind, WriteOp, WriteThrough};

#[cfg(feature = "redis")]
pub use crate::redis::{Codec, JsonCodec, RedisCache, RedisCacheBuilder};
