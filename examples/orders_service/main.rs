//! An orders REST service on axum, PostgreSQL and Redis: the REST twin of the gRPC
//! `checkout` example, each pattern where a production service would put it.
//!
//! ```text
//! cargo run -p sd-examples --features orders-service --example orders_service -- \
//!     --postgres postgres://postgres@127.0.0.1:5432/postgres \
//!     --redis redis://127.0.0.1:6379 [--addr 127.0.0.1:3000] [--rate 20 --burst 40]
//! curl -i -X POST localhost:3000/orders -H 'X-Api-Key: alice' \
//!     -H 'Idempotency-Key: 2f0c6a52-3c1e-4f0e-9a49-7d1f5d0f4a11' \
//!     -H 'Content-Type: application/json' -d '{"sku":"book-1","quantity":2}'
//! curl -i localhost:3000/orders/<id> -H 'X-Api-Key: alice'
//! redis-cli XRANGE orders:order - +
//! ```
//!
//! - `POST /orders` runs behind sd-idempotency's `IdempotencyLayer` on PostgreSQL (keys
//!   scoped to the caller's `X-Api-Key`). Its handler inserts the order, enqueues the
//!   `order_created` event with sd-outbox's `Outbox::enqueue` and completes the
//!   idempotency key through the `RequestClaim` the middleware hands it, all in one
//!   transaction: a retry with the same key replays the `201` byte for byte
//!   (`Idempotency-Replayed: true`) and never writes a second order or event, even when
//!   the server died right after the commit. The key covers the order's fields (`sku`,
//!   `quantity`), so a reformatted body is the same request, and another order under the
//!   same key gets `422`; a retry while the first still runs, `409` with `Retry-After`.
//! - Every route is rate limited per `X-Api-Key` by sd-ratelimit's tower layer on Redis
//!   (GCRA, `--rate` a second, bursts of `--burst`): over it, `429` with `Retry-After`;
//!   without the header, `400`.
//! - `GET /orders/{id}` reads through sd-cache on Redis (one load per key across
//!   processes, XFetch early refresh), so repeated reads do not reach PostgreSQL.
//! - sd-outbox's relay runs in the background and publishes each committed event to
//!   the Redis stream `{--prefix}:order` (at least once; the entry's `id` is the
//!   consumer's dedupe key).
//!
//! The server gives a client `--header-read-timeout` to send its request headers and a
//! request `--request-timeout` to be answered (then `503`, and the key is released); on
//! Ctrl-C or SIGTERM it stops accepting, lets requests in flight finish and stops the
//! relay. Errors are RFC 9457 `application/problem+json`. It prints the address and the
//! stream at the start, and at the stop how many reads the cache answered and loaded.

mod app;

use std::net::SocketAddr;
use std::time::Duration;

/// The flags.
#[derive(Debug, clap::Parser)]
#[command(name = "orders_service")]
struct Args {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// The PostgreSQL database: orders, their outbox, idempotency keys.
    #[arg(long, value_name = "URL")]
    postgres: String,
    /// The Redis server: rate limits, the order cache, the event stream.
    #[arg(long, value_name = "URL")]
    redis: String,
    /// Requests a second per caller, on average.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: u32,
    /// Requests a caller may send at once.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    burst: u32,
    /// How long an order stays cached, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    cache_ttl: u64,
    /// Seconds a client has to send its request headers.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    header_read_timeout: u64,
    /// Seconds a request may run before it is answered 503.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    request_timeout: u64,
    /// Prefix of the Redis keys and of the event stream.
    #[arg(long, default_value = "orders")]
    prefix: String,
}

/// Completes on Ctrl-C, or on SIGTERM (what a process manager sends) on Unix.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> Result<(), app::BoxError> {
    let args = <Args as clap::Parser>::parse();
    let mut config = app::Config::new(args.redis, args.postgres);
    config.rate = args.rate;
    config.burst = args.burst;
    config.cache_ttl = Duration::from_secs(args.cache_ttl);
    config.header_read_timeout = Duration::from_secs(args.header_read_timeout);
    config.request_timeout = Duration::from_secs(args.request_timeout);
    config.prefix = args.prefix;
    let service = app::start(&config).await?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!(
        "listening on http://{}; events go to the Redis stream {}",
        listener.local_addr()?,
        service.stream
    );
    app::serve(listener, service.router, &config, shutdown_signal()).await;
    // The relay publishes what committed before the stop; what it has not published
    // stays pending in the outbox for the next start.
    service.relay.shutdown().await;
    service.pool.close().await;
    let cache = service.cache.stats();
    println!(
        "stopped; the order cache answered {} reads from Redis and loaded {} from PostgreSQL",
        cache.hits, cache.loads
    );
    Ok(())
}
