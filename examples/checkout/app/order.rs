//! The order service: the idempotency key from metadata, the catalogue through the
//! cache, and the order as a saga (reserve stock under a fenced lease, charge, confirm).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prost::Message as _;
use sd_examples::grpc::run_once_status;
use sd_idempotency::{Fingerprint, RunError};
use sd_lock::semaphore::{BoxSemaphore, Semaphore};
use sd_lock::{BoxLock, Lock};
use sd_saga::{RetryPolicy, Saga, SagaOutcome, Step, StepContext, StepError};
use tonic::codegen::BoxFuture;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::backends::{Catalogue, Keys, Sagas};
use super::events::{OrderData, Orders};
use super::grpc::{
    Ack, CHARGE, ChargeRequest, OrderReply, PlaceOrder, REFUND, RELEASE, RESERVE, Rpc,
    StockRequest, metadata, unary,
};
use super::participants::Inventory;

/// What the saga steps reach: the participants, the stock leases, the order table.
#[derive(Debug)]
pub(crate) struct Steps {
    pub(crate) channel: Channel,
    /// The stock leases, on memory or sharded over the Redis servers.
    pub(crate) locks: BoxLock,
    pub(crate) orders: Orders,
    /// Fault injection: the first reservation stalls holding its lease (see [`stock`]).
    pub(crate) stall_once: AtomicBool,
    /// Read by the stall only, to know when another holder has written.
    pub(crate) inventory: Arc<Inventory>,
    /// The cap on concurrent calls to the payment provider.
    pub(crate) provider: ProviderCap,
}

/// At most [`PROVIDER_CALLS`] calls to the payment provider at once, over every replica
/// of the order service: permits of a semaphore (on memory, or the first Redis server),
/// and the most calls this replica saw in flight.
#[derive(Debug)]
pub(crate) struct ProviderCap {
    pub(crate) permits: BoxSemaphore,
    in_flight: AtomicU64,
    pub(crate) peak: AtomicU64,
}

impl ProviderCap {
    pub(crate) fn new(permits: BoxSemaphore) -> Self {
        ProviderCap {
            permits,
            in_flight: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }
}

/// How many calls the payment provider takes at once from this shop.
pub(crate) const PROVIDER_CALLS: u32 = 3;
/// The semaphore's resource, and how long a permit lasts (longer than a call).
const PROVIDER: &str = "payment-provider";
const PROVIDER_TTL: Duration = Duration::from_secs(5);

/// How long a stock lease lasts, and how long a caller waits for one.
const LEASE_TTL: Duration = Duration::from_secs(1);
const LEASE_WAIT: Duration = Duration::from_secs(20);

/// Transient statuses are retried; a refusal is final.
fn step_error(status: Status) -> StepError {
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted => {
            StepError::retryable(text)
        }
        _ => StepError::permanent(text),
    }
}

/// Reserve or release stock: under the SKU's lease, with its fencing token.
async fn stock(
    s: &Steps,
    ctx: &StepContext,
    o: &OrderData,
    path: &'static str,
) -> Result<Ack, StepError> {
    let lease = s
        .locks
        .acquire(&format!("stock:{}", o.sku), LEASE_TTL, LEASE_WAIT)
        .await
        .map_err(|e| StepError::retryable(format!("stock lease: {e}")))?;
    if path == RESERVE && s.stall_once.swap(false, Ordering::SeqCst) {
        // A process pause (GC, a swapped-out page, a VM migration) while holding the
        // lease: it outlives the lease, another order takes the SKU and reserves with a
        // newer token. The inventory then refuses this holder's stale token (ABORTED),
        // and the saga retries the step under a new lease. (The stall ends once the
        // inventory has seen a newer token, or after 10 s.)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while s.inventory.last_token(&o.sku) <= Some(lease.token())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let request = StockRequest {
        order_id: o.order_id.clone(),
        sku: o.sku.clone(),
        quantity: o.quantity,
        fencing_token: lease.token().0,
        idempotency_key: ctx.idempotency_key(),
    };
    let answer = unary(&s.channel, path, Request::new(request)).await;
    // An expired lease is left to its expiry (the fence keeps it safe).
    let _ = s.locks.release(lease).await;
    answer.map(Response::into_inner).map_err(step_error)
}

/// Charge or refund.
async fn payment(
    s: &Steps,
    ctx: &StepContext,
    o: &OrderData,
    path: &'static str,
) -> Result<Ack, StepError> {
    let request = ChargeRequest {
        order_id: o.order_id.clone(),
        amount_cents: o.amount_cents,
        card: o.card.clone(),
        idempotency_key: ctx.idempotency_key(),
    };
    // A permit per call: the provider never sees more than PROVIDER_CALLS at once.
    let cap = &s.provider;
    let permit = cap
        .permits
        .acquire(PROVIDER, PROVIDER_TTL, LEASE_WAIT)
        .await
        .map_err(|e| StepError::retryable(e.to_string()))?;
    let now = cap.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    cap.peak.fetch_max(now, Ordering::SeqCst);
    let answer = unary(&s.channel, path, Request::new(request)).await;
    cap.in_flight.fetch_sub(1, Ordering::SeqCst);
    // An expired permit is left to its expiry.
    let _ = cap.permits.release(permit).await;
    answer.map(Response::into_inner).map_err(step_error)
}

/// reserve_stock (undo: release) → charge_card (undo: refund) → confirm (pivot: the order
/// row and its `OrderPlaced` event in one transaction).
pub(crate) fn saga(steps: Arc<Steps>) -> sd_saga::Result<Saga<OrderData>> {
    // Short waits keep the demo quick; compensations keep trying longer than actions.
    let retry = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(20))
        .max_attempts(5)
        .build()?;
    let undo_retry = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(20))
        .max_attempts(50)
        .build()?;
    let confirm = steps.clone();
    Saga::builder("checkout")
        .retry(retry)
        .compensation_retry(undo_retry)
        .timeout(Duration::from_secs(30))
        .step(participant_step(
            "reserve_stock",
            &steps,
            RESERVE,
            RELEASE,
            |o, id| o.reservation = Some(id),
        ))
        .step(participant_step(
            "charge_card",
            &steps,
            CHARGE,
            REFUND,
            |o, id| o.payment = Some(id),
        ))
        .step(Step::pivot("confirm", move |_ctx, o: OrderData| {
            let s = confirm.clone();
            async move {
                s.orders.place(&o).await.map_err(StepError::retryable)?;
                Ok(o)
            }
        }))
        .build()
}

/// A compensatable step that calls a participant at `forward` (keeping the id it answers
/// with `keep`) and, to undo it, at `back`.
fn participant_step(
    name: &'static str,
    steps: &Arc<Steps>,
    forward: &'static str,
    back: &'static str,
    keep: fn(&mut OrderData, String),
) -> Step<OrderData> {
    let (s1, s2) = (steps.clone(), steps.clone());
    Step::compensatable(
        name,
        move |ctx, mut o: OrderData| {
            let s = s1.clone();
            async move {
                let id = call(&s, &ctx, &o, forward).await?.id;
                keep(&mut o, id);
                Ok(o)
            }
        },
        move |ctx, o: OrderData| {
            let s = s2.clone();
            async move { call(&s, &ctx, &o, back).await.map(drop) }
        },
    )
}

/// The inventory under the SKU's lease, or the payment service.
async fn call(
    s: &Steps,
    ctx: &StepContext,
    o: &OrderData,
    path: &'static str,
) -> Result<Ack, StepError> {
    if path == RESERVE || path == RELEASE {
        stock(s, ctx, o, path).await
    } else {
        payment(s, ctx, o, path).await
    }
}

/// Counters of the order service.
#[derive(Debug, Default)]
pub(crate) struct OrderCounters {
    pub(crate) placed: AtomicU64,
    pub(crate) compensated: AtomicU64,
    pub(crate) replayed: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

/// The order service.
#[derive(Debug)]
pub(crate) struct OrderService {
    pub(crate) run: String,
    pub(crate) keys: Keys,
    pub(crate) catalogue: Catalogue,
    pub(crate) sagas: Sagas,
    pub(crate) counters: OrderCounters,
}

impl OrderService {
    /// The order id of `key` sent by `client`.
    pub(crate) fn order_id(&self, client: &str, key: &str) -> String {
        format!("{}-{client}-{key}", self.run)
    }

    async fn place(&self, request: Request<PlaceOrder>) -> Result<Response<OrderReply>, Status> {
        let client = metadata(&request, "x-client-id")?
            .ok_or_else(|| Status::unauthenticated("send your client id in `x-client-id`"))?;
        let key = metadata(&request, "idempotency-key")?
            .ok_or_else(|| Status::invalid_argument("send an `idempotency-key`"))?;
        // prost encodes fields in tag order, so equal messages hash alike.
        let fingerprint = Fingerprint::of(request.get_ref().encode_to_vec());
        let work = self.execute(&client, &key, request.into_inner());
        let outcome = match self.keys.run(&client, &key, &fingerprint, work).await {
            Ok(outcome) => outcome,
            Err(e) => return Err(self.to_status(e)),
        };
        let replayed = outcome.is_replay();
        let mut response = Response::new(outcome.into_inner());
        if replayed {
            self.counters.replayed.fetch_add(1, Ordering::Relaxed);
            let md = response.metadata_mut();
            md.insert("idempotency-replayed", MetadataValue::from_static("true"));
        }
        Ok(response)
    }

    /// The work that runs once per key: price from the catalogue, then the saga.
    async fn execute(
        &self,
        client: &str,
        key: &str,
        order: PlaceOrder,
    ) -> Result<OrderReply, Status> {
        if order.quantity == 0 || order.quantity > 100 {
            return Err(Status::invalid_argument("quantity must be 1 to 100"));
        }
        let product = self
            .catalogue
            .get(&order.sku)
            .await?
            .ok_or_else(|| Status::not_found(format!("no product {}", order.sku)))?;
        let order_id = self.order_id(client, key);
        let data = OrderData {
            order_id: order_id.clone(),
            client: client.to_owned(),
            sku: order.sku,
            quantity: order.quantity,
            amount_cents: product.price_cents * u64::from(order.quantity),
            card: order.card,
            reservation: None,
            payment: None,
        };
        let amount_cents = data.amount_cents;
        let outcome = self
            .sagas
            .run(order_id.clone(), data)
            .await
            .map_err(|e| Status::unavailable(format!("saga log: {e}")))?;
        let (placed, reason) = match outcome {
            SagaOutcome::Completed(_) => {
                self.counters.placed.fetch_add(1, Ordering::Relaxed);
                (true, String::new())
            }
            SagaOutcome::Compensated { reason } => {
                self.counters.compensated.fetch_add(1, Ordering::Relaxed);
                (false, reason)
            }
            SagaOutcome::Stuck { reason } => {
                return Err(Status::internal(format!(
                    "order {order_id} is stuck: {reason}"
                )));
            }
            other => {
                return Err(Status::internal(format!(
                    "order {order_id} ended {}",
                    other.state()
                )));
            }
        };
        Ok(OrderReply {
            order_id,
            placed,
            reason,
            amount_cents,
        })
    }

    /// The idempotency outcomes as gRPC statuses, counting the calls refused in flight.
    fn to_status(&self, error: RunError<Status>) -> Status {
        run_once_status(error, || {
            self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        })
    }
}

impl Rpc for OrderService {
    const NAME: &'static str = "sd.checkout.v1.Orders";
    type Req = PlaceOrder;
    type Reply = OrderReply;

    fn handle(
        self: Arc<Self>,
        method: String,
        request: Request<PlaceOrder>,
    ) -> BoxFuture<Response<OrderReply>, Status> {
        Box::pin(async move {
            match method.as_str() {
                "Place" => self.place(request).await,
                other => Err(Status::unimplemented(format!("no method {other}"))),
            }
        })
    }
}
