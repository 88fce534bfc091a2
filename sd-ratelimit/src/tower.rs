//! Tower middleware, usable from axum and tonic.
//!
//! [`RateLimiterLayer`] extracts a key from each request ([`KeyExtractor`]: client IP,
//! a header, or a closure), asks a [`RateLimiter`] (memory or Redis), and either calls
//! the inner service ([`RateLimiterService`]), adding rate-limit headers to its response,
//! or answers itself:
//!
//! - HTTP: `429 Too Many Requests` with `Retry-After` (whole seconds, at least 1), the
//!   rate-limit headers of the chosen [`HeaderStyle`], and an RFC 9457
//!   `application/problem+json` body (`type`, `title`, `status`, `detail`);
//! - gRPC (`content-type: application/grpc...`): a trailers-only response with
//!   `grpc-status: 8` (`RESOURCE_EXHAUSTED`), `grpc-message` and `retry-after`.
//!
//! A request whose key cannot be extracted (a malformed or spoofed forwarding header)
//! gets `400 Bad Request` (gRPC `INVALID_ARGUMENT`); a limiter error, `503` (gRPC
//! `UNAVAILABLE`), whose body does not repeat the backend's error. Every refusal is
//! logged with `tracing` under the target `sd_ratelimit::tower`: `info` for 400 and 429
//! (the client's doing), `warn` for 503 (the limiter's). An admitted request of a leaky
//! queue waits its `delay` first.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::RateLimiter;
use crate::client_ip::ClientIp;
use crate::error::{Error, Result};

/// The body of the layer's responses: the inner service's body (`Left`), or the layer's
/// own refusal (`Right`: a problem document, or empty for gRPC). It is an
/// `http_body::Body` whenever `B` is one with `Bytes` data, so axum and tonic serve it
/// as they serve `B`.
pub type ResponseBody<B> = Either<B, Full<Bytes>>;

/// Which rate-limit headers to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// IETF `draft-ietf-httpapi-ratelimit-headers`: `RateLimit-Policy: "default";q=..;w=..`
    /// and `RateLimit: "default";r=..;t=..`.
    #[default]
    Ietf,
    /// The common `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    XRateLimit,
    /// Only `Retry-After` on denials.
    None,
}

/// Turns a request into the key it is limited by.
pub trait KeyExtractor<B>: Clone + Send + Sync + 'static {
    /// The key, or why there is none.
    fn extract(&self, req: &Request<B>) -> Result<String>;
}

impl<B, F> KeyExtractor<B> for F
where
    F: Fn(&Request<B>) -> Result<String> + Clone + Send + Sync + 'static,
{
    fn extract(&self, req: &Request<B>) -> Result<String> {
        self(req)
    }
}

/// The TCP peer address of a request, put into its extensions by the server (axum's
/// `ConnectInfo` is mapped with [`ClientIpKey::peer_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Reads the peer from [`PeerAddr`] or a plain `SocketAddr` in the extensions.
fn default_peer(ext: &http::Extensions) -> Option<IpAddr> {
    ext.get::<PeerAddr>()
        .map(|p| p.0.ip())
        .or_else(|| ext.get::<SocketAddr>().map(SocketAddr::ip))
}

/// How [`ClientIpKey`] finds the TCP peer in a request's extensions.
type PeerFn = dyn Fn(&http::Extensions) -> Option<IpAddr> + Send + Sync;

/// Keys requests by client IP, found as [`ClientIp`] says (IPv6 by prefix).
#[derive(Clone)]
pub struct ClientIpKey {
    config: Arc<ClientIp>,
    peer: Arc<PeerFn>,
}

impl std::fmt::Debug for ClientIpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIpKey")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ClientIpKey {
    /// Keys by the client IP that `config` finds.
    pub fn new(config: ClientIp) -> Self {
        ClientIpKey {
            config: Arc::new(config),
            peer: Arc::new(default_peer),
        }
    }

    /// Reads the TCP peer from the request's extensions with `peer`, a function or a
    /// closure that may capture state (for axum:
    /// `|e| e.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())`). It sees the
    /// extensions rather than the request, so one key serves every body type.
    pub fn peer_from(
        mut self,
        peer: impl Fn(&http::Extensions) -> Option<IpAddr> + Send + Sync + 'static,
    ) -> Self {
        self.peer = Arc::new(peer);
        self
    }
}

impl<B> KeyExtractor<B> for ClientIpKey {
    fn extract(&self, req: &Request<B>) -> Result<String> {
        let peer = (self.peer)(req.extensions());
        let values = self
            .config
            .header()
            .map(|h| {
                req.headers()
                    .get_all(h)
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let ip = self.config.resolve(values, peer)?;
        Ok(self.config.key(ip))
    }
}

/// Keys requests by the value of a header (an API key, a user id set by auth).
#[derive(Debug, Clone)]
pub struct HeaderKey {
    name: HeaderName,
    header: &'static str,
}

impl HeaderKey {
    /// Keys by header `name`; requests without it get `400`.
    pub fn new(name: &'static str) -> Result<Self> {
        let parsed = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::config("name", "not a valid header name"))?;
        Ok(HeaderKey {
            name: parsed,
            header: name,
        })
    }
}

impl<B> KeyExtractor<B> for HeaderKey {
    fn extract(&self, req: &Request<B>) -> Result<String> {
        let v = req.headers().get(&self.name).ok_or(Error::MissingHeader {
            header: self.header,
        })?;
        v.to_str()
            .map(str::to_owned)
            .map_err(|_| Error::MalformedHeader {
                header: self.header,
                position: 0,
                reason: "not visible ASCII",
            })
    }
}

/// The layer; see the [module docs](self).
///
/// ```
/// use std::sync::Arc;
/// use sd_ratelimit::{Limit, Quota, memory, client_ip::{ClientIp, Trust}};
/// use sd_ratelimit::tower::{ClientIpKey, RateLimiterLayer};
///
/// let limiter = Arc::new(memory::MemoryLimiterBuilder::new(Limit::gcra(Quota::per_second(10)?)).keyed::<String>()?);
/// let key = ClientIpKey::new(ClientIp::x_forwarded_for(Trust::Hops(1))?);
/// let layer = RateLimiterLayer::new(limiter, key);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RateLimiterLayer<L, E> {
    limiter: Arc<L>,
    extractor: E,
    style: HeaderStyle,
    cost: u32,
    window: Option<u64>,
}

impl<L, E: Clone> Clone for RateLimiterLayer<L, E> {
    fn clone(&self) -> Self {
        RateLimiterLayer {
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            style: self.style,
            cost: self.cost,
            window: self.window,
        }
    }
}

impl<L, E> RateLimiterLayer<L, E> {
    /// Limits every request by the key `extractor` finds, at cost 1, IETF headers.
    pub fn new(limiter: Arc<L>, extractor: E) -> Self {
        RateLimiterLayer {
            limiter,
            extractor,
            style: HeaderStyle::default(),
            cost: 1,
            window: None,
        }
    }

    /// Announces `limit`'s window as `w=` in `RateLimit-Policy` (whole seconds).
    pub fn policy(mut self, limit: &crate::Limit) -> Self {
        self.window = Some(secs(limit.window()).max(1));
        self
    }

    /// Which rate-limit headers to send.
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.style = style;
        self
    }

    /// The cost of each request (default 1).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }
}

impl<S, L, E> tower::Layer<S> for RateLimiterLayer<L, E>
where
    E: Clone,
{
    type Service = RateLimiterService<S, L, E>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimiterService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RateLimiterLayer`] builds. (Not `RateLimiter`, the name of the crate's
/// backend trait, nor tower's own `RateLimit`.)
#[derive(Debug)]
pub struct RateLimiterService<S, L, E> {
    inner: S,
    layer: RateLimiterLayer<L, E>,
}

impl<S: Clone, L, E: Clone> Clone for RateLimiterService<S, L, E> {
    fn clone(&self) -> Self {
        RateLimiterService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, L, E, ReqB, ResB> tower::Service<Request<ReqB>> for RateLimiterService<S, L, E>
where
    S: tower::Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    L: RateLimiter,
    E: KeyExtractor<ReqB>,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The clone is not ready; take the ready one and leave the clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let grpc = is_grpc(req.headers());
        let key = layer.extractor.extract(&req);
        Box::pin(async move {
            let key = match key {
                Ok(k) => k,
                Err(e) => {
                    tracing::info!(status = 400, error = %e, "refused a request: no rate-limit key");
                    return Ok(layer.refuse(grpc, StatusCode::BAD_REQUEST, &e.to_string(), None));
                }
            };
            match layer.limiter.check_key(&key, layer.cost).await {
                Ok(d) if d.allowed => {
                    if !d.delay.is_zero() {
                        tokio::time::sleep(d.delay).await;
                    }
                    let mut resp = inner.call(req).await?.map(Either::Left);
                    write_headers(resp.headers_mut(), &d, layer.style, layer.window);
                    Ok(resp)
                }
                Ok(d) => {
                    tracing::info!(status = 429, %key, retry_after = ?d.retry_after, penalty = d.penalty, "refused a request: rate limited");
                    let what = if d.penalty {
                        "rate limit exceeded, blocked as a penalty"
                    } else {
                        "rate limited"
                    };
                    let secs = secs(d.retry_after).max(1);
                    let detail = format!("{what}; retry after {secs} s");
                    Ok(layer.refuse(grpc, StatusCode::TOO_MANY_REQUESTS, &detail, Some(&d)))
                }
                Err(e @ Error::TooManyKeys { .. }) => {
                    tracing::info!(status = 429, %key, error = %e, "refused a request: rate limiter full");
                    let detail = "rate limiter full; retry later";
                    Ok(layer.refuse(grpc, StatusCode::TOO_MANY_REQUESTS, detail, None))
                }
                Err(e) => {
                    tracing::warn!(status = 503, %key, error = %e, "refused a request: the rate limiter failed");
                    let detail = "the rate limiter could not decide; retry later";
                    Ok(layer.refuse(grpc, StatusCode::SERVICE_UNAVAILABLE, detail, None))
                }
            }
        })
    }
}

impl<L, E> RateLimiterLayer<L, E> {
    /// The layer's own answer to a refused request.
    fn refuse<B>(
        &self,
        grpc: bool,
        status: StatusCode,
        detail: &str,
        decision: Option<&crate::Decision>,
    ) -> Response<ResponseBody<B>> {
        reject(grpc, status, detail, decision, self.style, self.window).map(Either::Right)
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whole seconds, rounded up.
fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn write_headers(h: &mut HeaderMap, d: &crate::Decision, style: HeaderStyle, window: Option<u64>) {
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    match style {
        HeaderStyle::Ietf => {
            let w = window.map(|w| format!(";w={w}")).unwrap_or_default();
            put("ratelimit-policy", format!("\"default\";q={}{w}", d.limit));
            put(
                "ratelimit",
                format!("\"default\";r={};t={}", d.remaining, secs(d.reset_after)),
            );
        }
        HeaderStyle::XRateLimit => {
            put("x-ratelimit-limit", d.limit.to_string());
            put("x-ratelimit-remaining", d.remaining.to_string());
            put("x-ratelimit-reset", secs(d.reset_after).to_string());
        }
        HeaderStyle::None => {}
    }
}

fn reject(
    grpc: bool,
    status: StatusCode,
    message: &str,
    decision: Option<&crate::Decision>,
    style: HeaderStyle,
    window: Option<u64>,
) -> Response<Full<Bytes>> {
    let body = if grpc {
        Bytes::new()
    } else {
        Bytes::from(problem(status, message))
    };
    let mut resp = Response::new(Full::new(body));
    let retry = decision
        .map(|d| secs(d.retry_after).max(1))
        .or_else(|| (status == StatusCode::TOO_MANY_REQUESTS).then_some(1));
    let h = resp.headers_mut();
    if let Some(r) = retry {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(r));
    }
    if let Some(d) = decision {
        write_headers(h, d, style, window);
    }
    if grpc {
        let code: u16 = match status {
            StatusCode::TOO_MANY_REQUESTS => 8, // RESOURCE_EXHAUSTED
            StatusCode::BAD_REQUEST => 3,       // INVALID_ARGUMENT
            _ => 14,                            // UNAVAILABLE
        };
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code));
        let encoded: String = message
            .bytes()
            .map(|b| match b {
                b' '..=b'~' if b != b'%' => char::from(b).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert("grpc-message", v);
        }
    } else {
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        *resp.status_mut() = status;
    }
    resp
}

/// An RFC 9457 problem document: `type` `about:blank` (the status says it all), the
/// status's reason phrase as `title`, and `detail`.
fn problem(status: StatusCode, detail: &str) -> String {
    format!(
        "{{\"type\":\"about:blank\",\"title\":{},\"status\":{},\"detail\":{}}}",
        json_string(status.canonical_reason().unwrap_or("Error")),
        status.as_u16(),
        json_string(detail),
    )
}

/// `s` as a JSON string literal, quoted and escaped (RFC 8259).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_details_are_escaped_json() {
        // Details can carry what a client sent (a header value): it must stay a string.
        assert_eq!(
            problem(StatusCode::BAD_REQUEST, "say \"hi\" \\ to\n\u{1}you"),
            r#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"say \"hi\" \\ to\n\u0001you"}"#
        );
    }
}
