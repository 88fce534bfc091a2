//! The crate's one error type.

use std::time::Duration;

use sd_core::BoxError;

use crate::lease::FencingToken;

sd_core::error_enum! {
    /// Everything that can go wrong in sd-lock.
    ///
    /// Input errors name what was wrong and are raised at the call, before any round trip;
    /// contention ([`Error::Held`], `Error::NoQuorum`) is an error a caller may retry
    /// (`acquire` does); backend errors keep their source.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// The resource name is empty.
        #[error("lock resource name is empty; name the thing the lock protects")]
        EmptyResource,

        /// The resource name is longer than the backends accept.
        #[error("lock resource name is {len} bytes, over the {max}-byte limit; hash long names")]
        ResourceTooLong {
            /// The length given.
            len: usize,
            /// The longest name accepted.
            max: usize,
        },

        /// The TTL is zero or shorter than the backend can keep.
        #[error("lock ttl {ttl:?} is shorter than the {min:?} this backend supports; raise `ttl`")]
        TtlTooShort {
            /// The TTL given.
            ttl: Duration,
            /// The shortest TTL this backend accepts.
            min: Duration,
        },

        /// The TTL does not exceed the clock-drift margin (1 % of the TTL + 2 ms), so the
        /// lease would be invalid the moment it is granted.
        #[error("lock ttl {ttl:?} must exceed its clock-drift margin of {drift:?}; raise `ttl`")]
        TtlBelowDrift {
            /// The TTL given.
            ttl: Duration,
            /// The drift margin for that TTL.
            drift: Duration,
        },

        /// The TTL is longer than the backends can represent exactly.
        #[error("lock ttl {ttl:?} exceeds the maximum {max:?}; use a shorter ttl and a watchdog")]
        TtlTooLong {
            /// The TTL given.
            ttl: Duration,
            /// The longest TTL accepted.
            max: Duration,
        },


        /// Another holder has the lease. Retry later, or call `acquire` with a wait.
        #[error(
            "lock `{resource}` is held by another holder; retry later or use `acquire` with a wait"
        )]
        Held {
            /// The resource.
            resource: String,
        },

        /// Every permit of a semaphore's resource is held. Retry later, or call `acquire`
        /// with a wait.
        #[error(
            "all {permits} permits of `{resource}` are held; retry later or use `acquire` with a wait"
        )]
        NoPermit {
            /// The resource.
            resource: String,
            /// How many permits the resource has.
            permits: u32,
        },

        /// Redlock reached fewer masters than its quorum. Every master was asked to release
        /// what this attempt set before the error was returned.
        #[cfg(feature = "redis")]
        #[error(
            "redlock on `{resource}` got {acquired} of the {needed} masters it needs ({} failed); retry, or bring failed masters back",
            failures.len()
        )]
        NoQuorum {
            /// The resource.
            resource: String,
            /// Masters that granted the lock.
            acquired: usize,
            /// The quorum (N/2+1).
            needed: usize,
            /// Which masters did not grant it, and why.
            failures: Vec<crate::redlock::NodeFailure>,
        },

        /// The lease was granted (or extended) on the master, but fewer of its replicas
        /// than [`wait_for_replicas`](crate::redis::RedisLockBuilder::wait_for_replicas)
        /// asks for acknowledged it within the wait, so it does not count: a granted
        /// lease was released again (best effort), an extension left the lease's validity
        /// as it was.
        #[cfg(feature = "redis")]
        #[error(
            "lock `{resource}` reached {acked} of the {wanted} replicas it waits for; check the replicas and their links, or lower `wait_for_replicas`"
        )]
        NotReplicated {
            /// The resource.
            resource: String,
            /// Replicas that acknowledged the write within the wait.
            acked: u32,
            /// Replicas asked for.
            wanted: u32,
        },

        /// The lock was granted, but acquiring took so long that no validity is left.
        /// It was released again.
        #[error(
            "acquiring `{resource}` took {elapsed:?}, which used up the ttl {ttl:?} minus drift; raise `ttl` or check backend latency"
        )]
        ValidityExhausted {
            /// The resource.
            resource: String,
            /// The TTL asked for.
            ttl: Duration,
            /// How long the acquisition took.
            elapsed: Duration,
        },

        /// `acquire` waited `max_wait` and did not get the lease.
        #[error(
            "gave up on lock `{resource}` after {waited:?} and {attempts} attempts; raise `max_wait` or find the holder"
        )]
        WaitTimeout {
            /// The resource.
            resource: String,
            /// How long it waited.
            waited: Duration,
            /// Attempts made.
            attempts: u32,
            /// The last attempt's error.
            #[source]
            last: Box<Error>,
        },

        /// The lease expired or was taken over: it can no longer be extended.
        #[error("lease on `{resource}` has expired or belongs to another holder; acquire it again")]
        LeaseExpired {
            /// The resource.
            resource: String,
        },

        /// A fenced write or read carried a token older than one the resource already saw:
        /// its holder lost the lease. Stop working on the resource.
        #[error(
            "fencing token {token} is older than {current}, which the resource already accepted; the lease was lost, stop writing"
        )]
        StaleToken {
            /// The token presented.
            token: FencingToken,
            /// The newest token the resource has seen.
            current: FencingToken,
        },

        /// The backend did not answer in time.
        #[error(
            "the lock backend did not answer within {after:?}; check the server or raise the timeout"
        )]
        Timeout {
            /// The timeout that elapsed.
            after: Duration,
        },

        /// A watchdog or cleanup needs a tokio runtime and none is running.
        #[error("no tokio runtime is running; call this from within a tokio runtime")]
        NoRuntime,

        /// The backend (Redis, PostgreSQL or etcd) failed; the source is the client's error.
        #[error(
            "the {backend} lock backend failed; check the server and the connection (postgres: that `migrate()` ran)"
        )]
        Backend {
            /// `"redis"`, `"postgres"` or `"etcd"`.
            backend: &'static str,
            /// The client error.
            #[source]
            source: BoxError,
        },

        /// A backend answered something this version does not understand.
        #[error("unexpected reply from the lock backend: {reason}; check the server version")]
        UnexpectedReply {
            /// What was wrong.
            reason: &'static str,
        },
    }
}

// `From<sd_core::ConfigError>` (InvalidConfig), `From<sd_core::Elapsed>` (Timeout), and the
// clients' errors (per feature) into `Backend`.
sd_core::impl_core_errors!(Error; Backend from redis, postgres);

#[cfg(feature = "etcd")]
impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Self {
        Error::Backend {
            backend: "etcd",
            source: Box::new(e),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether waiting and trying again may succeed: the lease (or every permit) is held,
    /// or Redlock missed its quorum, or the attempt ran out of validity or time.
    pub fn is_contention(&self) -> bool {
        match self {
            Error::Held { .. }
            | Error::NoPermit { .. }
            | Error::ValidityExhausted { .. }
            | Error::Timeout { .. } => true,
            #[cfg(feature = "redis")]
            Error::NoQuorum { .. } => true,
            _ => false,
        }
    }
}
