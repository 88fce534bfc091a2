//! The middleware over real HTTP on loopback: hyper's client against the payments app
//! ([`super::app`]), and the cases of the issue.
#![allow(unreachable_pub)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{self, HeaderValue, Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sd_idempotency::Store;
use sd_idempotency::tower::OnStoreFailure;

pub use super::app::*;
use super::{Harness, Observed};

/// A response as the client read it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// Asserts an RFC 9457 problem answer with `status`.
    #[track_caller]
    pub fn assert_problem(&self, status: u16) {
        assert_eq!(self.status, status);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `POST /payments` over a fresh connection; `None` when the server dropped it.
pub async fn send(port: u16, caller: &str, key: Option<&[u8]>, body: &str) -> Option<Reply> {
    request(port, "POST", "/payments", caller, key, body).await
}

/// A request from caller `alice` that gets an answer.
pub async fn alice(port: u16, method: &str, path: &str, key: Option<&[u8]>, body: &str) -> Reply {
    request(port, method, path, "alice", key, body)
        .await
        .expect("an answer")
}

/// `POST /payments` of `body` from caller `alice` with idempotency key `key`, which gets
/// an answer.
pub async fn pay(port: u16, key: &str, body: &str) -> Reply {
    alice(port, "POST", "/payments", Some(key.as_bytes()), body).await
}

/// A JSON request to `path` on the app at `port`, from `caller`, not sent yet.
fn to(port: u16, method: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header(header::CONTENT_TYPE, "application/json")
}

/// One request over a fresh connection; `None` when the server dropped it.
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    caller: &str,
    key: Option<&[u8]>,
    body: &str,
) -> Option<Reply> {
    let mut request = to(port, method, path).header("x-api-key", caller);
    if let Some(key) = key {
        request = request.header("idempotency-key", HeaderValue::from_bytes(key).unwrap());
    }
    exchange(request.body(body.to_owned()).unwrap()).await
}

/// Sends `request` with hyper's client on a connection of its own (no pool, so a
/// connection the server dropped is seen as `None`, never retried on another).
pub async fn exchange(request: Request<String>) -> Option<Reply> {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();
    let response = client
        .request(request.map(|b| Full::new(Bytes::from(b))))
        .await
        .ok()?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes()
        .to_vec();
    Some(Reply {
        status,
        headers,
        body,
    })
}

const PAY: &str = r#"{"amount":1000,"currency":"EUR"}"#;

fn key() -> String {
    sd_testkit::unique_name("key")
}

pub async fn http_concurrent_duplicates_run_once<S: Store + Clone + 'static>(h: &Harness<S>) {
    // The handler holds until the test lets it go, so every duplicate overlaps it.
    let hold = Hold::default();
    let payments = Payments {
        hold: Some(hold.clone()),
        ..Payments::default()
    };
    let port = serve(
        h.store.clone(),
        Duration::from_secs(60),
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    let key = key();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let key = key.clone();
        tasks.spawn(async move { pay(port, &key, PAY).await });
    }
    hold.entered(1).await;
    // While the first request is held, the other 99 all meet its claim.
    let mut replies = Vec::new();
    for _ in 0..99 {
        replies.push(tasks.join_next().await.unwrap().unwrap());
    }
    for r in &replies {
        assert_eq!(
            r.status,
            409,
            "a duplicate of a running request: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.header("retry-after")
                .is_some_and(|s| s.parse::<u64>().unwrap() >= 1)
        );
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    assert_eq!(
        payments.count(),
        0,
        "the held request has not created it yet"
    );
    hold.go.add_permits(1);
    let first = tasks.join_next().await.unwrap().unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotency-replayed"), None);
    assert_eq!(first.header("x-not-replayed"), Some("1"));
    assert_eq!(
        *hold.entered.borrow(),
        1,
        "only one request reached the handler"
    );

    // After completion, 100 concurrent retries are byte-identical replays that carry
    // only the chosen headers.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let key = key.clone();
        tasks.spawn(async move { pay(port, &key, PAY).await });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, first.body, "replays are byte-identical");
        assert_eq!(r.header("idempotency-replayed"), Some("true"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("location"), first.header("location"));
        assert_eq!(r.header("x-not-replayed"), None);
    }
    assert_eq!(
        payments.count(),
        1,
        "one payment for 200 identical requests"
    );
    assert_eq!(*hold.entered.borrow(), 1);
}

/// A handler that runs three lock TTLs: the heartbeat keeps its claim, so duplicates sent
/// after one, two and three TTLs get 409 with `Retry-After`, the handler runs once, and
/// its response is stored.
pub async fn http_long_handler_keeps_its_lock<S: Store + Clone + 'static>(h: &Harness<S>) {
    let observed = Observed::new(h.store.clone());
    let (long, mut steps) = LongWork::new(h, &observed);
    let payments = Payments {
        long: Some(long.clone()),
        ..Payments::default()
    };
    let port = serve_with(observed.clone(), payments, |b| b.lock_ttl(h.lock_ttl)).await;
    let key = key();
    let first = {
        let key = key.clone();
        tokio::spawn(async move {
            request(port, "POST", "/slow", "alice", Some(key.as_bytes()), "{}").await
        })
    };
    for _ in 0..LONG_STEPS {
        let step = steps.steps.recv().await.unwrap();
        if step % 2 == 0 {
            // `step / 2` lock TTLs have passed since the claim.
            let dup = alice(port, "POST", "/slow", Some(key.as_bytes()), "{}").await;
            assert_eq!(
                dup.status,
                409,
                "after {} lock TTLs the claim still holds: {:?}",
                step / 2,
                String::from_utf8_lossy(&dup.body)
            );
            assert!(dup.header("retry-after").is_some());
        }
        steps.go.add_permits(1);
    }
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(first.body, b"slow, run 1");
    assert_eq!(
        long.missed.load(Ordering::SeqCst),
        0,
        "a renewal every half TTL"
    );
    assert!(*observed.extends().borrow() >= LONG_STEPS as u64);
    let replay = alice(port, "POST", "/slow", Some(key.as_bytes()), "{}").await;
    assert_eq!(
        replay.header("idempotency-replayed"),
        Some("true"),
        "it completed"
    );
    assert_eq!(replay.body, first.body);
    assert_eq!(long.runs.load(Ordering::SeqCst), 1);
}

/// 5xx, 408, 409 and 429 are not stored: the key is released and a retry runs again.
/// Other statuses (201, 402) are stored and replayed.
pub async fn http_retryable_outcomes_are_not_stored<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve_with(h.store.clone(), payments.clone(), |b| b).await;
    for status in [500u16, 502, 503, 408, 409, 429] {
        let key = key();
        let path = format!("/outcome/{status}");
        let before = payments.runs();
        for attempt in 1..=2 {
            let r = alice(port, "POST", &path, Some(key.as_bytes()), "{}").await;
            assert_eq!(r.status, status);
            assert_eq!(
                r.header("idempotency-replayed"),
                None,
                "{status} is not stored"
            );
            assert_eq!(
                String::from_utf8_lossy(&r.body),
                format!("outcome {status}, run {}", before + attempt)
            );
        }
        assert_eq!(payments.runs(), before + 2, "{status}: the retry ran");
    }
    for status in [201u16, 402] {
        let key = key();
        let path = format!("/outcome/{status}");
        let first = alice(port, "POST", &path, Some(key.as_bytes()), "{}").await;
        let before = payments.runs();
        let again = alice(port, "POST", &path, Some(key.as_bytes()), "{}").await;
        assert_eq!((first.status, again.status), (status, status));
        assert_eq!(
            again.header("idempotency-replayed"),
            Some("true"),
            "{status} is stored"
        );
        assert_eq!(again.body, first.body);
        assert_eq!(payments.runs(), before, "{status}: the retry did not run");
    }
}

/// A response over `max_response_bytes` reaches the first caller whole; a 500 problem is
/// stored in its place, so a retry does not run the handler again. One under the cap is
/// replayed byte for byte.
pub async fn http_oversized_response_is_not_replayed<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve_with(h.store.clone(), payments.clone(), |b| {
        b.max_response_bytes(4096)
    })
    .await;
    let key = key();
    let first = alice(port, "POST", "/big/5000", Some(key.as_bytes()), "{}").await;
    assert_eq!(first.status, 201);
    assert_eq!(
        first.body.len(),
        5000,
        "the first caller gets the whole body"
    );
    let retry = alice(port, "POST", "/big/5000", Some(key.as_bytes()), "{}").await;
    assert_eq!(retry.status, 500);
    assert_eq!(retry.header("idempotency-replayed"), Some("true"));
    assert_eq!(
        retry.header("content-type"),
        Some("application/problem+json")
    );
    let problem: serde_json::Value = serde_json::from_slice(&retry.body).unwrap();
    assert_eq!(problem["status"], 500);
    assert_eq!(payments.runs(), 1, "the handler ran once");

    let key = self::key();
    let small = alice(port, "POST", "/big/3000", Some(key.as_bytes()), "{}").await;
    let replay = alice(port, "POST", "/big/3000", Some(key.as_bytes()), "{}").await;
    assert_eq!((small.status, replay.status), (201, 201));
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    assert_eq!(replay.body, small.body);
    assert_eq!(payments.runs(), 2);
}

/// Only the configured methods (POST, PATCH) on the configured paths need a key: GET and
/// DELETE pass through, and so does a path outside the configured prefixes.
pub async fn http_methods_and_routes<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve_with(h.store.clone(), payments.clone(), |b| b).await;
    // GET passes through, with or without a key, and is never replayed.
    for key in [
        None,
        Some(b"get-key".as_slice()),
        Some(b"get-key".as_slice()),
    ] {
        let r = alice(port, "GET", "/payments", key, "").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("idempotency-replayed"), None);
    }
    assert_eq!(payments.runs(), 3);
    // DELETE is not a configured method either.
    let r = alice(port, "DELETE", "/payments/p1", None, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(payments.runs(), 4);
    // PATCH is covered: no key is 400, a key runs once and replays.
    let r = alice(port, "PATCH", "/payments/p1", None, "{}").await;
    r.assert_problem(400);
    assert_eq!(payments.runs(), 4, "refused before the handler");
    let key = key();
    let first = alice(port, "PATCH", "/payments/p1", Some(key.as_bytes()), "{}").await;
    let again = alice(port, "PATCH", "/payments/p1", Some(key.as_bytes()), "{}").await;
    assert_eq!((first.status, again.status), (200, 200));
    assert_eq!(first.body, b"patched p1, run 5");
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(payments.runs(), 5);
    // A path outside the configured prefixes needs no key and is not deduplicated.
    let r = alice(port, "POST", "/unprotected", None, "{}").await;
    assert_eq!(r.status, 200);
    for _ in 0..2 {
        let r = alice(port, "POST", "/unprotected", Some(b"u"), "{}").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("idempotency-replayed"), None);
    }
    assert_eq!(payments.runs(), 8);
    // A POST on a configured path without a key is refused.
    let r = alice(port, "POST", "/outcome/201", None, "{}").await;
    assert_eq!(r.status, 400);
    assert_eq!(payments.runs(), 8);
}

/// A key is bound to its method and path (and query): the same key and body on another
/// method, path or query is 422 and does not run.
pub async fn http_key_is_bound_to_method_and_path<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve_with(h.store.clone(), payments.clone(), |b| b).await;
    let key = key();
    let first = pay(port, &key, PAY).await;
    assert_eq!(first.status, 201);
    for (method, path) in [
        ("PATCH", "/payments/p1"),
        ("POST", "/outcome/201"),
        ("POST", "/payments?currency=USD"),
    ] {
        let r = request(port, method, path, "alice", Some(key.as_bytes()), PAY)
            .await
            .unwrap();
        assert_eq!(r.status, 422, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    assert_eq!(payments.runs(), 0);
    assert_eq!(payments.count(), 1);
    let replay = pay(port, &key, PAY).await;
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
}

/// With `fingerprint_fields`, a retry that reorders, reformats or adds fields replays; a
/// changed chosen field is 422. Over the whole body, a reordered retry is 422.
pub async fn http_fingerprint_over_chosen_fields<S: Store + Clone + 'static>(h: &Harness<S>) {
    let payments = Payments::default();
    let port = serve_with(h.store.clone(), payments.clone(), |b| {
        b.fingerprint_fields(["/amount", "/currency"])
    })
    .await;
    let key = key();
    let first = pay(port, &key, PAY).await;
    assert_eq!(first.status, 201);
    for same in [
        r#"{"currency":"EUR","amount":1000}"#,
        r#"{ "amount" : 1000 , "currency" : "EUR" }"#,
        r#"{"amount":1000,"currency":"EUR","note":"retried by the client"}"#,
    ] {
        let r = pay(port, &key, same).await;
        assert_eq!(r.status, 201, "{same}");
        assert_eq!(r.header("idempotency-replayed"), Some("true"), "{same}");
        assert_eq!(r.body, first.body);
    }
    for changed in [
        r#"{"amount":999,"currency":"EUR"}"#,
        r#"{"amount":1000,"currency":"USD"}"#,
        r#"{"amount":1000}"#,
    ] {
        let r = pay(port, &key, changed).await;
        assert_eq!(r.status, 422, "{changed}");
    }
    assert_eq!(payments.count(), 1);

    // The default fingerprint is the whole body: a reordered retry is another request.
    let whole = serve_with(h.store.clone(), payments.clone(), |b| b).await;
    let key = self::key();
    assert_eq!(pay(whole, &key, PAY).await.status, 201);
    let reordered = pay(whole, &key, r#"{"currency":"EUR","amount":1000}"#).await;
    assert_eq!(reordered.status, 422);
    assert_eq!(payments.count(), 2);
}

/// The store frozen (`pause`): a fail-closed app answers 503 while it is still frozen
/// and does not run the handler; a fail-open app runs it. Once resumed, requests run.
pub async fn http_store_paused<S: Store + Clone + 'static>(
    store: S,
    pause: impl FnOnce(),
    resume: impl FnOnce(),
) {
    let payments = Payments::default();
    // Requests to the healthy store go through an app whose time limit a loaded machine
    // cannot reach; only the requests sent while the store is frozen meet the short one,
    // which they must exceed whatever the machine's speed.
    let healthy = serve_with(store.clone(), payments.clone(), |b| {
        b.timeout(Duration::from_secs(20))
    })
    .await;
    let timeout = Duration::from_millis(500);
    let closed = serve_with(store.clone(), payments.clone(), |b| b.timeout(timeout)).await;
    let open = serve_with(store.clone(), payments.clone(), |b| {
        b.timeout(timeout)
            .on_store_failure(OnStoreFailure::FailOpen)
    })
    .await;
    assert_eq!(pay(healthy, "before", PAY).await.status, 201);
    pause();
    // A guard, not a timing assertion: a request that never answers fails the test.
    let guard = Duration::from_secs(30);
    let down = tokio::time::timeout(guard, send(closed, "alice", Some(b"during"), PAY))
        .await
        .expect("an answer while the store is frozen")
        .unwrap();
    down.assert_problem(503);
    assert_eq!(payments.count(), 1, "fail closed: the handler did not run");
    let open_reply = tokio::time::timeout(guard, send(open, "alice", Some(b"open"), PAY))
        .await
        .expect("an answer while the store is frozen")
        .unwrap();
    assert_eq!(open_reply.status, 201, "fail open: the handler ran");
    assert_eq!(open_reply.header("idempotency-replayed"), None);
    assert_eq!(payments.count(), 2);
    resume();
    // Back: requests run again. (The claim sent while the store was frozen may have been
    // applied when it woke, so a retry of that key can get 409 until its lock expires.)
    let after = pay(healthy, "after", PAY).await;
    assert_eq!(after.status, 201);
    let replay = pay(healthy, "after", PAY).await;
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    assert_eq!(payments.count(), 3);
}

pub async fn http_mismatch_is_422_and_does_not_run<S: Store + Clone + 'static>(h: &Harness<S>) {
    let (port, payments) = serve_payments(h.store.clone()).await;
    let key = key();
    let first = pay(port, &key, PAY).await;
    assert_eq!(first.status, 201);
    let other = pay(port, &key, r#"{"amount":9999,"currency":"EUR"}"#).await;
    other.assert_problem(422);
    let problem: serde_json::Value = serde_json::from_slice(&other.body).unwrap();
    assert_eq!(problem["status"], 422);
    assert_eq!(payments.count(), 1);
}

pub async fn http_other_caller_is_independent<S: Store + Clone + 'static>(h: &Harness<S>) {
    let (port, payments) = serve_payments(h.store.clone()).await;
    let key = key();
    let alice = pay(port, &key, PAY).await;
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
    let early = pay(port, &key, PAY).await;
    assert_eq!(early.status, 409);
    h.pass(h.lock_ttl + h.lock_ttl / 4).await;
    let retry = pay(port, &key, PAY).await;
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
    let first = pay(port, &key, PAY).await;
    let replay = pay(port, &key, PAY).await;
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    assert_eq!(payments.count(), 1);
    h.pass(h.retention + h.retention / 4).await;
    let later = pay(port, &key, PAY).await;
    assert_eq!((first.status, later.status), (201, 201));
    assert_eq!(later.header("idempotency-replayed"), None);
    assert_eq!(payments.count(), 2);
}

pub async fn http_bad_keys_are_400<S: Store + Clone + 'static>(h: &Harness<S>) {
    let (port, payments) = serve_payments(h.store.clone()).await;
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
    let twice = to(port, "POST", "/payments")
        .header("x-api-key", "alice")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(PAY.to_owned())
        .unwrap();
    assert_eq!(exchange(twice).await.unwrap().status, 400);
    // An sf-string with an escape and a 255-character bare key are accepted.
    let ok = pay(port, r#""quoted \"key\" 1""#, PAY).await;
    assert_eq!(ok.status, 201);
    let max = key()
        .chars()
        .chain(std::iter::repeat('k'))
        .take(255)
        .collect::<String>();
    assert_eq!(pay(port, &max, PAY).await.status, 201);
    // No caller: 401.
    let anonymous = to(port, "POST", "/payments")
        .header("idempotency-key", "a")
        .body(PAY.to_owned())
        .unwrap();
    assert_eq!(exchange(anonymous).await.unwrap().status, 401);
    assert_eq!(payments.count(), 2);
}
