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

/// Implements `From<ConfigError>` (into `InvalidConfig { field, reason }`) and
/// `From<Elapsed>` (into `Timeout { after, .. }`) for a crate's `Error`, the two
/// conversions every sd crate's error makes the same way. Extra fields of the
/// `Timeout` variant are given after the type.
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
/// ```
#[macro_export]
macro_rules! impl_core_errors {
    ($error:ty) => {
        $crate::impl_core_errors!($error, Timeout {});
    };
    ($error:ty, Timeout { $($field:ident: $value:expr),* $(,)? }) => {
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
                    $($field: $value),*
                }
            }
        }
    };
}
