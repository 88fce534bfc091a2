//! Time limits on backend calls, the same way in every backend.
//!
//! [`timeout`] runs one call inside a `tracing` span and turns a call that runs past
//! its limit into [`Elapsed`]; each crate maps that to its `Error::Timeout { after }`.
//! [`Deadline`] bounds work of several steps (Redlock's quorum, a relay batch) by one
//! end time.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument as _;

use crate::error::Elapsed;

/// Runs `call` inside `span`; [`Elapsed`] if it has not finished after `limit` (the
/// call is dropped, cancelling it).
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use sd_core::deadline::timeout;
///
/// let slow = tokio::time::sleep(Duration::from_secs(10));
/// let answer = timeout(Duration::from_secs(1), tracing::Span::none(), slow).await;
/// assert_eq!(answer.unwrap_err().after, Duration::from_secs(1));
/// # }
/// ```
pub async fn timeout<F: Future>(
    limit: Duration,
    span: tracing::Span,
    call: F,
) -> Result<F::Output, Elapsed> {
    tokio::time::timeout(limit, call.instrument(span))
        .await
        .map_err(|_| Elapsed::new(limit))
}

/// An end time for work of several steps: each step gets what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    start: Instant,
    limit: Duration,
}

impl Deadline {
    /// A deadline `limit` from now (tokio's now: paused time when paused).
    pub fn after(limit: Duration) -> Self {
        Deadline {
            start: Instant::now(),
            limit,
        }
    }

    /// The whole limit this deadline was made with.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// How long since the deadline was made.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// What is left before the deadline; zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.limit.saturating_sub(self.start.elapsed())
    }

    /// True once the deadline has passed.
    pub fn is_past(&self) -> bool {
        self.remaining().is_zero()
    }

    /// Runs `call` for at most what is left; [`Elapsed`] (carrying the whole limit) when
    /// the deadline passes first.
    pub async fn run<F: Future>(&self, span: tracing::Span, call: F) -> Result<F::Output, Elapsed> {
        tokio::time::timeout(self.remaining(), call.instrument(span))
            .await
            .map_err(|_| Elapsed::new(self.limit))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_in_time_returns_its_output() {
        let out = timeout(Duration::from_secs(1), tracing::Span::none(), async { 7 }).await;
        assert_eq!(out, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shares_one_limit_across_steps() {
        let deadline = Deadline::after(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(deadline.remaining(), Duration::from_secs(6));
        let second = deadline
            .run(
                tracing::Span::none(),
                tokio::time::sleep(Duration::from_secs(7)),
            )
            .await;
        assert_eq!(second, Err(Elapsed::new(Duration::from_secs(10))));
        assert!(deadline.is_past());
        assert_eq!(deadline.remaining(), Duration::ZERO);
    }
}
