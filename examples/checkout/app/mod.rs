//! The checkout: three gRPC services on loopback, every sd pattern inside, a load driver
//! and the summary it ends with. Shared by `examples/checkout/main.rs` and
//! `examples/tests/checkout.rs`.

pub(crate) mod admin;
mod backends;
mod driver;
mod events;
mod grpc;
mod order;
mod participants;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use sd_ratelimit::tower::{HeaderKey, RateLimiterLayer};
use sd_ratelimit::{Limit, Quota};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};

use backends::{Catalogue, Picks};
pub(crate) use driver::Load;
use driver::{Driven, SKUS};
use events::{CONSUMERS, Dedupe, Fanout, Orders, Relaying};
pub(crate) use order::PROVIDER_CALLS;
use order::{OrderService, ProviderCap, Steps};
use participants::{Inventory, Payments};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which backends, and the load.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Redis servers: the first holds the rate limits and idempotency keys; the cache and
    /// the stock leases are sharded over all of them with sd-hashring. Empty: memory.
    pub(crate) redis: Vec<String>,
    /// PostgreSQL: the saga log, the orders with their outbox, the consumers' inbox (and
    /// the idempotency keys when no Redis is given). `None`: memory.
    pub(crate) postgres: Option<String>,
    pub(crate) load: Load,
    /// Publishes whose acknowledgement is lost (the events reached the consumers, the
    /// relay sends them again).
    pub(crate) lost_acks: u32,
    /// The first stock reservation stalls past its lease (its token then goes stale).
    pub(crate) stall: bool,
    /// Counts calls to each Redis server (in flight, failed), for fault tests.
    pub(crate) probe: backends::ShardProbe,
}

impl Config {
    /// Memory backends and the default burst: 8 clients x 25 orders.
    pub(crate) fn memory() -> Self {
        Config {
            redis: Vec::new(),
            postgres: None,
            load: Load {
                clients: 8,
                orders_per_client: 25,
                duplicate_every: 4,
                decline_every: 7,
                late_retries: 3,
                progress: false,
            },
            lost_acks: 3,
            stall: true,
            probe: backends::ShardProbe::default(),
        }
    }

    /// The default burst on the Redis servers at `redis` and the PostgreSQL database at
    /// `postgres`.
    #[cfg_attr(not(test), allow(dead_code))] // used by examples/tests/checkout*.rs
    pub(crate) fn on(redis: Vec<String>, postgres: &str) -> Self {
        Config {
            redis,
            postgres: Some(postgres.to_owned()),
            ..Config::memory()
        }
    }
}

/// Units of each SKU in stock at the start, and prices.
const STOCK: u32 = 50;
const PRICES: [u64; 4] = [24_900, 8_900, 3_900, 2_900];
/// Catalogue entries live 1 s, so the burst sees expiries and XFetch refreshes.
const CACHE_TTL: Duration = Duration::from_secs(1);
/// Per client: 40 orders a second, bursts of 6.
const PER_SECOND: u32 = 40;
const BURST: u32 = 6;

/// The running services.
struct Checkout {
    run: String,
    backend: String,
    inventory: Arc<Inventory>,
    payments: Arc<Payments>,
    service: Arc<OrderService>,
    steps: Arc<Steps>,
    /// Leases taken on each Redis server (empty on memory).
    lock_picks: Picks,
    fanout: Fanout,
    relaying: Relaying,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    order_channel: Channel,
}

/// Starts the services, drives the burst, waits for the events and sums up.
pub(crate) async fn run(config: &Config) -> Result<Summary, BoxError> {
    let checkout = start(config).await?;
    let driven = driver::drive(checkout.order_channel.clone(), &config.load).await;
    checkout
        .wait_for_events(&driven, Duration::from_secs(20))
        .await;
    let summary = checkout.summary(&driven).await;
    checkout.stop().await;
    summary
}

async fn start(config: &Config) -> Result<Checkout, BoxError> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let run = format!("r{:x}", nanos & 0xff_ffff_ffff);
    let mut conns = Vec::new();
    for url in &config.redis {
        let client = redis::Client::open(url.as_str())?;
        conns.push(ConnectionManager::new(client).await?);
    }
    let pg = match &config.postgres {
        Some(url) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(20)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?,
        ),
        None => None,
    };
    let backend = match (conns.len(), pg.is_some()) {
        (0, false) => "memory".to_owned(),
        (0, true) => "PostgreSQL (rate limits, cache and leases on memory)".to_owned(),
        (n, false) => format!("Redis x{n} (saga log, orders and outbox on memory)"),
        (n, true) => format!("Redis x{n} + PostgreSQL"),
    };

    // Inventory and payments: one server on loopback.
    let stock: Vec<(&str, u32)> = SKUS.iter().map(|s| (*s, STOCK)).collect();
    let inventory = Inventory::new(&stock);
    let payments = Payments::new(5);
    let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into())?;
    let participants_addr = incoming.local_addr()?;
    let participants = Server::builder()
        .add_service(grpc::Server(inventory.clone()))
        .add_service(grpc::Server(payments.clone()))
        .serve_with_incoming(incoming);
    let mut servers = vec![tokio::spawn(participants)];
    let channel = Endpoint::from_shared(format!("http://{participants_addr}"))?
        .connect()
        .await?;

    // The order service's patterns, each on its backend.
    let limit = Limit::gcra(Quota::per_second(PER_SECOND)?.with_burst(BURST)?);
    let limiter = backends::limiter(&conns, limit, &run)?;
    let prices = SKUS
        .iter()
        .zip(PRICES)
        .map(|(s, p)| ((*s).to_owned(), p))
        .collect();
    let catalogue = Catalogue::new(prices, &conns, &run, CACHE_TTL, &config.probe).await?;
    let (locks, lock_picks) = backends::locks(&conns, &run, &config.probe)?;
    let keys = backends::keys(&conns, pg.as_ref(), &run, Duration::from_secs(5)).await?;
    let (orders, dedupe) = match &pg {
        Some(pool) => (
            Orders::postgres(pool.clone()).await?,
            Dedupe::postgres(pool.clone()).await?,
        ),
        None => (
            Orders::Memory(Arc::default()),
            Dedupe::Memory(Mutex::default()),
        ),
    };
    let fanout = Fanout::new(dedupe, config.lost_acks)?;
    let relaying = orders.relay(fanout.clone())?;
    let steps = Arc::new(Steps {
        channel,
        locks,
        orders,
        stall_once: AtomicBool::new(config.stall),
        inventory: inventory.clone(),
        provider: ProviderCap::new(backends::provider_permits(&conns, &run, PROVIDER_CALLS)?),
    });
    let definition = order::saga(steps.clone())?;
    let owner = format!("checkout-{run}");
    let sagas = backends::sagas(pg.as_ref(), definition, owner).await?;
    let service = Arc::new(OrderService {
        run: run.clone(),
        keys,
        catalogue,
        sagas,
        counters: Default::default(),
    });

    // The order service, behind the per-client rate limit.
    let layer =
        RateLimiterLayer::new(Arc::new(limiter), HeaderKey::new("x-client-id")?).policy(&limit);
    let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into())?;
    let order_addr = incoming.local_addr()?;
    let orders_server = Server::builder()
        .layer(layer)
        .add_service(grpc::Server(service.clone()))
        .serve_with_incoming(incoming);
    servers.push(tokio::spawn(orders_server));
    let order_channel = Endpoint::from_shared(format!("http://{order_addr}"))?
        .connect()
        .await?;
    Ok(Checkout {
        run,
        backend,
        inventory,
        payments,
        service,
        steps,
        lock_picks,
        fanout,
        relaying,
        servers,
        order_channel,
    })
}

impl Checkout {
    /// Waits until every consumer handled the event of every placed order (or `deadline`).
    async fn wait_for_events(&self, driven: &Driven, deadline: Duration) {
        let placed: BTreeSet<&str> = driven
            .replies
            .values()
            .filter(|r| r.placed)
            .map(|r| r.order_id.as_str())
            .collect();
        let started = Instant::now();
        while started.elapsed() < deadline {
            let handled = self.fanout.handled();
            let done = placed.iter().all(|order| {
                CONSUMERS
                    .iter()
                    .all(|c| handled.contains_key(&(*c, (*order).to_owned())))
            });
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.relaying.stop().await;
        self.fanout.drain().await;
        for server in self.servers {
            server.abort();
        }
    }

    /// Counts what happened and checks it against what the services recorded.
    async fn summary(&self, driven: &Driven) -> Result<Summary, BoxError> {
        let mut problems: Vec<String> = driven.errors.clone();
        problems.extend(
            driven
                .mismatched
                .iter()
                .map(|k| format!("{k}: answers differ between sends")),
        );
        let placed: BTreeSet<String> = driven
            .replies
            .values()
            .filter(|r| r.placed)
            .map(|r| r.order_id.clone())
            .collect();
        let failed: BTreeSet<String> = driven
            .replies
            .values()
            .filter(|r| !r.placed)
            .map(|r| r.order_id.clone())
            .collect();
        let out_of_stock = driven
            .replies
            .values()
            .filter(|r| r.reason.contains("out of stock"))
            .count();

        // The order table holds exactly the placed orders.
        let stored: BTreeSet<String> = self
            .steps
            .orders
            .ids(&self.run)
            .await?
            .into_iter()
            .collect();
        if stored != placed {
            problems.push(format!(
                "{} orders stored but {} placed",
                stored.len(),
                placed.len()
            ));
        }
        // Each placed order charged once and kept; each failed one left with nothing.
        let ledger = self.payments.ledger();
        for id in &placed {
            let l = ledger.get(id).copied().unwrap_or_default();
            if l.charged != 1 || l.refunded != 0 {
                problems.push(format!(
                    "{id}: placed, charged {} refunded {}",
                    l.charged, l.refunded
                ));
            }
        }
        for id in &failed {
            let l = ledger.get(id).copied().unwrap_or_default();
            if l.charged != l.refunded {
                problems.push(format!(
                    "{id}: failed, charged {} refunded {}",
                    l.charged, l.refunded
                ));
            }
        }
        // Stock: nothing oversold or lost; only placed orders hold stock.
        let mut stock = Vec::new();
        let mut holders = BTreeSet::new();
        for (sku, s) in self.inventory.snapshot() {
            let initial = self.inventory.initial().get(&sku).copied().unwrap_or(0);
            let held: u32 = s.reserved.values().sum();
            if held > initial || s.available + held != initial {
                problems.push(format!(
                    "{sku}: oversold or lost: {initial} at start, {held} held, {} left",
                    s.available
                ));
            }
            holders.extend(s.reserved.keys().cloned());
            stock.push((sku, initial, held, s.available));
        }
        let holders: BTreeSet<String> = holders
            .into_iter()
            .filter(|o| o.starts_with(&self.run))
            .collect();
        if holders != placed {
            problems.push(format!(
                "{} orders hold stock but {} were placed (a failed order kept its reservation, or a placed one lost it)",
                holders.len(),
                placed.len()
            ));
        }
        // Events: one OrderPlaced per placed order, handled once by each consumer.
        let published = self.fanout.published();
        let mut event_ids: BTreeMap<String, BTreeSet<u128>> = BTreeMap::new();
        for e in published
            .iter()
            .filter(|e| e.aggregate_id.starts_with(&self.run))
        {
            event_ids
                .entry(e.aggregate_id.clone())
                .or_default()
                .insert(e.id.as_u128());
        }
        let events_relayed = event_ids.values().map(BTreeSet::len).sum::<usize>();
        if event_ids.keys().cloned().collect::<BTreeSet<_>>() != placed
            || events_relayed != placed.len()
        {
            problems.push(format!(
                "{events_relayed} OrderPlaced events relayed for {} orders, {} placed",
                event_ids.len(),
                placed.len()
            ));
        }
        let handled = self.fanout.handled();
        let mut deliveries = BTreeMap::new();
        for consumer in CONSUMERS {
            let mine: Vec<(&String, u32)> = handled
                .iter()
                .filter(|((c, o), _)| *c == consumer && o.starts_with(&self.run))
                .map(|((_, o), n)| (o, *n))
                .collect();
            let once = mine
                .iter()
                .filter(|(o, n)| *n == 1 && placed.contains(*o))
                .count();
            if once != placed.len() || mine.len() != placed.len() {
                problems.push(format!(
                    "{consumer} handled {} orders ({once} placed ones exactly once), {} placed",
                    mine.len(),
                    placed.len()
                ));
            }
            deliveries.insert(consumer, once);
        }
        // Every duplicate send was absorbed: answered with the stored result.
        if driven.replayed != driven.duplicates_sent {
            problems.push(format!(
                "{} duplicate sends but {} replayed answers",
                driven.duplicates_sent, driven.replayed
            ));
        }
        // The payment provider never had more calls at once than the cap.
        let provider_peak = self
            .steps
            .provider
            .peak
            .load(std::sync::atomic::Ordering::Relaxed);
        if provider_peak > u64::from(PROVIDER_CALLS) {
            problems.push(format!(
                "{provider_peak} payment calls at once, over the cap of {PROVIDER_CALLS}"
            ));
        }
        let metrics = self.service.sagas.local_metrics();
        let cache = self.service.catalogue.stats();
        let mut shard_keys = self.service.catalogue.picks();
        for (i, n) in self.lock_picks.get().into_iter().enumerate() {
            if let Some(slot) = shard_keys.get_mut(i) {
                *slot += n;
            }
        }
        let counters = &self.service.counters;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        Ok(Summary {
            backend: self.backend.clone(),
            orders: driven.replies.len(),
            placed: placed.len(),
            failed: failed.len(),
            declined: load(&self.payments.declined),
            out_of_stock,
            requests: driven.requests,
            limited: driven.limited,
            duplicates_sent: driven.duplicates_sent,
            duplicates_absorbed: driven.replayed,
            in_flight: driven.in_flight,
            compensated: load(&counters.compensated),
            compensations_run: metrics.compensations_run,
            step_failures: metrics.failed_attempts,
            transient_payment_failures: load(&self.payments.transient_failures),
            events_published: published.len(),
            events_relayed,
            deliveries,
            redeliveries_dropped: self.fanout.redeliveries(),
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_loads: cache.loads,
            early_refreshes: cache.early_refreshes,
            catalogue_queries: load(&self.service.catalogue.queries),
            stock,
            stale_tokens: load(&self.inventory.stale_tokens),
            provider_peak,
            shard_keys,
            elapsed: driven.elapsed,
            problems,
        })
    }
}

/// What the run did, and what broke a promise (`problems`, empty when none did).
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) backend: String,
    /// Distinct orders (keys) answered.
    pub(crate) orders: usize,
    pub(crate) placed: usize,
    /// Orders whose saga compensated (declined card, out of stock).
    pub(crate) failed: usize,
    pub(crate) declined: u64,
    pub(crate) out_of_stock: usize,
    pub(crate) requests: u64,
    pub(crate) limited: u64,
    pub(crate) duplicates_sent: u64,
    pub(crate) duplicates_absorbed: u64,
    pub(crate) in_flight: u64,
    pub(crate) compensated: u64,
    pub(crate) compensations_run: u64,
    pub(crate) step_failures: u64,
    pub(crate) transient_payment_failures: u64,
    pub(crate) events_published: usize,
    pub(crate) events_relayed: usize,
    /// Placed orders each consumer handled exactly once.
    pub(crate) deliveries: BTreeMap<&'static str, usize>,
    pub(crate) redeliveries_dropped: u64,
    pub(crate) cache_hits: u64,
    pub(crate) cache_misses: u64,
    pub(crate) cache_loads: u64,
    pub(crate) early_refreshes: u64,
    pub(crate) catalogue_queries: u64,
    /// (sku, at start, held by placed orders, left).
    pub(crate) stock: Vec<(String, u32, u32, u32)>,
    pub(crate) stale_tokens: u64,
    /// The most calls to the payment provider in flight at once (at most the cap).
    pub(crate) provider_peak: u64,
    /// Per Redis server: catalogue reads plus stock leases taken (empty on memory).
    pub(crate) shard_keys: Vec<u64>,
    pub(crate) elapsed: Duration,
    pub(crate) problems: Vec<String>,
}

impl Summary {
    /// Hits over reads of the catalogue cache.
    pub(crate) fn hit_ratio(&self) -> f64 {
        let reads = self.cache_hits + self.cache_misses;
        if reads == 0 {
            0.0
        } else {
            self.cache_hits as f64 / reads as f64
        }
    }

    /// True when no stock was oversold (or lost).
    pub(crate) fn stock_ok(&self) -> bool {
        self.stock
            .iter()
            .all(|(_, initial, held, left)| held <= initial && held + left == *initial)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, name: &str, value: String| {
            writeln!(f, "| {name:<24} | {value} |")
        };
        writeln!(
            f,
            "checkout on {}, burst driven in {:.2?}\n",
            self.backend, self.elapsed
        )?;
        writeln!(f, "| {:<24} | value |", "")?;
        writeln!(f, "|{}|---|", "-".repeat(26))?;
        row(
            f,
            "orders placed",
            format!(
                "{} of {} ({} not placed)",
                self.placed, self.orders, self.failed
            ),
        )?;
        row(
            f,
            "sagas compensated",
            format!(
                "{} ({} declined cards, {} out of stock; {} compensations run)",
                self.compensated, self.declined, self.out_of_stock, self.compensations_run
            ),
        )?;
        row(
            f,
            "duplicates absorbed",
            format!(
                "{} of {} duplicate sends ({} told to retry while the first ran)",
                self.duplicates_absorbed, self.duplicates_sent, self.in_flight
            ),
        )?;
        row(
            f,
            "requests limited",
            format!(
                "{} of {} calls (RESOURCE_EXHAUSTED, retried)",
                self.limited, self.requests
            ),
        )?;
        row(
            f,
            "payment provider",
            format!(
                "at most {} calls at once (a semaphore of {PROVIDER_CALLS} permits)",
                self.provider_peak
            ),
        )?;
        row(
            f,
            "step retries",
            format!(
                "{} failed attempts ({} payment timeouts injected)",
                self.step_failures, self.transient_payment_failures
            ),
        )?;
        let deliveries: Vec<String> = self
            .deliveries
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        row(
            f,
            "events relayed",
            format!(
                "{} OrderPlaced ({} publishes); handled once by: {}; {} redeliveries dropped",
                self.events_relayed,
                self.events_published,
                deliveries.join(", "),
                self.redeliveries_dropped
            ),
        )?;
        row(
            f,
            "cache hit ratio",
            format!(
                "{:.1}% ({} hits, {} misses, {} loads, {} early XFetch refreshes, {} catalogue queries)",
                self.hit_ratio() * 100.0,
                self.cache_hits,
                self.cache_misses,
                self.cache_loads,
                self.early_refreshes,
                self.catalogue_queries
            ),
        )?;
        let stock: Vec<String> = self
            .stock
            .iter()
            .map(|(sku, initial, held, left)| format!("{sku} {held}+{left}={initial}"))
            .collect();
        row(
            f,
            "stock never oversold",
            format!(
                "{} (sold+left=start: {}; {} stale fencing tokens refused)",
                if self.stock_ok() { "yes" } else { "NO" },
                stock.join(", "),
                self.stale_tokens
            ),
        )?;
        if !self.shard_keys.is_empty() {
            row(
                f,
                "keys per Redis server",
                format!("{:?} (cache + lock keys, by sd-hashring)", self.shard_keys),
            )?;
        }
        if self.problems.is_empty() {
            writeln!(
                f,
                "\nchecked: every placed order charged once, every failed one compensated, every event handled once per consumer"
            )
        } else {
            writeln!(f, "\nPROBLEMS:")?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
            Ok(())
        }
    }
}
