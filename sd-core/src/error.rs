//! The errors sd-core's checks return; each pattern crate turns them into its own
//! `Error::InvalidConfig { field, reason }` and `Error::Timeout { after }`.

use std::borrow::Cow;
use std::time::Duration;

/// A boxed error from a backend client, kept as the source of a crate's
/// `Error::Backend`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A configuration value that was refused: the field (the builder setter's name) and
/// why, with what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The builder field (or argument) at fault.
    pub field: &'static str,
    /// Why it is refused and what would be accepted.
    pub reason: Cow<'static, str>,
}

impl ConfigError {
    /// A refusal of `field`, for `reason`.
    pub fn new(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

/// A call that did not finish within its time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no answer within {after:?}")]
#[non_exhaustive]
pub struct Elapsed {
    /// The limit that passed.
    pub after: Duration,
}

impl Elapsed {
    /// A call that took longer than `after`.
    pub fn new(after: Duration) -> Self {
        Elapsed { after }
    }
}

/// Implements, for a crate's `Error`, the conversions every sd crate makes the same way:
/// `From<ConfigError>` (into `InvalidConfig { field, reason }`) and `From<Elapsed>` (into
/// `Timeout { after, .. }`; extra fields of the `Timeout` variant are given after the
/// type), and the crate-private constructor `Error::config(field, reason)` of an
/// `InvalidConfig` that the builders call.
///
/// After a `;`, `Backend from` names the backend clients whose errors become
/// `Backend { backend, source }` (the variant with exactly those two fields, `source` a
/// [`BoxError`]):
/// - `redis`: `From<redis::RedisError>`, with `backend: "redis"`;
/// - `postgres`: `From<sqlx::Error>` and `From<sd_core::migrate::MigrateError>`, with
///   `backend: "postgres"`.
///
/// Each is compiled under `#[cfg(feature = "redis")]` / `#[cfg(feature = "postgres")]`
/// evaluated in the calling crate, whose feature of that name must turn on the client
/// (`redis`, `sqlx`) and sd-core's own feature of the same name. A crate whose `Backend`
/// variant has more fields writes those impls itself.
///
/// ```
/// use std::borrow::Cow;
/// use std::time::Duration;
///
/// #[derive(Debug)]
/// enum Error {
///     InvalidConfig { field: &'static str, reason: Cow<'static, str> },
///     Timeout { after: Duration, bound: Option<usize> },
/// }
/// sd_core::impl_core_errors!(Error, Timeout { bound: None });
///
/// let e: Error = sd_core::ConfigError::new("ttl", "must be above zero").into();
/// assert!(matches!(e, Error::InvalidConfig { field: "ttl", .. }));
/// let e: Error = sd_core::Elapsed::new(Duration::from_secs(1)).into();
/// assert!(matches!(e, Error::Timeout { bound: None, .. }));
/// let e = Error::config("ttl", format!("{} is not above zero", 0));
/// assert!(matches!(e, Error::InvalidConfig { field: "ttl", .. }));
/// ```
///
/// With the backend conversions (here in a crate with features `redis` and `postgres`):
///
/// ```ignore
/// sd_core::impl_core_errors!(Error; Backend from redis, postgres);
/// ```
#[macro_export]
macro_rules! impl_core_errors {
    (
        $error:ty
        $(, Timeout { $($field:ident: $value:expr),* $(,)? })?
        $(; Backend from $($backend:ident),+ $(,)?)?
    ) => {
        impl ::core::convert::From<$crate::ConfigError> for $error {
            fn from(e: $crate::ConfigError) -> Self {
                Self::InvalidConfig {
                    field: e.field,
                    reason: e.reason,
                }
            }
        }

        impl ::core::convert::From<$crate::Elapsed> for $error {
            fn from(e: $crate::Elapsed) -> Self {
                Self::Timeout {
                    after: e.after,
                    $($($field: $value),*)?
                }
            }
        }

        impl $error {
            /// An `InvalidConfig` error: `field` is refused, for `reason`.
            #[allow(dead_code)]
            pub(crate) fn config(
                field: &'static str,
                reason: impl ::core::convert::Into<::std::borrow::Cow<'static, str>>,
            ) -> Self {
                Self::InvalidConfig {
                    field,
                    reason: reason.into(),
                }
            }
        }

        $($($crate::__impl_backend_from!($error, $backend);)+)?
    };
}

/// The `Backend from` conversions of [`impl_core_errors!`], one backend at a time.
#[doc(hidden)]
#[macro_export]
macro_rules! __impl_backend_from {
    ($error:ty, redis) => {
        #[cfg(feature = "redis")]
        #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
        impl ::core::convert::From<::redis::RedisError> for $error {
            fn from(e: ::redis::RedisError) -> Self {
                Self::Backend {
                    backend: "redis",
                    source: ::std::boxed::Box::new(e),
                }
            }
        }
    };
    ($error:ty, postgres) => {
        #[cfg(feature = "postgres")]
        #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
        impl ::core::convert::From<::sqlx::Error> for $error {
            fn from(e: ::sqlx::Error) -> Self {
                Self::Backend {
                    backend: "postgres",
                    source: ::std::boxed::Box::new(e),
                }
            }
        }

        #[cfg(feature = "postgres")]
        #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
        impl ::core::convert::From<$crate::migrate::MigrateError> for $error {
            fn from(e: $crate::migrate::MigrateError) -> Self {
                Self::Backend {
                    backend: "postgres",
                    source: ::std::boxed::Box::new(e),
                }
            }
        }
    };
}
