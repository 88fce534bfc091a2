//! The crate's one error type.

use std::time::Duration;

use sd_core::BoxError;

sd_core::error_enum! {
    /// What went wrong; every message says what to do about it.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
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
        /// A handler's response body failed while it was read to be stored.
        #[error("the response body failed while it was read to be stored: {source}; build the response from bytes in memory")]
        ResponseBody {
            /// The body's error.
            #[source]
            source: BoxError,
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
        /// The Redis store wrote a claim, a completion or an extension, but fewer replicas
        /// than `RedisStoreBuilder::wait_for_replicas` (feature `redis`) asks for
        /// acknowledged it within the wait, so it does not count. A claim was
        /// released again (best effort) and the work must not run; a completion is on the
        /// master only, so call `complete` again or expect a retry to run the key again
        /// once its lock expires.
        #[error(
            "the idempotency record reached {acked} of the {wanted} redis replicas it waits for; check the replicas and their links, or lower `wait_for_replicas`"
        )]
        NotReplicated {
            /// Replicas that acknowledged the write within the wait.
            acked: u32,
            /// Replicas asked for.
            wanted: u32,
        },
        /// The store's backend (Redis or PostgreSQL) failed; the source is the client's
        /// error.
        #[error(
            "the idempotency store's {backend} failed: {source}; check the server is reachable (postgres: and that `migrate()` ran)"
        )]
        Backend {
            /// `"redis"` or `"postgres"`.
            backend: &'static str,
            /// The client error.
            #[source]
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

    /// True when the store itself failed rather than the request or the claim: what
    /// the middleware answers with 503 (and [`run_once`](crate::run_once()) returns
    /// without running the work). A store that is down or slow (`Backend`, `Timeout`)
    /// a write that did not reach the replicas asked for (`NotReplicated`) and a record
    /// it cannot read back (`Corrupt`) count; a lost claim, a key in
    /// flight or a mismatch are answers about the request.
    pub fn is_store_failure(&self) -> bool {
        let unreadable = matches!(self, Error::Corrupt { .. });
        let unreachable = matches!(
            self,
            Error::Backend { .. } | Error::Timeout { .. } | Error::NotReplicated { .. }
        );
        unreadable || unreachable
    }
}

// `From<sd_core::ConfigError>` (InvalidConfig), `From<sd_core::Elapsed>` (Timeout), and the
// clients' errors (per feature) into `Backend`.
sd_core::impl_core_errors!(Error; Backend from redis, postgres);

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
