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

/// The payments service over HTTP on loopback, its store on the Redis at `url`
/// (lock TTL 30 s, retention 60 s): its port and its payment log.
async fn serve_payments(url: &str) -> (u16, suite::http::Payments) {
    let payments = suite::http::Payments::default();
    let port = suite::http::serve(
        store(url).await,
        Duration::from_secs(30),
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    (port, payments)
}

#[test]
fn store_down_is_503_and_nothing_runs() {
    let mut server = sd_testkit::RedisServer::start().expect("a redis server");
    let runtime = runtime();
    runtime.block_on(async {
        let (port, payments) = serve_payments(&server.url()).await;
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

/// Script calls (EVALSHA and EVAL) the server has received so far: each is one round
/// trip from the store. (`total_commands_processed` would also count the commands a
/// script runs inside the server.)
fn script_calls(server: &sd_testkit::RedisServer) -> u64 {
    let info = server
        .command(&["INFO", "commandstats"])
        .unwrap()
        .as_text()
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .map(|l| {
            let calls = l.split("calls=").nth(1).unwrap();
            calls[..calls.find(',').unwrap()].parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn a_first_run_is_two_round_trips_and_a_replay_is_one() {
    let server = sd_testkit::RedisServer::start().expect("a redis server");
    let runtime = runtime();
    runtime.block_on(async {
        let (port, payments) = serve_payments(&server.url()).await;
        let body = r#"{"amount":1,"currency":"EUR"}"#;
        // Warm up: the first EVALSHA of each script meets NOSCRIPT and is sent again with
        // its source; that happens once per server, not per request.
        for _ in 0..2 {
            suite::http::send(port, "alice", Some(b"warm"), body)
                .await
                .unwrap();
        }

        let before = script_calls(&server);
        let first = suite::http::send(port, "alice", Some(b"k1"), body)
            .await
            .unwrap();
        let after_first = script_calls(&server);
        let replay = suite::http::send(port, "alice", Some(b"k1"), body)
            .await
            .unwrap();
        let after_replay = script_calls(&server);

        assert_eq!(first.status, 201);
        assert_eq!(replay.body, first.body, "the replay is byte-identical");
        assert_eq!(after_first - before, 2, "a first run: claim + complete");
        assert_eq!(after_replay - after_first, 1, "a replay: one claim");
        assert_eq!(payments.count(), 2, "warm-up and k1 each ran once");
    });
}
