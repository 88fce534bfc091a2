//! The payments server example over real HTTP on loopback, on memory and on Redis and
//! PostgreSQL started by the testkit: 100 concurrent POSTs with one key create one
//! payment, and `GET /payments` lists exactly that one.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../payments_server.rs"]
mod payments_server;

use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One request as the caller `alice`: (status, replayed, body).
async fn request(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, bool, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<axum::body::Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("x-api-key", "alice")
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let req = req
        .body(Full::new(axum::body::Bytes::from(body.to_owned())))
        .unwrap();
    let reply = client.request(req).await.unwrap();
    let status = reply.status().as_u16();
    let replayed = reply
        .headers()
        .get("idempotency-replayed")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let body = reply.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8(body.to_vec()).unwrap())
}

async fn one_payment_for_100_retries(redis: Option<String>, postgres: Option<String>) {
    let (router, _) = payments_server::router(redis, postgres).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await });

    let key = sd_testkit::unique_name("pay");
    let body = r#"{"amount":1000,"currency":"EUR"}"#;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let key = key.clone();
        tasks.spawn(async move { request(port, "POST", "/payments", Some(&key), body).await });
    }
    let mut created = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        let (status, replayed, body) = reply.unwrap();
        match status {
            201 => created.push((replayed, body)),
            409 => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created.iter().filter(|(replayed, _)| !replayed).count(), 1);
    assert!(
        created.iter().all(|(_, b)| *b == created[0].1),
        "byte-identical replays"
    );

    let (status, _, list) = request(port, "GET", "/payments", None, "").await;
    assert_eq!(status, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["amount"], 1000);
    assert_eq!(list[0]["caller"], "alice");
    let answered: serde_json::Value = serde_json::from_str(&created[0].1).unwrap();
    assert_eq!(
        list[0], answered,
        "the one payment is the one every caller was told"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_server_on_memory() {
    one_payment_for_100_retries(None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_server_on_redis() {
    let redis = sd_testkit::redis().expect("redis-server");
    one_payment_for_100_retries(Some(redis.url().to_owned()), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payments_server_on_postgres() {
    let db = sd_testkit::database().expect("postgres");
    one_payment_for_100_retries(None, Some(db.url().to_owned())).await;
}
