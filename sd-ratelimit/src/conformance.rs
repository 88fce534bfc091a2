//! The contract every [`RateLimiter`] keeps, as async checks that take any backend
//! (feature `test-util`). The crate's own memory and Redis limiters run them; a new
//! backend, or a [`BoxLimiter`](crate::BoxLimiter) built from configuration, runs the
//! same ones:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sd_ratelimit::{conformance, memory::MemoryLimiterBuilder};
//!
//! let limiter = MemoryLimiterBuilder::new(conformance::limit()?).keyed::<String>()?;
//! conformance::run(&limiter).await;
//! # Ok(()) }
//! ```
//!
//! Build the limiter under test with [`limit()`] as its default limit (it refills one
//! request every 15 minutes, so nothing refills while the checks run, and no check
//! depends on timing). Every check uses keys of its own, unique to the process and the
//! moment, so the checks can share one limiter and one Redis server with other tests.
//! A violation panics with what was expected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{Clock as _, Decision, Error, Limit, Quota, RateLimiter, Result, SystemClock};

/// The burst of [`limit()`]: a fresh key admits this many requests of cost 1.
pub const BURST: u32 = 4;

/// The default limit the limiter under test must have: GCRA, [`BURST`] per hour, burst
/// [`BURST`].
pub fn limit() -> Result<Limit> {
    Ok(Limit::gcra(Quota::per_hour(BURST)?))
}

/// Runs every check below on `limiter`.
pub async fn run(limiter: &impl RateLimiter) {
    admits_the_burst_then_denies(limiter).await;
    keys_are_independent(limiter).await;
    cost_takes_that_many(limiter).await;
    a_cost_over_the_burst_is_an_error(limiter).await;
    concurrent_calls_admit_the_burst_exactly(limiter).await;
}

/// A key no other check (in this or another process) uses.
fn fresh_key(check: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemClock.now().subsec_nanos();
    format!(
        "conformance:{check}:{}:{nanos:x}:{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn decide(limiter: &impl RateLimiter, key: &str, cost: u32) -> Decision {
    match limiter.check_key(key, cost).await {
        Ok(d) => d,
        Err(e) => panic!("check_key({key:?}, {cost}) failed: {e}"),
    }
}

fn assert_denied(d: &Decision, what: &str) {
    assert!(!d.allowed, "{what}: expected a denial, got {d:?}");
    assert!(
        d.retry_after > Duration::ZERO,
        "{what}: a denial says when to retry: {d:?}"
    );
    assert_eq!(d.limit, BURST, "{what}: the limit is the burst: {d:?}");
}

/// A fresh key admits [`BURST`] requests of cost 1, `remaining` counting down to 0, then
/// denies with a `retry_after`.
pub async fn admits_the_burst_then_denies(limiter: &impl RateLimiter) {
    let key = fresh_key("burst");
    for i in 1..=BURST {
        let d = decide(limiter, &key, 1).await;
        assert!(
            d.allowed,
            "request {i} of the burst must be admitted: {d:?}"
        );
        assert_eq!(
            d.remaining,
            BURST - i,
            "remaining after {i} requests: {d:?}"
        );
        assert_eq!(d.limit, BURST, "the limit is the burst: {d:?}");
    }
    let denied = decide(limiter, &key, 1).await;
    assert_denied(&denied, "the request after the burst");
    assert_eq!(
        denied.remaining, 0,
        "nothing remains after the burst: {denied:?}"
    );
}

/// Using up one key leaves every other key whole.
pub async fn keys_are_independent(limiter: &impl RateLimiter) {
    let spent = fresh_key("spent");
    let other = fresh_key("other");
    decide(limiter, &spent, BURST).await;
    assert_denied(&decide(limiter, &spent, 1).await, "the spent key");
    let d = decide(limiter, &other, 1).await;
    assert!(
        d.allowed,
        "another key is not limited by the spent one: {d:?}"
    );
    assert_eq!(d.remaining, BURST - 1, "another key starts full: {d:?}");
}

/// A request of cost `n` takes `n`; one that does not fit is denied and takes nothing.
pub async fn cost_takes_that_many(limiter: &impl RateLimiter) {
    let key = fresh_key("cost");
    let d = decide(limiter, &key, BURST - 1).await;
    assert!(d.allowed, "a cost within the burst is admitted: {d:?}");
    assert_eq!(d.remaining, 1, "a cost of {} leaves 1: {d:?}", BURST - 1);
    assert_denied(&decide(limiter, &key, 2).await, "a cost of 2 with 1 left");
    let d = decide(limiter, &key, 1).await;
    assert!(d.allowed, "the denied request took nothing: {d:?}");
    assert_eq!(d.remaining, 0, "the last one taken: {d:?}");
}

/// A cost over the burst can never be admitted: [`Error::InsufficientCapacity`], not a
/// denial.
pub async fn a_cost_over_the_burst_is_an_error(limiter: &impl RateLimiter) {
    let key = fresh_key("capacity");
    match limiter.check_key(&key, BURST + 1).await {
        Err(Error::InsufficientCapacity { cost, capacity }) => {
            assert_eq!((cost, capacity), (BURST + 1, BURST));
        }
        other => panic!("a cost over the burst must be InsufficientCapacity, got {other:?}"),
    }
    let d = decide(limiter, &key, BURST).await;
    assert!(d.allowed, "the refused cost took nothing: {d:?}");
}

/// Calls in flight together on one key admit exactly [`BURST`] of them: each decision is
/// atomic.
pub async fn concurrent_calls_admit_the_burst_exactly(limiter: &impl RateLimiter) {
    let key = fresh_key("concurrent");
    let calls = (0..4 * BURST).map(|_| decide(limiter, &key, 1));
    let decisions = futures::future::join_all(calls).await;
    let admitted = decisions.iter().filter(|d| d.allowed).count();
    assert_eq!(
        admitted,
        BURST as usize,
        "{} calls in flight on one key admit exactly the burst",
        4 * BURST
    );
}
