//! A `BoxStore` chosen from a configuration string at run time (`memory`, or a
//! `redis://` or `postgres://` URL of a server the testkit started) passes the store's
//! conformance suite, and the middleware runs on it.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::redis::RedisStore;
use sd_idempotency::{BoxStore, MemoryStore, conformance};

/// What a service would do with its `IDEMPOTENCY_STORE`: pick the backend by scheme.
async fn store_from_config(config: &str) -> BoxStore {
    if config == "memory" {
        BoxStore::new(MemoryStore::new())
    } else if config.starts_with("redis://") {
        let client = redis::Client::open(config).unwrap();
        let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
        let store = RedisStore::builder()
            .prefix(sd_testkit::unique_name("boxed"))
            .build(conn)
            .unwrap();
        BoxStore::new(store)
    } else if config.starts_with("postgres://") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(config)
            .await
            .unwrap();
        let store = PostgresStore::builder().build(pool).unwrap();
        store.migrate().await.unwrap();
        BoxStore::new(store)
    } else {
        panic!("no idempotency store for `{config}`")
    }
}

/// The conformance suite and two middleware cases through the box, on real time (the
/// memory store reads the wall clock here, as in production).
fn through_the_box(config: &str, expiry_forgets: bool, guard: Box<dyn std::any::Any + Send>) {
    let runtime = sd_testkit::runtime();
    let store = runtime.block_on(store_from_config(config));
    let harness = suite::real_time(store, expiry_forgets, guard);
    runtime.block_on(async {
        conformance::all(&harness).await;
        suite::http::http_concurrent_duplicates_run_once(&harness).await;
        suite::http::http_mismatch_is_422_and_does_not_run(&harness).await;
    });
}

#[test]
fn boxed_memory() {
    through_the_box("memory", false, Box::new(()));
}

#[test]
fn boxed_redis() {
    let server = sd_testkit::redis().expect("a redis server");
    let url = server.url().to_owned();
    through_the_box(&url, true, Box::new(server));
}

#[test]
fn boxed_postgres() {
    let db = sd_testkit::database().expect("a postgres database");
    let url = db.url().to_owned();
    through_the_box(&url, false, Box::new(db));
}
