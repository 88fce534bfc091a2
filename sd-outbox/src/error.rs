//! The crate's one error type.

use std::time::Duration;

/// What went wrong; every message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range; raised at construction.
    #[error("invalid `{field}`: {reason}")]
    Config {
        /// The builder field (or argument) at fault.
        field: &'static str,
        /// Why it is refused and what would be accepted.
        reason: String,
    },
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
    /// A backend did not answer within the configured timeout.
    #[error("the {backend} did not answer within {after:?}; check it is up or raise `timeout`")]
    Timeout {
        /// Which backend.
        backend: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// PostgreSQL failed.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    #[error("postgres failed: {source}; check the server is reachable and `migrate()` ran")]
    Postgres {
        /// The client error.
        #[from]
        source: sqlx::Error,
    },
    /// Redis failed.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    #[error("redis failed: {source}; check the server is reachable")]
    Redis {
        /// The client error.
        #[from]
        source: redis::RedisError,
    },
}

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

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

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
