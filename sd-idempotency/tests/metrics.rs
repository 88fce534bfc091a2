//! Feature `metrics`: each claim is counted once under its outcome (first, replay, in
//! flight, mismatch), and each store call's latency under its operation, with the
//! documented names and labels, on memory, Redis and PostgreSQL.
#![cfg(all(feature = "metrics", feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use std::time::Duration;

use sd_core::observe::{Capture, backend, label, operation, outcome};
use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::redis::RedisStore;
use sd_idempotency::{ClaimOutcome, Fingerprint, MemoryStore, Store, StoredResponse};
use sd_testkit::runtime;

const CLAIMS: &str = "sd.idempotency.claims";
const STORE_DURATION: &str = "sd.idempotency.store.duration";

/// First, in flight, mismatch, then completed and replayed: one of each outcome, with
/// one claim, one complete and no release on `store`.
async fn drive(store: &impl Store) {
    let lock = Duration::from_secs(30);
    let order = Fingerprint::of_parts(["order", "1"]);
    let other = Fingerprint::of_parts(["order", "2"]);
    let ClaimOutcome::Claimed(claim) = store.claim("orders", "k1", &order, lock).await.unwrap()
    else {
        panic!("a new key is claimed");
    };
    assert!(matches!(
        store.claim("orders", "k1", &order, lock).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    assert_eq!(
        store.claim("orders", "k1", &other, lock).await.unwrap(),
        ClaimOutcome::Mismatch
    );
    let response = StoredResponse::new(201, b"ok".to_vec());
    store
        .complete(&claim, &response, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(
        store.claim("orders", "k1", &order, lock).await.unwrap(),
        ClaimOutcome::Completed(_)
    ));
}

fn assert_one_of_each(capture: &Capture, name: &str, backend: &str) {
    for o in [
        outcome::FIRST,
        outcome::IN_FLIGHT,
        outcome::MISMATCH,
        outcome::REPLAY,
    ] {
        let n = capture.counter(
            CLAIMS,
            &[
                (label::NAME, name),
                (label::BACKEND, backend),
                (label::OUTCOME, o),
            ],
        );
        assert_eq!(n, 1, "{backend} {o}");
    }
}

#[test]
fn memory_claims_are_counted_by_outcome() {
    let capture = Capture::new();
    let store = capture.build(|| MemoryStore::new().with_name("orders"));
    runtime().block_on(drive(&store));
    assert_one_of_each(&capture, "orders", backend::MEMORY);
    // A claim with a bad lock time is an error, not an outcome.
    let fp = Fingerprint::of_parts(["x"]);
    assert!(
        runtime()
            .block_on(store.claim("s", "k", &fp, Duration::ZERO))
            .is_err()
    );
    assert_eq!(capture.counter(CLAIMS, &[(label::NAME, "orders")]), 4);
}

#[test]
fn redis_and_postgres_claims_and_store_latency_are_counted() {
    let redis = sd_testkit::redis().expect("redis-server must be installed");
    let db = sd_testkit::database().expect("postgres must be installed");
    let capture = Capture::new();
    runtime().block_on(async {
        let conn =
            sd_testkit::redis_manager(redis.url(), Duration::from_secs(2), Duration::from_secs(2))
                .await;
        let on_redis = capture.build(|| {
            RedisStore::builder()
                .name("api")
                .prefix("metrics-idem")
                .build(conn)
                .unwrap()
        });
        drive(&on_redis).await;
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        let on_pg = capture.build(|| {
            PostgresStore::builder()
                .name("api")
                .table("metrics_idem")
                .build(pool)
                .unwrap()
        });
        on_pg.migrate().await.unwrap();
        drive(&on_pg).await;
    });
    for b in [backend::REDIS, backend::POSTGRES] {
        assert_one_of_each(&capture, "api", b);
        let calls = |op| {
            capture
                .samples(
                    STORE_DURATION,
                    &[(label::BACKEND, b), (label::OPERATION, op)],
                )
                .len()
        };
        assert_eq!(
            (
                calls(operation::CLAIM),
                calls(operation::COMPLETE),
                calls(operation::RELEASE)
            ),
            (4, 1, 0),
            "{b}"
        );
    }
}
