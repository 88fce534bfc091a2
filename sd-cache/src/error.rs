//! The crate's one error type.

use std::sync::Arc;
use std::time::Duration;

/// A loader's error, shared by reference between every caller that waited on the load.
///
/// Downcast it to the loader's own type with
/// [`downcast_ref`](https://doc.rust-lang.org/std/error/trait.Error.html#method.downcast_ref).
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

sd_core::error_enum! {
    /// Everything that can go wrong in sd-cache.
    ///
    /// Configuration errors name the field; loader errors keep the loader's error (shared, not
    /// copied, with every waiter); backend errors keep their source. The type is `Clone` so one
    /// failed load can be handed to every coalesced caller.
    #[derive(Debug, Clone, thiserror::Error)]
    pub enum Error {
        /// The loader returned an error. Every caller coalesced on that load receives the same
        /// error (one `Arc`), and no caller retried the loader on its own.
        #[error(
            "the loader failed: {source}; the error is shared with every waiter, retry the call to load again"
        )]
        Loader {
            /// The loader's error.
            source: SharedError,
        },

        /// The backend failed (connection refused or lost, timeout, script error). The source
        /// is shared (an `Arc`, not a `Box`) because one failure is handed to every coalesced
        /// caller and the error is `Clone`.
        #[error(
            "{backend} {operation} failed: {source}; check the server, or configure `fallback_to_loader` to read around it"
        )]
        Backend {
            /// The backend: `"redis"`.
            backend: &'static str,
            /// What the cache was doing (`read`, `write`, `lock`, `invalidate`, ...).
            operation: &'static str,
            /// The client's error.
            source: SharedError,
        },

        /// A call did not finish within its time limit.
        #[error("no answer within {after:?}; raise the time limit or check the backend")]
        Timeout {
            /// The limit that passed.
            after: Duration,
        },

        /// A value or envelope could not be encoded or decoded by the codec.
        #[error(
            "codec failed to {direction} the value for key `{key}`: {source}; check that every process uses the same codec and value type"
        )]
        Codec {
            /// `encode` or `decode`.
            direction: &'static str,
            /// The cache key (truncated to 128 bytes).
            key: String,
            /// The codec's error.
            source: SharedError,
        },

        /// Another process holds the load lock and did not publish a value in time.
        #[error(
            "key `{key}` is being loaded by another process that did not finish within {waited_ms} ms; retry, or raise `lock_ttl` if loads are slow"
        )]
        LoadTimeout {
            /// The cache key (truncated to 128 bytes).
            key: String,
            /// How long this caller waited.
            waited_ms: u64,
        },

        /// A key the Redis tier cannot store safely.
        #[error("invalid key `{key}`: {reason}")]
        InvalidKey {
            /// The key (truncated to 128 bytes).
            key: String,
            /// Why.
            reason: &'static str,
        },

        /// A non-optional read waited on a load of the same key by an optional loader that
        /// found nothing.
        #[error(
            "the key was loaded as not found by an optional loader; read it with `try_get_or_load_optional`"
        )]
        NotFound,

        /// The write-behind buffer is full (returned only by the non-waiting `try_` methods).
        #[error(
            "the write-behind buffer holds {capacity} pending writes; await `write` for backpressure, or raise `capacity`"
        )]
        Full {
            /// The configured capacity.
            capacity: usize,
        },

        /// The write-behind worker has shut down; the write was not accepted.
        #[error("the write-behind worker is shut down and accepts no writes; create a new one")]
        Closed,

        /// The backing store rejected a write-through write; the cache holds no new value.
        #[error("the store rejected the write: {source}; the cache was left without the new value")]
        Store {
            /// The store's error.
            source: SharedError,
        },
    }
}

impl Error {
    /// The loader's error when this is [`Error::Loader`].
    pub fn loader_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Error::Loader { source } => Some(source.as_ref()),
            _ => None,
        }
    }

    pub(crate) fn loader<E: Into<sd_core::BoxError>>(e: E) -> Self {
        Error::Loader {
            source: Arc::from(e.into()),
        }
    }
}

// A Redis failure whose operation is not known has `operation: "command"`.
sd_core::impl_core_errors!(Error; Backend from redis(operation = "command"));

/// Truncates a key for error messages.
#[cfg(feature = "redis")]
pub(crate) fn short_key(key: &str) -> String {
    let mut end = key.len().min(128);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_owned()
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
