//! An orders handler that writes its order and completes its idempotency key in one
//! PostgreSQL transaction, through the middleware's `RequestClaim`: the server is killed
//! right after the handler's commit and a retry replays; the transaction rolls back and
//! the key is not completed. A handler that ignores its claim shows the window the claim
//! closes.
#![allow(clippy::unwrap_used)]

#[allow(unused_macros)]
mod suite;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;
use sd_idempotency::IdempotencyLayer;
use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::tower::RequestClaim;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use suite::http::{Hold, Reply, exchange};

/// The orders service: its pool, the idempotency store its handler completes on, and a
/// count of the handler's runs.
#[derive(Clone)]
struct Orders {
    pool: PgPool,
    store: PostgresStore,
    runs: Arc<AtomicUsize>,
    /// Requests with `x-hold: 1` wait here once their transaction has ended.
    hold: Hold,
}

/// `POST /orders`: inserts the order and answers 201, completing its key as `x-mode`
/// says: `commit` (`RequestClaim::commit`), `complete-in` (`complete_in`, then its own
/// commit), `plain` (ignores the claim; the middleware stores the response), or
/// `roll-back` (`complete_in`, then a rollback and 422).
async fn create(
    State(app): State<Orders>,
    claim: RequestClaim,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mode = header("x-mode").unwrap_or("commit").to_owned();
    let hold = header("x-hold") == Some("1");
    let mut tx = app.pool.begin().await.unwrap();
    // The commit must survive the kill that follows it: wait for its WAL to be written
    // (the testkit's server runs with synchronous_commit off).
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("INSERT INTO orders (key, body) VALUES ($1, $2) RETURNING id")
        .bind(claim.claim().key())
        .bind(body.to_vec())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let response = (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"order":{id},"run":{run}}}"#),
    )
        .into_response();
    let response = match mode.as_str() {
        "plain" => {
            tx.commit().await.unwrap();
            response
        }
        "complete-in" => {
            let response = claim
                .complete_in(&app.store, &mut tx, response)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            response
        }
        "roll-back" => {
            claim
                .complete_in(&app.store, &mut tx, response)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            (StatusCode::UNPROCESSABLE_ENTITY, "out of stock").into_response()
        }
        _ => claim.commit(&app.store, tx, response).await.unwrap(),
    };
    if hold {
        app.hold.wait().await;
    }
    response
}

/// The orders app on `pool` behind the layer (lock TTL 1 s, callers by `x-api-key`),
/// whose store is `store` as seen through [`suite::Observed`]: its port.
async fn serve(orders: Orders, observed: suite::Observed<PostgresStore>) -> u16 {
    let layer = IdempotencyLayer::builder(observed)
        .principal(|parts| {
            let key = parts.headers.get("x-api-key")?;
            key.to_str().ok().map(str::to_owned)
        })
        .lock_ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/orders", post(create))
        .layer(layer)
        .with_state(orders);
    suite::http::listen(app).await
}

/// Sets up the orders service on a database of `server`'s, and runs `test` with it.
fn orders_on(
    server: &mut sd_testkit::PostgresServer,
    test: impl AsyncFnOnce(&mut sd_testkit::PostgresServer, u16, Orders, suite::Observed<PostgresStore>),
) {
    let db = server.create_database().expect("a database");
    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(2))
            .connect(db.url())
            .await
            .unwrap();
        let store = PostgresStore::builder().build(pool.clone()).unwrap();
        store.migrate().await.unwrap();
        sqlx::query(
            "CREATE TABLE orders (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, body BYTEA)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let orders = Orders {
            pool,
            store: store.clone(),
            runs: Arc::default(),
            hold: Hold::default(),
        };
        let observed = suite::Observed::new(store);
        let port = serve(orders.clone(), observed.clone()).await;
        test(server, port, orders, observed).await;
    });
    drop(db);
}

const ORDER: &str = r#"{"sku":"book","qty":1}"#;

/// `POST /orders` from `alice` with `key`, completing as `mode`; held after its
/// transaction when `hold`. `None` when the connection failed.
async fn order(port: u16, key: &str, mode: &str, hold: bool) -> Option<Reply> {
    let request = Request::post(format!("http://127.0.0.1:{port}/orders"))
        .header("x-api-key", "alice")
        .header("idempotency-key", key)
        .header("x-mode", mode)
        .header("x-hold", if hold { "1" } else { "0" })
        .header(header::CONTENT_TYPE, "application/json")
        .body(ORDER.to_owned())
        .unwrap();
    exchange(request).await
}

/// Retries `key` until the answer is neither 409 (its lock still held) nor 503 (the
/// pool still reconnecting), for 30 s at most.
async fn retry(port: u16, key: &str, mode: &str) -> Reply {
    for _ in 0..150 {
        if let Some(reply) = order(port, key, mode, false).await
            && !matches!(reply.status, 409 | 503)
        {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no answer but 409 or 503 for 30 s");
}

async fn orders_for(pool: &PgPool, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE key = $1")
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The handler commits its order, then the server is killed before the middleware's
/// own write. Without the claim (`plain`) the middleware's completion fails and the
/// retry, once the lock lapsed, inserts a second order. Completing in the handler's
/// transaction (`complete-in`, `commit`), the retry replays the first response.
#[test]
fn a_retry_replays_when_the_server_dies_after_the_handlers_commit() {
    let mut server = sd_testkit::PostgresServer::start().expect("a postgres server");
    orders_on(&mut server, async |server, port, orders, _| {
        let mut outcomes = Vec::new();
        for (n, mode) in ["plain", "complete-in", "commit"].into_iter().enumerate() {
            let key = sd_testkit::unique_name(mode);
            let first = {
                let key = key.clone();
                tokio::spawn(async move { order(port, &key, mode, true).await })
            };
            // The handler's transaction has committed; the middleware has not written yet.
            orders.hold.entered(n + 1).await;
            server.kill().unwrap();
            orders.hold.go.add_permits(1);
            let first = first.await.unwrap().expect("an answer");
            assert_eq!(first.status, 201, "{mode}: the caller gets the response");
            server.start_again().unwrap();
            let again = retry(port, &key, mode).await;
            outcomes.push((mode, key, first, again));
        }
        let runs = orders.runs.load(Ordering::SeqCst);
        for (mode, key, first, again) in outcomes {
            let created = orders_for(&orders.pool, &key).await;
            if mode == "plain" {
                // The window the claim closes: the response was not stored.
                assert_eq!(again.status, 201);
                assert_eq!(again.header("idempotency-replayed"), None);
                assert_ne!(again.body, first.body);
                assert_eq!(created, 2, "plain: the retry ran the handler again");
            } else {
                assert_eq!(again.status, 201, "{mode}");
                assert_eq!(
                    again.header("idempotency-replayed"),
                    Some("true"),
                    "{mode}: the retry is a replay"
                );
                assert_eq!(again.body, first.body, "{mode}: of the first response");
                assert_eq!(created, 1, "{mode}: one order");
            }
        }
        assert_eq!(runs, 4, "plain ran twice, complete-in and commit once each");
    });
}

/// The handler completes in its transaction and rolls it back: the key is not
/// completed (the middleware releases it), so a retry runs at once and is not a replay
/// of the 422. After `commit` the middleware writes nothing; after `complete_in` and a
/// commit it asks for a release, which the store refuses.
#[test]
fn a_rolled_back_transaction_leaves_the_key_uncompleted() {
    let mut server = sd_testkit::PostgresServer::start().expect("a postgres server");
    orders_on(&mut server, async |_, port, orders, observed| {
        let key = sd_testkit::unique_name("rolled");
        let rolled = order(port, &key, "roll-back", false).await.unwrap();
        assert_eq!(rolled.status, 422);
        assert_eq!(
            observed.calls.releases(),
            1,
            "the middleware released the key"
        );
        let again = order(port, &key, "commit", false).await.unwrap();
        assert_eq!(again.status, 201, "the retry ran: {:?}", again.body);
        assert_eq!(again.header("idempotency-replayed"), None);
        assert_eq!(
            orders_for(&orders.pool, &key).await,
            1,
            "the rolled-back order is gone"
        );
        assert_eq!(
            (observed.calls.completes(), observed.calls.releases()),
            (0, 1),
            "after commit the middleware wrote nothing"
        );
        let replay = order(port, &key, "commit", false).await.unwrap();
        assert_eq!(replay.header("idempotency-replayed"), Some("true"));
        assert_eq!(replay.body, again.body);

        let key = sd_testkit::unique_name("complete-in");
        let first = order(port, &key, "complete-in", false).await.unwrap();
        assert_eq!(first.status, 201);
        assert_eq!(
            observed.calls.releases(),
            2,
            "after complete_in the middleware asks for a release, refused"
        );
        let replay = order(port, &key, "complete-in", false).await.unwrap();
        assert_eq!(replay.header("idempotency-replayed"), Some("true"));
        assert_eq!(replay.body, first.body);
        assert_eq!(orders.runs.load(Ordering::SeqCst), 3);
        assert_eq!(observed.calls.completes(), 0);
    });
}
