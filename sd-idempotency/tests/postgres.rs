//! The behaviour suite on PostgreSQL, completion in the caller's transaction, and a
//! database that goes down.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::{ClaimOutcome, Error, Fingerprint, Store, StoredResponse};
use sqlx::postgres::PgPoolOptions;
use suite::Harness;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

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
    let runtime = runtime();
    let store = runtime.block_on(store(db.url()));
    let harness = Harness {
        store,
        lock_ttl: Duration::from_millis(600),
        retention: Duration::from_millis(600),
        pass: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        guard: Box::new(db),
    };
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
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query("INSERT INTO payments VALUES ('pay_1')")
            .execute(&mut *tx)
            .await
            .unwrap();
        store
            .complete_in(&mut tx, &claim, &response, lock)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert!(matches!(
            store.claim("alice", "k", &fp, lock).await.unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
        // Committed: both.
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query("INSERT INTO payments VALUES ('pay_1')")
            .execute(&mut *tx)
            .await
            .unwrap();
        store
            .complete_in(&mut tx, &claim, &response, lock)
            .await
            .unwrap();
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

#[test]
fn bad_table_names_are_refused() {
    let runtime = runtime();
    runtime.block_on(async {
        let pool = PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap();
        for bad in ["", "Payments", "1abc", "a;drop table x", &"a".repeat(49)] {
            let err = PostgresStore::builder()
                .table(bad)
                .build(pool.clone())
                .unwrap_err();
            assert!(matches!(err, Error::Config { field: "table", .. }), "{bad}");
        }
    });
}

#[test]
fn store_down_is_503_and_nothing_runs() {
    let mut server = sd_testkit::PostgresServer::start().expect("a postgres server");
    let db = server.create_database().expect("a database");
    let runtime = runtime();
    runtime.block_on(async {
        let store = store(db.url()).await;
        let payments = suite::http::Payments::default();
        let port = suite::http::serve(
            store,
            Duration::from_secs(30),
            Duration::from_secs(60),
            payments.clone(),
        )
        .await;
        let body = r#"{"amount":1,"currency":"EUR"}"#;
        assert_eq!(
            suite::http::send(port, "alice", Some(b"k1"), body)
                .await
                .unwrap()
                .status,
            201
        );
        server.kill().unwrap();
        let down = suite::http::send(port, "alice", Some(b"k2"), body)
            .await
            .unwrap();
        assert_eq!(down.status, 503);
        assert_eq!(
            down.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(payments.count(), 1, "the handler did not run");
    });
    drop(db);
}
