//! The observability convention every pattern crate follows, written once: the label keys
//! of metrics and the field names of `tracing` spans (the same words in both), their
//! bounded values, and (feature `metrics`) the handles a crate registers when it is built.
//!
//! # Names
//!
//! A metric is named after OpenTelemetry's semantic conventions where one exists
//! (`messaging.*` for the outbox relay and stream consumers) and `sd.<crate>.<thing>`
//! otherwise. Durations are histograms in seconds ([`UNIT_SECONDS`]); counts of events
//! are counters. Each crate's docs list its own names with their kind, unit and labels.
//!
//! # Labels and span fields
//!
//! Labels are bounded: a value comes from configuration ([`label::NAME`], the name a user
//! gave an instance) or from a fixed set ([`backend`], [`outcome`], [`operation`]), never
//! from a request (no raw key, id or IP). A span carries the same keys as fields, so a
//! trace and a metric of one call read alike:
//!
//! ```
//! use sd_core::observe::{backend, label, operation};
//!
//! // `tracing`'s macros take field names as tokens, so crates write the key itself; it is
//! // the same string as the label key.
//! let span = tracing::debug_span!("idempotency.store", sd.backend = backend::REDIS, sd.operation = operation::CLAIM);
//! assert_eq!(label::BACKEND, "sd.backend");
//! # drop(span);
//! ```
//!
//! # Handles are made once
//!
//! With feature `metrics`, a crate registers its counters and histograms when an instance
//! is built (`counter`, `histogram`, `gauge`), against the recorder installed at that
//! moment, and keeps the handles: a hot path pays one add on a handle, never a lookup by
//! name. Install the exporter's recorder before building the instances it should see.
//! With no recorder installed the handles do nothing.
//!
//! The hottest counts (a cache hit, a memory limiter's decision) are
//! [`Tally`](crate::tally::Tally) counts instead, which reach their counters in steps of
//! [`STEP`](crate::tally::STEP) per thread: call `publish` (feature `metrics`) before rendering a scrape
//! for exact figures.

/// Label keys, which are also the span field names.
pub mod label {
    /// The name a user gave the instance (a limiter, a store, a relay, a pool);
    /// `"default"` when none was given.
    pub const NAME: &str = "sd.name";
    /// The backend that served the call: one of [`super::backend`].
    pub const BACKEND: &str = "sd.backend";
    /// How a unit of work ended: one of [`super::outcome`].
    pub const OUTCOME: &str = "sd.outcome";
    /// The operation a backend call performed: one of [`super::operation`].
    pub const OPERATION: &str = "sd.operation";
    /// OpenTelemetry's messaging system attribute (`redis`, `nats`, `kafka`) on the
    /// `messaging.*` metrics.
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    /// OpenTelemetry's messaging operation name attribute (`publish`, `process`).
    pub const MESSAGING_OPERATION: &str = "messaging.operation.name";
    /// A partition of a stream (Kafka, or the pool's `(partition, offset)` positions):
    /// bounded by the partition count.
    pub const PARTITION: &str = "sd.partition";
    /// OpenTelemetry's error type attribute, present when a call failed: a fixed word
    /// (`timeout`, `backend`), never an error message.
    pub const ERROR_TYPE: &str = "error.type";
    /// A step of a saga, by the name its definition gives it: bounded by the definition.
    pub const STEP: &str = "sd.step";
}

/// The values of [`label::BACKEND`] (and of [`label::MESSAGING_SYSTEM`] for sinks and
/// consumers).
pub mod backend {
    /// In-process state.
    pub const MEMORY: &str = "memory";
    /// Redis (one server, Sentinel or Cluster).
    pub const REDIS: &str = "redis";
    /// PostgreSQL.
    pub const POSTGRES: &str = "postgres";
    /// NATS JetStream.
    pub const NATS: &str = "nats";
    /// Kafka.
    pub const KAFKA: &str = "kafka";
    /// etcd.
    pub const ETCD: &str = "etcd";
}

/// The values of [`label::OUTCOME`].
pub mod outcome {
    /// A rate limiter admitted the request.
    pub const ALLOWED: &str = "allowed";
    /// A rate limiter refused the request.
    pub const DENIED: &str = "denied";
    /// Shadow mode admitted a request the limit would have refused.
    pub const SHADOW_DENIED: &str = "shadow_denied";
    /// The backend failed and the failure policy admitted the request.
    pub const FAIL_OPEN: &str = "fail_open";
    /// The backend failed and the failure policy refused the request.
    pub const FAIL_CLOSED: &str = "fail_closed";
    /// The backend failed and a local fallback decided.
    pub const FALLBACK: &str = "fallback";
    /// An idempotency key seen for the first time: the caller runs the request.
    pub const FIRST: &str = "first";
    /// An idempotency key already completed: the stored response is replayed.
    pub const REPLAY: &str = "replay";
    /// An idempotency key another request is running.
    pub const IN_FLIGHT: &str = "in_flight";
    /// An idempotency key reused with a different request.
    pub const MISMATCH: &str = "mismatch";
    /// A unit of work finished without error.
    pub const OK: &str = "ok";
    /// A unit of work returned an error.
    pub const ERROR: &str = "error";
    /// A unit of work panicked.
    pub const PANICKED: &str = "panicked";
    /// Work refused because a bounded queue was full.
    pub const REJECTED: &str = "rejected";
    /// Work stopped while it ran (a forced shutdown).
    pub const CANCELLED: &str = "cancelled";
    /// A unit of work given up after its last attempt and set aside (a dead letter).
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// A backend call that failed.
    pub const BACKEND_ERROR: &str = "backend_error";
    /// A lock granted a lease.
    pub const ACQUIRED: &str = "acquired";
    /// A lock refused a lease another holder has (one attempt).
    pub const CONTENDED: &str = "contended";
    /// A wait (for a lease) gave up when its time ran out.
    pub const TIMEOUT: &str = "timeout";
    /// An attempt failed and another follows.
    pub const RETRIED: &str = "retried";
    /// A unit of work gave up after its last attempt.
    pub const FAILED: &str = "failed";
    /// A saga ran every step.
    pub const COMPLETED: &str = "completed";
    /// A saga was undone: its completed steps compensated.
    pub const COMPENSATED: &str = "compensated";
    /// A saga left for an operator: a compensation (or a step past the pivot) gave up.
    pub const STUCK: &str = "stuck";
    /// A campaign made its caller leader of an election.
    pub const ELECTED: &str = "elected";
}

/// The values of [`label::OPERATION`].
pub mod operation {
    /// A rate-limit decision.
    pub const DECIDE: &str = "decide";
    /// Claiming an idempotency key.
    pub const CLAIM: &str = "claim";
    /// Storing a completed response.
    pub const COMPLETE: &str = "complete";
    /// Releasing a claim so the key can be retried.
    pub const RELEASE: &str = "release";
    /// Renewing a claim's lock.
    pub const EXTEND: &str = "extend";
    /// Deleting expired records.
    pub const SWEEP: &str = "sweep";
    /// Publishing a message.
    pub const PUBLISH: &str = "publish";
    /// Processing a consumed message (a job).
    pub const PROCESS: &str = "process";
    /// Receiving messages from a broker (a stream read, a poll), before processing.
    pub const RECEIVE: &str = "receive";
    /// Taking a lease.
    pub const ACQUIRE: &str = "acquire";
    /// Running a saga step's action.
    pub const STEP: &str = "step";
    /// Running a saga step's compensation.
    pub const COMPENSATE: &str = "compensate";
    /// Running for leader of an election.
    pub const CAMPAIGN: &str = "campaign";
    /// Reading who leads an election.
    pub const OBSERVE: &str = "observe";
    /// A leader ending its own term.
    pub const RESIGN: &str = "resign";
    /// Running a cache's loader on a miss or an early refresh.
    pub const LOAD: &str = "load";
    /// Reading an entry from a cache's backend.
    pub const READ: &str = "read";
    /// Writing an entry (a value, or a load's result) to a cache's backend.
    pub const WRITE: &str = "write";
    /// Removing an entry from a cache's backend.
    pub const INVALIDATE: &str = "invalidate";
    /// Giving up a cache's load lock.
    pub const UNLOCK: &str = "unlock";
    /// Telling the other memory tiers of a two-tier cache about a write.
    pub const ANNOUNCE: &str = "announce";
    /// Renewing a two-tier cache instance's lease.
    pub const HEARTBEAT: &str = "heartbeat";
}

/// The unit of every duration histogram: seconds, as OpenTelemetry asks.
pub const UNIT_SECONDS: &str = "s";

/// The name of an instance nobody named.
pub const DEFAULT_NAME: &str = "default";

#[cfg(feature = "test-util")]
mod capture;
#[cfg(feature = "metrics")]
mod handles;
#[cfg(feature = "test-util")]
pub use capture::Capture;
#[cfg(feature = "metrics")]
pub use handles::{Labels, counter, gauge, histogram, record_since};

/// Brings the counters of every metered [`Tally`](crate::tally::Tally) alive (the hottest
/// counts of the pattern crates) up to date; call it before rendering a scrape, so the
/// scrape lags by nothing.
///
/// ```
/// let hits = sd_core::tally::Tally::<1>::metered([metrics::Counter::noop()]);
/// hits.bump::<0>();
/// sd_core::observe::publish();
/// assert_eq!(hits.sum::<0>(), 1);
/// ```
#[cfg(feature = "metrics")]
pub fn publish() {
    crate::tally::registry::publish_all();
}
