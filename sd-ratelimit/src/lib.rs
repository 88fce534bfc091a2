//! Rate limiting for services: GCRA (the default), token bucket, leaky bucket (meter and
//! queue) and a sliding-window counter, on memory or on Redis (one server or a cluster),
//! with a tower layer for axum and tonic and client IPs that cannot be spoofed.
//!
//! # When to use it
//!
//! Use it to protect an API from bursts and abusive clients: per IP, per user, per
//! route, several limits in one call. Use the memory backend for a limit local to one
//! process, the Redis backend for a limit shared by every replica. It is not a
//! concurrency limiter (in-flight requests: use `tower::limit::ConcurrencyLimit`) and
//! not a load shedder.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use sd_ratelimit::{Error, Limit, Quota, memory::{ManualClock, MemoryLimiterBuilder}};
//!
//! // 10 per second, bursts of 5, time injected so the example is exact.
//! let clock = ManualClock::new();
//! let limiter = MemoryLimiterBuilder::new(Limit::gcra(Quota::per_second(10)?.with_burst(5)?))
//!     .clock(clock.clone())
//!     .keyed::<String>()?;
//! for _ in 0..5 {
//!     assert!(limiter.check("203.0.113.7")?.allowed);
//! }
//! let denied = limiter.check("203.0.113.7")?;
//! assert!(!denied.allowed);
//! assert_eq!(denied.retry_after, Duration::from_millis(100)); // Retry-After
//! assert_eq!(denied.reset_after, Duration::from_millis(500)); // back to full
//! // A cost the burst can never hold is its own answer, not "try later".
//! assert!(matches!(limiter.check_n("198.51.100.1", 6), Err(Error::InsufficientCapacity { .. })));
//! clock.advance(denied.retry_after);
//! assert!(limiter.check("203.0.113.7")?.allowed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Algorithms
//!
//! [`Limit`] picks one; the math lives once, in [`algorithm`], on integer time, and every
//! backend runs that same code (Redis runs a line-by-line Lua port). A [`Decision`]
//! carries `allowed, limit, remaining, retry_after, reset_after` (and `delay` for a
//! leaky queue). Invalid numbers fail at construction with [`Error::InvalidConfig`]
//! naming the field.
//!
//! A limiter built with a penalty
//! ([`memory::MemoryLimiterBuilder::penalty`], `redis::RedisLimiterBuilder::penalty`)
//! refuses a key outright for that long once its limit denies it, whatever the limit
//! would admit meanwhile (the login-abuse case): [`Decision::penalty`] marks such a
//! refusal and `retry_after` (the tower layer's `Retry-After`) is the time left.
//!
//! # Backends and their guarantees
//!
//! | | [`memory`] | `redis` (feature `redis`) |
//! |---|---|---|
//! | atomicity | one compare-and-swap per decision, lock-free per key | one `EVALSHA` per decision, atomic in Redis (with `redis::RedisLimiterBuilder::batch`, concurrent decisions share one, each still atomic) |
//! | time | injected [`Clock`] ([`MonotonicClock`] by default) | the Redis server's `TIME` (app clocks may drift) |
//! | memory | at most `max_keys` keys; keys back to full removed automatically | keys expire when back to full |
//! | several limits | all or none (taken in order, given back on denial) | all or none (one script) |
//! | quota change | keeps state: no fresh burst | limit travels with each call: no fresh burst |
//! | failure | none | `redis::FailurePolicy`: open, closed, or a local limiter |
//! | penalty | a block word beside the key's state, read before its compare-and-swap | a block key beside the state (same hash slot), read and started in the deciding script |
//! | fast paths | `allow()`: admitted or not, no [`Decision`] built | `redis::RedisLimiterBuilder::deny_cache`: keys Redis denied answered locally until they could be admitted |
//!
//! Both backends make identical decisions for the same requests at the same times (a
//! differential test runs memory, Redis and Redis Cluster side by side), and GCRA on
//! memory makes identical decisions to `governor` for the same quota. Both have a shadow
//! mode that counts what would be denied and admits everything. Either backend, or your
//! own [`RateLimiter`], fits behind a [`BoxLimiter`], so a service can choose one from its
//! configuration at run time.
//!
//! # Client IPs
//!
//! [`client_ip`] finds the client behind proxies from the rightmost untrusted address of
//! `X-Forwarded-For` or `Forwarded` (trusted hop count or trusted CIDRs), never the
//! leftmost, and parses PROXY protocol v1/v2 headers on listeners configured for them
//! (`client_ip::ProxyListener` with the `tokio` feature accepts connections, strips the
//! header and hands on the client's address).
//! Malformed or hostile input is a typed error, never a panic.
//!
//! # How it compares
//!
//! On memory, a decision is one load and one compare-and-swap on the key's own word: a
//! single limiter checks about as fast as `governor`'s direct limiter, and keyed checks
//! are faster than `governor`'s keyed (DashMap) limiter, from a cheaper hasher, the GCRA
//! path skipping the general kernel, and more map shards per core. On Redis the cost is
//! the server's Lua scripting, not the script: every `redis.call` from Lua costs the
//! server several times a plain command, so one decision costs a few raw `SET`s, and
//! `redis::RedisLimiterBuilder::batch` spreads a script's fixed cost over many
//! decisions. The benches also run `governor` keyed on this crate's hasher, and on the
//! same Redis server the scripts users would otherwise deploy: go-redis/redis_rate's GCRA
//! and a fixed window kept as Envoy's ratelimit service keeps it (`INCR` + `PEXPIRE`).
//! The measured figures, with the peers' from the same run, are in
//! [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
//!
//! # Sizing
//!
//! What one Redis server (one shard: a single server, or one master of a cluster)
//! sustained in decisions a second, with and without `batch`, beside
//! go-redis/redis_rate's script on the same server, is in the Sizing section of
//! [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md#sizing). For a peak load in decisions a second,
//! `shards = ceil(load / (rate × headroom))`, with that rate and a headroom below 1 (the
//! file works examples at 0.5). A cluster spreads keys over its shards by slot, so this
//! holds for a load spread over many keys: every decision on one key (and on the keys of
//! one `check_all`, which must share a slot) goes to the same shard, so one hot key gets
//! one shard's rate however many shards there are.
//!
//! # Metrics and spans
//!
//! With feature `metrics`, every limiter reports through the `metrics` facade (install
//! the exporter's recorder before building the limiter: handles are registered at
//! build time, never looked up by name). Labels follow `sd_core::observe`; `sd.name`
//! is the limiter's name (`MemoryLimiterBuilder::name`, default `"default"`).
//!
//! A memory decision takes tens of nanoseconds, about what one atomic add on a shared
//! counter costs, so it is counted on a stripe its thread owns and reaches the recorder
//! in steps of 64 decisions per thread and outcome: call `sd_core::observe::publish()`
//! before rendering a scrape and it is exact (dropping the limiter publishes too). A
//! Redis decision is added to its counter as it is made.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `sd.ratelimit.decisions` | counter | decisions | `sd.name`, `sd.backend` (`memory`, `redis`), `sd.outcome` (`allowed`, `denied`, `shadow_denied`, `fail_open`, `fail_closed`, `fallback`) |
//! | `sd.ratelimit.backend.duration` | histogram | s | `sd.name`, `sd.backend` (`redis`) |
//!
//! A decision is counted once: by the limit's outcome, or, when Redis failed, by what the
//! failure policy did (a `fallback` decision is also counted by the local limiter, under
//! `sd.backend = memory`). Every Redis round trip runs in a `ratelimit.redis` (or
//! `ratelimit.redis.batch`) span with `sd.name`, `sd.backend` and `sd.operation`;
//! a memory decision, tens of nanoseconds, has no span of its own.
//!
//! # Crate features
//!
//! None is on by default; the memory backend and [`client_ip`] need none.
//!
//! - `redis`: the Redis backend (redis-rs, async; single server or cluster). Implies `tokio`.
//! - `tower`: the tower / axum / tonic middleware. Implies `tokio` (to wait out a leaky
//!   queue's delay).
//! - `test-util`: `conformance`, the checks every [`RateLimiter`] passes, for your own
//!   backend or a [`BoxLimiter`] built from configuration.
//! - `metrics`: decisions and backend latency through the `metrics` facade (see
//!   [Metrics and spans](#metrics-and-spans)).
//! - `tokio`: `until_ready` on the memory limiters, reading a PROXY header from a tokio
//!   stream, and `client_ip::ProxyListener`.
//!
//! # Running the tests
//!
//! `cargo test -p sd-ratelimit` (or `cargo nextest run -p sd-ratelimit`) runs every
//! suite: the crate's tests turn on `redis`, `tower`, `tokio` and `test-util` through a
//! dev-dependency on the crate itself, so no suite is left out for want of a feature
//! flag. The Redis suites start real `redis-server` processes (single and cluster)
//! through `sd-testkit`; a missing server binary fails the test, it is never skipped.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod algorithm;
mod boxed;
pub mod client_ip;
#[cfg(feature = "test-util")]
pub mod conformance;
mod error;
pub mod memory;
mod observe;
#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "tower")]
pub mod tower;

pub use crate::algorithm::{Decision, Limit, MAX_SLIDING_WINDOW_LIMIT, Quota};
pub use crate::boxed::BoxLimiter;
pub use crate::error::{Error, Result};
#[doc(no_inline)]
pub use sd_core::{Clock, ManualClock, MonotonicClock, SystemClock, TokioClock};

/// A backend the tower layer (or any async caller) can ask: memory or Redis, or either
/// behind a [`BoxLimiter`] chosen at run time.
///
/// Contract: one call decides one request of `cost` for `key` atomically with respect
/// to every other call on the same key; a cost over the capacity is
/// [`Error::InsufficientCapacity`]. The `conformance` module (feature `test-util`)
/// checks it on any implementation.
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
    C: Clock,
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
