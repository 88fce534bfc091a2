//! The middleware over real HTTP on loopback: an axum payments app, a raw HTTP/1.1
#![allow(unreachable_pub)]
//! client, and the cases of the issue.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use sd_idempotency::{IdempotencyLayer, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Harness;

/// The payments the app created, and a switch that makes the next one crash.
#[derive(Clone, Default)]
pub struct Payments {
    pub created: Arc<Mutex<Vec<String>>>,
    pub crash_next: Arc<AtomicBool>,
    seq: Arc<AtomicUsize>,
}

impl Payments {
    pub fn count(&self) -> usize {
        self.created.lock().unwrap().len()
    }
}

async fn create(
    State(p): State<Payments>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, HeaderMap::new(), "bad json".into());
    };
    // Widen the race window so concurrent duplicates overlap.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if p.crash_next.swap(false, Ordering::SeqCst) {
        panic!("the handler crashed after the claim");
    }
    let n = p.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let caller = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let id = format!("pay_{n}_{caller}");
    p.created.lock().unwrap().push(id.clone());
    let mut out = HeaderMap::new();
    out.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    out.insert(header::LOCATION, format!("/payments/{id}").parse().unwrap());
    out.insert("x-not-replayed", "1".parse().unwrap());
    let body =
        serde_json::json!({ "id": id, "amount": json["amount"], "currency": json["currency"] });
    (StatusCode::CREATED, out, body.to_string())
}

/// Serves the app with the layer on `store`; returns the port.
pub async fn serve<S: Store + Clone + 'static>(
    store: S,
    lock_ttl: Duration,
    retention: Duration,
    payments: Payments,
) -> u16 {
    let layer = IdempotencyLayer::builder(store)
        .principal(|parts| {
            parts
                .headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .lock_ttl(lock_ttl)
        .retention(retention)
        .build()
        .unwrap();
    let app = Router::new()
        .route("/payments", post(create))
        .layer(layer)
        .with_state(payments);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request over a fresh connection; `None` when the server dropped it.
pub async fn send(port: u16, caller: &str, key: Option<&[u8]>, body: &str) -> Option<Reply> {
    let mut head = format!(
        "POST /payments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Api-Key: {caller}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    )
    .into_bytes();
    if let Some(key) = key {
        head.extend_from_slice(b"Idempotency-Key: ");
        head.extend_from_slice(key);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(body.as_bytes());
    raw(port, &head).await
}

pub async fn raw(port: u16, request: &[u8]) -> Option<Reply> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8(buf[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !headers.iter().any(|(n, _)| n == "transfer-encoding"),
        "the test client reads content-length bodies only"
    );
    Some(Reply {
        status,
        headers,
        body: buf[split + 4..].to_vec(),
    })
}

const PAY: &str = r#"{"amount":1000,"currency":"EUR"}"#;

fn key() -> String {
    sd_testkit::unique_name("key")
}

pub async fn http_concurrent_duplicates_run_once<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve(
        h.store.clone(),
        Duration::from_secs(60),
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    let key = key();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let key = key.clone();
            tokio::spawn(async move {
                send(port, "alice", Some(key.as_bytes()), PAY)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(
        payments.count(),
        1,
        "one payment for 100 identical requests"
    );
    let created: Vec<_> = replies.iter().filter(|r| r.status == 201).collect();
    let first = created
        .iter()
        .find(|r| r.header("idempotency-replayed").is_none())
        .expect("the request that ran");
    assert_eq!(
        created
            .iter()
            .filter(|r| r.header("idempotency-replayed").is_none())
            .count(),
        1
    );
    for r in &replies {
        match r.status {
            201 => {
                assert_eq!(r.body, first.body, "replays are byte-identical");
                assert_eq!(r.header("content-type"), Some("application/json"));
                assert_eq!(r.header("location"), first.header("location"));
            }
            409 => {
                assert!(r.header("retry-after").is_some());
                assert_eq!(r.header("content-type"), Some("application/problem+json"));
            }
            other => panic!(
                "unexpected status {other}: {:?}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
    // After completion every retry is a replay that carries only the chosen headers.
    let again = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    assert_eq!(again.status, 201);
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(again.header("x-not-replayed"), None);
    assert_eq!(first.header("x-not-replayed"), Some("1"));
    assert_eq!(payments.count(), 1);
}

pub async fn http_mismatch_is_422_and_does_not_run<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve(
        h.store.clone(),
        Duration::from_secs(60),
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    let key = key();
    let first = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    assert_eq!(first.status, 201);
    let other = send(
        port,
        "alice",
        Some(key.as_bytes()),
        r#"{"amount":9999,"currency":"EUR"}"#,
    )
    .await
    .unwrap();
    assert_eq!(other.status, 422);
    assert_eq!(
        other.header("content-type"),
        Some("application/problem+json")
    );
    let problem: serde_json::Value = serde_json::from_slice(&other.body).unwrap();
    assert_eq!(problem["status"], 422);
    assert_eq!(payments.count(), 1);
}

pub async fn http_other_caller_is_independent<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve(
        h.store.clone(),
        Duration::from_secs(60),
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    let key = key();
    let alice = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    let bob = send(port, "bob", Some(key.as_bytes()), PAY).await.unwrap();
    assert_eq!((alice.status, bob.status), (201, 201));
    assert_ne!(alice.body, bob.body, "bob never sees alice's payment");
    assert_eq!(bob.header("idempotency-replayed"), None);
    assert_eq!(payments.count(), 2);
}

pub async fn http_crash_after_claim_then_retry_after_ttl<S: Store + Clone + 'static>(
    h: &Harness<S>,
) {
    let payments = Payments::default();
    let port = serve(
        h.store.clone(),
        h.lock_ttl,
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    let key = key();
    payments.crash_next.store(true, Ordering::SeqCst);
    let crashed = send(port, "alice", Some(key.as_bytes()), PAY).await;
    assert!(
        crashed.is_none(),
        "the connection drops with the crashed handler: {crashed:?}"
    );
    assert_eq!(payments.count(), 0);
    // The claim is still held: a retry within the lock gets 409.
    let early = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    assert_eq!(early.status, 409);
    h.pass(h.lock_ttl + h.lock_ttl / 4).await;
    let retry = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotency-replayed"), None);
    assert_eq!(payments.count(), 1);
}

pub async fn http_retention_runs_again<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve(
        h.store.clone(),
        Duration::from_secs(60),
        h.retention,
        payments.clone(),
    )
    .await;
    let key = key();
    let first = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    let replay = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    assert_eq!(payments.count(), 1);
    h.pass(h.retention + h.retention / 4).await;
    let later = send(port, "alice", Some(key.as_bytes()), PAY)
        .await
        .unwrap();
    assert_eq!((first.status, later.status), (201, 201));
    assert_eq!(later.header("idempotency-replayed"), None);
    assert_eq!(payments.count(), 2);
}

pub async fn http_bad_keys_are_400<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve(
        h.store.clone(),
        Duration::from_secs(60),
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    let long = "k".repeat(256);
    let cases: Vec<Option<Vec<u8>>> = vec![
        None,
        Some(b"\"\"".to_vec()),
        Some(long.into_bytes()),
        Some(b"caf\xc3\xa9".to_vec()),
        Some(b"\xff\xfe".to_vec()),
        Some(b"\"unterminated".to_vec()),
        Some(b"\"bad\\escape\"".to_vec()),
    ];
    for key in cases {
        let reply = send(port, "alice", key.as_deref(), PAY).await.unwrap();
        assert_eq!(reply.status, 400, "key {key:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
    }
    let twice = format!(
        "POST /payments HTTP/1.1\r\nHost: x\r\nX-Api-Key: alice\r\nIdempotency-Key: a\r\nIdempotency-Key: b\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PAY}",
        PAY.len()
    );
    assert_eq!(raw(port, twice.as_bytes()).await.unwrap().status, 400);
    // An sf-string with an escape and a 255-character bare key are accepted.
    let ok = send(port, "alice", Some(br#""quoted \"key\" 1""#), PAY)
        .await
        .unwrap();
    assert_eq!(ok.status, 201);
    let max = key()
        .chars()
        .chain(std::iter::repeat('k'))
        .take(255)
        .collect::<String>();
    assert_eq!(
        send(port, "alice", Some(max.as_bytes()), PAY)
            .await
            .unwrap()
            .status,
        201
    );
    // No caller: 401.
    let anonymous = format!(
        "POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PAY}",
        PAY.len()
    );
    assert_eq!(raw(port, anonymous.as_bytes()).await.unwrap().status, 401);
    assert_eq!(payments.count(), 2);
}
