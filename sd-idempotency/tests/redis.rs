//! The behaviour suite on Redis, and a Redis that goes down.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_idempotency::redis::RedisStore;
use suite::Harness;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn store(url: &str) -> RedisStore<ConnectionManager> {
    let client = redis::Client::open(url).unwrap();
    let conn = ConnectionManager::new(client).await.unwrap();
    RedisStore::builder()
        .prefix(sd_testkit::unique_name("idem"))
        .build(conn)
        .unwrap()
}

fn harness() -> (
    tokio::runtime::Runtime,
    Harness<RedisStore<ConnectionManager>>,
) {
    let server =
        sd_testkit::redis().expect("a redis server (install redis-server or set SD_REDIS_URL)");
    let runtime = runtime();
    let store = runtime.block_on(store(server.url()));
    let harness = Harness {
        store,
        lock_ttl: Duration::from_millis(600),
        retention: Duration::from_millis(600),
        pass: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        guard: Box::new(server),
    };
    (runtime, harness)
}

behaviour_suite!(harness());

#[test]
fn store_down_is_503_and_nothing_runs() {
    let mut server = sd_testkit::RedisServer::start().expect("a redis server");
    let runtime = runtime();
    runtime.block_on(async {
        let store = store(&server.url()).await;
        let payments = suite::http::Payments::default();
        let port = suite::http::serve(
            store,
            Duration::from_secs(30),
            Duration::from_secs(60),
            payments.clone(),
        )
        .await;
        let ok = suite::http::send(
            port,
            "alice",
            Some(b"k1"),
            r#"{"amount":1,"currency":"EUR"}"#,
        )
        .await
        .unwrap();
        assert_eq!(ok.status, 201);
        server.kill().unwrap();
        let down = suite::http::send(
            port,
            "alice",
            Some(b"k2"),
            r#"{"amount":1,"currency":"EUR"}"#,
        )
        .await
        .unwrap();
        assert_eq!(down.status, 503);
        assert_eq!(
            down.header("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(payments.count(), 1, "the handler did not run");
        server.start_again().unwrap();
        // Back up (the connection manager reconnects): requests run again.
        let mut status = 0;
        for _ in 0..50 {
            status = suite::http::send(
                port,
                "alice",
                Some(b"k3"),
                r#"{"amount":1,"currency":"EUR"}"#,
            )
            .await
            .unwrap()
            .status;
            if status == 201 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 201);
        assert_eq!(payments.count(), 2);
        assert!(!payments.crash_next.load(Ordering::SeqCst));
    });
}
