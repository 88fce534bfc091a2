//! The mechanics every sd pattern crate shares, kept once so they cannot drift apart.
//!
//! sd's pattern crates (`sd-ratelimit`, `sd-cache`, `sd-lock`, ...) never depend on one
//! another; what several of them need lives here, as `tower-layer` holds what every
//! tower middleware needs and `sqlx-core` what every sqlx driver needs. This crate knows
//! no pattern. Most users never name it: each pattern crate re-exports the few types its
//! users write (a [`RetryPolicy`], a [`ManualClock`] in tests).
//!
//! | module | what it holds |
//! |---|---|
//! | [`boxed`] | [`boxed_twin!`]: the object-safe twin of an async trait, for a crate's boxed handle |
//! | [`clock`] | one [`Clock`] trait; [`MonotonicClock`], [`SystemClock`] (wall time), [`TokioClock`], [`ManualClock`] |
//! | [`retry`] | [`RetryPolicy`]: exponential backoff with jitter and a bound on attempts |
//! | [`deadline`] | [`timeout`](deadline::timeout) with a span, and [`Deadline`] for work in several steps |
//! | [`name`] | the one rule for table names ([`TableName`]) and Redis key prefixes ([`KeyPrefix`]) |
//! | [`error`] | [`ConfigError`] (the field and the reason), [`Elapsed`], [`BoxError`] |
//! | `redis` | `Script`: `EVALSHA`, then `EVAL` once on `NOSCRIPT`; `wait_for_replicas`: `WAIT` on the key's master (feature `redis`) |
//! | `failover` | `FailoverConnection`: one server, a Sentinel group or a Cluster behind one redis-rs `ConnectionLike`, following failover (feature `redis`) |
//! | [`tally`] | [`Tally`](tally::Tally): counts bumped on hot paths without an atomic add, published to `metrics` counters in steps |
//! | [`observe`] | the metric names, label keys and span fields every crate uses; metric handles (feature `metrics`) |
//! | `migrate` | `Migrator`: versioned, checksummed migrations under an advisory lock (feature `postgres`) |
//! | `trace` | `TraceParent`: W3C `traceparent` written from the current `tracing` span, read back as a job span's parent (feature `otel`) |
//!
//! ```
//! use std::time::Duration;
//! use sd_core::{Clock, ManualClock, RetryPolicy};
//!
//! let clock = ManualClock::new();
//! clock.advance(Duration::from_secs(3));
//! assert_eq!(clock.now(), Duration::from_secs(3));
//!
//! let policy = RetryPolicy::builder()
//!     .initial_interval(Duration::from_millis(10))
//!     .jitter(0.0)
//!     .build()?;
//! assert_eq!(policy.delay(3, 0.0), Duration::from_millis(40));
//! # Ok::<(), sd_core::ConfigError>(())
//! ```
//!
//! # Features
//! - `redis`: `redis::Script` (redis-rs 1.x, any `ConnectionLike`) and
//!   `failover::FailoverConnection`.
//! - `postgres`: `migrate::Migrator` (sqlx 0.8).
//! - `metrics`: `observe::{counter, histogram, gauge}` over the `metrics` facade.
//! - `test-util`: `observe::Capture`, a test's own metrics recorder (implies `metrics`).
//! - `otel`: `trace::TraceParent`, W3C trace context across an asynchronous hop
//!   (opentelemetry 0.33 API, tracing-opentelemetry 0.34); the application installs the
//!   SDK, its exporter and the tracing-opentelemetry layer.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod boxed;
pub mod clock;
pub mod deadline;
pub mod error;
#[cfg(feature = "redis")]
pub mod failover;
#[cfg(feature = "postgres")]
pub mod migrate;
pub mod name;
pub mod observe;
#[cfg(feature = "redis")]
pub mod redis;
pub mod retry;
pub mod tally;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod trace;

pub use clock::{Clock, ManualClock, MonotonicClock, SystemClock, TokioClock};
pub use deadline::Deadline;
pub use error::{BoxError, ConfigError, Elapsed};
pub use name::{KeyPrefix, TableName};
pub use retry::{RetryPolicy, RetryPolicyBuilder};
