//! A checkout over gRPC that uses every sd pattern: an order, a payment and an inventory
//! service on tonic, on loopback, and a load driver that ends with a summary table.
//!
//! ```text
//! cargo run -p sd-examples --example checkout --features checkout
//! cargo run -p sd-examples --example checkout --features checkout -- \
//!     --redis redis://127.0.0.1:6379 --redis redis://127.0.0.1:6380 \
//!     --postgres postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! The order service (`sd.checkout.v1.Orders/Place`):
//!
//! - limits each client (`x-client-id`) with the sd-ratelimit tower layer: GCRA, 40 a
//!   second, bursts of 6; over it, `RESOURCE_EXHAUSTED` with `retry-after`;
//! - runs each order once per `idempotency-key` (sd-idempotency `RunOnce`): a duplicate
//!   gets the stored answer (`idempotency-replayed: true`), or `ABORTED` while the first
//!   still runs;
//! - reads prices through sd-cache (single-flight, XFetch early refresh; entries live
//!   1 s so the burst sees them expire);
//! - runs the order as an sd-saga: `reserve_stock` (under an sd-lock lease on the SKU;
//!   the inventory service refuses a stale fencing token) → `charge_card` (each call to
//!   the payment provider holds one of 3 permits of an sd-lock `Semaphore`, so the
//!   provider never sees more than 3 calls at once from every replica) → `confirm`
//!   (the pivot: the order row and its `OrderPlaced` event through sd-outbox, in one
//!   transaction); a declined card or missing stock compensates in reverse;
//! - relays `OrderPlaced` to two consumers (shipping, email) as sd-pool jobs keyed by
//!   order id; each drops redeliveries by event id.
//!
//! With `--redis URL` (repeatable) the rate limits, idempotency keys and the payment
//! provider's permits live on the first server and sd-hashring shards the cache and lease keys over all of them; with
//! `--postgres URL` the saga log, the orders with their outbox (sd-outbox's relay) and
//! the consumers' inbox live in PostgreSQL. Nothing given: all on memory (the order row
//! and its event committed together through sd-outbox's `MemoryOutbox`, published by its
//! `MemoryRelay`; see `app/events.rs`). Each pattern is held as its crate's boxed handle
//! (`BoxLimiter`, `BoxCache`, `BoxLock`, and the idempotency and saga `BoxStore`s), so the
//! flags pick the backends at run time and the service code names one type per pattern;
//! the Redis shards are a backend too (`app/backends.rs`).
//!
//! The load: 8 clients send 25 orders each at once; every 4th is sent twice with the same
//! key, 3 per client again at the end; every 7th card is declined; every 5th charge
//! attempt times out once; the first 3 publishes of the relay lose their acknowledgement
//! (the consumers got the events; the relay sends them again); the first stock
//! reservation stalls while holding its lease until another order has taken the SKU
//! with a newer token, so the inventory refuses the stale one and the saga retries. The run fails (exit 1) if a promise broke: stock oversold, an
//! order charged twice or not refunded, an event lost or handled twice.
//!
//! With `--admin-addr ADDR` (`127.0.0.1:0` for any free port) the checkout installs a
//! Prometheus recorder before it builds anything, prints `admin on http://ADDR: ...`, and
//! serves on that port, during the load and after it until Ctrl-C:
//!
//! - `GET /metrics`: every pattern's metrics (the README's Metrics table) in the
//!   Prometheus text format; dots become underscores, counters end in `_total` and
//!   durations in `_seconds` (`sd.ratelimit.decisions` is `sd_ratelimit_decisions_total`);
//! - `GET /debug/pprof/profile?seconds=N`: a CPU profile of the process over the next N
//!   seconds (1 to 60), as a flamegraph SVG to open in a browser; one at a time (`409`
//!   while another runs), `400` for a missing or bad `seconds`.
//!
//! `grafana-dashboard.json` beside this file charts those metrics (import it and pick a
//! Prometheus datasource):
//!
//! ```text
//! cargo run -p sd-examples --example checkout --features checkout -- --admin-addr 127.0.0.1:9464
//! curl -s 127.0.0.1:9464/metrics | grep sd_saga_sagas_total
//! curl -so checkout.svg '127.0.0.1:9464/debug/pprof/profile?seconds=5'
//! ```

mod app;

use std::net::SocketAddr;
use std::process::ExitCode;

/// The flags.
#[derive(Debug, clap::Parser)]
#[command(name = "checkout")]
struct Args {
    /// A Redis server (repeatable): rate limits and idempotency keys on the first, the
    /// cache and leases sharded over all.
    #[arg(long, value_name = "URL")]
    redis: Vec<String>,
    /// The PostgreSQL database for the saga log, the orders, their outbox and the inbox.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// Clients sending orders at once (1 to 1000).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    clients: Option<u16>,
    /// Orders per client (1 to 1000).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    orders: Option<u16>,
    /// No progress line while the load runs.
    #[arg(long)]
    quiet: bool,
    /// Serve `/metrics` and `/debug/pprof/profile?seconds=N` on this address (port 0:
    /// any free port), and keep serving after the load until Ctrl-C.
    #[arg(long, value_name = "ADDR")]
    admin_addr: Option<SocketAddr>,
}

fn config() -> (app::Config, Option<SocketAddr>) {
    let args = <Args as clap::Parser>::parse();
    let mut config = app::Config::memory();
    config.redis = args.redis;
    config.postgres = args.postgres;
    if let Some(n) = args.clients {
        config.load.clients = usize::from(n);
    }
    if let Some(n) = args.orders {
        config.load.orders_per_client = usize::from(n);
    }
    config.load.progress = !args.quiet;
    (config, args.admin_addr)
}

/// Installs the Prometheus recorder (before any service is built, so every pattern's
/// handles report to it) and starts the admin port.
async fn admin(
    addr: SocketAddr,
) -> Result<app::admin::Admin, Box<dyn std::error::Error + Send + Sync>> {
    let metrics = app::admin::install_recorder()?;
    let admin = app::admin::Admin::start(addr, metrics).await?;
    let addr = admin.addr();
    println!("admin on http://{addr}: /metrics, /debug/pprof/profile?seconds=N");
    Ok(admin)
}

#[tokio::main]
async fn main() -> ExitCode {
    let (config, admin_addr) = config();
    let admin = match admin_addr {
        Some(addr) => match admin(addr).await {
            Ok(admin) => Some(admin),
            Err(e) => {
                eprintln!("checkout failed: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let orders = config.load.clients * config.load.orders_per_client;
    println!(
        "{} clients send {orders} orders at once to the order service on loopback",
        config.load.clients
    );
    let code = match app::run(&config).await {
        Ok(summary) => {
            println!("\n{summary}");
            if summary.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("checkout failed: {e}");
            ExitCode::FAILURE
        }
    };
    if let Some(admin) = admin {
        println!("admin on http://{} until Ctrl-C", admin.addr());
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("checkout: cannot wait for Ctrl-C ({e}); stopping");
        }
    }
    code
}
