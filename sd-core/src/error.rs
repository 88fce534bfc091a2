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

/// Declares a crate's error enum with the variant every sd error starts with:
/// `InvalidConfig { field, reason }`, the refusal of a builder setting, whose message
/// names the setter (`invalid `ttl`: must be above zero`). The enum is `#[non_exhaustive]`;
/// the crate's own variants follow, given as the body.
///
/// The caller derives `Debug` and `thiserror::Error` (and `Clone` if it wants one), so
/// its own variants carry their `#[error(..)]` messages as usual. Pair it with
/// [`impl_core_errors!`](crate::impl_core_errors) for the conversions from [`ConfigError`] and [`Elapsed`].
///
/// ```
/// use std::time::Duration;
///
/// sd_core::error_enum! {
///     /// Everything that can go wrong here.
///     #[derive(Debug, thiserror::Error)]
///     pub enum Error {
///         /// A call did not finish in time.
///         #[error("no answer within {after:?}")]
///         Timeout {
///             /// The limit that passed.
///             after: Duration,
///         },
///     }
/// }
/// sd_core::impl_core_errors!(Error);
///
/// let e = Error::config("ttl", "must be above zero");
/// assert_eq!(e.to_string(), "invalid `ttl`: must be above zero");
/// assert!(matches!(e, Error::InvalidConfig { field: "ttl", .. }));
/// ```
#[macro_export]
macro_rules! error_enum {
    (
        $(#[$attr:meta])*
        $vis:vis enum $name:ident {
            $($variants:tt)*
        }
    ) => {
        $(#[$attr])*
        #[non_exhaustive]
        $vis enum $name {
            /// A setting is invalid: `build()` refused it, naming the setter. Raised at
            /// construction, never per call.
            #[error("invalid `{field}`: {reason}")]
            InvalidConfig {
                /// The builder setter (or argument) whose value was refused.
                field: &'static str,
                /// Why it was refused, and what would be accepted.
                reason: ::std::borrow::Cow<'static, str>,
            },
            $($variants)*
        }
    };
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
/// (`redis`, `sqlx`) and sd-core's own feature of the same name. A `Backend` variant with
/// more fields gives their values after the backend, `redis(operation = "command")`, and
/// its `source` may be any type a [`BoxError`] converts into (an `Arc<dyn Error + ..>`
/// for an error that must be `Clone`).
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
/// sd_core::impl_core_errors!(Error; Backend from redis(operation = "command"));
/// ```
#[macro_export]
macro_rules! impl_core_errors {
    (
        $error:ty
        $(, Timeout { $($field:ident: $value:expr),* $(,)? })?
        $(; Backend from $($backend:ident $(($($extra:ident = $value2:expr),+ $(,)?))?),+ $(,)?)?
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

        $($($crate::__impl_backend_from!($error, $backend $(, $($extra = $value2),+)?);)+)?
    };
}

/// The `Backend from` conversions of [`impl_core_errors!`], one backend at a time.
#[doc(hidden)]
#[macro_export]
macro_rules! __impl_backend_from {
    ($error:ty, redis $(, $extra:ident = $value:expr)*) => {
        #[cfg(feature = "redis")]
        impl ::core::convert::From<::redis::RedisError> for $error {
            fn from(e: ::redis::RedisError) -> Self {
                let source: $crate::BoxError = ::std::boxed::Box::new(e);
                Self::Backend {
                    backend: "redis",
                    $($extra: $value,)*
                    source: ::core::convert::Into::into(source),
                }
            }
        }
    };
    ($error:ty, postgres) => {
        #[cfg(feature = "postgres")]
        impl ::core::convert::From<::sqlx::Error> for $error {
            fn from(e: ::sqlx::Error) -> Self {
                Self::Backend {
                    backend: "postgres",
                    source: ::std::boxed::Box::new(e),
                }
            }
        }

        #[cfg(feature = "postgres")]
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
