//! The payments server example over real HTTP on loopback, on memory and on Redis and
//! PostgreSQL started by the testkit: 100 concurrent POSTs with one key create one
//! payment, and `GET /payments` lists exactly that one.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../payments_server.rs"]
mod payments_server;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request over a fresh connection: (status, replayed, body).
async fn request(port: u16, head: &str, body: &str) -> (u16, bool, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "{head}\r\nHost: 127.0.0.1\r\nX-Api-Key: alice\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let replayed = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("idempotency-replayed: true"));
    (status, replayed, body.to_owned())
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
        let head = format!("POST /payments HTTP/1.1\r\nIdempotency-Key: {key}");
        tasks.spawn(async move { request(port, &head, body).await });
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

    let (status, _, list) = request(port, "GET /payments HTTP/1.1", "").await;
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
