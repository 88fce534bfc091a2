//! Idempotency-Key store on memory, Redis and PostgreSQL, and middleware that executes
//! each request once under concurrent retries.
//!
//! A client that retries a `POST /payments` after a timeout must not be charged twice.
//! It sends an `Idempotency-Key`; the server runs the request once, answers concurrent
//! duplicates with 409, a reused key with another body with 422, and replays the stored
//! response, byte for byte, to every later retry.
//!
//! # When to use it (and when not)
//!
//! Use it for non-idempotent operations with side effects outside one database
//! transaction: charging a card, sending mail, calling a partner API, publishing a
//! message ([`run_once`](crate::run_once())). When the request only writes to your own
//! PostgreSQL database, one transaction with a unique constraint on the key is simpler;
//! [`postgres::PostgresStore::complete_in`] is the middle ground, storing the response in
//! that transaction (from an axum handler behind the middleware, through its
//! [`tower::RequestClaim`]).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use sd_idempotency::{ClaimOutcome, Fingerprint, MemoryStore, Store, StoredResponse};
//!
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let store = MemoryStore::new();
//! let fp = Fingerprint::of(r#"{"amount":1000,"currency":"EUR"}"#);
//! let lock = Duration::from_secs(30);
//!
//! let ClaimOutcome::Claimed(claim) = store.claim("alice", "key-1", &fp, lock).await? else {
//!     panic!("the first request claims the key");
//! };
//! // A concurrent duplicate is told to come back later.
//! assert!(matches!(store.claim("alice", "key-1", &fp, lock).await?, ClaimOutcome::InFlight { .. }));
//! // The same key with another body is refused.
//! let other = Fingerprint::of(r#"{"amount":9999,"currency":"EUR"}"#);
//! assert_eq!(store.claim("alice", "key-1", &other, lock).await?, ClaimOutcome::Mismatch);
//!
//! let response = StoredResponse::new(201, r#"{"id":"pay_1"}"#);
//! store.complete(&claim, &response, Duration::from_secs(24 * 3600)).await?;
//! // Every retry gets the stored response.
//! assert_eq!(store.claim("alice", "key-1", &fp, lock).await?, ClaimOutcome::Completed(response));
//! # Ok::<(), sd_idempotency::Error>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! With axum (feature `tower`):
//!
//! ```ignore
//! let layer = IdempotencyLayer::builder(store)
//!     .principal(|parts| parts.headers.get("x-api-key")?.to_str().ok().map(str::to_owned))
//!     .build()?;
//! let app = Router::new().route("/payments", post(create_payment)).layer(layer);
//! ```
//!
//! The middleware stores the handler's response after the handler returned, unless the
//! handler completed the key itself through the [`tower::RequestClaim`] in its request's
//! extensions: on PostgreSQL in the transaction that writes its rows
//! ([`tower::RequestClaim::commit`]), so the response commits with them. Without that,
//! a store that fails between the handler's commit and the middleware's write leaves the
//! response unstored, and a retry after `lock_ttl` runs the handler again (the
//! [`tower`] module docs show the handler and each store's window).
//!
//! A duplicate that arrives while the first request runs gets 409 with `Retry-After`, or,
//! with [`tower::IdempotencyLayerBuilder::wait_in_flight`], waits a bounded time for the
//! first one's response and replays it.
//!
//! With tonic, or any handler that is not HTTP, [`run_once`](crate::run_once()) takes the
//! scope, key and fingerprint you read from the message: `examples/idempotent_grpc.rs`
//! reads them from gRPC metadata and maps each outcome to a status code.
//!
//! # Guarantees per backend
//!
//! Every backend honours the [`Store`] contract: claim, complete, release and extend are
//! each one atomic step; a claim holds while its lock lives; a takeover of an abandoned
//! key bumps the epoch and the old holder's `complete` is refused ([`Error::ClaimLost`]).
//!
//! | backend | claim | complete | replay | survives | limits |
//! |---|---|---|---|---|---|
//! | [`MemoryStore`] | a shard lock | a shard lock | 0 round trips | nothing | one process |
//! | [`redis::RedisStore`] | 1 `EVALSHA` | 1 `EVALSHA` | 1 round trip | app restarts | a failover or unpersisted restart can forget claims |
//! | [`postgres::PostgresStore`] | 1 statement | 1 statement (or in your transaction) | 1 round trip | crashes, restarts | a write per claim and per replay |
//!
//! On Redis, [`redis::RedisStoreBuilder::wait_for_replicas`] (off by default) makes a
//! claim, a completion or an extension count only once `WAIT` says that many replicas
//! hold it ([`Error::NotReplicated`] otherwise, and a claim that did not count is
//! released): a failover that promotes one of them then forgets none of them, and no key
//! runs twice across it (the failover tests check this). It is not durability on disk,
//! a failover may still promote a replica that missed a write when fewer replicas are
//! waited for than there are, and `WAIT` does not make Redis a consensus system; use
//! PostgreSQL when a duplicate run is not acceptable.
//!
//! Behind the middleware, a handler that completes through its claim, and a duplicate
//! that waits for the request in flight, get on each backend:
//!
//! | backend | completion with the handler's writes | a duplicate waiting for the first |
//! |---|---|---|
//! | [`MemoryStore`] | [`tower::RequestClaim::complete`]: a separate write | polls the claim, a shard lock each |
//! | [`redis::RedisStore`] | [`tower::RequestClaim::complete`]: a separate round trip | polls the claim, one `EVALSHA` each (read only while the key is in flight) |
//! | [`postgres::PostgresStore`] | in the handler's transaction: both commit or neither | reads the row, one `SELECT` each (no write, no wait on the handler's open transaction); claims once the key is free |
//!
//! Polls start 5 ms after the duplicate arrived and back off to 200 ms apart, so a
//! waiting duplicate answers at most one poll interval after the first request's
//! completion.
//!
//! The middleware fails closed: when the store errs or times out it answers 503 and the
//! handler does not run ([`tower::OnStoreFailure`]). A claim that timed out may
//! still land when a frozen store wakes: a retry with the same key then gets 409 with
//! `Retry-After` until `lock_ttl` has passed, and runs after that (the tests pause Redis
//! and PostgreSQL to check the 503; nothing runs twice either way).
//!
//! Stores are built with `builder()` (setters that cannot fail, one `build()` that
//! names the setter of a value out of range); [`BoxStore`] holds any of them behind one
//! type, for a store picked from configuration at run time. Tables and key prefixes
//! follow sd-core's one rule (keys are `{prefix}:{{digest}}`, sd adds the colon);
//! PostgreSQL's schema is applied by sd-core's migrator and recorded in `sd_migrations`.
//!
//! # Cost
//!
//! Round trips to the store per request: first run 2 (claim, complete), replay 1,
//! duplicate in flight 1, plus one `extend` per third of `lock_ttl` the handler runs.
//! The Redis and PostgreSQL tests count them on the server. A handler that completes
//! through [`tower::RequestClaim::commit`] moves the completion into its transaction
//! (one statement there, none after); after [`tower::RequestClaim::complete_in`] the
//! middleware adds one release, which the store refuses once the transaction committed.
//! A duplicate waiting for the first costs one round trip per poll
//! ([`Store::poll_claim`]). `benches/idempotency.rs`
//! runs a first request through the middleware on each backend beside the bare handler:
//! the memory store adds little to a handler, Redis and PostgreSQL add their round
//! trips; the figures are in
//! [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
//!
//! # Sizing
//!
//! What one Redis server (one shard) sustained in first runs a second (claim + complete
//! on new keys, the middleware left out), beside a hand-written `SET NX PX` then
//! `SET XX PX`, is in the Sizing section of [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md#sizing). For a load in
//! requests a second that carry an idempotency key,
//! `shards = ceil(load / (rate × headroom))`, with a headroom below 1 (the file works
//! examples at 0.5); a replay is one round trip where a first run is two, so a load of
//! retries costs less. Keys are digests, so they spread evenly over a cluster's slots;
//! what does not spread is one key, whose retries all go to one shard, and
//! `wait_for_replicas` adds a round trip and a replica's acknowledgement to each state
//! change, which these figures leave out.
//!
//! # Metrics and spans
//!
//! With feature `metrics`, every store reports through the `metrics` facade (install
//! the exporter's recorder before building the store: handles are registered then).
//! Labels follow `sd_core::observe`; `sd.name` is the store's name (the builders'
//! `name`, [`MemoryStore::with_name`]; default `"default"`).
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `sd.idempotency.claims` | counter | claims | `sd.name`, `sd.backend` (`memory`, `redis`, `postgres`), `sd.outcome` (`first`, `replay`, `in_flight`, `mismatch`) |
//! | `sd.idempotency.store.duration` | histogram | s | `sd.name`, `sd.backend` (`redis`, `postgres`), `sd.operation` (`claim`, `complete`, `release`, `extend`, `sweep`) |
//!
//! A claim that fails (the store is down) is no outcome: it is an error, and its call's
//! time is still recorded. Every Redis script and PostgreSQL statement runs in an
//! `idempotency.redis` / `idempotency.postgres` span with `sd.name`, `sd.backend` and
//! `sd.operation`; the middleware's store calls run in `idempotency.store`.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis backend ([`redis::RedisStore`]).
//! - `postgres`: the PostgreSQL backend ([`postgres::PostgresStore`], sqlx 0.8).
//! - `tower`: the tower / axum middleware ([`tower::IdempotencyLayer`]).
//! - `axum`: `tower` and [`tower::RequestClaim`] as an axum extractor (axum 0.8).
//! - `metrics`: claims by outcome and store latency through the `metrics` facade (see
//!   [Metrics and spans](#metrics-and-spans)).
//! - `test-util`: `conformance`, the store contract suite every backend runs, for a
//!   store of your own or a [`BoxStore`] built from configuration.
// Without its feature an item is not there to link to: its links lead to the list above.
#![cfg_attr(
    not(feature = "redis"),
    doc = "",
    doc = "[`redis::RedisStore`]: #crate-features",
    doc = "[`redis::RedisStoreBuilder::wait_for_replicas`]: #crate-features"
)]
#![cfg_attr(
    not(feature = "postgres"),
    doc = "",
    doc = "[`postgres::PostgresStore`]: #crate-features",
    doc = "[`postgres::PostgresStore::complete_in`]: #crate-features"
)]
#![cfg_attr(
    not(feature = "tower"),
    doc = "",
    doc = "[`tower::IdempotencyLayer`]: #crate-features",
    doc = "[`tower::OnStoreFailure`]: #crate-features",
    doc = "[`tower::RequestClaim`]: #crate-features",
    doc = "[`tower::RequestClaim::complete`]: #crate-features",
    doc = "[`tower`]: #crate-features",
    doc = "[`tower::IdempotencyLayerBuilder::wait_in_flight`]: #crate-features"
)]
#![cfg_attr(
    not(all(feature = "tower", feature = "postgres")),
    doc = "",
    doc = "[`tower::RequestClaim::complete_in`]: #crate-features",
    doc = "[`tower::RequestClaim::commit`]: #crate-features"
)]
//! # Running the tests
//!
//! `cargo test -p sd-idempotency` (or `cargo nextest run -p sd-idempotency`) runs every suite: the
//! crate's tests turn on `redis`, `postgres`, `tower` and `test-util` through a dev-dependency on
//! the crate itself, so no suite is left out for want of a feature flag. The backend
//! suites start real `redis-server` and `postgres` servers through `sd-testkit`; a missing
//! server binary fails the test, it is never skipped.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod boxed;
#[cfg(feature = "test-util")]
pub mod conformance;
mod error;
pub mod memory;
mod observe;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
mod run_once;
pub mod store;
#[cfg(feature = "tower")]
pub mod tower;

pub use boxed::BoxStore;
pub use error::{Error, Result};
pub use memory::MemoryStore;
pub use run_once::{
    DEFAULT_LOCK_TTL, DEFAULT_RETENTION, Outcome, RunError, RunOnce, RunOnceBuilder, run_once,
};
pub use sd_core::{Clock, ManualClock, SystemClock};
pub use store::{
    Claim, ClaimOutcome, Fingerprint, Store, StoredResponse, run_sweeper, validate_key,
};
#[cfg(feature = "tower")]
pub use tower::IdempotencyLayer;
