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
//! # When to use it, and when not
//!
//! Use it in front of anything slow or expensive that many requests read: database rows,
//! remote API responses, rendered fragments. Do not use it for data that must be read
//! strictly after every write from any process (read the store), or as a durable store
//! (write-behind buffers live in memory; see [`write`](mod@write)).
//!
//! # Backends and their guarantees
//!
//! | | memory ([`Cache`]) | Redis (`redis::RedisCache`, feature `redis`) |
//! |---|---|---|
//! | loads per key per miss | one per process (single-flight) | one across every process sharing the prefix (short `SET NX PX` lock) |
//! | hit cost | an engine lookup and a clock read; no allocation | one round trip (`EVALSHA`: entry and server `TIME`) |
//! | clock | injected ([`Clock`]) | the Redis server's `TIME`, so skewed app clocks agree |
//! | a load that began before a write or invalidation | not stored (per-shard write counter) | not stored (entry version) |
//! | backend down | n/a | [`Error::Backend`]; with `fallback_to_loader`, reads run the loader uncached |
//! | cluster | n/a | keys `prefix:{key}` and `prefix:{key}:lock` share a hash slot |
//!
//! In both, an early refresh runs in the background while readers get the current value;
//! a loader error is shared with the callers coalesced on it and is never cached; with
//! `stale_if_error`, a value up to that long past its expiry answers reads whose reload
//! fails. Waiting processes on Redis wake on a pub/sub message
//! (`RedisCacheBuilder::notifications`)
//! or re-read with backoff from 10 to 200 ms, and take the lock themselves if its holder
//! died.
//!
//! # Write policies
//!
//! Cache-aside is the default: write the store, then [`Cache::invalidate`]. Use
//! [`WriteThrough`] for records read right after they are written (store first, then cache;
//! a failed store leaves no new value cached), and [`WriteBehind`] for counters and
//! analytics (bounded buffer, coalesced per key, batches of 50 or every second, retries,
//! a dead-letter hook, flushed on shutdown). The [`write`](mod@write) module compares them.
//!
//! # Redis as an LFU cache
//!
//! A Redis used only as a cache should evict the least *frequently* used keys:
//!
//! ```text
//! maxmemory 2gb
//! maxmemory-policy allkeys-lfu   # or volatile-lfu: only keys with a TTL (all of ours have one)
//! lfu-log-factor 10              # hits to saturate the 8-bit counter: ~1M at 10, ~1K at 1
//! lfu-decay-time 1               # minutes before an idle key's counter is halved
//! ```
//!
//! To spot hot keys, `OBJECT FREQ prefix:{key}` returns a key's counter (only under an LFU
//! policy) and `redis-cli --hotkeys` scans for the highest. A hot key is where XFetch and
//! the load lock earn their keep; if one key dominates, put the memory tier in front.
//!
//! # Figures
//!
//! `cargo bench -p sd-benches --bench cache`, on a shared 2-core container under load
//! (absolute times are inflated; the ratios come from one run):
//!
//! | | sd | peer | ratio |
//! |---|---|---|---|
//! | hit, `get` vs moka `get` (10,000 keys) | 1.01 µs | 1.35 µs | 0.74× |
//! | hit, `get_or_load` vs moka `get_with` | 1.28 µs | 1.26 µs | 1.01× |
//! | Redis hit vs raw `GET` (one round trip each) | 92 µs | 65 µs | 1.42× |
//!
//! A hot key behind a 50 ms loader, TTL 2 s, read by 1,000 tasks for 4.5 s
//! (`examples/stampede.rs`): naive cache-aside on moka called the loader 2,001 times
//! (every reader at each expiry; slowest read 55 ms); sd called it 3 times (slowest read
//! 4 ms: no reader waited for a load after the first).
//!
//! # Engine
//!
//! The memory tier stores entries in [moka](https://docs.rs/moka) `sync::Cache` (TinyLFU
//! admission, LRU eviction, per-entry expiry on timer wheels, no background threads).
//! quick_cache is a little faster on a bare hit and has a better hit ratio on some traces,
//! but has no expiry at all: entries that expired (and whose stale-on-error window closed)
//! would stay until evicted by size. moka reclaims them on its own TTL (set to the longest
//! an entry may be needed: TTL + jitter + stale window) and its TinyLFU admission keeps
//! one-hit wonders from pushing hot keys out. Freshness, XFetch and stale windows are ours,
//! on the injected clock; moka only stores and evicts. Values are cloned out on each hit:
//! wrap large values in `Arc`.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis tier (`redis` module: redis-rs async, any `ConnectionLike`
//!   including a cluster connection; JSON codec through serde).
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
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod two_tier;
pub mod write;
pub mod xfetch;

pub use clock::{Clock, ManualClock, RandomSource, SystemClock, TokioClock};
pub use error::{Error, Result, SharedError};
pub use memory::{Cache, CacheBuilder};
pub use stats::CacheStats;
pub use write::{CacheTier, DeadLetter, Store, WriteBehind, WriteOp, WriteThrough};

#[cfg(feature = "redis")]
pub use crate::redis::{Codec, JsonCodec, RedisCache, RedisCacheBuilder};
#[cfg(feature = "redis")]
pub use crate::two_tier::{TwoTier, TwoTierBuilder};
