//! A payments API that charges once per `Idempotency-Key`, however often clients retry.
//!
//! ```text
//! cargo run -p sd-examples --example payments_server --features idempotency-server -- \
//!     [--addr 127.0.0.1:3000] [--redis redis://127.0.0.1/ | --postgres postgres://...]
//! curl -i -X POST localhost:3000/payments -H 'X-Api-Key: alice' \
//!     -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \
//!     -d '{"amount":1000,"currency":"EUR"}'
//! curl localhost:3000/payments -H 'X-Api-Key: alice'
//! ```
//!
//! Send the POST twice: the second answer is the first, byte for byte, with
//! `Idempotency-Replayed: true`, and `GET /payments` lists one payment.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::redis::RedisStore;
use sd_idempotency::{IdempotencyLayer, MemoryStore, Store};

type Payments = Arc<Mutex<Vec<serde_json::Value>>>;

fn caller(headers: &HeaderMap) -> Option<String> {
    headers.get("x-api-key")?.to_str().ok().map(str::to_owned)
}

async fn create(
    State(payments): State<Payments>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    let mut out = HeaderMap::new();
    out.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let parsed: Option<(u64, String)> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| Some((v["amount"].as_u64()?, v["currency"].as_str()?.to_owned())));
    let Some((amount, currency)) = parsed else {
        let error =
            serde_json::json!({ "error": "send {\"amount\": <integer>, \"currency\": <string>}" });
        return (StatusCode::UNPROCESSABLE_ENTITY, out, error.to_string());
    };
    let mut list = payments.lock().unwrap_or_else(|e| e.into_inner());
    let payment = serde_json::json!({
        "id": format!("pay_{}", list.len() + 1),
        "caller": caller(&headers),
        "amount": amount,
        "currency": currency,
    });
    list.push(payment.clone());
    (StatusCode::CREATED, out, payment.to_string())
}

async fn list(State(payments): State<Payments>) -> String {
    let list = payments.lock().unwrap_or_else(|e| e.into_inner());
    serde_json::Value::Array(list.clone()).to_string()
}

fn app<S: Store + Clone + 'static>(store: S) -> Result<Router, sd_idempotency::Error> {
    let layer = IdempotencyLayer::builder(store)
        .principal(|parts| caller(&parts.headers))
        .paths(["/payments"])
        .build()?;
    Ok(Router::new()
        .route("/payments", post(create).get(list))
        .layer(layer)
        .with_state(Payments::default()))
}

/// The app on the store the flags name: Redis, PostgreSQL (migrated, swept every
/// minute), or memory when neither is given.
pub(crate) async fn router(
    redis_url: Option<String>,
    postgres_url: Option<String>,
) -> Result<(Router, &'static str), Box<dyn std::error::Error>> {
    Ok(match (redis_url, postgres_url) {
        (Some(_), Some(_)) => return Err("give --redis or --postgres, not both".into()),
        (Some(url), None) => {
            let conn = redis::aio::ConnectionManager::new(redis::Client::open(url)?).await?;
            (app(RedisStore::builder().build(conn)?)?, "redis")
        }
        (None, Some(url)) => {
            let store = PostgresStore::builder().build(sqlx::PgPool::connect(&url).await?)?;
            store.migrate().await?;
            tokio::spawn(sd_idempotency::run_sweeper(
                store.clone(),
                std::time::Duration::from_secs(60),
            ));
            (app(store)?, "postgres")
        }
        (None, None) => {
            let store = MemoryStore::new();
            tokio::spawn(sd_idempotency::run_sweeper(
                store.clone(),
                std::time::Duration::from_secs(60),
            ));
            (app(store)?, "memory")
        }
    })
}

/// The flags.
#[derive(Debug, clap::Parser)]
#[command(name = "payments_server")]
struct Args {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: String,
    /// Keep idempotency keys on this Redis server.
    #[arg(long, value_name = "URL", conflicts_with = "postgres")]
    redis: Option<String>,
    /// Keep idempotency keys in this PostgreSQL database.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args {
        addr,
        redis: redis_url,
        postgres: postgres_url,
    } = <Args as clap::Parser>::parse();
    let (router, store) = router(redis_url, postgres_url).await?;
    println!("store: {store}");
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{addr}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
