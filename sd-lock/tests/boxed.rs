//! A `BoxLock` chosen from a configuration string at run time (`memory`, a `redis://`,
//! `postgres://` or etcd `http://` URL of a server the testkit started) passes the same
//! conformance suite as the backends it boxes.
#![cfg(all(feature = "redis", feature = "postgres", feature = "etcd"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{manager, runtime};
use sd_lock::conformance;
use sd_lock::etcd::EtcdLock;
use sd_lock::memory::MemoryLock;
use sd_lock::postgres::PostgresLock;
use sd_lock::redis::RedisLock;
use sd_lock::{BoxLock, Lock, Watchdog};

/// What a service would do with its `LOCK_URL`: pick the backend by scheme.
async fn lock_from_config(config: &str) -> BoxLock {
    let prefix = sd_testkit::unique_name("boxed");
    if config == "memory" {
        BoxLock::new(MemoryLock::new())
    } else if config.starts_with("redis://") {
        let lock = RedisLock::builder(manager(config).await)
            .prefix(prefix)
            .build()
            .unwrap();
        BoxLock::new(lock)
    } else if config.starts_with("postgres://") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(config)
            .await
            .unwrap();
        let lock = PostgresLock::new(pool);
        lock.migrate().await.unwrap();
        BoxLock::new(lock)
    } else if config.starts_with("http://") {
        let client = etcd_client::Client::connect([config], None).await.unwrap();
        let lock = EtcdLock::builder(client)
            .prefix(format!("{prefix}/"))
            .build()
            .unwrap();
        BoxLock::new(lock)
    } else {
        panic!("no lock backend for `{config}`")
    }
}

/// The suite through the box: the contract, a short mutual-exclusion run, and a
/// watchdog over the boxed lock.
async fn suite(config: &str, ttl: Duration) {
    let lock = lock_from_config(config).await;
    conformance::contract(&lock, "contract", ttl).await;
    common::every_section_lands(lock.clone(), 4, 10).await;
    let lease = lock.try_acquire("watched", ttl * 3).await.unwrap();
    let dog = Watchdog::start(lock.clone(), lease).unwrap();
    assert!(!dog.is_lost());
    let _ = dog.release().await.unwrap();
}

/// The memory lock reads tokio's clock: on a paused one, its 300 ms lease holds through
/// the contract's steps whatever the load, and waiting it out costs no real time.
#[test]
fn boxed_memory() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(suite("memory", Duration::from_millis(300)));
}

#[test]
fn boxed_redis() {
    let server = sd_testkit::redis().expect("redis-server");
    runtime().block_on(suite(server.url(), Duration::from_secs(2)));
}

#[test]
fn boxed_postgres() {
    let db = sd_testkit::database().expect("postgres");
    // Server time: a lease long enough for the contract's steps on a loaded machine.
    runtime().block_on(suite(db.url(), Duration::from_secs(2)));
}

#[test]
fn boxed_etcd() {
    let server = sd_testkit::etcd().expect("etcd");
    runtime().block_on(suite(server.url(), Duration::from_secs(2)));
}
