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
    /// An idempotency key the caller sent is not acceptable.
    #[error("invalid idempotency key: {reason}; send 1 to 255 printable ascii characters")]
    InvalidKey {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The claim is no longer held: its lock expired (and maybe another request took the
    /// key over), or it was already completed or released.
    #[error(
        "the claim on key `{key}` (epoch {epoch}) is no longer held; its lock expired or it was taken over: raise `lock_ttl` or call `extend` while the work runs"
    )]
    ClaimLost {
        /// The idempotency key.
        key: String,
        /// The epoch of the lost claim.
        epoch: u64,
    },
    /// The same key is in use by a request that is still running.
    #[error("a request with this idempotency key is still running; retry after {retry_after:?}")]
    InFlight {
        /// When the running request's lock expires at the latest.
        retry_after: Duration,
    },
    /// The key was first used with a different request.
    #[error(
        "idempotency key `{key}` was first used with a different request; send a new key for a new request"
    )]
    Mismatch {
        /// The idempotency key.
        key: String,
    },
    /// A response is larger than the store accepts.
    #[error("response of {size} bytes exceeds the {limit}-byte cap; raise `max_response_bytes`")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The configured cap.
        limit: usize,
    },
    /// A stored record cannot be read back (written by another version, or damaged).
    #[error("stored idempotency record is unreadable ({reason}); delete the key or let it expire")]
    Corrupt {
        /// What failed to decode.
        reason: String,
    },
    /// A result could not be encoded or decoded as JSON by [`run_once`](crate::run_once()).
    #[error("cannot (de)serialize the stored result as json: {source}")]
    Codec {
        /// The serde_json error.
        #[from]
        source: serde_json::Error,
    },
    /// The store did not answer within the configured timeout.
    #[error(
        "the idempotency store did not answer within {after:?}; check it is up or raise `timeout`"
    )]
    Timeout {
        /// The timeout that elapsed.
        after: Duration,
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
    /// PostgreSQL failed.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    #[error("postgres failed: {source}; check the server is reachable and `migrate()` ran")]
    Postgres {
        /// The client error.
        #[from]
        source: sqlx::Error,
    },
}

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(reason: impl Into<String>) -> Self {
        Error::Corrupt {
            reason: reason.into(),
        }
    }

    /// True when the store itself failed (down, timed out, unreadable) rather than the
    /// request or the claim: what the middleware answers with 503.
    pub fn is_store_failure(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Corrupt { .. } => true,
            #[cfg(feature = "redis")]
            Error::Redis { .. } => true,
            #[cfg(feature = "postgres")]
            Error::Postgres { .. } => true,
            _ => false,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
