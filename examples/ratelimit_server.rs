//! An axum server that limits `GET /` per client IP, on memory or on Redis.
//!
//! ```text
//! cargo run -p sd-examples --features ratelimit-server --example ratelimit_server -- \
//!     --addr 127.0.0.1:3000 --rate 5/s --burst 10 [--redis redis://127.0.0.1/] [--trusted-hops 1]
//! curl -i http://127.0.0.1:3000/    # 200 with RateLimit headers, then 429 + Retry-After
//! ```
//!
//! `--trusted-hops N`: N proxies in front append to `X-Forwarded-For`; the client is the
//! N-th address from the right. Without it the TCP peer is the client and forwarding
//! headers are ignored (a client can write whatever it likes there).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use redis::aio::ConnectionManager;
use sd_ratelimit::client_ip::{ClientIp, Trust};
use sd_ratelimit::memory::KeyedLimiter;
use sd_ratelimit::redis::{FailurePolicy, RedisLimiter};
use sd_ratelimit::tower::{ClientIpKey, RateLimitLayer};
use sd_ratelimit::{Decision, Limit, Quota, RateLimiter};

/// Memory or Redis, chosen at startup.
#[derive(Debug)]
enum Backend {
    Memory(KeyedLimiter<String>),
    Redis(RedisLimiter<ConnectionManager>),
}

impl RateLimiter for Backend {
    async fn check_key(&self, key: &str, cost: u32) -> sd_ratelimit::Result<Decision> {
        match self {
            Backend::Memory(m) => m.check_n(key, cost),
            Backend::Redis(r) => r.check_n(key, cost).await,
        }
    }
}

#[derive(Debug)]
struct Args {
    addr: SocketAddr,
    quota: Quota,
    redis: Option<String>,
    trusted_hops: usize,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut addr: SocketAddr = "127.0.0.1:3000".parse()?;
    let (mut count, mut period) = (5u32, Duration::from_secs(1));
    let mut burst = None;
    let mut redis = None;
    let mut trusted_hops = 0;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => addr = value()?.parse()?,
            "--rate" => {
                let v = value()?;
                let (n, unit) = v.split_once('/').ok_or("--rate is N/s, N/m or N/h")?;
                count = n.parse()?;
                period = match unit {
                    "s" => Duration::from_secs(1),
                    "m" => Duration::from_secs(60),
                    "h" => Duration::from_secs(3600),
                    _ => return Err("--rate is N/s, N/m or N/h".into()),
                };
            }
            "--burst" => burst = Some(value()?.parse()?),
            "--redis" => redis = Some(value()?),
            "--trusted-hops" => trusted_hops = value()?.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let quota = Quota::new(count, period)?;
    let quota = quota.with_burst(burst.unwrap_or(quota.burst()))?;
    Ok(Args {
        addr,
        quota,
        redis,
        trusted_hops,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let limit = Limit::gcra(args.quota);
    let backend = match &args.redis {
        None => Backend::Memory(sd_ratelimit::memory::Builder::new(limit).keyed()?),
        Some(url) => {
            let conn = redis::Client::open(url.as_str())?
                .get_connection_manager()
                .await?;
            Backend::Redis(
                sd_ratelimit::redis::Builder::new(limit)
                    .on_failure(FailurePolicy::Open)
                    .build(conn)?,
            )
        }
    };
    let client_ip = match args.trusted_hops {
        0 => ClientIp::peer(),
        n => ClientIp::x_forwarded_for(Trust::Hops(n))?,
    };
    let peer = |e: &axum::http::Extensions| -> Option<IpAddr> {
        e.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
    };
    let key = ClientIpKey::new(client_ip).peer_from(peer);
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .layer(RateLimitLayer::new(Arc::new(backend), key).policy(&limit));
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!(
        "listening on http://{} ({} per {:?}, burst {}, {})",
        listener.local_addr()?,
        1,
        args.quota.interval(),
        args.quota.burst(),
        args.redis.as_deref().unwrap_or("memory"),
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
