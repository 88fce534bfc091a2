//! The tower / axum middleware: the `Idempotency-Key` header of the IETF draft
//! ("The Idempotency-Key HTTP Header Field", draft-ietf-httpapi-idempotency-key-header).
//!
//! For each request whose method (POST and PATCH by default) and path are covered:
//!
//! | situation                                        | answer                                     |
//! |--------------------------------------------------|--------------------------------------------|
//! | no key (and keys are required)                   | 400                                        |
//! | key empty, over 255 characters, not a string, repeated | 400                                  |
//! | no caller identity from the principal extractor  | 401                                        |
//! | body over `max_request_bytes`                    | 413                                        |
//! | first time                                       | the handler runs once                      |
//! | same key, another method, path or body           | 422                                        |
//! | same key while the first still runs              | 409 with `Retry-After`; with [`wait_in_flight`](IdempotencyLayerBuilder::wait_in_flight), the first's response once stored (409 when the wait is over) |
//! | same key after it completed                      | stored status, chosen headers, body byte for byte, `Idempotency-Replayed: true` |
//! | the store fails or times out                     | 503, the handler does not run (fail closed) |
//!
//! Errors are `application/problem+json` (RFC 9457). Keys are scoped to the caller (the
//! principal extractor: tenant, user, API key), so one caller never sees another's
//! response, and bound to the method and path through the fingerprint, a SHA-256 of
//! method, path and query, and the body (or chosen JSON fields of it).
//!
//! Which outcomes are stored is a policy: by default 2xx and 4xx except 408, 409 and 429.
//! An outcome that is not stored releases the key, so a retry runs the handler again.
//! A response whose stored form exceeds `max_response_bytes` is sent to the first caller
//! and a 500 problem is stored in its place, so the handler never runs twice for it.
//!
//! # Completing in the handler's transaction
//!
//! By default the middleware stores the response after the handler returned, in a write
//! of its own. That leaves a window: when the handler's own writes committed and that
//! store then fails (the store went down, or timed out), the caller gets the response
//! but it is not stored. The key stays in flight until `lock_ttl` passes, and a retry
//! after that runs the handler again: a second order, a second event.
//!
//! The handler closes the window by completing the key itself. The middleware puts a
//! [`RequestClaim`] in the request's extensions (axum: an extractor with feature `axum`,
//! `Extension<RequestClaim>` without); with
//! PostgreSQL the handler stores the response it is about to send in the same
//! transaction as its rows ([`RequestClaim::complete_in`] or [`RequestClaim::commit`]),
//! so both commit or neither does, and the middleware then stores nothing:
//!
//! ```ignore
//! async fn create_order(
//!     State(app): State<App>,
//!     claim: RequestClaim, // feature `axum`; else Extension(claim): Extension<RequestClaim>
//!     Json(order): Json<NewOrder>,
//! ) -> Result<Response, AppError> {
//!     let mut tx = app.pool.begin().await?;
//!     let id = insert_order(&mut tx, &order).await?;
//!     app.outbox.enqueue_in(&mut tx, order_created(id)).await?;
//!     let response = (StatusCode::CREATED, Json(OrderView { id })).into_response();
//!     // Stores the response in `tx` and commits; a retry replays it from now on.
//!     Ok(claim.commit(&app.idempotency, tx, response).await?)
//! }
//! ```
//!
//! What each store gives a handler that completes through its claim:
//!
//! | store | completion | the window |
//! |---|---|---|
//! | PostgreSQL, [`RequestClaim::complete_in`] / [`RequestClaim::commit`] | in the handler's transaction | closed: the response commits with the rows, or neither does |
//! | any store, [`RequestClaim::complete`] | one write when the handler calls it | narrowed to the handler's own work after the call; the store and the handler's database are two writes |
//! | any store, the middleware (the handler ignores the claim) | one write after the handler returned | open as described above |
//!
//! When the handler completed through its claim, the middleware sends its response as
//! it is and writes nothing more; after [`RequestClaim::complete_in`] (the
//! handler commits its transaction itself) it asks the store to release the key, which
//! the store refuses when the transaction committed and does when it rolled back, so a
//! retry of a rolled-back request runs at once.
// Without PostgreSQL the transaction methods are not there: their links lead to the
// crate's features.
#![cfg_attr(
    not(feature = "postgres"),
    doc = "",
    doc = "[`RequestClaim::complete_in`]: crate#crate-features",
    doc = "[`RequestClaim::commit`]: crate#crate-features"
)]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName};
use http::{Method, Request, Response, StatusCode};
use sd_core::RetryPolicy;

use crate::error::{Error, Result};
use crate::run_once::{DEFAULT_LOCK_TTL, DEFAULT_RETENTION, heartbeat_lock_ttl};
use crate::store::{Fingerprint, Store, StoredResponse, call_timeout, ttl_ms};

mod claim;
mod handle;
mod problem;

#[cfg(feature = "axum")]
pub use claim::ClaimMissing;
pub use claim::RequestClaim;

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The header set on replayed responses.
pub const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Principal = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;
type Policy = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// What the middleware does when the store fails or does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnStoreFailure {
    /// Answer 503 and do not run the handler (the default).
    #[default]
    FailClosed,
    /// Run the handler without protection, and log a warning.
    FailOpen,
}

/// The default storage policy: 2xx, and 4xx other than 408, 409 and 429 (the ones a
/// retry may change).
pub fn default_store_policy(status: StatusCode) -> bool {
    status.is_success()
        || (status.is_client_error()
            && !matches!(
                status,
                StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
            ))
}

/// Options of an [`IdempotencyLayer`]; [`build`](IdempotencyLayerBuilder::build) checks them.
#[derive(Clone)]
pub struct IdempotencyLayerBuilder<S> {
    store: S,
    config: Config,
}

impl<S> fmt::Debug for IdempotencyLayerBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: Store> IdempotencyLayerBuilder<S> {
    /// Methods covered (default POST and PATCH).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Path prefixes covered (default: every path). Each must start with `/`.
    pub fn paths<P: Into<String>>(mut self, prefixes: impl IntoIterator<Item = P>) -> Self {
        self.config.paths = prefixes.into_iter().map(Into::into).collect();
        self
    }

    /// Whether a covered request without a key is refused with 400 (default true). When
    /// false it runs without protection.
    pub fn require_key(mut self, required: bool) -> Self {
        self.config.require_key = required;
        self
    }

    /// Who the caller is (tenant, user, API key): keys are looked up within it. `None`
    /// answers 401. Without an extractor every caller shares one scope, which is only
    /// safe when one caller uses the service.
    pub fn principal(
        mut self,
        extract: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config.principal = Some(Arc::new(extract));
        self
    }

    /// Fingerprint these JSON fields (JSON pointers such as `/amount`) instead of the
    /// whole body, so a retry that reorders or reformats the JSON is the same request. A
    /// body that is not JSON is fingerprinted whole.
    pub fn fingerprint_fields<P: Into<String>>(
        mut self,
        pointers: impl IntoIterator<Item = P>,
    ) -> Self {
        self.config.fields = Some(pointers.into_iter().map(Into::into).collect());
        self
    }

    /// How long a claim holds without a heartbeat (default 30 s). The middleware extends
    /// it every third while the handler runs, so this is how fast a crashed holder's key
    /// is freed.
    pub fn lock_ttl(mut self, lock_ttl: Duration) -> Self {
        self.config.lock_ttl = lock_ttl;
        self
    }

    /// How long a completed response is replayed (default 24 h).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention = retention;
        self
    }

    /// How long one store call may take before it counts as a failure (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// The largest request body read (default 1 MiB); larger ones get 413.
    pub fn max_request_bytes(mut self, limit: usize) -> Self {
        self.config.max_request_bytes = limit;
        self
    }

    /// The largest stored response (default 1 MiB).
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.config.max_response_bytes = limit;
        self
    }

    /// Response headers stored and replayed (default `content-type` and `location`).
    pub fn replay_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.replay_headers = names.into_iter().collect();
        self
    }

    /// Which response statuses are stored (default [`default_store_policy`]). Others
    /// release the key so a retry runs the handler again.
    pub fn store_policy(
        mut self,
        policy: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.policy = Arc::new(policy);
        self
    }

    /// What to do when the store fails (default [`OnStoreFailure::FailClosed`]).
    pub fn on_store_failure(mut self, mode: OnStoreFailure) -> Self {
        self.config.on_failure = mode;
        self
    }

    /// The largest `Retry-After` sent with a 409 (default 1 s; at least 1 s is sent).
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.config.max_retry_after = max;
        self
    }

    /// Lets a duplicate that arrives while the first request with its key still runs
    /// wait up to `max_wait` for the first one's response, and answer with it (a replay,
    /// `Idempotency-Replayed: true`) instead of 409 at once. Off by default. When
    /// `max_wait` passes first, the answer is 409 with `Retry-After`, as without it.
    ///
    /// The duplicate asks the store again and again ([`Store::poll_claim`]; memory: a
    /// shard lock; Redis: one `EVALSHA`; PostgreSQL: one `SELECT`), 5 ms after it
    /// arrived and then twice as long each time, at most 200 ms apart (each pause
    /// shortened at random by up to half). When the first request does not store its
    /// outcome (a 5xx, which releases the key) or its lock lapses, a waiting duplicate
    /// claims the key and runs the handler, as a retry sent then would. Each waiting
    /// request holds its connection and task: [`build`](Self::build) refuses zero and a
    /// wait longer than `lock_ttl`.
    pub fn wait_in_flight(mut self, max_wait: Duration) -> Self {
        self.config.wait_in_flight = Some(max_wait);
        self
    }

    /// Checks the options.
    pub fn build(mut self) -> Result<IdempotencyLayer<S>> {
        heartbeat_lock_ttl(self.config.lock_ttl)?;
        if let Some(wait) = self.config.wait_in_flight {
            if wait.is_zero() {
                return Err(Error::config(
                    "wait_in_flight",
                    "must be longer than zero; leave it unset to answer 409 at once",
                ));
            }
            if wait > self.config.lock_ttl {
                return Err(Error::config(
                    "wait_in_flight",
                    format!(
                        "must not exceed lock_ttl ({:?}); shorten the wait or raise lock_ttl",
                        self.config.lock_ttl
                    ),
                ));
            }
        }
        self.config.poll = RetryPolicy::builder()
            .initial_interval(FIRST_POLL)
            .multiplier(2.0)
            .max_interval(LAST_POLL)
            .jitter(0.5)
            .unlimited_attempts()
            .build()?;
        ttl_ms("retention", self.config.retention)?;
        call_timeout(self.config.timeout)?;
        if self.config.methods.is_empty() {
            return Err(Error::config("methods", "name at least one method"));
        }
        if self.config.max_request_bytes == 0 {
            return Err(Error::config("max_request_bytes", "must be above zero"));
        }
        if self.config.max_response_bytes < 256 {
            return Err(Error::config(
                "max_response_bytes",
                "must be at least 256 bytes (a stored problem must fit)",
            ));
        }
        if let Some(bad) = self.config.paths.iter().find(|p| !p.starts_with('/')) {
            return Err(Error::config(
                "paths",
                format!("prefix `{bad}` must start with `/`"),
            ));
        }
        let fields = self.config.fields.iter().flatten();
        if let Some(bad) = fields
            .into_iter()
            .find(|p| !p.is_empty() && !p.starts_with('/'))
        {
            return Err(Error::config(
                "fingerprint_fields",
                format!("`{bad}` is not a JSON pointer; write `/{bad}`"),
            ));
        }
        Ok(IdempotencyLayer {
            store: self.store,
            config: Arc::new(self.config),
        })
    }
}

/// The first pause of a duplicate waiting for the request in flight.
const FIRST_POLL: Duration = Duration::from_millis(5);
/// The longest pause between two polls of a waiting duplicate.
const LAST_POLL: Duration = Duration::from_millis(200);

#[derive(Clone)]
struct Config {
    methods: Vec<Method>,
    paths: Vec<String>,
    require_key: bool,
    principal: Option<Principal>,
    fields: Option<Vec<String>>,
    lock_ttl: Duration,
    retention: Duration,
    timeout: Duration,
    max_request_bytes: usize,
    max_response_bytes: usize,
    replay_headers: Vec<HeaderName>,
    policy: Policy,
    on_failure: OnStoreFailure,
    max_retry_after: Duration,
    wait_in_flight: Option<Duration>,
    poll: RetryPolicy,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("methods", &self.methods)
            .field("paths", &self.paths)
            .field("require_key", &self.require_key)
            .field("principal", &self.principal.is_some())
            .field("fields", &self.fields)
            .field("lock_ttl", &self.lock_ttl)
            .field("retention", &self.retention)
            .field("timeout", &self.timeout)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("replay_headers", &self.replay_headers)
            .field("on_failure", &self.on_failure)
            .field("max_retry_after", &self.max_retry_after)
            .field("wait_in_flight", &self.wait_in_flight)
            .finish_non_exhaustive()
    }
}

impl Config {
    fn covers(&self, parts: &http::request::Parts) -> bool {
        self.methods.contains(&parts.method)
            && (self.paths.is_empty()
                || self
                    .paths
                    .iter()
                    .any(|p| parts.uri.path().starts_with(p.as_str())))
    }

    fn fingerprint(&self, parts: &http::request::Parts, body: &[u8]) -> Fingerprint {
        let target = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |pq| pq.as_str());
        let method = parts.method.as_str().as_bytes();
        match self.fields.as_ref().and_then(|f| select_fields(f, body)) {
            Some(selected) => {
                Fingerprint::of_parts([method, target.as_bytes(), b"fields", &selected])
            }
            None => Fingerprint::of_parts([method, target.as_bytes(), b"body", body]),
        }
    }

    /// What is stored for a response: its status, the replayed headers and its body, or
    /// a 500 problem in its place when that exceeds `max_response_bytes`.
    fn stored(
        &self,
        key: &str,
        status: StatusCode,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> StoredResponse {
        let mut stored = StoredResponse::new(status.as_u16(), body.to_vec());
        for name in &self.replay_headers {
            for value in headers.get_all(name) {
                stored
                    .headers
                    .push((name.as_str().to_owned(), value.as_bytes().to_vec()));
            }
        }
        if stored.encoded_len() <= self.max_response_bytes {
            return stored;
        }
        tracing::warn!(
            key,
            size = stored.encoded_len(),
            "response too large to store"
        );
        let problem = problem::Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Response not replayable",
            "the first response was too large to store; use a new key for a new request",
        );
        StoredResponse::new(problem.status.as_u16(), problem.body().to_vec())
            .with_header("content-type", "application/problem+json")
    }
}

/// The chosen JSON fields, canonically encoded, or `None` when the body is not JSON.
fn select_fields(pointers: &[String], body: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let selected: Vec<Option<&serde_json::Value>> =
        pointers.iter().map(|p| value.pointer(p)).collect();
    serde_json::to_vec(&selected).ok()
}

/// A [`tower::Layer`] that runs each keyed request once; see the [module docs](self).
#[derive(Clone)]
pub struct IdempotencyLayer<S> {
    store: S,
    config: Arc<Config>,
}

impl<S> fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer").finish_non_exhaustive()
    }
}

impl<S: Store> IdempotencyLayer<S> {
    /// Options on `store`: POST and PATCH on every path, keys required, one shared scope
    /// (set [`IdempotencyLayerBuilder::principal`]), 30 s lock, 24 h retention, 2 s store timeout, 1 MiB
    /// request and response caps, `content-type` and `location` replayed, fail closed.
    pub fn builder(store: S) -> IdempotencyLayerBuilder<S> {
        IdempotencyLayerBuilder {
            store,
            config: Config {
                methods: vec![Method::POST, Method::PATCH],
                paths: Vec::new(),
                require_key: true,
                principal: None,
                fields: None,
                lock_ttl: DEFAULT_LOCK_TTL,
                retention: DEFAULT_RETENTION,
                timeout: Duration::from_secs(2),
                max_request_bytes: 1 << 20,
                max_response_bytes: 1 << 20,
                replay_headers: vec![CONTENT_TYPE, http::header::LOCATION],
                policy: Arc::new(default_store_policy),
                on_failure: OnStoreFailure::FailClosed,
                max_retry_after: Duration::from_secs(1),
                wait_in_flight: None,
                poll: RetryPolicy::default(),
            },
        }
    }
}

impl<S: Clone, I> tower::Layer<I> for IdempotencyLayer<S> {
    type Service = Idempotency<S, I>;

    fn layer(&self, inner: I) -> Self::Service {
        Idempotency {
            inner,
            store: self.store.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around a handler.
#[derive(Clone)]
pub struct Idempotency<S, I> {
    inner: I,
    store: S,
    config: Arc<Config>,
}

impl<S, I> fmt::Debug for Idempotency<S, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

impl<S, I, ReqB, ResB> tower::Service<Request<ReqB>> for Idempotency<S, I>
where
    S: Store + Clone + 'static,
    I: tower::Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    I::Future: Send,
    I::Error: Send,
    ReqB: http_body::Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = I::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, I::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let store = self.store.clone();
        let config = Arc::clone(&self.config);
        Box::pin(handle::handle(store, config, inner, request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_defaults() {
        assert!(default_store_policy(StatusCode::CREATED));
        assert!(default_store_policy(StatusCode::PAYMENT_REQUIRED));
        assert!(!default_store_policy(StatusCode::CONFLICT));
        assert!(!default_store_policy(StatusCode::TOO_MANY_REQUESTS));
        assert!(!default_store_policy(StatusCode::INTERNAL_SERVER_ERROR));
    }

    #[test]
    fn config_is_checked() {
        let store = crate::MemoryStore::new();
        let err = |b: IdempotencyLayerBuilder<crate::MemoryStore>| match b.build() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let b = || IdempotencyLayer::builder(store.clone());
        assert_eq!(err(b().lock_ttl(Duration::ZERO)), "lock_ttl");
        assert_eq!(err(b().retention(Duration::ZERO)), "retention");
        assert_eq!(err(b().methods([])), "methods");
        assert_eq!(err(b().paths(["payments"])), "paths");
        assert_eq!(
            err(b().fingerprint_fields(["amount"])),
            "fingerprint_fields"
        );
        assert_eq!(err(b().max_response_bytes(10)), "max_response_bytes");
        assert_eq!(err(b().wait_in_flight(Duration::ZERO)), "wait_in_flight");
        let over = b().lock_ttl(Duration::from_secs(5));
        assert_eq!(
            err(over.wait_in_flight(Duration::from_millis(5001))),
            "wait_in_flight"
        );
        assert!(b().wait_in_flight(DEFAULT_LOCK_TTL).build().is_ok());
        assert!(b().build().is_ok());
    }
}
