//! Reading the field a builder's refusal names.
#![allow(dead_code, unreachable_pub)]

use sd_outbox::{Error, Result};

/// The field of the [`Error::InvalidConfig`] that `built` holds; panics, showing what came
/// back, on a value or any other error.
pub fn invalid_field<T>(built: Result<T>) -> &'static str {
    match built {
        Err(Error::InvalidConfig { field, .. }) => field,
        Err(other) => panic!("expected a config error, got {other:?}"),
        Ok(_) => panic!("expected a config error, got a value"),
    }
}
