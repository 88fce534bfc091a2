//! The one error type of the crate.

use std::fmt;
use std::time::Duration;

use crate::pool::Job;

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range; the pool was not built.
    #[error("`{field}` {reason}")]
    Config {
        /// The builder field at fault.
        field: &'static str,
        /// Why the value was refused and what to use instead.
        reason: &'static str,
    },
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
        /// The builder field whose bound is reached: `queue_capacity`, `max_key_backlog` or
        /// `max_watermark_window`.
        bound: &'static str,
        /// Its value.
        limit: usize,
    },
    /// `submit_timeout` found no room in time.
    #[error(
        "no room in the pool within {waited:?} (`{bound}` reached); raise the timeout or `{bound}`"
    )]
    Timeout {
        /// How long it waited.
        waited: Duration,
        /// The bound that was still reached when the time ran out.
        bound: &'static str,
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
    /// A Redis command failed.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    #[error(
        "redis {op} failed: {source}; check that the server is up and the stream and group exist"
    )]
    Redis {
        /// The command, e.g. `XREADGROUP`.
        op: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered with a reply this crate does not understand.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    #[error(
        "redis {op} returned an unexpected reply ({what}); check the server version (Redis 7 or newer)"
    )]
    RedisReply {
        /// The command.
        op: &'static str,
        /// What was wrong with the reply.
        what: &'static str,
    },
}

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
