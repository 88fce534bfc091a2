//! The relay retry policy the tests use.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::time::Duration;

/// The relay's retry policy with waits from `initial` doubling to `max` (jitter 0.5, no
/// bound of its own on attempts).
pub fn waits(initial: Duration, max: Duration) -> sd_outbox::RetryPolicy {
    sd_outbox::RetryPolicy::builder()
        .initial_interval(initial)
        .max_interval(max)
        .jitter(0.5)
        .unlimited_attempts()
        .build()
        .unwrap()
}
