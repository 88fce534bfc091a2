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
//!   `now - delta * beta * ln(rand()) >= expiry`, while readers keep the current value. On a
//!   very hot key many reads fire together; at most one refresh per key is in flight (it is
//!   claimed before its task is spawned) and none starts once the refreshed entry is in
//!   place (memory: entry id; Redis: the lock is taken only against the version the
//!   refresh was decided on), so a key is loaded once per expiry;
//! - **TTL jitter**, **negative caching** and bounded **serve-stale-on-error**;
//! - **lifetimes chosen by the loader** ([`Expiring`], `try_get_or_load_expiring`): from an
//!   HTTP `Cache-Control`, a token's expiry; expiry, XFetch, jitter and negative caching
//!   work from each entry's own lifetime, on every backend (see [`expiring`]);
//! - **batched loads** (the DataLoader pattern, [`BatchLoader`], `get_or_load_many`): the
//!   misses of many keys, and of concurrent single reads within a short window, load with
//!   one call to a batch function, each key once (see [`batch`]).
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
//! | | memory ([`Cache`]) | Redis (`redis::RedisCache`, feature `redis`) | two-tier (`two_tier::TwoTier`, feature `redis`) |
//! |---|---|---|---|
//! | loads per key per miss | one per process (single-flight) | one across every process sharing the prefix (short `SET NX PX` lock) | as Redis |
//! | hit cost | an engine lookup and a clock read; no allocation | one round trip (a plain `HMGET`; `TIME` rides along at most once a second) | a memory hit: as memory plus one atomic load; else as Redis |
//! | clock | injected ([`Clock`]) | the Redis server's, estimated from `TIME` (an upper bound: an entry is never taken as fresh after its expiry); locks and writes use `TIME` in the script | memory tier on the process clock, Redis tier as Redis |
//! | a load that began before a write or invalidation | not stored (per-shard write counter), and calls starting after the invalidation do not join it | not stored (entry version) | not stored in either tier |
//! | after a write or invalidation returns | every later read sees it | every later read in any process sees it | every later read in any process sees it: the write returns once every instance acknowledged dropping its memory copy or its lease (default 2 s) lapsed |
//! | backend down | n/a | [`Error::Backend`]; with `fallback_to_loader`, reads run the loader uncached | as Redis; the memory tier stops serving within the lease and is cleared before it serves again |
//! | cluster | n/a | keys `prefix:{key}` and `prefix:{key}:lock` share a hash slot | yes, Redis 7+ (`build_on_cluster`): the registry and channels share a hash tag, invalidations go through sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) on that shard; a failover of it is a resync |
//! | failover (replicas) | n/a | Redis replicates asynchronously: a master that crashes may lose the last writes it acknowledged, an invalidation's tombstone included, and reads then return the value from before them until the key is written again or expires (a `CLUSTER FAILOVER` or a forced Sentinel failover loses nothing) | the Redis tier as Redis; the memory tiers' coherence survives failovers (the `two_tier` module says how) |
//!
//! All three implement [`CacheBackend`] (`&str` keys; the memory cache as
//! `Cache<String, V>`), and [`BoxCache`] holds any of them behind one type, so a service
//! can choose the backend from its configuration at run time. The same contract suite
//! (`conformance`, feature `test-util`) runs against all three, and a new backend can run
//! it too.
//!
//! In both, an early refresh runs in the background while readers get the current value;
//! a loader error is shared with the callers coalesced on it and is never cached; with
//! `stale_if_error`, a value up to that long past its expiry answers reads whose reload
//! fails. Waiting processes on Redis wake on a pub/sub message
//! (`RedisCacheBuilder::notifications`)
//! or re-read with backoff from 10 to 200 ms, and take the lock themselves if its holder
//! died.
//!
//! # Write policies: which to pick
//!
//! - **Cache-aside** (the default; no wrapper): write the store, then `invalidate`. The next
//!   read loads the truth. Pick it for most data: nothing to configure, and a failed cache
//!   call never leaves the cache newer than the store.
//! - **[`WriteThrough`]**: store first, then cache the new value (a failed store leaves no
//!   new value cached; writes to one key are serialised). Pick it for records read right
//!   after they are written (profiles, settings, carts), so that read is a hit.
//! - **[`WriteBehind`]**: cache now, store later in coalesced batches (bounded buffer with
//!   backpressure, batches of 50 or every second, retries with backoff, a dead-letter hook,
//!   flushed on shutdown). Pick it for counters, analytics and last-seen times, where many
//!   writes to one key may collapse into one and a crash may lose what was not yet flushed
//!   (the buffer is in memory; use sd-outbox when that is not acceptable).
//!
//! All three work over every tier ([`CacheTier`] is implemented for the memory, Redis and
//! two-tier caches); over the two-tier cache a write-through returns once every instance
//! dropped its old copy. The [`write`](mod@write) module has the details.
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
//! With the default `lfu-log-factor 10` the counter reaches about 10 after 100 hits, 18
//! after 1,000, 142 after 100,000 and saturates at 255 near a million; lower it (e.g. 1)
//! when your hot keys see only hundreds of hits per decay period, or they all look alike.
//! `lfu-decay-time` (minutes) halves idle counters, so yesterday's hot key can be evicted.
//!
//! To spot hot keys, `OBJECT FREQ prefix:{key}` (the key is `RedisCache::data_key`)
//! returns a key's counter (only under an LFU policy) and `redis-cli --hotkeys` scans for
//! the highest. A hot key is where XFetch and the load lock earn their keep; if one key
//! dominates, put the memory tier in front (`TwoTier`).
//!
//! # How it compares
//!
//! Against [moka](https://docs.rs/moka), the engine the memory tier stores in: a memory
//! hit costs a little more than a bare moka hit (the freshness check adds a clock read
//! and a counter); through the loader API the same plus a branch (a hit is answered when
//! the call is made, and only a miss builds the loading future); a two-tier memory hit as
//! much again plus one atomic load; all far below a Redis round trip. A Redis hit is one
//! round trip, somewhat dearer than a raw `GET` because it reads a hash. Under a stampede
//! (a hot key expiring under a thousand readers, `examples/stampede.rs`), naive
//! cache-aside calls the loader once per reader at each expiry; moka's coalescing
//! `get_with` and sd both call it once per expiry, in memory, on Redis and two-tier alike,
//! but with `get_with` the readers of each expiry wait for the load, while sd refreshes
//! early, so after the first load no reader waits for one. The measured figures, beside the peers'
//! from the same run, are in
//! [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
//!
//! # Sizing
//!
//! What one Redis server (one shard) sustained in Redis-tier hits (one `HMGET` each) and
//! loads (a miss, its loader, the write) a second, beside a raw `GET` and a hand-written
//! `GET` + `SET`, is in the Sizing section of [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md#sizing). Size the
//! Redis tier by the reads that reach it (in a two-tier cache, those its memory tier
//! misses): `shards = ceil(load / (rate × headroom))`, with a headroom below 1 (the file
//! works examples at 0.5). What more shards do not spread: an entry and its load lock
//! share one hash tag, so every read of one hot key lands on one shard (a two-tier
//! cache's memory tier is what takes them off it); on a cluster, a two-tier cache's
//! instance registry and invalidation channels share one hash tag, so every write and
//! invalidation passes through one shard.
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
//! # Metrics
//!
//! With feature `metrics`, every count of [`CacheStats`] is also reported through the
//! `metrics` facade, on handles registered when the cache is built (install the
//! exporter's recorder first). Hits are counted without an atomic add (each thread bumps
//! a stripe of its own), so `hit` lookups reach the recorder in steps of 64 per thread:
//! call `sd_core::observe::publish()` before rendering a scrape (dropping the cache does
//! too) and the scrape is exact; every other count is added as it happens. Labels follow `sd_core::observe`: `sd.name` (the builder's `name(..)`, default
//! `default`) and `sd.backend` (`memory`, `redis`; a two-tier cache reports through both).
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `sd.cache.lookups` | counter | reads | `sd.name`, `sd.backend`, `sd.outcome` (`hit`, `miss`) |
//! | `sd.cache.loads` | counter | loads | `sd.name`, `sd.backend` |
//! | `sd.cache.load_errors` | counter | loads | `sd.name`, `sd.backend` |
//! | `sd.cache.load.duration` | histogram | s | `sd.name`, `sd.backend` |
//! | `sd.cache.stampede.joins` | counter | callers | `sd.name`, `sd.backend` |
//! | `sd.cache.early_refreshes` | counter | loads | `sd.name`, `sd.backend` |
//! | `sd.cache.skipped_refreshes` | counter | refreshes | `sd.name`, `sd.backend` |
//! | `sd.cache.stale_served` | counter | reads | `sd.name`, `sd.backend` |
//! | `sd.cache.evictions` | counter | entries | `sd.name`, `sd.backend` |
//! | `sd.cache.fallback_loads` | counter | reads | `sd.name`, `sd.backend` |
//!
//! With or without the feature, every run of a loader is a `cache.load` span and every
//! call to Redis a `cache.redis` span, each with `sd.name`, `sd.backend` and
//! `sd.operation` (`load`; `read`, `write`, `invalidate`, `unlock`, and the two-tier
//! cache's `announce` and `heartbeat`), the fields every sd crate's spans carry. A hit
//! opens no span.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis tier (`redis` module: redis-rs async, any `ConnectionLike`
//!   including a cluster connection; JSON codec through serde) and the two-tier cache
//!   (`two_tier` module: memory in front of Redis, invalidations acknowledged over pub/sub,
//!   sharded pub/sub on a Redis Cluster).
//! - `metrics`: the counts of [`CacheStats`] and the load time through the `metrics`
//!   facade (see [Metrics](#metrics)).
//! - `test-util`: `conformance`, the contract suite every [`CacheBackend`] passes, for
//!   the tests of a new backend or of a [`BoxCache`] built from configuration.
//!
//! # Running the tests
//!
//! `cargo test -p sd-cache` (or `cargo nextest run -p sd-cache`) runs every suite: the
//! crate's tests turn on `redis` and `test-util` through a dev-dependency on the crate
//! itself, so no suite is left out for want of a feature flag. The Redis and two-tier
//! suites start real `redis-server` processes through `sd-testkit`; a missing server
//! binary fails the test, it is never skipped.
//!
//! # Two-tier, in short
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use sd_cache::{RedisCache, TwoTier};
//!
//! let client = redis::Client::open("redis://127.0.0.1/")?;
//! let cache: TwoTier<String, _> = TwoTier::builder(RedisCache::builder("users").ttl(Duration::from_secs(60)))
//!     .local_ttl(Duration::from_secs(5))
//!     .lease(Duration::from_secs(2))
//!     .build(client.get_connection_manager().await?, client.clone())
//!     .await?;
//! cache.insert("42", &"ada".to_owned()).await?; // returns once every instance dropped its copy
//! assert_eq!(cache.get("42").await?.as_deref(), Some("ada"));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod batch;
pub mod clock;
#[cfg(feature = "test-util")]
pub mod conformance;
mod error;
pub mod expiring;
pub mod memory;
mod observe;
mod policy;
#[cfg(feature = "redis")]
pub mod redis;
pub mod singleflight;
mod stats;
#[cfg(feature = "redis")]
pub mod two_tier;
pub mod write;
pub mod xfetch;

pub use backend::{BoxCache, CacheBackend, Loader, loader};
pub use batch::{BatchLoader, BatchLoaderBuilder};
pub use clock::{Clock, ManualClock, MonotonicClock, RandomSource, TokioClock};
pub use error::{Error, Result, SharedError};
pub use expiring::Expiring;
pub use memory::{Cache, CacheBuilder};
pub use sd_core::RetryPolicy;
pub use stats::CacheStats;
pub use write::{CacheTier, DeadLetter, Store, WriteBehind, WriteOp, WriteThrough};

#[cfg(feature = "redis")]
pub use crate::redis::{Codec, JsonCodec, RedisCache, RedisCacheBuilder};
#[cfg(feature = "redis")]
pub use crate::two_tier::{TwoTier, TwoTierBuilder};
