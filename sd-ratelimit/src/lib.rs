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
//! use sd_ratelimit::{Error, Limit, Quota, memory::{Builder, ManualClock}};
//!
//! // 10 per second, bursts of 5, time injected so the example is exact.
//! let clock = ManualClock::new();
//! let limiter = Builder::new(Limit::gcra(Quota::per_second(10)?.with_burst(5)?))
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
//! # Backends and their guarantees
//!
//! | | [`memory`] | `redis` (feature `redis`) |
//! |---|---|---|
//! | atomicity | one compare-and-swap per decision, lock-free per key | one `EVALSHA` per decision, atomic in Redis (with [`batch`](crate::redis::Builder::batch), concurrent decisions share one, each still atomic) |
//! | time | injected [`memory::Clock`] (monotonic by default) | the Redis server's `TIME` (app clocks may drift) |
//! | memory | at most `max_keys` keys; keys back to full removed automatically | keys expire when back to full |
//! | several limits | all or none (taken in order, given back on denial) | all or none (one script) |
//! | quota change | keeps state: no fresh burst | limit travels with each call: no fresh burst |
//! | failure | none | [`FailurePolicy`](crate::redis::FailurePolicy): open, closed, or a local limiter |
//! | fast paths | `allow()`: admitted or not, no [`Decision`] built | [`deny_cache`](crate::redis::Builder::deny_cache): keys Redis denied answered locally until they could be admitted |
//!
//! Both backends make identical decisions for the same requests at the same times (a
//! differential test runs memory, Redis and Redis Cluster side by side), and GCRA on
//! memory makes identical decisions to `governor` for the same quota. Both have a shadow
//! mode that counts what would be denied and admits everything.
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
//! # Figures
//!
//! From `cargo bench -p sd-benches --bench ratelimit` (criterion, `--warm-up-time 1
//! --measurement-time 3`), three whole runs in a row, both crates in every run, on a
//! two-core VM shared with other builds (load average 4.6–8.5 throughout): the median
//! of the three runs, the ratio of the medians (peer time / our time, or our
//! throughput / peer throughput; above 1 is faster) and, in brackets, the three per-run
//! ratios. Read the ratios, not the absolute values: at this load they move by ±30 %.
//!
//! | bench | sd-ratelimit | peer, same runs | ratio [per run] |
//! |---|---|---|---|
//! | memory, one limiter, `check()` | 21.0 ns | governor direct 23.3 ns | 1.11× [1.25, 1.11, 1.09] |
//! | memory, one limiter, `allow()` | 20.0 ns | governor direct 23.3 ns | 1.16× [1.44, 1.16, 0.96] |
//! | memory, 10,000 keys, 1 thread, `check()` | 82.4 ns | governor keyed (DashMap) 117.0 ns | 1.42× [1.65, 1.42, 1.56] |
//! | memory, 10,000 keys, 2 threads, `check()` | 69.9 ns | governor keyed (DashMap) 106.3 ns | 1.52× [1.98, 1.70, 1.17] |
//! | Redis, 64 callers, one connection | 58.2 k/s | raw `SET` 269 k/s; `EVALSHA` of `return 1` 279 k/s | 0.22×; 0.21× |
//! | Redis, same, [`batch(64)`](crate::redis::Builder::batch) | 113 k/s | same | 0.42×; 0.41× [0.25, 0.48, 0.42 against `SET`] |
//!
//! The benches read only `allowed`, as governor's bench reads only `is_ok()`; both
//! checks are inlined, so fields nobody reads are not computed. Instruction counts per
//! decision (`valgrind --tool=callgrind` on `examples/hotpath.rs`; they repeat exactly
//! under load; quota `admit` makes every check admit, `deny` every check deny):
//!
//! | path | admit | deny | governor, admit / deny |
//! |---|---|---|---|
//! | one limiter, `check()`, reading `allowed` | 70 | 70 | 57 / 51 |
//! | one limiter, `check()`, reading every field | 113 | 108 | 57 / 51 |
//! | one limiter, `allow()` | 65 | 63 | 57 / 51 |
//! | 10,000 keys, `check()` | 161 | 161 | 317 / 318 |
//! | 10,000 keys, `allow()` | 159 | 157 | 317 / 318 |
//!
//! So on one limiter we still run about 8–19 instructions more than governor (the
//! runtime-changeable limit is read through a sequence lock, and `check` keeps the
//! general kernel reachable), yet measured no slower in every run above; with the
//! noise at this load, call it parity. Both use
//! the same clock (quanta's TSC counter, about 25 instructions of each count). Keyed
//! checks are faster from foldhash against SipHash, the GCRA path skipping the general
//! kernel, and 32 map shards per core (two threads rarely write the same shard's reader
//! count).
//!
//! Redis is server-bound, and the floor is Redis's scripting, not the script.
//! Instructions per operation in redis-server 7.0 (`valgrind --tool=callgrind` on the
//! server, 20,000 pipelined operations, the same on every run):
//!
//! | operation | instructions |
//! |---|---|
//! | `SET k v PX` | 9.7 k |
//! | `EVALSHA` of `return 1` | 10.5 k |
//! | `GET` + `SET .. PX`, plain commands | 13.6 k |
//! | smallest GCRA script (`GET`, arithmetic, `SET .. PX`, caller's clock) | 55.5 k |
//! | this crate's GCRA / leaky-meter script, one decision (server clock) | 74 k |
//! | the same, batch of 64 (one `MGET`), per decision | 37 k |
//! | this crate's general script (every algorithm), one decision | 90 k |
//! | the same, batch of 64, per decision | 47 k |
//!
//! Each `redis.call` from Lua costs the server about 15–20 k instructions (it builds a
//! client, runs the command, then parses the reply back into Lua), so any script that
//! reads and writes a key costs at least 5.7 times a raw `SET`. Against raw commands
//! the 0.8× goal would need a native Redis module, which managed Redis services do not
//! load; it is not met. Batching spreads the script's fixed cost and the client's
//! per-command work over many decisions; it does not remove the per-key calls.
//!
//! # Crate features
//!
//! None is on by default; the memory backend and [`client_ip`] need none.
//!
//! - `redis`: the Redis backend (redis-rs, async; single server or cluster). Implies `tokio`.
//! - `tower`: the tower / axum / tonic middleware. Implies `tokio` (to wait out a leaky
//!   queue's delay).
//! - `tokio`: `until_ready` on the memory limiters, [`memory::TokioClock`], reading a
//!   PROXY header from a tokio stream, and `client_ip::ProxyListener`.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod algorithm;
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
