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
//! | same key while the first still runs              | 409 with `Retry-After`                     |
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

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use crate::error::{Error, Result};
use crate::run_once::{DEFAULT_LOCK_TTL, DEFAULT_RETENTION, heartbeat_lock_ttl, with_heartbeat};
use crate::store::{
    ClaimOutcome, Fingerprint, Store, StoredResponse, call_timeout, ttl_ms, validate_key,
};

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

    /// Checks the options.
    pub fn build(self) -> Result<IdempotencyLayer<S>> {
        heartbeat_lock_ttl(self.config.lock_ttl)?;
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

    fn stored(
        &self,
        status: StatusCode,
        headers: &http::HeaderMap,
        body: &Bytes,
    ) -> StoredResponse {
        let mut stored = StoredResponse::new(status.as_u16(), body.to_vec());
        for name in &self.replay_headers {
            for value in headers.get_all(name) {
                stored
                    .headers
                    .push((name.as_str().to_owned(), value.as_bytes().to_vec()));
            }
        }
        stored
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
        Box::pin(handle(store, config, inner, request))
    }
}

/// A refusal before the handler runs.
struct Problem {
    status: StatusCode,
    title: &'static str,
    detail: String,
    retry_after: Option<u64>,
}

impl Problem {
    fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            title,
            detail: detail.into(),
            retry_after: None,
        }
    }

    fn body(&self) -> Bytes {
        let json = serde_json::json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        Bytes::from(json.to_string())
    }

    fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The key in the header: one header, an RFC 8941 string (`"..."`) or a bare token.
fn read_key(headers: &http::HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad =
        |detail: String| Problem::new(StatusCode::BAD_REQUEST, "Invalid Idempotency-Key", detail);
    if values.next().is_some() {
        return Err(bad("send one Idempotency-Key header, not several".into()));
    }
    let raw = value
        .to_str()
        .map_err(|_| bad("the Idempotency-Key holds bytes outside printable ascii".into()))?;
    let key =
        parse_sf_string(raw).map_err(|reason| bad(format!("the Idempotency-Key {reason}")))?;
    validate_key(&key).map_err(|e| bad(e.to_string()))?;
    Ok(Some(key))
}

/// An RFC 8941 sf-string (`"..."` with `\"` and `\\` escapes), or the value as is when
/// it is not quoted (what most clients send).
fn parse_sf_string(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim_matches(' ');
    let Some(inner) = raw.strip_prefix('"') else {
        return Ok(raw.to_owned());
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                return if chars.next().is_none() {
                    Ok(out)
                } else {
                    Err("has characters after its closing quote")
                };
            }
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return Err("holds an escape other than \\\" or \\\\"),
            },
            c => out.push(c),
        }
    }
    Err("lacks its closing quote")
}

async fn call_store<T>(config: &Config, f: impl Future<Output = Result<T>>) -> Result<T> {
    let span = tracing::debug_span!("idempotency.store");
    sd_core::deadline::timeout(config.timeout, span, f).await?
}

async fn handle<S, I, ReqB, ResB>(
    store: S,
    config: Arc<Config>,
    mut inner: I,
    request: Request<ReqB>,
) -> Result<Response<ResB>, I::Error>
where
    S: Store,
    I: tower::Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: http_body::Body + From<Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + From<Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    if !config.covers(&parts) {
        return inner.call(Request::from_parts(parts, body)).await;
    }
    let key = match read_key(&parts.headers) {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => {
            return Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key required",
                format!(
                    "{} {} requires an Idempotency-Key header",
                    parts.method,
                    parts.uri.path()
                ),
            )
            .into_response());
        }
        Ok(None) => return inner.call(Request::from_parts(parts, body)).await,
        Err(problem) => return Ok(problem.into_response()),
    };
    let scope = match &config.principal {
        None => String::new(),
        Some(extract) => match extract(&parts) {
            Some(scope) => scope,
            None => {
                return Ok(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "Caller unknown",
                    "idempotency keys are kept per caller; authenticate the request",
                )
                .into_response());
            }
        },
    };
    let body = match Limited::new(body, config.max_request_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request too large",
                format!("the body exceeds {} bytes", config.max_request_bytes),
            )
            .into_response());
        }
        Err(e) => {
            return Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "Unreadable body",
                format!("reading the request body failed: {e}"),
            )
            .into_response());
        }
    };
    let fingerprint = config.fingerprint(&parts, &body);
    let claimed = call_store(
        &config,
        store.claim(&scope, &key, &fingerprint, config.lock_ttl),
    )
    .await;
    let claim = match claimed {
        Ok(ClaimOutcome::Claimed(claim)) => claim,
        Ok(ClaimOutcome::InFlight { retry_after }) => {
            let secs = retry_after
                .min(config.max_retry_after)
                .as_secs_f64()
                .ceil()
                .max(1.0) as u64;
            let mut problem = Problem::new(
                StatusCode::CONFLICT,
                "Request in progress",
                "a request with this Idempotency-Key is still running; retry later",
            );
            problem.retry_after = Some(secs);
            return Ok(problem.into_response());
        }
        Ok(ClaimOutcome::Completed(stored)) => return Ok(replay(stored)),
        Ok(ClaimOutcome::Mismatch) => {
            return Ok(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key reused",
                "this Idempotency-Key was used with a different request; send a new key",
            )
            .into_response());
        }
        Err(error) => {
            tracing::warn!(%error, key, "idempotency store failed");
            if config.on_failure == OnStoreFailure::FailOpen && error.is_store_failure() {
                return inner
                    .call(Request::from_parts(parts, ReqB::from(body)))
                    .await;
            }
            return Ok(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store unavailable",
                "the request was not processed; retry with the same Idempotency-Key",
            )
            .into_response());
        }
    };
    let request = Request::from_parts(parts, ReqB::from(body));
    let result = with_heartbeat(&store, &claim, config.lock_ttl, inner.call(request)).await;
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            release(&config, &store, &claim).await;
            return Err(e);
        }
    };
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.map_err(Into::<BoxError>::into);
    let body = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            release(&config, &store, &claim).await;
            return Ok(Problem::new(
                StatusCode::BAD_GATEWAY,
                "Response failed",
                format!("the handler's response body failed: {error}"),
            )
            .into_response());
        }
    };
    if (config.policy)(parts.status) {
        let mut stored = config.stored(parts.status, &parts.headers, &body);
        if stored.encoded_len() > config.max_response_bytes {
            tracing::warn!(
                key,
                size = stored.encoded_len(),
                "response too large to store"
            );
            let problem = Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Response not replayable",
                "the first response was too large to store; use a new key for a new request",
            );
            stored = StoredResponse::new(problem.status.as_u16(), problem.body().to_vec())
                .with_header("content-type", "application/problem+json");
        }
        let done = call_store(&config, store.complete(&claim, &stored, config.retention)).await;
        if let Err(error) = done {
            tracing::warn!(%error, key, "the response was not stored; a retry may run again");
        }
    } else {
        release(&config, &store, &claim).await;
    }
    Ok(Response::from_parts(parts, ResB::from(body)))
}

async fn release<S: Store>(config: &Config, store: &S, claim: &crate::Claim) {
    if let Err(error) = call_store(config, store.release(claim)).await {
        tracing::warn!(%error, key = claim.key(), "releasing the key failed; it frees when the lock expires");
    }
}

/// The stored response with `Idempotency-Replayed: true`.
fn replay<B: From<Bytes>>(stored: StoredResponse) -> Response<B> {
    let mut response = Response::new(B::from(Bytes::from(stored.body)));
    *response.status_mut() =
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value))
        {
            headers.append(name, value);
        }
    }
    headers.insert(IDEMPOTENCY_REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sf_strings() {
        assert_eq!(parse_sf_string("\"abc\"").ok(), Some("abc".to_owned()));
        assert_eq!(parse_sf_string("\"a\\\"b\"").ok(), Some("a\"b".to_owned()));
        assert_eq!(
            parse_sf_string("plain-uuid").ok(),
            Some("plain-uuid".to_owned())
        );
        assert!(parse_sf_string("\"open").is_err());
        assert!(parse_sf_string("\"a\"b").is_err());
        assert!(parse_sf_string("\"a\\nb\"").is_err());
    }

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
        assert!(b().build().is_ok());
    }
}
