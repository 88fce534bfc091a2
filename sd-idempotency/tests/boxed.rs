//! A `BoxStore` chosen from a configuration string at run time (`memory`, or a
//! `redis://` or `postgres://` URL of a server the testkit started) passes the store's
//! conformance suite (`poll_claim` included), and the middleware runs on it, waiting
//! duplicates and a handler completing through its claim among the cases. The memory
//! store runs on a manual clock; the servers' stores on the servers' time.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::redis::RedisStore;
use sd_idempotency::{BoxStore, ManualClock, MemoryStore, conformance};

/// What a service would do with its `IDEMPOTENCY_STORE`: pick the backend by scheme. The
/// memory store reads `clock` (a service passes `SystemClock`; the test moves a
/// `ManualClock` by hand).
async fn store_from_config(config: &str, clock: ManualClock) -> BoxStore {
    if config == "memory" {
        BoxStore::new(MemoryStore::with_clock(clock))
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

/// The conformance suite and four middleware cases through the box on `harness`.
fn through_the_box(runtime: &tokio::runtime::Runtime, harness: suite::Harness<BoxStore>) {
    runtime.block_on(async {
        conformance::all(&harness).await;
        suite::http::http_concurrent_duplicates_run_once(&harness).await;
        suite::http::http_mismatch_is_422_and_does_not_run(&harness).await;
        suite::wait::http_waiting_duplicates_get_the_first_response(&harness).await;
        suite::wait::http_handler_completes_through_its_claim(&harness).await;
    });
}

/// A server's store, on real time: the store's time is the server's.
fn on_a_server(config: &str, expiry_forgets: bool, guard: Box<dyn std::any::Any + Send>) {
    let runtime = sd_testkit::runtime();
    let store = runtime.block_on(store_from_config(config, ManualClock::new()));
    through_the_box(&runtime, suite::real_time(store, expiry_forgets, guard));
}

/// The memory store on a manual clock that the suite moves: every time is exact.
#[test]
fn boxed_memory() {
    let runtime = sd_testkit::runtime();
    let clock = ManualClock::new();
    let store = runtime.block_on(store_from_config("memory", clock.clone()));
    through_the_box(&runtime, suite::manual_time(store, clock));
}

#[test]
fn boxed_redis() {
    let server = sd_testkit::redis().expect("a redis server");
    let url = server.url().to_owned();
    on_a_server(&url, true, Box::new(server));
}

#[test]
fn boxed_postgres() {
    let db = sd_testkit::database().expect("a postgres database");
    let url = db.url().to_owned();
    on_a_server(&url, false, Box::new(db));
}
