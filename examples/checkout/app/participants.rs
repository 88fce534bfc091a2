//! The inventory and payment services: each serves a saga step's idempotency key once
//! (a repeat gets the first answer), and the inventory refuses a stale fencing token.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sd_lock::FencingToken;
use sd_lock::fence::FencedRegister;
use tonic::codegen::BoxFuture;
use tonic::{Request, Response, Status};

use super::grpc::{Ack, ChargeRequest, Rpc, StockRequest};

/// One SKU's stock: what is left, and what each order holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stock {
    pub(crate) available: u32,
    pub(crate) reserved: BTreeMap<String, u32>,
}

/// The inventory service. Every change to a SKU's stock goes through a register fenced
/// by the token of the order service's lease on that SKU: a holder whose lease expired
/// (and whose token is older than the newest one seen) is refused.
#[derive(Debug)]
pub(crate) struct Inventory {
    initial: BTreeMap<String, u32>,
    stock: HashMap<String, FencedRegister<Stock>>,
    served: Served,
    pub(crate) stale_tokens: AtomicU64,
}

impl Inventory {
    pub(crate) fn new(initial: &[(&str, u32)]) -> Arc<Self> {
        let stock = initial
            .iter()
            .map(|(sku, n)| {
                let stock = Stock {
                    available: *n,
                    reserved: BTreeMap::new(),
                };
                ((*sku).to_owned(), FencedRegister::new(stock))
            })
            .collect();
        Arc::new(Inventory {
            initial: initial.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect(),
            stock,
            served: Served::default(),
            stale_tokens: AtomicU64::new(0),
        })
    }

    /// The stock each SKU started with.
    pub(crate) fn initial(&self) -> &BTreeMap<String, u32> {
        &self.initial
    }

    /// The newest fencing token the stock of `sku` has seen.
    pub(crate) fn last_token(&self, sku: &str) -> Option<FencingToken> {
        self.stock.get(sku).and_then(FencedRegister::last_token)
    }

    /// Each SKU's stock now.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, Stock> {
        self.stock
            .iter()
            .map(|(sku, r)| (sku.clone(), r.peek()))
            .collect()
    }

    fn serve(&self, method: &str, r: StockRequest) -> Result<Ack, Status> {
        let id = format!("{}-{}", method.to_lowercase(), r.order_id);
        self.served
            .once(&r.idempotency_key, id, || self.change(method, &r))
    }

    fn change(&self, method: &str, r: &StockRequest) -> Result<(), Status> {
        let register = self
            .stock
            .get(&r.sku)
            .ok_or_else(|| Status::not_found(format!("no sku {}", r.sku)))?;
        let token = FencingToken(r.fencing_token);
        let order = r.order_id.clone();
        let changed = match method {
            "Reserve" => register.update(token, |s| {
                if s.available < r.quantity {
                    return Err(Status::failed_precondition(format!(
                        "out of stock: {} left of {}",
                        s.available, r.sku
                    )));
                }
                s.available -= r.quantity;
                s.reserved.insert(order, r.quantity);
                Ok(())
            }),
            "Release" => register.update(token, |s| {
                if let Some(n) = s.reserved.remove(&order) {
                    s.available += n;
                }
                Ok(())
            }),
            other => return Err(Status::unimplemented(format!("no method {other}"))),
        };
        match changed {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => return Err(refused),
            Err(stale) => {
                self.stale_tokens.fetch_add(1, Ordering::Relaxed);
                // The caller's lease is gone: it may take a new one and try again.
                return Err(Status::aborted(stale.to_string()));
            }
        }
        Ok(())
    }
}

/// Charges and refunds per order, as the payment service's ledger has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    pub(crate) charged: u32,
    pub(crate) refunded: u32,
}

/// The payment service: declines the card `declined`; answers `UNAVAILABLE` to the first
/// charge attempt of every `flaky_every`-th order (a transient fault the saga retries).
#[derive(Debug)]
pub(crate) struct Payments {
    flaky_every: u64,
    served: Served,
    ledger: Mutex<BTreeMap<String, Ledger>>,
    attempts: AtomicU64,
    pub(crate) transient_failures: AtomicU64,
    pub(crate) declined: AtomicU64,
}

impl Payments {
    pub(crate) fn new(flaky_every: u64) -> Arc<Self> {
        Arc::new(Payments {
            flaky_every,
            served: Served::default(),
            ledger: Mutex::default(),
            attempts: AtomicU64::new(0),
            transient_failures: AtomicU64::new(0),
            declined: AtomicU64::new(0),
        })
    }

    /// Charges and refunds per order id.
    pub(crate) fn ledger(&self) -> BTreeMap<String, Ledger> {
        lock(&self.ledger).clone()
    }

    fn serve(&self, method: &str, r: ChargeRequest) -> Result<Ack, Status> {
        let id = format!("{}-{}", method.to_lowercase(), r.order_id);
        self.served
            .once(&r.idempotency_key, id, || self.book(method, &r))
    }

    fn book(&self, method: &str, r: &ChargeRequest) -> Result<(), Status> {
        let mut ledger = lock(&self.ledger);
        let entry = ledger.entry(r.order_id.clone()).or_default();
        match method {
            "Charge" => {
                let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
                if self.flaky_every > 0 && n.is_multiple_of(self.flaky_every) {
                    self.transient_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(Status::unavailable("card network timeout"));
                }
                if r.card == "declined" {
                    self.declined.fetch_add(1, Ordering::Relaxed);
                    return Err(Status::failed_precondition("card declined"));
                }
                entry.charged += 1;
            }
            "Refund" => {
                if entry.charged > entry.refunded {
                    entry.refunded += 1;
                }
            }
            other => return Err(Status::unimplemented(format!("no method {other}"))),
        }
        Ok(())
    }
}

/// Serves each participant over gRPC as the service `$name`: every method's request
/// goes to its `serve`, answered at once with an [`Ack`].
macro_rules! participant_rpc {
    ($($t:ty: $name:literal, $req:ty);*) => {$(
        impl Rpc for $t {
            const NAME: &'static str = $name;
            type Req = $req;
            type Reply = Ack;

            fn handle(
                self: Arc<Self>,
                method: String,
                request: Request<$req>,
            ) -> BoxFuture<Response<Ack>, Status> {
                let result = self.serve(&method, request.into_inner()).map(Response::new);
                Box::pin(async move { result })
            }
        }
    )*};
}
participant_rpc!(
    Inventory: "sd.checkout.v1.Inventory", StockRequest;
    Payments: "sd.checkout.v1.Payments", ChargeRequest
);

/// The answers a participant gave, by step idempotency key: each key's effect runs once.
#[derive(Debug, Default)]
struct Served(Mutex<HashMap<String, Ack>>);

impl Served {
    /// Runs `effect` unless `key` was served; a repeat gets the first answer, marked replayed.
    fn once(
        &self,
        key: &str,
        id: String,
        effect: impl FnOnce() -> Result<(), Status>,
    ) -> Result<Ack, Status> {
        let mut served = lock(&self.0);
        if let Some(ack) = served.get(key) {
            return Ok(Ack {
                replayed: true,
                ..ack.clone()
            });
        }
        effect()?;
        let ack = Ack {
            id,
            replayed: false,
        };
        served.insert(key.to_owned(), ack.clone());
        Ok(ack)
    }
}

/// Locks a mutex, taking the data of a poisoned one (a panicking holder left it whole).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
