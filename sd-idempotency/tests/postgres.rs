//! The behaviour suite on PostgreSQL, completion in the caller's transaction, and a
//! database that goes down.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::{Claim, ClaimOutcome, Error, Fingerprint, Store, StoredResponse};
use sqlx::postgres::PgPoolOptions;
use suite::Harness;

async fn store(url: &str) -> PostgresStore {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .unwrap();
    let store = PostgresStore::builder()
        .table("idem_keys")
        .build(pool)
        .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store
}

fn harness() -> (tokio::runtime::Runtime, Harness<PostgresStore>) {
    let db = sd_testkit::database()
        .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
    let runtime = sd_testkit::runtime();
    let store = runtime.block_on(store(db.url()));
    let harness = suite::real_time(store, false, Box::new(db));
    (runtime, harness)
}

behaviour_suite!(harness());

#[test]
fn complete_in_commits_with_the_business_rows() {
    let (runtime, h) = harness();
    runtime.block_on(async {
        let store = &h.store;
        sqlx::query("CREATE TABLE payments (id TEXT PRIMARY KEY)")
            .execute(store.pool())
            .await
            .unwrap();
        let fp = Fingerprint::of("pay 10");
        let lock = Duration::from_secs(60);
        let ClaimOutcome::Claimed(claim) = store.claim("alice", "k", &fp, lock).await.unwrap()
        else {
            panic!()
        };
        let response = StoredResponse::new(201, "pay_1");
        // Rolled back: neither the payment nor the completion exists.
        let tx = pay_and_complete(store, &claim, &response, lock).await;
        tx.rollback().await.unwrap();
        assert!(matches!(
            store.claim("alice", "k", &fp, lock).await.unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
        // Committed: both.
        let tx = pay_and_complete(store, &claim, &response, lock).await;
        tx.commit().await.unwrap();
        assert_eq!(
            store.claim("alice", "k", &fp, lock).await.unwrap(),
            ClaimOutcome::Completed(response.clone())
        );
        let mut tx = store.pool().begin().await.unwrap();
        let again = store.complete_in(&mut tx, &claim, &response, lock).await;
        assert!(matches!(again, Err(Error::ClaimLost { .. })));
    });
}

/// Opens a transaction that inserts the payment `pay_1` and completes `claim` with
/// `response` in it, and hands it back uncommitted.
async fn pay_and_complete<'a>(
    store: &'a PostgresStore,
    claim: &Claim,
    response: &StoredResponse,
    lock: Duration,
) -> sqlx::Transaction<'a, sqlx::Postgres> {
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO payments VALUES ('pay_1')")
        .execute(&mut *tx)
        .await
        .unwrap();
    store
        .complete_in(&mut tx, claim, response, lock)
        .await
        .unwrap();
    tx
}

#[test]
fn bad_table_names_are_refused() {
    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap();
        for bad in ["", "Payments", "1abc", "a;drop table x", &"a".repeat(49)] {
            let err = PostgresStore::builder()
                .table(bad)
                .build(pool.clone())
                .unwrap_err();
            assert!(
                matches!(err, Error::InvalidConfig { field: "table", .. }),
                "{bad}"
            );
        }
    });
}

/// Runs `test` with the payments app on a store in a database of its own, and the
/// server, to kill or restart.
fn payments_on_a_server_of_its_own(
    test: impl AsyncFnOnce(&mut sd_testkit::PostgresServer, u16, suite::http::Payments),
) {
    let mut server = sd_testkit::PostgresServer::start().expect("a postgres server");
    let db = server.create_database().expect("a database");
    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let (port, payments) = suite::http::serve_payments(store(db.url()).await).await;
        test(&mut server, port, payments).await;
    });
    drop(db);
}

const BODY: &str = r#"{"amount":1,"currency":"EUR"}"#;

#[test]
fn store_down_is_503_and_nothing_runs() {
    payments_on_a_server_of_its_own(async |server, port, payments| {
        assert_eq!(suite::http::pay(port, "k1", BODY).await.status, 201);
        server.kill().unwrap();
        let down = suite::http::pay(port, "k2", BODY).await;
        down.assert_problem(503);
        assert_eq!(payments.count(), 1, "the handler did not run");
    });
}

/// The model over 24 sequences in real time (100 ms locks), each on a table of its own
/// so that `sweep` counts only its records.
#[test]
fn postgres_store_follows_the_model() {
    let (runtime, h) = harness();
    let tables = std::sync::atomic::AtomicUsize::new(0);
    suite::model::check(&runtime, 24, suite::model::ops(40, 150, false), || {
        let n = tables.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let store = PostgresStore::builder()
            .table(format!("model_{n}"))
            .build(h.store.pool().clone())
            .unwrap();
        runtime.block_on(store.migrate()).unwrap();
        let backend = suite::model::Backend {
            lock: Duration::from_millis(100),
            retention: Duration::from_millis(150),
            expiry_forgets: false,
            sweep_counts: true,
            slack: 2,
            now: Arc::new(suite::model::wall_clock),
            pass: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        };
        (store, backend)
    });
}

/// Runs `test` with a store on a server of its own, and its pause and resume.
fn on_a_pausable_server<F: Future<Output = ()>>(
    test: impl FnOnce(PostgresStore, suite::Fault, suite::Fault) -> F,
) {
    let server = sd_testkit::PostgresServer::start().expect("postgres");
    let db = server.create_database().expect("a database");
    suite::on_a_pausable_server(
        server,
        sd_testkit::PostgresServer::pause,
        sd_testkit::PostgresServer::resume,
        store(db.url()),
        test,
    );
    drop(db);
}

fault_suite!(on_a_pausable_server);

#[test]
fn requests_recover_after_a_restart() {
    payments_on_a_server_of_its_own(async |server, port, payments| {
        let before = suite::http::pay(port, "k1", BODY).await;
        assert_eq!(before.status, 201);
        // Every pooled connection dies with the server; the pool replaces them.
        server.restart().unwrap();
        let after = suite::http::pay(port, "k2", BODY).await;
        assert_eq!(
            after.status,
            201,
            "{:?}",
            String::from_utf8_lossy(&after.body)
        );
        // The record written before the restart is still there: a replay.
        let replay = suite::http::pay(port, "k1", BODY).await;
        assert_eq!(replay.header("idempotency-replayed"), Some("true"));
        assert_eq!(replay.body, before.body);
        assert_eq!(payments.count(), 2);
    });
}

/// The statements the database executed since the last call (pg_stat_statements), each
/// with its count; the counting queries themselves are left out.
async fn statements(pool: &sqlx::PgPool) -> Vec<(String, i64)> {
    use sqlx::Row as _;
    let rows = sqlx::query(
        "SELECT query, calls FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query NOT LIKE '%pg_stat_statements%'
         ORDER BY query",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let query: String = r.get("query");
            (
                query
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" "),
                r.get("calls"),
            )
        })
        .collect()
}

fn total(statements: &[(String, i64)]) -> i64 {
    statements.iter().map(|(_, n)| n).sum()
}

#[test]
fn a_first_run_is_two_statements_and_a_replay_is_one() {
    let mut server = sd_testkit::PostgresServer::start().expect("a postgres server");
    server
        .psql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        .unwrap();
    server.restart().unwrap();
    let db = server.create_database().expect("a database");
    db.psql("CREATE EXTENSION pg_stat_statements").unwrap();
    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let counter = PgPoolOptions::new()
            .max_connections(1)
            .connect(db.url())
            .await
            .unwrap();
        let (port, payments) = suite::http::serve_payments(store(db.url()).await).await;
        suite::http::pay(port, "warm", BODY).await;
        statements(&counter).await;

        let first = suite::http::pay(port, "k1", BODY).await;
        let first_statements = statements(&counter).await;
        let replay = suite::http::pay(port, "k1", BODY).await;
        let replay_statements = statements(&counter).await;

        assert_eq!(first.status, 201);
        assert_eq!(replay.body, first.body, "the replay is byte-identical");
        assert_eq!(
            total(&first_statements),
            2,
            "a first run: claim + complete: {first_statements:?}"
        );
        assert!(
            first_statements
                .iter()
                .any(|(q, _)| q.starts_with("INSERT INTO"))
        );
        assert!(
            first_statements
                .iter()
                .any(|(q, _)| q.starts_with("UPDATE"))
        );
        assert_eq!(
            total(&replay_statements),
            1,
            "a replay: one claim: {replay_statements:?}"
        );
        assert_eq!(payments.count(), 2, "warm-up and k1 each ran once");
    });
    drop(db);
}

/// A duplicate's polls of a key in flight read the row: its version (`xmin`) stays as it
/// is, while a claim rewrites it. They do not wait on a transaction that holds the row
/// either: a poll during the handler's transaction answers in flight, and the next one
/// after its commit replays.
#[test]
fn polls_of_a_key_in_flight_write_nothing_and_do_not_wait() {
    let (runtime, h) = harness();
    runtime.block_on(async {
        let store = &h.store;
        let fp = Fingerprint::of("order");
        let lock = Duration::from_secs(60);
        let scope = sd_testkit::unique_name("poll");
        let version = async || -> String {
            sqlx::query_scalar("SELECT xmin::text FROM idem_keys WHERE scope = $1 AND key = 'k'")
                .bind(&scope)
                .fetch_one(store.pool())
                .await
                .unwrap()
        };
        let ClaimOutcome::Claimed(claim) = store.claim(&scope, "k", &fp, lock).await.unwrap()
        else {
            panic!()
        };
        let before = version().await;
        for _ in 0..10 {
            let polled = store.poll_claim(&scope, "k", &fp, lock).await.unwrap();
            assert!(
                matches!(polled, ClaimOutcome::InFlight { .. }),
                "{polled:?}"
            );
        }
        assert_eq!(version().await, before, "the polls wrote nothing");
        let claimed = store.claim(&scope, "k", &fp, lock).await.unwrap();
        assert!(matches!(claimed, ClaimOutcome::InFlight { .. }));
        assert_ne!(version().await, before, "a claim rewrites the row");

        let response = StoredResponse::new(201, "order 1");
        let mut tx = store.pool().begin().await.unwrap();
        store
            .complete_in(&mut tx, &claim, &response, lock)
            .await
            .unwrap();
        let during = tokio::time::timeout(
            Duration::from_secs(1),
            store.poll_claim(&scope, "k", &fp, lock),
        )
        .await
        .expect("a poll does not wait for the transaction")
        .unwrap();
        assert!(
            matches!(during, ClaimOutcome::InFlight { .. }),
            "{during:?}"
        );
        tx.commit().await.unwrap();
        assert_eq!(
            store.poll_claim(&scope, "k", &fp, lock).await.unwrap(),
            ClaimOutcome::Completed(response)
        );
    });
}
