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
//!   the inventory service refuses a stale fencing token) → `charge_card` → `confirm`
//!   (the pivot: the order row and its `OrderPlaced` event through sd-outbox, in one
//!   transaction); a declined card or missing stock compensates in reverse;
//! - relays `OrderPlaced` to two consumers (shipping, email) as sd-pool jobs keyed by
//!   order id; each drops redeliveries by event id.
//!
//! With `--redis URL` (repeatable) the rate limits and idempotency keys live on the first
//! server and sd-hashring shards the cache and lease keys over all of them; with
//! `--postgres URL` the saga log, the orders with their outbox (sd-outbox's relay) and
//! the consumers' inbox live in PostgreSQL. Nothing given: all on memory (the order row
//! and its event committed together through sd-outbox's `MemoryOutbox`, published by its
//! `MemoryRelay`; see `app/events.rs`).
//!
//! The load: 8 clients send 25 orders each at once; every 4th is sent twice with the same
//! key, 3 per client again at the end; every 7th card is declined; every 5th charge
//! attempt times out once; the first 3 publishes of the relay lose their acknowledgement
//! (the consumers got the events; the relay sends them again); the first stock
//! reservation stalls while holding its lease until another order has taken the SKU
//! with a newer token, so the inventory refuses the stale one and the saga retries. The run fails (exit 1) if a promise broke: stock oversold, an
//! order charged twice or not refunded, an event lost or handled twice.

mod app;

use std::process::ExitCode;

fn usage() -> &'static str {
    "usage: checkout [--redis URL]... [--postgres URL] [--clients N] [--orders N] [--quiet]"
}

fn config() -> Result<app::Config, String> {
    let mut config = app::Config::memory();
    config.load.progress = true;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| match v.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(format!("{flag} must be a number from 1 to 1000, not {v}")),
        };
        match flag.as_str() {
            "--redis" => config.redis.push(value()?),
            "--postgres" => config.postgres = Some(value()?),
            "--clients" => config.load.clients = number(value()?)?,
            "--orders" => config.load.orders_per_client = number(value()?)?,
            "--quiet" => config.load.progress = false,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    let orders = config.load.clients * config.load.orders_per_client;
    println!(
        "{} clients send {orders} orders at once to the order service on loopback",
        config.load.clients
    );
    match app::run(&config).await {
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
    }
}
