//! The crate's one error type.

use std::time::Duration;

use sd_core::BoxError;

sd_core::error_enum! {
    /// What went wrong; every message says what to do about it.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// A message cannot be enqueued as it is.
        #[error("invalid message `{field}`: {reason}")]
        InvalidMessage {
            /// The message field at fault.
            field: &'static str,
            /// Why it is refused and what would be accepted.
            reason: String,
        },
        /// The sink refused or failed to publish an event.
        #[error("publishing failed after {published} event(s) of the batch: {reason}")]
        Publish {
            /// How many leading events of the batch the sink acknowledged.
            published: usize,
            /// What the sink reported.
            reason: String,
        },
        /// A backend (or a relay batch, database and sink together) did not answer within
        /// the configured timeout.
        #[error("no answer within {after:?}; check the backend is up or raise `timeout`")]
        Timeout {
            /// The timeout that elapsed.
            after: Duration,
        },
        /// A backend failed: PostgreSQL, Redis, NATS or Kafka.
        #[error(
            "{backend} failed: {source}; check the server is reachable (and, for postgres, that `migrate()` ran)"
        )]
        Backend {
            /// Which backend: `"postgres"`, `"redis"`, `"nats"` or `"kafka"`.
            backend: &'static str,
            /// The client's error.
            source: BoxError,
        },
    }
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidMessage {
            field,
            reason: reason.into(),
        }
    }

    /// A publish failure after `published` acknowledged events; for [`Publisher`]
    /// implementations.
    ///
    /// [`Publisher`]: crate::Publisher
    pub fn publish(published: usize, reason: impl std::fmt::Display) -> Self {
        Error::Publish {
            published,
            reason: reason.to_string(),
        }
    }
}

sd_core::impl_core_errors!(Error; Backend from postgres, redis);

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
