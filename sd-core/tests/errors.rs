//! `impl_core_errors!` with every conversion it writes: configuration, time limit, and
//! the Redis and PostgreSQL client errors into `Backend { backend, source }`.
#![cfg(all(feature = "redis", feature = "postgres"))]

use std::borrow::Cow;
use std::time::Duration;

use sd_core::BoxError;

#[derive(Debug)]
enum Error {
    InvalidConfig {
        field: &'static str,
        reason: Cow<'static, str>,
    },
    Timeout {
        after: Duration,
    },
    Backend {
        backend: &'static str,
        source: BoxError,
    },
}

sd_core::impl_core_errors!(Error; Backend from redis, postgres);

fn backend(e: Error) -> (&'static str, String) {
    match e {
        Error::Backend { backend, source } => (backend, source.to_string()),
        other => panic!("expected Error::Backend, got {other:?}"),
    }
}

#[test]
fn config_and_elapsed_convert_as_before() {
    let e: Error = sd_core::ConfigError::new("ttl", "must be above zero").into();
    assert!(matches!(
        e,
        Error::InvalidConfig { field: "ttl", ref reason } if reason == "must be above zero"
    ));
    let e: Error = sd_core::Elapsed::new(Duration::from_millis(5)).into();
    assert!(matches!(e, Error::Timeout { after } if after == Duration::from_millis(5)));
}

#[test]
fn redis_errors_become_backend_redis() {
    let client = redis::RedisError::from((redis::ErrorKind::Io, "connection refused"));
    let (name, source) = backend(client.into());
    assert_eq!(name, "redis");
    assert!(source.contains("connection refused"), "{source}");
}

#[test]
fn sqlx_and_migrate_errors_become_backend_postgres() {
    let (name, source) = backend(sqlx::Error::PoolTimedOut.into());
    assert_eq!(name, "postgres");
    assert_eq!(source, sqlx::Error::PoolTimedOut.to_string());

    let migrate = sd_core::migrate::MigrateError::from(sqlx::Error::PoolClosed);
    let (name, source) = backend(migrate.into());
    assert_eq!(name, "postgres");
    assert!(source.contains("migration failed in postgres"), "{source}");
}
