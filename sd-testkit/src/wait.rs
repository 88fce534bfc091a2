//! The helpers every crate's tests need around the servers: a runtime sized for the
//! machine, and waiting (bounded) for a condition instead of sleeping a guessed time.
//!
//! The bound in each `eventually` is a hang guard, never a timing assertion: a
//! condition that takes longer on a loaded machine still passes.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long `eventually` waits before it fails the test: long enough for a loaded
/// two-core machine, short enough that a hang is reported.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// A multi-threaded tokio runtime with `workers` threads and every driver on: build it
/// after the (blocking) testkit calls, then `block_on` the test body.
///
/// # Panics
/// If the runtime cannot be built (no threads left): the test cannot run.
pub fn runtime_with(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime for the test")
}

/// [`runtime_with`] two workers, the machines these tests run on have two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    runtime_with(2)
}

/// Polls the async `check` every 20 ms until it returns true.
///
/// # Panics
/// After [`HANG_GUARD`], naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < HANG_GUARD,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 20 ms on this thread until it returns true (for tests without a
/// runtime).
///
/// # Panics
/// After [`HANG_GUARD`], naming `what`.
pub fn eventually_blocking(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < HANG_GUARD,
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `attempt` until it succeeds, sleeping `pause` after each error: how a test
/// gets through a server restart, when the first calls after it fail with connection
/// errors. Returns the result and how many attempts failed.
///
/// # Panics
/// After [`HANG_GUARD`], with the last error.
pub async fn retry_until_ok<T, E, F, Fut>(pause: Duration, mut attempt: F) -> (T, usize)
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let mut failed = 0;
    loop {
        match attempt().await {
            Ok(value) => return (value, failed),
            Err(e) => {
                assert!(start.elapsed() < HANG_GUARD, "still failing: {e:?}");
                failed += 1;
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn eventually_returns_once_the_condition_holds_and_retries_count_failures() {
        let calls = AtomicUsize::new(0);
        runtime().block_on(async {
            eventually("the third call", || async {
                calls.fetch_add(1, Ordering::SeqCst) >= 2
            })
            .await;
            let tries = AtomicUsize::new(0);
            let (value, failed) = retry_until_ok(Duration::from_millis(1), || async {
                match tries.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err("down"),
                    n => Ok(n),
                }
            })
            .await;
            assert_eq!((value, failed), (2, 2));
        });
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let mut n = 0;
        eventually_blocking("n reaches 3", || {
            n += 1;
            n == 3
        });
    }
}
