//! The crate's one error type.

use std::time::Duration;

use sd_core::BoxError;

sd_core::error_enum! {
    /// Everything that can go wrong in sd-ratelimit.
    ///
    /// Configuration errors name the field; input errors say which header or byte was bad;
    /// backend errors keep their source.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// The request costs more than the limit can ever hold: waiting will not help.
        #[error(
            "cost {cost} exceeds the limit's capacity {capacity} and can never be admitted; split the request or raise the burst"
        )]
        InsufficientCapacity {
            /// The cost asked for.
            cost: u32,
            /// The most the limit admits at once.
            capacity: u32,
        },

        /// One key given twice to the Redis limiter's `check_all`: its script reads every
        /// state before it writes any, so the second limit would not see the first's cost.
        #[error(
            "key {key:?} appears twice in one check_all; give each limit its own key (a prefix per limit)"
        )]
        DuplicateKey {
            /// The repeated key.
            key: String,
        },

        /// The memory limiter holds `max_keys` keys and none of them is back to full.
        #[error(
            "the limiter already tracks {max_keys} keys and none is idle; deny the request or raise `max_keys`"
        )]
        TooManyKeys {
            /// The configured cap.
            max_keys: usize,
        },

        /// A header needed to find the client address is absent.
        #[error("header `{header}` is missing; check that the proxy in front sets it")]
        MissingHeader {
            /// The header name.
            header: &'static str,
        },

        /// A client-address header is malformed or hostile.
        #[error("header `{header}` is malformed at entry {position} from the right: {reason}")]
        MalformedHeader {
            /// The header name.
            header: &'static str,
            /// 1-based position counted from the right (0 when the whole header is bad).
            position: usize,
            /// What was wrong.
            reason: &'static str,
        },

        /// The address list is shorter than the number of trusted proxies: either the
        /// request bypassed a proxy or the hop count is configured too high.
        #[error(
            "header `{header}` holds {found} addresses but {trusted_hops} trusted hops are configured; lower `trusted_hops` or make sure every request passes the proxies"
        )]
        TooFewHops {
            /// The header name.
            header: &'static str,
            /// Configured trusted hops.
            trusted_hops: usize,
            /// Addresses found.
            found: usize,
        },

        /// The selected hop carries no address (`unknown` or an obfuscated identifier).
        #[error("header `{header}` names the client as `{value}`, which is not an IP address")]
        NoClientAddress {
            /// The header name.
            header: &'static str,
            /// The node identifier found (truncated to 64 bytes).
            value: String,
        },

        /// A PROXY protocol header is malformed.
        #[error(
            "invalid PROXY protocol header: {reason}; the peer must send a PROXY v1 or v2 header first"
        )]
        ProxyProtocol {
            /// What was wrong.
            reason: &'static str,
        },

        /// Reading the PROXY protocol header from the stream failed.
        #[error("reading the PROXY protocol header failed; drop the connection")]
        Io {
            /// The I/O error.
            #[from]
            source: std::io::Error,
        },

        /// The backend (Redis) answered with an error or the connection failed. A Redis
        /// limiter hands it to its failure policy, which answers in its place and counts it
        /// in `Stats::backend_errors`.
        #[error(
            "{backend} failed; check the server, or let the failure policy decide (see `FailurePolicy`)"
        )]
        Backend {
            /// Which backend: `"redis"`.
            backend: &'static str,
            /// The client error.
            #[source]
            source: BoxError,
        },

        /// The backend did not answer within the configured timeout.
        #[error("the backend did not answer within {after:?}; raise `timeout` or check the server")]
        Timeout {
            /// The timeout that elapsed.
            after: Duration,
        },

        /// The rate-limit script returned something this version does not understand.
        #[error("unexpected reply from the rate-limit script: {reason}; is the server a Redis ≥ 6.2?")]
        UnexpectedReply {
            /// What was wrong.
            reason: &'static str,
        },
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

sd_core::impl_core_errors!(Error; Backend from redis);
