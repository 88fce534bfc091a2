//! An axum server that limits `GET /` per client IP, on memory or on Redis.
//!
//! ```text
//! cargo run -p sd-examples --features ratelimit-server --example ratelimit_server -- \
//!     --addr 127.0.0.1:3000 --rate 5/s --burst 10 [--redis redis://127.0.0.1/] \
//!     [--trusted-hops 1 | --proxy-protocol]
//! curl -i http://127.0.0.1:3000/    # 200 with RateLimit headers, then 429 + Retry-After
//! ```
//!
//! `--trusted-hops N`: N proxies in front append to `X-Forwarded-For`; the client is the
//! N-th address from the right. `--proxy-protocol`: the load balancer in front sends a
//! PROXY v1/v2 header on every connection (HAProxy `send-proxy`, AWS NLB proxy
//! protocol); the client is the header's source, and connections without a valid header
//! are dropped. Without either, the TCP peer is the client and forwarding headers are
//! ignored (a client can write whatever it likes there).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::extract::connect_info::Connected;
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};
use redis::aio::ConnectionManager;
use sd_ratelimit::client_ip::{ClientIp, ProxyListener, Trust};
use sd_ratelimit::memory::KeyedLimiter;
use sd_ratelimit::redis::{FailurePolicy, RedisLimiter};
use sd_ratelimit::tower::{ClientIpKey, RateLimiterLayer};
use sd_ratelimit::{Decision, Limit, Quota, RateLimiter};

/// Memory or Redis, chosen at startup.
#[derive(Debug)]
enum Backend {
    Memory(Box<KeyedLimiter<String>>),
    Redis(Box<RedisLimiter<ConnectionManager>>),
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
    proxy_protocol: bool,
}

/// A listener configured for the PROXY protocol, served by axum.
struct Proxied(ProxyListener);

impl Listener for Proxied {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(conn) => return conn,
                // Out of file descriptors and the like: wait, as axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The client's address: the TCP peer, or the PROXY header's source.
#[derive(Debug, Clone, Copy)]
struct Client(SocketAddr);

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Client {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Client(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, Proxied>> for Client {
    fn connect_info(stream: IncomingStream<'_, Proxied>) -> Self {
        Client(*stream.remote_addr())
    }
}

/// The flags.
#[derive(Debug, clap::Parser)]
#[command(name = "ratelimit_server")]
struct Cli {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// The rate: N/s, N/m or N/h.
    #[arg(long, default_value = "5/s", value_parser = rate)]
    rate: (u32, Duration),
    /// The burst (default: the rate's count).
    #[arg(long)]
    burst: Option<u32>,
    /// Keep the limits on this Redis server instead of in memory.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Take the client from X-Forwarded-For, trusting this many proxies in front.
    #[arg(long, default_value_t = 0, conflicts_with = "proxy_protocol")]
    trusted_hops: usize,
    /// Read a PROXY v1/v2 header on each connection.
    #[arg(long)]
    proxy_protocol: bool,
}

/// `N/s`, `N/m` or `N/h`.
fn rate(s: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("`{s}`: the rate is N/s, N/m or N/h");
    let (n, unit) = s.split_once('/').ok_or_else(bad)?;
    let period = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Ok((n.parse().map_err(|_| bad())?, period))
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let cli = <Cli as clap::Parser>::parse();
    let (count, period) = cli.rate;
    let quota = Quota::new(count, period)?;
    let quota = quota.with_burst(cli.burst.unwrap_or(quota.burst()))?;
    Ok(Args {
        addr: cli.addr,
        quota,
        redis: cli.redis,
        trusted_hops: cli.trusted_hops,
        proxy_protocol: cli.proxy_protocol,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let limit = Limit::gcra(args.quota);
    let backend = match &args.redis {
        None => Backend::Memory(Box::new(
            sd_ratelimit::memory::MemoryLimiterBuilder::new(limit).keyed()?,
        )),
        Some(url) => {
            let conn = redis::Client::open(url.as_str())?
                .get_connection_manager()
                .await?;
            Backend::Redis(Box::new(
                sd_ratelimit::redis::RedisLimiterBuilder::new(limit)
                    .on_failure(FailurePolicy::Open)
                    .build(conn)?,
            ))
        }
    };
    let client_ip = match args.trusted_hops {
        0 => ClientIp::peer(),
        n => ClientIp::x_forwarded_for(Trust::Hops(n))?,
    };
    let peer = |e: &axum::http::Extensions| -> Option<IpAddr> {
        e.get::<ConnectInfo<Client>>().map(|c| c.0.0.ip())
    };
    let key = ClientIpKey::new(client_ip).peer_from(peer);
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .layer(RateLimiterLayer::new(Arc::new(backend), key).policy(&limit));
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!(
        "listening on http://{} ({} per {:?}, burst {}, {})",
        listener.local_addr()?,
        1,
        args.quota.interval(),
        args.quota.burst(),
        args.redis.as_deref().unwrap_or("memory"),
    );
    let make = app.into_make_service_with_connect_info::<Client>();
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if args.proxy_protocol {
        let listener = Proxied(ProxyListener::new(listener, Duration::from_secs(5))?);
        axum::serve(listener, make)
            .with_graceful_shutdown(shutdown)
            .await?;
    } else {
        axum::serve(listener, make)
            .with_graceful_shutdown(shutdown)
            .await?;
    }
    Ok(())
}
