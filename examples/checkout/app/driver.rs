//! The load driver: a burst of orders from several clients at once, with retries
//! (rate-limited and in-flight answers are retried with the same key), duplicate sends
//! of the same key, and cards the payment service declines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::grpc::{OrderReply, PLACE, PlaceOrder, unary};
use super::participants::lock;

/// The shape of the burst.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    /// Clients (each limited on its own).
    pub(crate) clients: usize,
    /// Orders each client sends, all at once.
    pub(crate) orders_per_client: usize,
    /// Every n-th order is sent twice at once with the same key.
    pub(crate) duplicate_every: usize,
    /// Every n-th order pays with a card the payment service declines.
    pub(crate) decline_every: usize,
    /// Orders per client sent once more at the end, with their keys (late retries).
    pub(crate) late_retries: usize,
    /// Print a progress line while it runs.
    pub(crate) progress: bool,
}

/// The SKUs the clients order, in turn.
pub(crate) const SKUS: [&str; 4] = ["espresso-machine", "grinder", "kettle", "scale"];

/// What the driver saw.
#[derive(Debug, Default)]
pub(crate) struct Driven {
    /// The answer per `client/key`.
    pub(crate) replies: BTreeMap<String, OrderReply>,
    /// gRPC calls made (retries included).
    pub(crate) requests: u64,
    /// Calls answered `RESOURCE_EXHAUSTED` (then retried).
    pub(crate) limited: u64,
    /// Calls answered `ABORTED`: the key's first call was still running (then retried).
    pub(crate) in_flight: u64,
    /// Sends of a key that had been sent before.
    pub(crate) duplicates_sent: u64,
    /// Answers marked `idempotency-replayed`.
    pub(crate) replayed: u64,
    /// Keys whose answers differed between sends.
    pub(crate) mismatched: Vec<String>,
    /// Sends that ended in an error other than the retried ones.
    pub(crate) errors: Vec<String>,
    pub(crate) elapsed: Duration,
}

#[derive(Debug, Default)]
struct Shared {
    requests: AtomicU64,
    limited: AtomicU64,
    in_flight: AtomicU64,
    replayed: AtomicU64,
    answered: AtomicU64,
    placed: AtomicU64,
    answers: Mutex<Vec<(String, Result<OrderReply, String>)>>,
}

/// One order of the burst: client `c`, order `i`.
fn order(load: &Load, c: usize, i: usize) -> (String, String, PlaceOrder) {
    let n = c * load.orders_per_client + i;
    let declined = load.decline_every > 0 && n % load.decline_every == load.decline_every - 1;
    let order = PlaceOrder {
        sku: SKUS[(c + i) % SKUS.len()].to_owned(),
        quantity: 1 + (i % 2) as u32,
        card: if declined { "declined" } else { "visa" }.to_owned(),
    };
    (format!("client-{c}"), format!("key-{i}"), order)
}

/// Sends the burst to the order service at `channel` and waits for every answer.
pub(crate) async fn drive(channel: Channel, load: &Load) -> Driven {
    let started = Instant::now();
    let shared = Arc::new(Shared::default());
    let mut sends = tokio::task::JoinSet::new();
    let mut duplicates = 0;
    let mut total = 0;
    for c in 0..load.clients {
        for i in 0..load.orders_per_client {
            let copies = if load.duplicate_every > 0 && i % load.duplicate_every == 1 {
                2
            } else {
                1
            };
            duplicates += copies - 1;
            total += copies;
            for _ in 0..copies {
                let (client, key, order) = order(load, c, i);
                let (channel, shared) = (channel.clone(), shared.clone());
                sends.spawn(async move { send(&channel, &shared, client, key, order).await });
            }
        }
    }
    let total = total + load.clients * load.late_retries.min(load.orders_per_client);
    let progress = load
        .progress
        .then(|| tokio::spawn(progress(shared.clone(), total)));
    while sends.join_next().await.is_some() {}
    // Late retries: a client that lost its answers sends the same keys again.
    for c in 0..load.clients {
        for i in 0..load.late_retries.min(load.orders_per_client) {
            let (client, key, order) = order(load, c, i);
            duplicates += 1;
            send(&channel, &shared, client, key, order).await;
        }
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let mut driven = Driven {
        requests: shared.requests.load(Ordering::Relaxed),
        limited: shared.limited.load(Ordering::Relaxed),
        in_flight: shared.in_flight.load(Ordering::Relaxed),
        replayed: shared.replayed.load(Ordering::Relaxed),
        duplicates_sent: duplicates as u64,
        elapsed: started.elapsed(),
        ..Driven::default()
    };
    for (id, answer) in std::mem::take(&mut *lock(&shared.answers)) {
        match answer {
            Ok(reply) => {
                if let Some(first) = driven.replies.get(&id) {
                    if first != &reply {
                        driven.mismatched.push(id);
                    }
                } else {
                    driven.replies.insert(id, reply);
                }
            }
            Err(e) => driven.errors.push(format!("{id}: {e}")),
        }
    }
    driven
}

/// Sends one order until it gets an answer: waits out `RESOURCE_EXHAUSTED` (the layer's
/// `retry-after` is in whole seconds; the driver waits at most 100 ms to keep the demo
/// short) and `ABORTED` (the key's first call still runs).
async fn send(channel: &Channel, shared: &Shared, client: String, key: String, order: PlaceOrder) {
    let id = format!("{client}/{key}");
    let mut answer = Err("gave up after 200 attempts".to_owned());
    for attempt in 0..200u64 {
        let mut request = Request::new(order.clone());
        let md = request.metadata_mut();
        match (client.parse(), key.parse()) {
            (Ok(c), Ok(k)) => {
                md.insert("x-client-id", c);
                md.insert("idempotency-key", k);
            }
            _ => {
                answer = Err("client or key is not ascii".to_owned());
                break;
            }
        }
        shared.requests.fetch_add(1, Ordering::Relaxed);
        // A little spread so retries of one client do not arrive in lockstep.
        let spread = Duration::from_millis((attempt * 7 + key.len() as u64 * 13) % 40);
        match unary::<PlaceOrder, OrderReply>(channel, PLACE, request).await {
            Ok(response) => {
                let replayed = response.metadata().get("idempotency-replayed").is_some();
                if replayed {
                    shared.replayed.fetch_add(1, Ordering::Relaxed);
                }
                let reply = response.into_inner();
                if reply.placed && !replayed {
                    shared.placed.fetch_add(1, Ordering::Relaxed);
                }
                answer = Ok(reply);
                break;
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                shared.limited.fetch_add(1, Ordering::Relaxed);
                let wait = hint(&s, "retry-after", 1000).min(Duration::from_millis(100));
                tokio::time::sleep(wait + spread).await;
            }
            Err(s) if s.code() == Code::Aborted => {
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                let wait = hint(&s, "retry-after-ms", 1).min(Duration::from_millis(50));
                tokio::time::sleep(wait + spread).await;
            }
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50) + spread).await;
            }
            Err(s) => {
                answer = Err(format!("{:?}: {}", s.code(), s.message()));
                break;
            }
        }
    }
    shared.answered.fetch_add(1, Ordering::Relaxed);
    lock(&shared.answers).push((id, answer));
}

/// A wait hint from the status metadata, `unit_ms` per unit.
fn hint(status: &Status, name: &str, unit_ms: u64) -> Duration {
    let units = status
        .metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_millis(units.saturating_mul(unit_ms))
}

async fn progress(shared: Arc<Shared>, total: usize) {
    loop {
        eprint!(
            "\r  answered {}/{total}  placed {}  calls {}  limited {}  in flight {}  replayed {}   ",
            shared.answered.load(Ordering::Relaxed),
            shared.placed.load(Ordering::Relaxed),
            shared.requests.load(Ordering::Relaxed),
            shared.limited.load(Ordering::Relaxed),
            shared.in_flight.load(Ordering::Relaxed),
            shared.replayed.load(Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
