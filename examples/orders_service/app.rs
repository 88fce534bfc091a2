//! The orders service: its configuration, its routes and handlers, and the server that
//! runs them with timeouts and a graceful shutdown. `main.rs` reads the flags; the test
//! (`examples/tests/orders_service.rs`) starts the same service on servers of its own.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use redis::aio::ConnectionManager;
use sd_cache::RedisCache;
use sd_idempotency::IdempotencyLayer;
use sd_idempotency::postgres::PostgresStore;
use sd_idempotency::tower::RequestClaim;
use sd_outbox::Message;
use sd_outbox::postgres::{Outbox, Relay, RelayHandle};
use sd_outbox::redis::RedisStreamsPublisher;
use sd_ratelimit::redis::RedisLimiterBuilder;
use sd_ratelimit::tower::{HeaderKey, RateLimiterLayer};
use sd_ratelimit::{Limit, Quota};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Uuid;
use tokio::sync::watch;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header naming the caller: idempotency keys are scoped to it, and the rate limit
/// counts per value.
pub(crate) const CALLER: &str = "x-api-key";

/// Everything the service is started with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The Redis server: rate limits, the order cache and the event stream.
    pub(crate) redis: String,
    /// The PostgreSQL database: orders, their outbox and the idempotency keys.
    pub(crate) postgres: String,
    /// Requests a second each caller may send, on average.
    pub(crate) rate: u32,
    /// Requests a caller may send at once.
    pub(crate) burst: u32,
    /// How long an order stays in the cache.
    pub(crate) cache_ttl: Duration,
    /// How long a client may take to send a request's headers.
    pub(crate) header_read_timeout: Duration,
    /// How long a request may run before it is answered 503.
    pub(crate) request_timeout: Duration,
    /// How long a shutdown waits for requests in flight.
    pub(crate) shutdown_grace: Duration,
    /// Prefix of the Redis keys (rate limits, cache) and of the event stream.
    pub(crate) prefix: String,
}

/// An order's columns as selected: `id::text, customer, sku, quantity`.
type OrderRow = (String, String, String, i32);

impl From<OrderRow> for Order {
    fn from((id, customer, sku, quantity): OrderRow) -> Self {
        Order {
            id,
            customer,
            sku,
            quantity,
        }
    }
}

impl Config {
    /// The defaults on these servers.
    pub(crate) fn new(redis: impl Into<String>, postgres: impl Into<String>) -> Self {
        Config {
            redis: redis.into(),
            postgres: postgres.into(),
            rate: 20,
            burst: 40,
            cache_ttl: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            prefix: "orders".into(),
        }
    }
}

/// An order, as stored, cached, answered and published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Order {
    pub(crate) id: String,
    pub(crate) customer: String,
    pub(crate) sku: String,
    pub(crate) quantity: i32,
}

/// What a client sends to `POST /orders`.
#[derive(Debug, Deserialize)]
struct NewOrder {
    sku: String,
    quantity: i32,
}

/// What the handlers share.
#[derive(Clone)]
struct App {
    pool: PgPool,
    outbox: Outbox,
    idempotency: PostgresStore,
    cache: RedisCache<Order, ConnectionManager>,
}

/// The running service's parts: the router to serve, and handles on what runs beside it.
pub(crate) struct Service {
    /// The routes, behind the rate limit and the idempotency middleware.
    pub(crate) router: Router,
    /// The outbox relay publishing `order_created` events to Redis Streams.
    pub(crate) relay: RelayHandle,
    /// The order cache (its stats tell hits from loads).
    pub(crate) cache: RedisCache<Order, ConnectionManager>,
    /// The Redis stream the events go to.
    pub(crate) stream: String,
    /// The pool on the service's database.
    pub(crate) pool: PgPool,
}

const ORDERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS orders (
    id         UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    customer   TEXT        NOT NULL,
    sku        TEXT        NOT NULL,
    quantity   INTEGER     NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// Connects to both servers, applies the schemas (orders, outbox, idempotency keys),
/// starts the relay and the idempotency sweeper, and builds the router.
pub(crate) async fn start(config: &Config) -> Result<Service, BoxError> {
    let pool = PgPoolOptions::new()
        .max_connections(32)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&config.postgres)
        .await?;
    sqlx::query(ORDERS_TABLE).execute(&pool).await?;
    let outbox = Outbox::builder()
        .table("orders_outbox")
        .build(pool.clone())?;
    outbox.migrate().await?;
    let idempotency = PostgresStore::builder().build(pool.clone())?;
    idempotency.migrate().await?;
    tokio::spawn(sd_idempotency::run_sweeper(
        idempotency.clone(),
        Duration::from_secs(60),
    ));

    let redis = redis::Client::open(config.redis.as_str())?;
    let conn = ConnectionManager::new_with_config(
        redis,
        redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(2))),
    )
    .await?;
    let publisher = RedisStreamsPublisher::builder(conn.clone())
        .prefix(config.prefix.as_str())
        .build()?;
    let stream = publisher.stream("order");
    let relay = Relay::builder(outbox.clone(), publisher).build()?.spawn();
    let cache = RedisCache::<Order>::builder(format!("{}:cache", config.prefix))
        .ttl(config.cache_ttl)
        .build(conn.clone())
        .await?;
    let limit = Limit::gcra(Quota::per_second(config.rate)?.with_burst(config.burst)?);
    let limiter = RedisLimiterBuilder::new(limit)
        .prefix(format!("{}:rl", config.prefix))
        .build(conn)?;

    let idempotency_layer = IdempotencyLayer::builder(idempotency.clone())
        .principal(|parts| caller(&parts.headers))
        .paths(["/orders"])
        // A retry that reorders or reformats the JSON is the same request.
        .fingerprint_fields(["/sku", "/quantity"])
        .build()?;
    let timeout = config.request_timeout;
    let app = App {
        pool: pool.clone(),
        outbox,
        idempotency,
        cache: cache.clone(),
    };
    // Layers run outside in: the rate limit first (a refusal costs one Redis call), then
    // the idempotency middleware, then the request timeout. The timeout sits inside the
    // middleware so that a handler it stops answers 503 there, which the middleware does
    // not store: it releases the key and a retry runs again.
    let router = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .layer(axum::middleware::from_fn(move |req, next| {
            time_limit(timeout, req, next)
        }))
        .layer(idempotency_layer)
        .layer(RateLimiterLayer::new(Arc::new(limiter), HeaderKey::new(CALLER)?).policy(&limit))
        .with_state(app);
    Ok(Service {
        router,
        relay,
        cache,
        stream,
        pool,
    })
}

fn caller(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CALLER)?.to_str().ok()?;
    (!value.is_empty()).then(|| value.to_owned())
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn json(status: StatusCode, order: &Order) -> Response {
    let body = serde_json::to_string(order).unwrap_or_default();
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response();
    if status == StatusCode::CREATED
        && let Ok(location) = HeaderValue::from_str(&format!("/orders/{}", order.id))
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Answers 503 when the handler takes longer than `timeout`.
async fn time_limit(timeout: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Request timed out",
            "the request took too long; retry with the same Idempotency-Key",
        ),
    }
}

/// Reads and checks a new order: a SKU of 1 to 64 visible characters, 1 to 1,000 items.
fn parse(body: &[u8]) -> Result<NewOrder, String> {
    let new: NewOrder = serde_json::from_slice(body)
        .map_err(|e| format!("send {{\"sku\": <string>, \"quantity\": <integer>}}: {e}"))?;
    if new.sku.is_empty() || new.sku.len() > 64 || new.sku.chars().any(char::is_control) {
        return Err("`sku` must be 1 to 64 characters without control characters".into());
    }
    if !(1..=1_000).contains(&new.quantity) {
        return Err("`quantity` must be 1 to 1000".into());
    }
    Ok(new)
}

/// `POST /orders`: inserts the order, enqueues its `order_created` event and completes
/// the idempotency key, all in one transaction: the order, its event and the stored
/// answer commit together or not at all, so a retry either replays this answer or
/// runs again from nothing.
async fn create_order(
    State(app): State<App>,
    claim: RequestClaim,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The middleware refused callers without one (401) before the handler runs.
    let customer = caller(&headers).unwrap_or_default();
    let new = match parse(&body) {
        Ok(new) => new,
        Err(detail) => {
            return problem(StatusCode::UNPROCESSABLE_ENTITY, "Invalid order", &detail);
        }
    };
    match place(&app, &claim, customer, new).await {
        Ok(response) => response,
        Err(e) => {
            eprintln!("orders_service: placing an order failed: {e}");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Order not placed",
                "the order could not be stored; retry with the same Idempotency-Key",
            )
        }
    }
}

async fn place(
    app: &App,
    claim: &RequestClaim,
    customer: String,
    new: NewOrder,
) -> Result<Response, BoxError> {
    let mut tx = app.pool.begin().await?;
    let order: Order = sqlx::query_as::<_, OrderRow>(
        "INSERT INTO orders (customer, sku, quantity) VALUES ($1, $2, $3) \
         RETURNING id::text, customer, sku, quantity",
    )
    .bind(customer)
    .bind(new.sku)
    .bind(new.quantity)
    .fetch_one(&mut *tx)
    .await?
    .into();
    let event = Message::json(
        "order",
        order.id.clone(),
        "order_created",
        serde_json::to_value(&order)?,
    );
    app.outbox.enqueue(&mut tx, event).await?;
    let response = json(StatusCode::CREATED, &order);
    // Stores the answer in `tx` and commits: from here a retry replays it.
    Ok(claim.commit(&app.idempotency, tx, response).await?)
}

/// `GET /orders/{id}`: read through the cache (single-flight on a miss; a missing order
/// is cached as not found for a few seconds).
async fn get_order(State(app): State<App>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return problem(StatusCode::NOT_FOUND, "No such order", "not an order id");
    };
    let pool = app.pool.clone();
    let read = app
        .cache
        .try_get_or_load_optional(&id.to_string(), move || async move {
            sqlx::query_as::<_, OrderRow>(
                "SELECT id::text, customer, sku, quantity FROM orders WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .map(|row| row.map(Order::from))
        })
        .await;
    match read {
        Ok(Some(order)) => json(StatusCode::OK, &order),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "No such order",
            "no order has this id",
        ),
        Err(e) => {
            eprintln!("orders_service: reading order {id} failed: {e}");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Order not read",
                "the order could not be read; retry",
            )
        }
    }
}

/// Serves `router` on `listener` (HTTP/1.1) until `shutdown` completes: a client gets
/// `header_read_timeout` to send its headers, then the server stops accepting, lets the
/// requests in flight finish (at most `shutdown_grace`) and returns.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let builder = builder.http1_only();
    // `stop` tells every connection to finish its request and close; each connection
    // holds a `running` receiver, so `running` closes once the last one ended.
    let (stop, stopping) = watch::channel(false);
    let (running, connection) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    eprintln!("orders_service: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let mut stopping = stopping.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            // A client that went away or was too slow is no error of ours: ignored.
            let stop = tokio::select! {
                _ = conn.as_mut() => false,
                stop = stopping.wait_for(|stop| *stop) => stop.is_ok(),
            };
            if stop {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            drop(connection);
        });
    }
    drop((listener, connection));
    let _ = stop.send(true);
    if tokio::time::timeout(config.shutdown_grace, running.closed())
        .await
        .is_err()
    {
        eprintln!(
            "orders_service: requests still running after {:?}; stopping anyway",
            config.shutdown_grace
        );
    }
}
