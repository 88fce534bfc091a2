//! sd-idempotency: per-request overhead of the middleware on memory, Redis and PostgreSQL
//! beside the bare handler, for a first run (claim + complete) and a replay (one claim).
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::redis::RedisStore;
use sd_idempotency::{IdempotencyLayer, MemoryStore, Store};
use tower::{Layer, Service, ServiceExt, service_fn};

const BODY: &str = r#"{"amount":1000,"currency":"EUR"}"#;

async fn handler(_: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .body(Full::from(
            r#"{"id":"pay_1","amount":1000,"currency":"EUR"}"#,
        ))
        .unwrap())
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::from(BODY))
        .unwrap()
}

fn group<S: Store + Clone + 'static>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: S,
) {
    let layer = IdempotencyLayer::builder(store).build().unwrap();
    let svc = layer.layer(service_fn(handler));
    let mut g = c.benchmark_group(format!("idempotency/{name}"));
    let seq = AtomicU64::new(0);
    g.bench_function("first_run", |b| {
        b.iter(|| {
            let key = format!("k{}", seq.fetch_add(1, Ordering::Relaxed));
            rt.block_on(svc.clone().oneshot(request(&key))).unwrap()
        })
    });
    rt.block_on(svc.clone().oneshot(request("replayed")))
        .unwrap();
    g.bench_function("replay", |b| {
        b.iter(|| {
            rt.block_on(svc.clone().oneshot(request("replayed")))
                .unwrap()
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let rt = sd_testkit::runtime_with(1);
    {
        let mut g = c.benchmark_group("idempotency/bare");
        let mut svc = service_fn(handler);
        g.bench_function("handler", |b| {
            b.iter(|| rt.block_on(svc.call(request("k"))).unwrap())
        });
        g.finish();
    }
    group(c, &rt, "memory", MemoryStore::new());
    let redis_server = sd_testkit::redis().expect("a redis server");
    let redis = rt.block_on(async {
        let client = redis::Client::open(redis_server.url()).unwrap();
        let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
        RedisStore::builder()
            .prefix(sd_testkit::unique_name("idem-bench"))
            .build(conn)
            .unwrap()
    });
    group(c, &rt, "redis", redis);
    let db = sd_testkit::database().expect("a postgres server");
    let pg = rt.block_on(async {
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        let store = PostgresStore::builder().build(pool).unwrap();
        store.migrate().await.unwrap();
        store
    });
    group(c, &rt, "postgres", pg);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
