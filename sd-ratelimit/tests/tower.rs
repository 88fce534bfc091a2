//! The tower layer: 429 with Retry-After and rate-limit headers, RFC 9457 problem bodies
//! for every refusal, gRPC RESOURCE_EXHAUSTED, spoofed forwarding headers, custom keys.
#![cfg(feature = "tower")]
#![allow(clippy::unwrap_used)] // Tests may unwrap (helpers outside #[test] included).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use sd_ratelimit::client_ip::{ClientIp, Trust};
use sd_ratelimit::memory::{self, KeyedLimiter, ManualClock};
use sd_ratelimit::tower::{
    ClientIpKey, HeaderKey, HeaderStyle, KeyExtractor, PeerAddr, RateLimiterLayer, ResponseBody,
};
use sd_ratelimit::{Limit, Quota};
use tower::{Layer, Service, ServiceExt};

fn limiter(per_second: u32, burst: u32) -> Arc<KeyedLimiter<String, ManualClock>> {
    let limit = Limit::gcra(
        Quota::per_second(per_second)
            .unwrap()
            .with_burst(burst)
            .unwrap(),
    );
    Arc::new(
        memory::MemoryLimiterBuilder::new(limit)
            .clock(ManualClock::new())
            .keyed()
            .unwrap(),
    )
}

type Body = ResponseBody<String>;

fn app<E: KeyExtractor<String>>(
    layer: RateLimiterLayer<KeyedLimiter<String, ManualClock>, E>,
) -> impl Service<Request<String>, Response = Response<Body>, Error = Infallible> + Clone {
    layer.layer(tower::service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(Response::new("hello".to_string()))
    }))
}

/// Sends `req` through a clone of `svc`.
async fn send<S>(svc: &S, req: Request<String>) -> Response<Body>
where
    S: Service<Request<String>, Response = Response<Body>, Error = Infallible> + Clone,
{
    svc.clone().oneshot(req).await.unwrap()
}

fn request(xff: &str, peer: &str) -> Request<String> {
    let mut req = Request::builder()
        .uri("/")
        .header("x-forwarded-for", xff)
        .body(String::new())
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
    req
}

#[tokio::test]
async fn denies_with_429_retry_after_and_ietf_headers() {
    let key = ClientIpKey::new(ClientIp::x_forwarded_for(Trust::Hops(1)).unwrap());
    let svc = app(RateLimiterLayer::new(limiter(2, 2), key)
        .policy(&Limit::gcra(Quota::per_second(2).unwrap())));
    for remaining in [1, 0] {
        let resp = send(&svc, request("1.1.1.1", "10.0.0.1:5000")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["ratelimit-policy"], "\"default\";q=2;w=1");
        assert_eq!(
            resp.headers()["ratelimit"],
            format!("\"default\";r={remaining};t=1").as_str()
        );
    }
    let resp = send(&svc, request("1.1.1.1", "10.0.0.1:5000")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    // A client that rotates a spoofed left entry is still the same client.
    let resp = send(&svc, request("9.9.9.9, 1.1.1.1", "10.0.0.1:5000")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another client is not affected.
    let resp = send(&svc, request("2.2.2.2", "10.0.0.1:5000")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // A malformed header is a 400, not a panic and not a free pass.
    let resp = send(&svc, request("1.1.1.1, garbage", "10.0.0.1:5000")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn trusted_proxies_ignore_headers_from_direct_clients() {
    let trust = Trust::Proxies(vec!["10.0.0.0/8".parse().unwrap()]);
    let key = ClientIpKey::new(ClientIp::x_forwarded_for(trust).unwrap());
    let svc = app(RateLimiterLayer::new(limiter(1, 1), key).headers(HeaderStyle::XRateLimit));
    // A direct client rotating X-Forwarded-For is keyed by its own address.
    let first = send(&svc, request("1.1.1.1", "8.8.8.8:1")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-ratelimit-limit"], "1");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "0");
    let second = send(&svc, request("2.2.2.2", "8.8.8.8:1")).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.headers()["x-ratelimit-remaining"], "0");
}

#[tokio::test]
async fn grpc_gets_resource_exhausted() {
    let key = HeaderKey::new("x-api-key").unwrap();
    let svc = app(RateLimiterLayer::new(limiter(1, 1), key));
    let grpc = || {
        Request::builder()
            .header("content-type", "application/grpc+proto")
            .header("x-api-key", "k1")
            .body(String::new())
            .unwrap()
    };
    assert_eq!(send(&svc, grpc()).await.status(), StatusCode::OK);
    let resp = send(&svc, grpc()).await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "gRPC errors travel in grpc-status"
    );
    assert_eq!(resp.headers()["grpc-status"], "8");
    assert_eq!(
        resp.headers()["grpc-message"],
        "rate limited; retry after 1 s"
    );
    assert_eq!(resp.headers()["retry-after"], "1");
    // No key header: INVALID_ARGUMENT.
    let no_key = Request::builder()
        .header("content-type", "application/grpc")
        .body(String::new())
        .unwrap();
    assert_eq!(send(&svc, no_key).await.headers()["grpc-status"], "3");
}

#[tokio::test]
async fn closures_extract_keys() {
    let by_path = |req: &Request<String>| Ok(req.uri().path().to_owned());
    let svc = app(RateLimiterLayer::new(limiter(1, 1), by_path).headers(HeaderStyle::None));
    let get = |p: &str| Request::builder().uri(p).body(String::new()).unwrap();
    assert_eq!(send(&svc, get("/a")).await.status(), StatusCode::OK);
    assert_eq!(send(&svc, get("/b")).await.status(), StatusCode::OK);
    let denied = send(&svc, get("/a")).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(denied.headers().get("ratelimit").is_none());
}

/// The refusal's status, content type and problem document.
async fn problem(resp: Response<Body>) -> (StatusCode, String, String) {
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn a_request_without_a_key_gets_a_400_problem() {
    let key = HeaderKey::new("x-api-key").unwrap();
    let svc = app(RateLimiterLayer::new(limiter(1, 1), key));
    let resp = svc.oneshot(Request::new(String::new())).await.unwrap();
    assert_eq!(
        problem(resp).await,
        (
            StatusCode::BAD_REQUEST,
            "application/problem+json".to_owned(),
            r#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"header `x-api-key` is missing; check that the proxy in front sets it"}"#.to_owned()
        )
    );
}

#[tokio::test]
async fn a_limited_request_gets_a_429_problem_with_its_headers() {
    let key = HeaderKey::new("x-api-key").unwrap();
    let svc = app(RateLimiterLayer::new(limiter(1, 1), key).headers(HeaderStyle::XRateLimit));
    let get = || {
        Request::builder()
            .header("x-api-key", "k1")
            .body(String::new())
            .unwrap()
    };
    assert_eq!(send(&svc, get()).await.status(), StatusCode::OK);
    let resp = send(&svc, get()).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(
        problem(resp).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            "application/problem+json".to_owned(),
            r#"{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"rate limited; retry after 1 s"}"#.to_owned()
        )
    );
}

#[tokio::test]
async fn a_failing_limiter_gets_a_503_problem_that_hides_the_error() {
    // A cost the burst can never hold is an error from the limiter, not a denial.
    let key = HeaderKey::new("x-api-key").unwrap();
    let svc = app(RateLimiterLayer::new(limiter(1, 1), key).cost(2));
    let req = Request::builder()
        .header("x-api-key", "k1")
        .body(String::new())
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    assert_eq!(
        problem(resp).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/problem+json".to_owned(),
            r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"the rate limiter could not decide; retry later"}"#.to_owned()
        )
    );
}

#[tokio::test]
async fn peer_from_takes_a_closure_with_state() {
    // The closure captures the address to report (a test stand-in for axum's ConnectInfo).
    let peer: std::net::IpAddr = "192.0.2.9".parse().unwrap();
    let key = ClientIpKey::new(ClientIp::peer()).peer_from(move |_| Some(peer));
    assert_eq!(
        KeyExtractor::<String>::extract(&key, &Request::new(String::new())).unwrap(),
        "192.0.2.9"
    );
}
