//! The crate's one error type.

use std::borrow::Cow;
use std::time::Duration;

use sd_core::BoxError;

sd_core::error_enum! {
    /// What went wrong; every message says what to do about it.
    ///
    /// A step's own failure is not an [`Error`]: it is a [`StepError`](crate::StepError) that
    /// the orchestrator retries, compensates or turns into
    /// [`SagaOutcome::Stuck`](crate::SagaOutcome::Stuck). An `Error` means the definition, the configuration or the
    /// log failed.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// A step's configuration is out of range; raised when the saga is built.
        #[error("invalid `{field}` of step `{step}`: {reason}")]
        StepConfig {
            /// The step's name.
            step: String,
            /// The field at fault.
            field: &'static str,
            /// Why it is refused.
            reason: Cow<'static, str>,
        },
        /// The saga definition has no steps.
        #[error("saga `{saga}` has no steps; add at least one with `step(..)`")]
        NoSteps {
            /// The saga's name.
            saga: String,
        },
        /// A compensatable step follows the pivot: once the pivot commits the saga can only
        /// go forward, so nothing after it may be undone.
        #[error(
            "saga `{saga}`: compensatable step `{step}` comes after the pivot `{pivot}`; move it before the pivot or make it retriable"
        )]
        CompensatableAfterPivot {
            /// The saga's name.
            saga: String,
            /// The offending step.
            step: String,
            /// The pivot step.
            pivot: String,
        },
        /// A retriable step comes before any pivot: it could never be undone if a later step
        /// failed.
        #[error(
            "saga `{saga}`: retriable step `{step}` comes before the pivot; retriable steps follow a pivot, mark the point of no return with `Step::pivot`"
        )]
        RetriableBeforePivot {
            /// The saga's name.
            saga: String,
            /// The offending step.
            step: String,
        },
        /// A second pivot: a saga has one point of no return.
        #[error("saga `{saga}`: step `{step}` is a second pivot after `{first}`; make it retriable")]
        SecondPivot {
            /// The saga's name.
            saga: String,
            /// The second pivot.
            step: String,
            /// The first pivot.
            first: String,
        },
        /// A parallel group holds the pivot: a group runs before the pivot (compensatable
        /// steps) or after it (retriable steps), never across it.
        #[error(
            "saga `{saga}`: the pivot `{step}` is in a parallel group; make it a step of its own between the groups"
        )]
        PivotInGroup {
            /// The saga's name.
            saga: String,
            /// The pivot step.
            step: String,
        },
        /// The saga was started under another version of its definition, and no
        /// migration from that version is registered (or the migration cannot place it).
        #[error(
            "saga `{id}` was started under version {found} of its definition and this orchestrator runs version {expected}; recover it with an orchestrator of version {found}, or register a `migration({found}, ..)` that places its step {step}"
        )]
        DefinitionVersion {
            /// The saga id.
            id: String,
            /// The version stored with the saga.
            found: u32,
            /// This orchestrator's version.
            expected: u32,
            /// The step the saga is at (in its own version).
            step: u32,
        },
        /// Two steps share a name.
        #[error("saga `{saga}`: two steps are named `{step}`; step names must be unique")]
        DuplicateStep {
            /// The saga's name.
            saga: String,
            /// The repeated name.
            step: String,
        },
        /// A saga id is not acceptable.
        #[error("invalid saga id: {reason}; use 1 to 200 printable characters")]
        InvalidId {
            /// What is wrong with it.
            reason: &'static str,
        },
        /// A saga with this id was already started.
        #[error("saga `{id}` already exists; pick a new id, or `get` the existing one")]
        AlreadyExists {
            /// The saga id.
            id: String,
        },
        /// No saga with this id.
        #[error("no saga `{id}` in the log")]
        NotFound {
            /// The saga id.
            id: String,
        },
        /// The saga belongs to another saga definition than this orchestrator's.
        #[error(
            "saga `{id}` is a `{found}` saga, not `{expected}`; resume it with its own orchestrator"
        )]
        WrongType {
            /// The saga id.
            id: String,
            /// This orchestrator's saga name.
            expected: String,
            /// The saga's type in the log.
            found: String,
        },
        /// `resume` was called on a saga that is not stuck.
        #[error(
            "saga `{id}` is `{state}`, not stuck; only stuck sagas are resumed (`recover` continues abandoned ones)"
        )]
        NotStuck {
            /// The saga id.
            id: String,
            /// Its state.
            state: crate::SagaState,
        },
        /// This orchestrator no longer owns the saga: its lease expired and another
        /// orchestrator claimed it (a higher epoch), or the version moved on. The write was
        /// refused; the new owner carries on.
        #[error(
            "saga `{id}`: lease of epoch {epoch} was lost to another orchestrator; the write was refused and the new owner continues (raise `lease_ttl` if steps outlive it)"
        )]
        Fenced {
            /// The saga id.
            id: String,
            /// The epoch this orchestrator held.
            epoch: u64,
        },
        /// The saga data could not be encoded or decoded as JSON.
        #[error("cannot (de)serialize the saga data as json: {source}")]
        Codec {
            /// The serde_json error.
            #[from]
            source: serde_json::Error,
        },
        /// A stored saga cannot be read back (written by another version, or damaged).
        #[error("stored saga is unreadable ({reason}); inspect the row")]
        Corrupt {
            /// What failed to decode.
            reason: String,
        },
        /// The log did not answer within the configured timeout.
        #[error("the saga log did not answer within {after:?}; check it is up or raise `timeout`")]
        Timeout {
            /// The timeout that elapsed.
            after: Duration,
        },
        /// The log's backend (PostgreSQL, or another [`SagaStore`](crate::SagaStore)) failed.
        #[error(
            "the saga log's {backend} failed: {source}; check the server is reachable and `migrate()` ran"
        )]
        Backend {
            /// Which backend: `"postgres"`, ...
            backend: &'static str,
            /// The client's error.
            source: BoxError,
        },
    }
}

impl Error {
    pub(crate) fn corrupt(reason: impl Into<String>) -> Self {
        Error::Corrupt {
            reason: reason.into(),
        }
    }

    /// A failure of the log's `backend` (for [`SagaStore`](crate::SagaStore)
    /// implementations).
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            source: source.into(),
        }
    }

    /// True when the log itself failed (down, timed out, unreadable): the saga is left
    /// where it was, and `recover` continues it once its lease expires.
    pub fn is_store_failure(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. } | Error::Corrupt { .. } | Error::Backend { .. }
        )
    }
}

sd_core::impl_core_errors!(Error; Backend from postgres);

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
