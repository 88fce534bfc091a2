//! The behaviour suite every backend runs.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::time::Duration;

/// A multi-threaded runtime, built after the (blocking) testkit calls.
pub fn runtime() -> tokio::runtime::Runtime {
    sd_testkit::runtime_with(4)
}

/// A connection manager that gives up quickly on a dead server.
#[cfg(feature = "redis")]
pub async fn manager(url: &str) -> redis::aio::ConnectionManager {
    manager_with(url, Duration::from_millis(300), Duration::from_secs(3)).await
}

/// A connection manager with the given connect and response timeouts, retrying a lost
/// connection once.
#[cfg(feature = "redis")]
pub async fn manager_with(
    url: &str,
    connect: Duration,
    response: Duration,
) -> redis::aio::ConnectionManager {
    sd_testkit::redis_manager(url, connect, response).await
}

/// A fast retry policy for tests: full jitter below `initial` doubling to `max`,
/// unlimited attempts (the shape of the lock's default, shorter).
pub fn backoff(initial: Duration, max: Duration) -> sd_lock::RetryPolicy {
    sd_lock::RetryPolicy::builder()
        .initial_interval(initial)
        .max_interval(max)
        .jitter(1.0)
        .unlimited_attempts()
        .build()
        .unwrap()
}

/// The shared mutual-exclusion run on resource `job`: `tasks` tasks of `sections`
/// critical sections each under a 10 s lease, and every section's increment landed.
pub async fn every_section_lands<L: sd_lock::Lock + Clone + 'static>(
    lock: L,
    tasks: usize,
    sections: usize,
) {
    let report = sd_lock::conformance::mutual_exclusion(
        lock,
        "job",
        tasks,
        sections,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(report.final_value, (tasks * sections) as u64);
}

/// `built` is `InvalidConfig` naming `field`.
pub fn refused<T: std::fmt::Debug>(field: &str, built: Result<T, sd_lock::Error>) {
    match built {
        Err(sd_lock::Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
        other => panic!("{field}: expected InvalidConfig, got {other:?}"),
    }
}

/// A pool of 8 connections to the PostgreSQL database at `url`.
#[cfg(feature = "postgres")]
pub async fn pg_pool(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await
        .unwrap()
}
