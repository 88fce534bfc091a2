//! The orders service example over real HTTP on loopback, on Redis and PostgreSQL started
//! by the testkit. Counts are read from PostgreSQL directly, raw (`count(*)` of the
//! orders and outbox tables), and the event from the Redis stream as the relay wrote it.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../orders_service/app.rs"]
mod app;

use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One answer: status, headers, body.
struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// One request as `caller`, with an `Idempotency-Key` when given.
async fn request(
    port: u16,
    method: &str,
    path: &str,
    caller: &str,
    key: Option<&str>,
    body: &str,
) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<axum::body::Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("x-api-key", caller)
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let req = req
        .body(Full::new(axum::body::Bytes::from(body.to_owned())))
        .unwrap();
    let reply = client.request(req).await.unwrap();
    let status = reply.status().as_u16();
    let headers = reply.headers().clone();
    let body = reply.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

/// A Redis server and a fresh database, and the service's config on them (keys and
/// stream under a prefix of this test's own).
fn servers() -> (sd_testkit::Redis, sd_testkit::TestDatabase, app::Config) {
    let redis = sd_testkit::redis().expect("redis-server");
    let db = sd_testkit::database().expect("postgres");
    let mut config = app::Config::new(redis.url(), db.url());
    config.prefix = sd_testkit::unique_name("orders");
    (redis, db, config)
}

/// The service on its port, and what stops it.
struct Running {
    port: u16,
    service: app::Service,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Tells the server to stop (once).
    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
    }

    /// Stops the server, waits for it to return (5 s at most), and stops the relay.
    async fn join(mut self) {
        self.signal_stop();
        tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .expect("the server returns")
            .unwrap();
        self.service.relay.shutdown().await;
    }
}

async fn run(config: app::Config) -> Running {
    let service = app::start(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = service.router.clone();
    let server = tokio::spawn(async move {
        app::serve(listener, router, &config, async {
            let _ = stopped.await;
        })
        .await;
    });
    Running {
        port,
        service,
        stop: Some(stop),
        server,
    }
}

/// Raw counts of the orders and outbox tables.
async fn counts(pool: &PgPool) -> (i64, i64) {
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(pool)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM orders_outbox")
        .fetch_one(pool)
        .await
        .unwrap();
    (orders, events)
}

/// Another session's transaction holding a lock that blocks every INSERT into orders
/// until it ends.
async fn block_inserts(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

/// Every entry of `stream`, as field maps.
async fn stream_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<redis::streams::StreamId> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    reply.ids
}

fn field(entry: &redis::streams::StreamId, name: &str) -> String {
    entry.get(name).unwrap_or_else(|| panic!("no field {name}"))
}

const BOOK: &str = r#"{"sku":"book-1","quantity":2}"#;
const PEN: &str = r#"{"sku":"pen-7","quantity":5}"#;

/// A POST with a key creates one order and one event, completed in the handler's
/// transaction; the same key replays the body without a second order or event; another
/// body under that key is refused with 422; concurrent duplicates create one order; GET
/// is served, the second time from the cache; the relay publishes the event to the Redis
/// stream as it was enqueued; and a caller over the limit gets 429 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_are_placed_once_cached_published_and_rate_limited() {
    let (redis, _db, mut config) = servers();
    config.rate = 1;
    config.burst = 30;
    let running = run(config.clone()).await;
    let (port, pool) = (running.port, running.service.pool.clone());

    // The first POST: one order, one event.
    let key = sd_testkit::unique_name("order");
    let first = request(port, "POST", "/orders", "alice", Some(&key), BOOK).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.header("idempotency-replayed"), None);
    let order = first.json();
    let id = order["id"].as_str().unwrap().to_owned();
    assert_eq!(order["customer"], "alice");
    assert_eq!(order["sku"], "book-1");
    assert_eq!(order["quantity"], 2);
    assert_eq!(
        first.header("location"),
        Some(format!("/orders/{id}").as_str())
    );
    assert_eq!(counts(&pool).await, (1, 1));

    // The order, its event and its stored answer were written by one transaction.
    let order_xmin: String = sqlx::query_scalar("SELECT xmin::text FROM orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    let event_txid: String =
        sqlx::query_scalar("SELECT (txid::text::bigint % 4294967296)::text FROM orders_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
    let key_xmin: String = sqlx::query_scalar(
        "SELECT xmin::text FROM idempotency_keys WHERE key = $1 AND state = 'completed'",
    )
    .bind(&key)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(event_txid, order_xmin, "the event commits with the order");
    assert_eq!(key_xmin, order_xmin, "the key completes with the order");

    // The same key and body (reformatted too): the same answer, byte for byte, and
    // nothing new written.
    for body in [BOOK, r#"{ "quantity": 2, "sku": "book-1" }"#] {
        let again = request(port, "POST", "/orders", "alice", Some(&key), body).await;
        assert_eq!(again.status, 201, "{body}");
        assert_eq!(again.header("idempotency-replayed"), Some("true"), "{body}");
        assert_eq!(again.body, first.body, "{body}");
    }
    assert_eq!(counts(&pool).await, (1, 1));

    // The same key with another order is refused, and writes nothing.
    for body in [PEN, r#"{"sku":"book-1","quantity":3}"#] {
        let other = request(port, "POST", "/orders", "alice", Some(&key), body).await;
        assert_eq!(other.status, 422, "{body}: {}", other.body);
        assert_eq!(
            other.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(other.header("idempotency-replayed"), None);
    }
    assert_eq!(counts(&pool).await, (1, 1));

    // Twenty concurrent sends of a new key: one order and one event, every 201 the same.
    let key2 = sd_testkit::unique_name("order");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let key2 = key2.clone();
        tasks.spawn(async move { request(port, "POST", "/orders", "bob", Some(&key2), PEN).await });
    }
    let mut created = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        match reply.status {
            201 => created.push(reply.body),
            409 => assert!(reply.header("retry-after").is_some()),
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert!(!created.is_empty());
    assert!(created.iter().all(|b| *b == created[0]), "one answer");
    assert_eq!(counts(&pool).await, (2, 2));

    // GET after POST is served; the second GET is a cache hit.
    let before = running.service.cache.stats();
    let read = request(port, "GET", &format!("/orders/{id}"), "alice", None, "").await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.json(), order);
    let after_first = running.service.cache.stats();
    assert_eq!(after_first.loads, before.loads + 1, "the first GET loads");
    let read = request(port, "GET", &format!("/orders/{id}"), "alice", None, "").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.json(), order);
    let after_second = running.service.cache.stats();
    assert_eq!(
        after_second.hits,
        after_first.hits + 1,
        "the second GET hits"
    );
    assert_eq!(after_second.loads, after_first.loads, "and loads nothing");
    let missing = request(
        port,
        "GET",
        "/orders/00000000-0000-0000-0000-000000000000",
        "alice",
        None,
        "",
    )
    .await;
    assert_eq!(missing.status, 404);

    // The relay publishes the first order's event to the stream exactly as enqueued.
    let (event_id, aggregate_type, aggregate_id, event_type, payload): (
        sqlx::types::Uuid,
        String,
        String,
        String,
        serde_json::Value,
    ) = sqlx::query_as(
        "SELECT id, aggregatetype, aggregateid, type, payload FROM orders_outbox WHERE aggregateid = $1",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stream = running.service.stream.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    let entries = loop {
        let entries = stream_entries(&mut conn, &stream).await;
        if entries.len() >= 2 || Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entries.len(), 2, "one entry per order");
    let entry = entries
        .iter()
        .find(|e| field(e, "aggregateid") == id)
        .expect("the first order's event");
    assert_eq!(field(entry, "id"), event_id.to_string());
    assert_eq!(field(entry, "aggregatetype"), aggregate_type);
    assert_eq!(aggregate_type, "order");
    assert_eq!(field(entry, "type"), event_type);
    assert_eq!(event_type, "order_created");
    assert_eq!(field(entry, "payload_kind"), "json");
    let published: serde_json::Value = serde_json::from_str(&field(entry, "payload")).unwrap();
    assert_eq!(published, payload);
    assert_eq!(published, order, "the event carries the order answered");
    assert_eq!(field(entry, "headers"), "{}");
    assert_eq!(aggregate_id, id);

    // A caller over its limit: 429 with Retry-After and a problem document.
    // The burst (30) goes through, then one more a second (the rate) at most.
    let mut admitted = 0u64;
    let started = Instant::now();
    let refused = loop {
        let reply = request(port, "GET", &format!("/orders/{id}"), "mallory", None, "").await;
        if reply.status == 429 {
            break reply;
        }
        assert_eq!(reply.status, 200);
        admitted += 1;
        assert!(
            admitted <= 31 + started.elapsed().as_secs(),
            "{admitted} admitted in {:?}",
            started.elapsed()
        );
    };
    assert!(admitted >= 30, "the burst is admitted: {admitted}");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    // Other callers are not limited by mallory.
    let read = request(port, "GET", &format!("/orders/{id}"), "alice", None, "").await;
    assert_eq!(read.status, 200);

    // A graceful stop: the server returns, and the relay stops.
    running.join().await;
    assert_eq!(counts(&pool).await, (2, 2));
}

/// A client that sends half its headers is cut off after the header read timeout, while
/// a complete request on another connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_after_the_header_read_timeout() {
    let (_redis, _db, mut config) = servers();
    config.header_read_timeout = Duration::from_secs(1);
    let running = run(config).await;

    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", running.port))
        .await
        .unwrap();
    slow.write_all(b"GET /orders/x HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    let waited = started.elapsed();
    assert!(read.is_ok(), "the connection is still open after 5 s");
    assert!(
        waited >= Duration::from_millis(900),
        "cut off early: {waited:?}"
    );
    // hyper closes the connection, answering 408 or nothing.
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    let reply = request(running.port, "GET", "/orders/x", "alice", None, "").await;
    assert_eq!(reply.status, 404);
    running.join().await;
}

/// A request that runs past the request timeout (its INSERT waits on a table lock) is
/// answered 503 and writes nothing; the middleware does not store the 503, so a retry
/// with the same key runs and creates the one order and its one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_timeout_is_answered_503_and_its_retry_runs() {
    let (_redis, _db, mut config) = servers();
    config.request_timeout = Duration::from_secs(1);
    let running = run(config).await;
    let pool = running.service.pool.clone();

    let lock = block_inserts(&pool).await;
    let key = sd_testkit::unique_name("order");
    let started = Instant::now();
    let late = request(running.port, "POST", "/orders", "alice", Some(&key), BOOK).await;
    assert_eq!(late.status, 503, "{}", late.body);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        late.header("content-type"),
        Some("application/problem+json")
    );
    lock.rollback().await.unwrap();

    let retry = request(running.port, "POST", "/orders", "alice", Some(&key), BOOK).await;
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(retry.header("idempotency-replayed"), None, "the retry ran");
    assert_eq!(counts(&pool).await, (1, 1));
    running.join().await;
}

/// A stop lets the request in flight finish: the server stops accepting at once, answers
/// the request (held by a table lock) once the lock goes, and only then returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_the_request_in_flight_finish() {
    let (_redis, _db, config) = servers();
    let mut running = run(config).await;
    let (port, pool) = (running.port, running.service.pool.clone());

    let lock = block_inserts(&pool).await;
    let key = sd_testkit::unique_name("order");
    let in_flight =
        tokio::spawn(
            async move { request(port, "POST", "/orders", "alice", Some(&key), BOOK).await },
        );
    // The handler's INSERT waits on the lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
            .fetch_one(&pool)
            .await
            .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the INSERT never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    running.signal_stop();
    // The listener closes: new connections are refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "still accepting after the stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !running.server.is_finished(),
        "the server returned with a request in flight"
    );

    lock.rollback().await.unwrap();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 201, "{}", reply.body);
    // The server returns once the request is answered.
    running.join().await;
    assert_eq!(counts(&pool).await, (1, 1));
}
