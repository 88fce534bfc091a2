//! The one error type of the crate.

use std::fmt;
use std::time::Duration;

use crate::pool::Job;

sd_core::error_enum! {
    /// What went wrong, and what to do about it.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// The pool was built outside a tokio runtime.
        #[error("no tokio runtime is running; build the pool from inside a tokio runtime")]
        NoRuntime,
        /// The pool no longer takes jobs: `close`, `drain` or `shutdown_now` was called.
        #[error(
            "the pool is closed and takes no more jobs; submit before calling close, drain or shutdown_now"
        )]
        Closed,
        /// `try_submit` found a bound reached.
        #[error(
            "the pool is full: `{bound}` ({limit}) is reached; retry later, use `submit`, which waits, or raise `{bound}`"
        )]
        Full {
            /// The builder field whose bound is reached: `queue`, `max_key_backlog` or
            /// `max_watermark_window`.
            bound: &'static str,
            /// Its value.
            limit: usize,
        },
        /// A call did not finish within its time limit: `submit_timeout` found no room in
        /// time (`bound` names the bound still reached).
        #[error("{}", timeout_message(*after, *bound))]
        Timeout {
            /// The limit that passed.
            after: Duration,
            /// For `submit_timeout`, the builder field whose bound was still reached when the
            /// time ran out; `None` for other time limits.
            bound: Option<&'static str>,
        },
        /// A job submitted into its own pool while it was full; waiting could deadlock, since
        /// the room it waits for may need the submitting job to finish.
        #[error(
            "a job submitted into its own full pool (`{bound}` reached), which could wait forever; use `try_submit` from inside jobs or raise `{bound}`"
        )]
        WouldDeadlock {
            /// The bound that was reached.
            bound: &'static str,
        },
        /// Offsets of one partition must be submitted in increasing order.
        #[error(
            "offset {offset} of partition {partition} is not above the last tracked offset {last}; submit the offsets of a partition in increasing order"
        )]
        OffsetNotIncreasing {
            /// The partition.
            partition: u32,
            /// The offset that was refused.
            offset: u64,
            /// The highest offset tracked so far in that partition.
            last: u64,
        },
        /// The job panicked. The worker survived and took the next job.
        #[error("job {id} panicked: {message}; the pool kept its capacity, fix the job")]
        Panicked {
            /// The job's id.
            id: u64,
            /// The panic payload when it was a string, else a placeholder.
            message: String,
        },
        /// The job was dropped before it finished: aborted by `shutdown_now`, or returned
        /// unrun by `drain`/`shutdown_now` and then dropped by the caller.
        #[error(
            "job {id} was cancelled before it finished (shutdown or dropped unrun); resubmit it if it must run"
        )]
        Cancelled {
            /// The job's id.
            id: u64,
        },
        /// A backend command failed, or answered with a reply this crate does not
        /// understand ([`UnexpectedReply`] as the source).
        #[error(
            "{backend} {operation} failed: {source}; check that the server is up and the stream and group exist"
        )]
        Backend {
            /// The backend: `"redis"`.
            backend: &'static str,
            /// The command, e.g. `XREADGROUP`.
            operation: &'static str,
            /// The client's error.
            #[source]
            source: sd_core::BoxError,
        },
    }
}

fn timeout_message(after: Duration, bound: Option<&'static str>) -> String {
    match bound {
        Some(bound) => format!(
            "no room in the pool within {after:?} (`{bound}` reached); raise the timeout or `{bound}`"
        ),
        None => format!("no answer within {after:?}; raise the time limit"),
    }
}

/// The source of an [`Error::Backend`] whose server answered with a reply this crate
/// does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply ({what}); check the server version (Redis 7 or newer)")]
#[non_exhaustive]
pub struct UnexpectedReply {
    /// What was wrong with the reply.
    pub what: &'static str,
}

// A Redis failure whose command is not known has `operation: "command"`.
sd_core::impl_core_errors!(Error, Timeout { bound: None }; Backend from redis(operation = "command"));

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A job the pool did not accept, handed back with the reason.
///
/// Returned by [`Pool::try_submit`](crate::Pool::try_submit),
/// [`Pool::submit`](crate::Pool::submit) and
/// [`Pool::submit_timeout`](crate::Pool::submit_timeout), so the caller can retry, run
/// the job elsewhere, or drop it knowingly.
pub struct Rejected<F> {
    /// Why the job was not accepted.
    pub error: Error,
    /// The job, untouched.
    pub job: Job<F>,
}

impl<F> Rejected<F> {
    /// The job, untouched.
    pub fn into_job(self) -> Job<F> {
        self.job
    }
}

impl<F> fmt::Debug for Rejected<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("error", &self.error)
            .field("job", &self.job)
            .finish()
    }
}

impl<F> fmt::Display for Rejected<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<F> std::error::Error for Rejected<F> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<F> From<Rejected<F>> for Error {
    fn from(rejected: Rejected<F>) -> Self {
        rejected.error
    }
}
