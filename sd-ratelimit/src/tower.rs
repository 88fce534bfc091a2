//! Tower middleware, usable from axum and tonic.
//!
//! [`RateLimitLayer`] extracts a key from each request ([`KeyExtractor`]: client IP,
//! a header, or a closure), asks a [`RateLimiter`] (memory or Redis), and either calls
//! the inner service, adding rate-limit headers to its response, or answers itself:
//!
//! - HTTP: `429 Too Many Requests` with `Retry-After` (whole seconds, at least 1) and the
//!   rate-limit headers of the chosen [`HeaderStyle`];
//! - gRPC (`content-type: application/grpc...`): a trailers-only response with
//!   `grpc-status: 8` (`RESOURCE_EXHAUSTED`), `grpc-message` and `retry-after`.
//!
//! A request whose key cannot be extracted (a malformed or spoofed forwarding header)
//! gets `400 Bad Request` (gRPC `INVALID_ARGUMENT`); a limiter error, `503` (gRPC
//! `UNAVAILABLE`). An admitted request of a leaky queue waits its `delay` first.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};

use crate::RateLimiter;
use crate::client_ip::ClientIp;
use crate::error::{Error, Result};

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

/// Keys requests by client IP, found as [`ClientIp`] says (IPv6 by prefix).
#[derive(Debug, Clone)]
pub struct ClientIpKey {
    config: Arc<ClientIp>,
    peer: fn(&http::Extensions) -> Option<IpAddr>,
}

impl ClientIpKey {
    /// Keys by the client IP that `config` finds.
    pub fn new(config: ClientIp) -> Self {
        ClientIpKey {
            config: Arc::new(config),
            peer: default_peer,
        }
    }

    /// Reads the TCP peer with `peer` (for axum:
    /// `|e| e.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())`).
    pub fn peer_from(mut self, peer: fn(&http::Extensions) -> Option<IpAddr>) -> Self {
        self.peer = peer;
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
/// use sd_ratelimit::tower::{ClientIpKey, RateLimitLayer};
///
/// let limiter = Arc::new(memory::Builder::new(Limit::gcra(Quota::per_second(10)?)).keyed::<String>()?);
/// let key = ClientIpKey::new(ClientIp::x_forwarded_for(Trust::Hops(1))?);
/// let layer = RateLimitLayer::new(limiter, key);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RateLimitLayer<L, E> {
    limiter: Arc<L>,
    extractor: E,
    style: HeaderStyle,
    cost: u32,
    window: Option<u64>,
}

impl<L, E: Clone> Clone for RateLimitLayer<L, E> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            style: self.style,
            cost: self.cost,
            window: self.window,
        }
    }
}

impl<L, E> RateLimitLayer<L, E> {
    /// Limits every request by the key `extractor` finds, at cost 1, IETF headers.
    pub fn new(limiter: Arc<L>, extractor: E) -> Self {
        RateLimitLayer {
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

impl<S, L, E> tower::Layer<S> for RateLimitLayer<L, E>
where
    E: Clone,
{
    type Service = RateLimit<S, L, E>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] builds.
#[derive(Debug)]
pub struct RateLimit<S, L, E> {
    inner: S,
    layer: RateLimitLayer<L, E>,
}

impl<S: Clone, L, E: Clone> Clone for RateLimit<S, L, E> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, L, E, ReqB, ResB> tower::Service<Request<ReqB>> for RateLimit<S, L, E>
where
    S: tower::Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    L: RateLimiter,
    E: KeyExtractor<ReqB>,
    ReqB: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, S::Error>> + Send>>;

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
                    return Ok(reject(
                        grpc,
                        StatusCode::BAD_REQUEST,
                        &e.to_string(),
                        None,
                        layer.style,
                        layer.window,
                    ));
                }
            };
            match layer.limiter.check_key(&key, layer.cost).await {
                Ok(d) if d.allowed => {
                    if !d.delay.is_zero() {
                        tokio::time::sleep(d.delay).await;
                    }
                    let mut resp = inner.call(req).await?;
                    write_headers(resp.headers_mut(), &d, layer.style, layer.window);
                    Ok(resp)
                }
                Ok(d) => Ok(reject(
                    grpc,
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate limited",
                    Some(&d),
                    layer.style,
                    layer.window,
                )),
                Err(Error::TooManyKeys { .. }) => Ok(reject(
                    grpc,
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate limiter full",
                    None,
                    layer.style,
                    layer.window,
                )),
                Err(e) => Ok(reject(
                    grpc,
                    StatusCode::SERVICE_UNAVAILABLE,
                    &e.to_string(),
                    None,
                    layer.style,
                    layer.window,
                )),
            }
        })
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

fn reject<B: Default>(
    grpc: bool,
    status: StatusCode,
    message: &str,
    decision: Option<&crate::Decision>,
    style: HeaderStyle,
    window: Option<u64>,
) -> Response<B> {
    let mut resp = Response::new(B::default());
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
        *resp.status_mut() = status;
    }
    resp
}
