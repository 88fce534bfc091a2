//! Saga orchestrator with a durable log, retries, pivot semantics and crash recovery.
//!
//! An order spans services that each own their data: reserve stock, charge the card,
//! book shipping. Two-phase commit blocks; a saga runs each local step in turn and, when
//! one fails, runs the compensations of the completed steps in reverse. This crate drives
//! such sagas from your process, records every step in a log (memory or PostgreSQL), and
//! lets another orchestrator finish the sagas of one that crashed.
//!
//! # When to use it (and when not)
//!
//! Use it when a business operation calls several services that cannot share a
//! transaction and a half-done operation must be undone or finished, even across a crash
//! of the caller. Each step is an async function in your code (a gRPC or HTTP call, a
//! local transaction). When every write lands in one database, use one transaction
//! instead. When you need timers, signals, child workflows or histories replayed
//! deterministically, use a workflow engine (Temporal, Restate); this crate is the
//! smaller thing: a state machine over a log table.
//!
//! # Example
//!
//! ```
//! use sd_saga::{MemoryStore, Orchestrator, RetryPolicy, Saga, SagaOutcome, SagaState, Step, StepError};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! // The saga data: whatever the steps need and record, serialized into the log.
//! type Order = Vec<String>;
//! let quick = RetryPolicy::builder().initial_interval(std::time::Duration::from_millis(1)).build()?;
//! let saga = Saga::<Order>::builder("order")
//!     .retry(quick)
//!     .compensation_retry(quick)
//!     .step(Step::compensatable(
//!         "reserve_stock",
//!         |ctx, mut order: Order| async move {
//!             // Call the inventory service with ctx.idempotency_key() here.
//!             order.push(format!("reserved with key {}", ctx.idempotency_key()));
//!             Ok(order)
//!         },
//!         |_ctx, _order| async { Ok(()) }, // release the stock
//!     ))
//!     .step(Step::pivot("charge_card", |_ctx, _order| async {
//!         Err::<Order, _>(StepError::permanent("card declined"))
//!     }))
//!     .step(Step::retriable("book_shipment", |_ctx, order| async { Ok(order) }))
//!     .build()?;
//! let orchestrator = Orchestrator::builder(saga, MemoryStore::new()).build()?;
//!
//! let outcome = orchestrator.run("order-1", Vec::new()).await?;
//! assert_eq!(
//!     outcome,
//!     SagaOutcome::Compensated { reason: "step `charge_card` failed: card declined".into() }
//! );
//! let record = orchestrator.get("order-1").await?.expect("logged");
//! assert_eq!(record.state, SagaState::Compensated);
//! assert_eq!(record.data, r#"["reserved with key order-1/0/forward"]"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A complete program, an order saga over three gRPC services with `--fail SERVICE` and
//! `--postgres URL`, is `examples/order_saga.rs`.
//!
//! # Steps
//!
//! - [`Step::compensatable`]: before the pivot, with a compensation (its logical undo:
//!   release, refund, cancel).
//! - [`Step::pivot`]: the point of no return (at most one). If it fails, the steps before
//!   it are compensated; once it succeeds, the saga only goes forward.
//! - [`Step::retriable`]: after the pivot; retried until it succeeds, never compensated.
//!
//! [`SagaBuilder::parallel`] adds a group of steps that run concurrently (reserve stock
//! in several warehouses at once, or charge and reserve together), with a `merge` that
//! folds each branch's output into the saga data. A group sits before the pivot
//! (compensatable steps) or after it (retriable ones), never across it.
//!
//! [`SagaBuilder::build`] rejects, with an [`Error`] naming the step: no steps, a
//! compensatable step after the pivot, a retriable step before it, a second pivot, a
//! repeated step name, a pivot inside a parallel group, a zero timeout.
//!
//! ```
//! use sd_saga::{MemoryStore, Orchestrator, Saga, SagaOutcome, Step};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! type Order = Vec<String>;
//! let reserve = |warehouse: &'static str| {
//!     Step::compensatable(
//!         warehouse,
//!         move |_ctx, mut order: Order| async move {
//!             order.push(format!("reserved in {warehouse}"));
//!             Ok(order)
//!         },
//!         |_ctx, _order| async { Ok(()) },
//!     )
//! };
//! let saga = Saga::<Order>::builder("order")
//!     // Both reservations run at once; each adds its line to the order.
//!     .parallel([reserve("north"), reserve("south")], |mut order: Order, branch: Order| {
//!         order.extend(branch.into_iter().filter(|line| !order.contains(line)).collect::<Vec<_>>());
//!         order
//!     })
//!     .step(Step::pivot("charge", |_ctx, order| async { Ok(order) }))
//!     .deadline(std::time::Duration::from_secs(600))
//!     .build()?;
//! let orchestrator = Orchestrator::builder(saga, MemoryStore::new()).build()?;
//! let SagaOutcome::Completed(order) = orchestrator.run("order-7", Vec::new()).await? else {
//!     panic!("not completed")
//! };
//! assert_eq!(order.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Each attempt runs under the step's timeout (default 30 s) and failed attempts are
//! retried under its [`RetryPolicy`]: exponential backoff with jitter, Temporal's
//! defaults (1 s, ×2, capped at 100×), 3 attempts for forward steps before the pivot and
//! 10 for retriable steps and compensations. A [`StepError::permanent`] is not retried.
//!
//! # Guarantees
//!
//! - **Steps run at least once, not exactly once.** A step's action (or compensation)
//!   runs again after a failed attempt, and after a crash: if the orchestrator dies
//!   between the participant's effect and the log's outcome record, the saga's next owner
//!   runs the step again. So **participants must dedupe**: every call carries
//!   [`StepContext::idempotency_key`], `{saga id}/{step}/{direction}`, the same on every
//!   attempt and every orchestrator; a participant that stores the keys it served (in the
//!   transaction of its effect, or with `sd-idempotency`) makes each effect happen once.
//! - **Order.** Forward steps run in definition order, one at a time except the branches
//!   of a parallel group, which run concurrently. When a step before or at the pivot
//!   gives up, exactly the completed steps are compensated, in exact reverse order, one
//!   at a time; a group's completed branches concurrently, in any order (its other
//!   branches are awaited first, or dropped if [`Step::cancellable`]). A failed step is
//!   not compensated (it did not happen), except when its last attempt timed out (or a
//!   cancellable branch was dropped): its effect may still land, so its own compensation
//!   runs too. A participant asked to compensate a key it never served should record
//!   that and refuse a late forward call with that key.
//! - **Deadline and cancel.** A saga may carry a deadline ([`SagaBuilder::deadline`],
//!   [`Orchestrator::run_within`]) on the orchestrator's [`Clock`], and anyone may call
//!   [`Orchestrator::cancel`]. Both are stored in the log; from then on (the owner sees a
//!   cancel at its next write, a deadline before each stage) no new forward step starts:
//!   steps already started are awaited, then every completed step is compensated, and a
//!   `cancelled` or `deadline` event says why. A retrying step is not cut short. Once the
//!   pivot succeeded the saga only goes forward, so neither applies.
//! - **Definition versions.** Each saga stores the [`SagaBuilder::version`] it was started
//!   under. An orchestrator of another version refuses to recover or resume it
//!   ([`Error::DefinitionVersion`]) unless a [`SagaBuilder::migration`] from that version
//!   is registered, so a deploy that changed the steps does not drive old sagas through
//!   the new ones by accident. Keep the old version running (or register the migration)
//!   until its sagas are done.
//! - **Past the pivot, only forward.** Retriable steps are never compensated.
//! - **Stuck.** A compensation (or a retriable step) that still fails when its policy
//!   runs out, or fails with a permanent error, leaves the saga [`SagaState::Stuck`]:
//!   nobody drives it, the reason is stored ([`SagaRecord::reason`]) and counted in
//!   [`Metrics`]; someone fixes the cause and calls [`Orchestrator::resume`], which tries
//!   the failed call again with a fresh retry budget and finishes the saga.
//! - **One owner at a time.** A saga is leased to one orchestrator (`lease_ttl`, default
//!   30 s, renewed by every write and every third of the TTL while a step runs). Every
//!   write is conditional on the saga's version and fencing epoch; [`Orchestrator::recover`]
//!   claims sagas whose lease expired, bumping the epoch, so a stalled owner that wakes up
//!   has its next write refused ([`Error::Fenced`]) and stops. Its step may still have
//!   called its participant meanwhile: the key dedupes that too.
//! - **Intent, then outcome.** The log records the intent of every attempt before it
//!   runs and its outcome after; the step and the data in the instance row say where a
//!   recovered saga resumes (for a parallel group, which branches started, finished or
//!   failed, and which compensations are done). Retry budgets restart when a saga is
//!   recovered or resumed.
//!
//! | log | survives | writes per step (happy path) | leases by | limits |
//! |---|---|---|---|---|
//! | [`MemoryStore`] | nothing (one process) | 2 map updates under one mutex | its [`Clock`] | sagas stay in memory until [`MemoryStore::prune_finished`] |
//! | `postgres::PostgresStore` | orchestrator crashes, database restarts | 2 statements | `clock_timestamp()` | rows stay until `postgres::PostgresStore::prune_finished` |
//!
//! [`BoxStore`] holds either log behind one type, so a service picks it from its
//! configuration at run time.
//!
//! Saga ids are unique per log (across saga types); starting an id twice is
//! [`Error::AlreadyExists`], so a retried request that starts "order-1" again does not
//! start a second saga.
//!
//! # How it compares
//!
//! The memory log adds a few microseconds of bookkeeping per step, next to nothing once
//! the participants do real work; the PostgreSQL log costs its two statements per step,
//! which is what durability and crash recovery take. Against a workflow engine it is
//! the smaller thing: no timers, signals or replayed histories, only a state machine
//! over a log table. The measured figures, beside a plain sequence of the same calls,
//! are in [benches/RESULTS.md](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
//!
//! # Metrics
//!
//! [`Orchestrator::metrics`] returns a [`Metrics`] snapshot to export: sagas of the type
//! by state and the age of the oldest unfinished one (from the log, one query), plus this
//! orchestrator's counters (started, completed, compensated, stuck, recovered, attempts,
//! failures, compensations run, fenced writes) and a step-latency histogram.
//!
//! With feature `metrics`, every orchestrator also reports through the `metrics` facade
//! (install the exporter's recorder before building the orchestrator: handles are
//! registered then, one set per step). `sd.name` is the saga's name, `sd.step` a step's
//! (both from the definition, so bounded); labels follow `sd_core::observe`.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `sd.saga.steps` | counter | calls | `sd.name`, `sd.step`, `sd.outcome` (`ok`, `retried`, `failed`) |
//! | `sd.saga.compensations` | counter | calls | `sd.name`, `sd.step`, `sd.outcome` (`ok`, `retried`, `failed`) |
//! | `sd.saga.step.duration` | histogram | s | `sd.name`, `sd.step`, `sd.operation` (`step`, `compensate`) |
//! | `sd.saga.sagas` | counter | sagas | `sd.name`, `sd.outcome` (`completed`, `compensated`, `stuck`) |
//!
//! A step's action (`sd.saga.steps`) or compensation (`sd.saga.compensations`) counts
//! `ok` or `failed` once when the call ends (`failed`: it gave up, on a permanent error
//! or its last attempt), and `retried` for every failed attempt that is tried again; a
//! compensation counted `ok` is a step compensated. Every attempt's time is one sample
//! of `sd.saga.step.duration`. A saga this orchestrator drove to its end (run, recovered
//! or resumed) counts once in `sd.saga.sagas`: `stuck` is a saga left for an operator.
//! Each attempt runs in a `saga.step` span with `sd.name`, `sd.step`, `sd.operation`
//! and `attempt`; PostgreSQL log statements run in `saga.postgres` with `sd.backend`.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `postgres`: the PostgreSQL log (`postgres::PostgresStore`, sqlx 0.8).
//! - `metrics`: step and compensation calls by outcome, attempt time and sagas by how
//!   they ended through the `metrics` facade (see [Metrics](#metrics)).
//! - `test-util`: the `conformance` module, the [`SagaStore`] contract as a suite of
//!   checks that any log (a new backend, or a [`BoxStore`]) can run.
//!
//! # Running the tests
//!
//! `cargo test -p sd-saga` (or `cargo nextest run -p sd-saga`) runs every suite: the
//! crate's tests turn on `postgres`, `test-util` and `metrics` through a dev-dependency on the
//! crate itself, so no suite is left out for want of a feature flag. The PostgreSQL
//! suites start real `postgres` servers through `sd-testkit`; a missing server binary
//! fails the test, it is never skipped.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod boxed;
#[cfg(feature = "test-util")]
pub mod conformance;
mod definition;
mod error;
pub mod memory;
mod metrics;
mod observe;
mod orchestrator;
mod plan;
#[cfg(feature = "postgres")]
pub mod postgres;
mod run;
mod store;

pub use crate::boxed::BoxStore;
pub use crate::definition::{
    BoxFuture, Direction, Saga, SagaBuilder, Step, StepContext, StepError, StepKind,
    idempotency_key,
};
pub use crate::error::{Error, Result};
pub use crate::memory::MemoryStore;
pub use crate::metrics::{LATENCY_BUCKETS, Latency, LocalMetrics, Metrics};
pub use crate::orchestrator::{Orchestrator, OrchestratorBuilder, Recovery, SagaOutcome};
pub use crate::store::{
    Claimant, Event, EventKind, Lease, NewSaga, SagaRecord, SagaState, SagaStore, StoreStats,
    StoredEvent, Write,
};
/// Retry policies and clocks are sd-core's, the same in every sd crate.
pub use sd_core::{Clock, ManualClock, RetryPolicy, RetryPolicyBuilder, SystemClock};
