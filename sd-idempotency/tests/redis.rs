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
    let runtime = sd_testkit::runtime();
    let store = runtime.block_on(store(server.url()));
    let harness = suite::real_time(store, true, Box::new(server));
    (runtime, harness)
}

behaviour_suite!(harness());

/// The payments service over HTTP on loopback, its store on the Redis at `url`
/// (lock TTL 30 s, retention 60 s): its port and its payment log.
async fn serve_payments(url: &str) -> (u16, suite::http::Payments) {
    suite::http::serve_payments(store(url).await).await
}

#[test]
fn store_down_is_503_and_nothing_runs() {
    let mut server = sd_testkit::RedisServer::start().expect("a redis server");
    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let (port, payments) = serve_payments(&server.url()).await;
        let body = r#"{"amount":1,"currency":"EUR"}"#;
        let ok = suite::http::pay(port, "k1", body).await;
        assert_eq!(ok.status, 201);
        server.kill().unwrap();
        let down = suite::http::pay(port, "k2", body).await;
        down.assert_problem(503);
        assert_eq!(payments.count(), 1, "the handler did not run");
        server.start_again().unwrap();
        // Back up (the connection manager reconnects): requests run again.
        let mut status = 0;
        for _ in 0..50 {
            status = suite::http::pay(port, "k3", body).await.status;
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

/// The model over 24 sequences in real time (100 ms locks): Redis forgets an expired
/// record at once, and has nothing to sweep.
#[test]
fn redis_store_follows_the_model() {
    let (runtime, h) = harness();
    suite::model::check(&runtime, 24, suite::model::ops(40, 150, false), || {
        let backend = suite::model::Backend {
            lock: Duration::from_millis(100),
            retention: Duration::from_millis(150),
            expiry_forgets: true,
            sweep_counts: false,
            slack: 2,
            now: Arc::new(suite::model::wall_clock),
            pass: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        };
        (h.store.clone(), backend)
    });
}

/// Runs `test` with a store on a server of its own, and its pause and resume.
fn on_a_pausable_server<F: Future<Output = ()>>(
    test: impl FnOnce(RedisStore<ConnectionManager>, suite::Fault, suite::Fault) -> F,
) {
    let server = sd_testkit::RedisServer::start().expect("a redis server");
    let url = server.url();
    suite::on_a_pausable_server(
        server,
        sd_testkit::RedisServer::pause,
        sd_testkit::RedisServer::resume,
        store(&url),
        test,
    );
}

fault_suite!(on_a_pausable_server);

/// Every command clients send to one server, as MONITOR reports them (the commands a
/// script runs inside the server are tagged `lua` and left out).
struct Monitor {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
    port: u16,
}

impl Monitor {
    async fn start(port: u16) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
        Monitor { lines, port }
    }

    /// The names of the commands clients sent since the last call: sends a marker and
    /// reads up to it (MONITOR reports commands in the order the server ran them).
    async fn commands(&mut self) -> Vec<String> {
        let marker = sd_testkit::unique_name("marker");
        sd_testkit::resp::command(self.port, &["ECHO", marker.as_str()]).unwrap();
        let mut out = Vec::new();
        loop {
            let line = self.lines.next_line().await.unwrap().expect("monitor open");
            if line.contains(&marker) {
                return out;
            }
            let Some((source, command)) = line.split_once("] ") else {
                continue;
            };
            if source.ends_with(" lua") {
                continue;
            }
            let name = command.split('"').nth(1).unwrap_or_default();
            out.push(name.to_ascii_uppercase());
        }
    }
}

#[test]
fn a_first_run_is_two_round_trips_and_a_replay_is_one() {
    let server = sd_testkit::RedisServer::start().expect("a redis server");
    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let (port, payments) = serve_payments(&server.url()).await;
        let mut monitor = Monitor::start(server.port()).await;
        let body = r#"{"amount":1,"currency":"EUR"}"#;
        // Warm up: the first EVALSHA of each script meets NOSCRIPT and is sent again with
        // its source; that happens once per server, not per request.
        for _ in 0..2 {
            suite::http::pay(port, "warm", body).await;
        }
        let warm = monitor.commands().await;
        assert!(warm.contains(&"EVAL".to_owned()), "{warm:?}");

        let first = suite::http::pay(port, "k1", body).await;
        let first_commands = monitor.commands().await;
        let replay = suite::http::pay(port, "k1", body).await;
        let replay_commands = monitor.commands().await;

        assert_eq!(first.status, 201);
        assert_eq!(replay.body, first.body, "the replay is byte-identical");
        assert_eq!(
            first_commands,
            ["EVALSHA", "EVALSHA"],
            "a first run: claim + complete, and no other command"
        );
        assert_eq!(replay_commands, ["EVALSHA"], "a replay: one claim");
        assert_eq!(payments.count(), 2, "warm-up and k1 each ran once");
    });
}
