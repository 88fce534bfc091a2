//! An order saga over three gRPC services (inventory, payments, shipping) on tonic, all
//! in this process on loopback, driven by sd-saga on the memory log or, with
//! `--postgres URL`, on the PostgreSQL log.
//!
//! | step | kind | forward | compensation |
//! |---|---|---|---|
//! | `reserve_stock` | compensatable | `Inventory/Reserve` | `Inventory/Release` |
//! | `charge_card` | compensatable | `Payments/Charge` | `Payments/Refund` |
//! | `book_shipment` | pivot | `Shipping/Book` | (none: the point of no return) |
//! | `commit_stock` | retriable | `Inventory/Commit` | (none) |
//!
//! Every call carries the step's idempotency key in the request; each service keeps the
//! keys it served and answers a repeat with its first reply, so a step that runs twice
//! (a retry, a recovered crash) has its effect once.
//!
//! ```text
//! cargo run -p sd-examples --example order_saga --features saga
//! cargo run -p sd-examples --example order_saga --features saga -- --fail shipping
//! cargo run -p sd-examples --example order_saga --features saga -- --flaky payments --fail shipping
//! cargo run -p sd-examples --example order_saga --features saga -- --postgres postgres://postgres@127.0.0.1:5432/postgres
//! ```
//!
//! `--fail SERVICE` makes that service refuse its forward call (`FAILED_PRECONDITION`,
//! not retried), so the saga compensates what it did before, in reverse; `--flaky
//! SERVICE` makes it answer `UNAVAILABLE` twice first, which the retry policy absorbs.
//!
//! No build script and no protoc: the messages below and the service glue
//! (`sd_examples::grpc`) are written by hand, as tonic-build would generate them for
//!
//! ```proto
//! message StepRequest { string order_id = 1; string idempotency_key = 2; string sku = 3;
//!                       uint32 quantity = 4; uint64 amount_cents = 5; }
//! message StepReply { string id = 1; bool replayed = 2; }
//! service Inventory { rpc Reserve(StepRequest) returns (StepReply);
//!                     rpc Release(StepRequest) returns (StepReply);
//!                     rpc Commit(StepRequest) returns (StepReply); }
//! service Payments { rpc Charge(StepRequest) returns (StepReply);
//!                    rpc Refund(StepRequest) returns (StepReply); }
//! service Shipping { rpc Book(StepRequest) returns (StepReply); }
//! ```

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use sd_examples::grpc::{Rpc, Server as GrpcServer, unary};
use sd_saga::postgres::PostgresStore;
use sd_saga::{
    MemoryStore, Orchestrator, RetryPolicy, Saga, SagaOutcome, SagaStore, Step, StepContext,
    StepError,
};
use serde::{Deserialize, Serialize};
use tonic::codegen::BoxFuture;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status};

#[derive(Clone, PartialEq, Message)]
struct StepRequest {
    #[prost(string, tag = "1")]
    order_id: String,
    #[prost(string, tag = "2")]
    idempotency_key: String,
    #[prost(string, tag = "3")]
    sku: String,
    #[prost(uint32, tag = "4")]
    quantity: u32,
    #[prost(uint64, tag = "5")]
    amount_cents: u64,
}

#[derive(Clone, PartialEq, Message)]
struct StepReply {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(bool, tag = "2")]
    replayed: bool,
}

// ---- the participants ------------------------------------------------------------------

/// One service: serves each idempotency key once, keeps a ledger, misbehaves on demand.
#[derive(Debug)]
struct Participant {
    name: &'static str,
    /// The methods that move forward (the ones `--fail` / `--flaky` hit).
    forward: &'static [&'static str],
    refuse: bool,
    state: Mutex<ParticipantState>,
}

#[derive(Debug, Default)]
struct ParticipantState {
    flaky_left: u32,
    served: HashMap<String, String>,
    ledger: Vec<String>,
}

impl Participant {
    fn new(name: &'static str, forward: &'static [&'static str], args: &Args) -> Arc<Self> {
        let flaky = args.flaky.as_deref() == Some(name);
        Arc::new(Participant {
            name,
            forward,
            refuse: args.fail.as_deref() == Some(name),
            state: Mutex::new(ParticipantState {
                flaky_left: if flaky { 2 } else { 0 },
                ..ParticipantState::default()
            }),
        })
    }

    fn handle(&self, method: &str, request: StepRequest) -> Result<StepReply, Status> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = st.served.get(&request.idempotency_key) {
            return Ok(StepReply {
                id: id.clone(),
                replayed: true,
            });
        }
        let forward = self.forward.contains(&method);
        if forward && st.flaky_left > 0 {
            st.flaky_left -= 1;
            println!("    {}: {method} -> UNAVAILABLE (flaky)", self.name);
            return Err(Status::unavailable(format!("{} is flaky", self.name)));
        }
        if forward && self.refuse {
            println!("    {}: {method} -> FAILED_PRECONDITION", self.name);
            return Err(Status::failed_precondition(format!(
                "{} refuses order {}",
                self.name, request.order_id
            )));
        }
        let id = format!("{}-{}", method.to_lowercase(), st.ledger.len() + 1);
        let line = format!(
            "{method} {} x{} / {} cents for {} -> {id}",
            request.sku, request.quantity, request.amount_cents, request.order_id
        );
        println!("    {}: {line}", self.name);
        st.ledger.push(line);
        st.served.insert(request.idempotency_key, id.clone());
        Ok(StepReply {
            id,
            replayed: false,
        })
    }

    fn ledger(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ledger
            .clone()
    }
}

// ---- the glue tonic-build would generate ----------------------------------------------

trait Named: Send + Sync + 'static {
    const NAME: &'static str;
}
#[derive(Debug)]
struct InventoryName;
impl Named for InventoryName {
    const NAME: &'static str = "sd.order.v1.Inventory";
}
#[derive(Debug)]
struct PaymentsName;
impl Named for PaymentsName {
    const NAME: &'static str = "sd.order.v1.Payments";
}
#[derive(Debug)]
struct ShippingName;
impl Named for ShippingName {
    const NAME: &'static str = "sd.order.v1.Shipping";
}

/// The service named `N`, served by its participant.
#[derive(Debug)]
struct Service<N>(Arc<Participant>, PhantomData<N>);

impl<N: Named> Rpc for Service<N> {
    const NAME: &'static str = N::NAME;
    type Req = StepRequest;
    type Reply = StepReply;

    fn handle(
        self: Arc<Self>,
        method: String,
        request: Request<StepRequest>,
    ) -> BoxFuture<Response<StepReply>, Status> {
        let result = self
            .0
            .handle(&method, request.into_inner())
            .map(Response::new);
        Box::pin(async move { result })
    }
}

/// The gRPC server of `participant` as the service named `N`.
fn serve<N: Named>(participant: &Arc<Participant>) -> GrpcServer<Service<N>> {
    GrpcServer(Arc::new(Service(participant.clone(), PhantomData)))
}

/// The client side: one unary call on the shared channel.
async fn call(
    channel: &Channel,
    path: &'static str,
    request: StepRequest,
) -> Result<StepReply, Status> {
    Ok(unary(channel, path, Request::new(request))
        .await?
        .into_inner())
}

// ---- the saga --------------------------------------------------------------------------

/// The saga data, stored as JSON in the log after every step.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    sku: String,
    quantity: u32,
    amount_cents: u64,
    reservation: Option<String>,
    payment: Option<String>,
    shipment: Option<String>,
}

/// Transient statuses are retried; a refusal is final.
fn step_error(status: Status) -> StepError {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::ResourceExhausted => {
            StepError::retryable(format!("{:?}: {}", status.code(), status.message()))
        }
        _ => StepError::permanent(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// A step that calls `path` and stores the reply id with `set`.
fn forward(
    channel: &Channel,
    path: &'static str,
    set: fn(&mut Order, String),
) -> impl Fn(StepContext, Order) -> BoxFutureOrder + Send + Sync + 'static {
    let channel = channel.clone();
    move |ctx, mut order| {
        let channel = channel.clone();
        Box::pin(async move {
            let reply = call(&channel, path, request(&ctx, &order))
                .await
                .map_err(step_error)?;
            set(&mut order, reply.id);
            Ok(order)
        })
    }
}

type BoxFutureOrder = sd_saga::BoxFuture<Result<Order, StepError>>;

/// A compensation that calls `path`.
fn undo(
    channel: &Channel,
    path: &'static str,
) -> impl Fn(StepContext, Order) -> sd_saga::BoxFuture<Result<(), StepError>> + Send + Sync + 'static
{
    let channel = channel.clone();
    move |ctx, order| {
        let channel = channel.clone();
        Box::pin(async move {
            call(&channel, path, request(&ctx, &order))
                .await
                .map(drop)
                .map_err(step_error)
        })
    }
}

fn request(ctx: &StepContext, order: &Order) -> StepRequest {
    StepRequest {
        order_id: order.id.clone(),
        idempotency_key: ctx.idempotency_key(),
        sku: order.sku.clone(),
        quantity: order.quantity,
        amount_cents: order.amount_cents,
    }
}

fn order_saga(channel: &Channel) -> sd_saga::Result<Saga<Order>> {
    // Short waits so the demo is quick; production keeps the defaults (1 s, x2, 100 s cap).
    let retry = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(100))
        .max_attempts(4)
        .build()?;
    Saga::builder("order")
        .retry(retry)
        .compensation_retry(retry)
        .timeout(Duration::from_secs(5))
        .step(Step::compensatable(
            "reserve_stock",
            forward(channel, "/sd.order.v1.Inventory/Reserve", |o, id| {
                o.reservation = Some(id)
            }),
            undo(channel, "/sd.order.v1.Inventory/Release"),
        ))
        .step(Step::compensatable(
            "charge_card",
            forward(channel, "/sd.order.v1.Payments/Charge", |o, id| {
                o.payment = Some(id)
            }),
            undo(channel, "/sd.order.v1.Payments/Refund"),
        ))
        .step(Step::pivot(
            "book_shipment",
            forward(channel, "/sd.order.v1.Shipping/Book", |o, id| {
                o.shipment = Some(id)
            }),
        ))
        .step(Step::retriable(
            "commit_stock",
            forward(channel, "/sd.order.v1.Inventory/Commit", |_, _| {}),
        ))
        .build()
}

async fn run_order<S: SagaStore>(
    saga: Saga<Order>,
    store: S,
    order: Order,
) -> Result<SagaOutcome<Order>, Box<dyn std::error::Error>> {
    let orchestrator = Orchestrator::builder(saga, store).owner("demo").build()?;
    let id = order.id.clone();
    println!("running saga {id}:");
    let outcome = orchestrator.run(id.clone(), order).await?;
    println!("\nthe log of {id}:");
    for e in orchestrator.events(&id).await? {
        let (name, _) = orchestrator
            .saga()
            .steps()
            .nth(e.event.step as usize)
            .unwrap_or(("?", sd_saga::StepKind::Pivot));
        let error = e.event.error.map(|e| format!(" ({e})")).unwrap_or_default();
        println!(
            "  v{:<3} {:<14} {:<10} {:<7} attempt {}{error}",
            e.version,
            name,
            e.event.direction,
            e.event.kind.as_str(),
            e.event.attempt
        );
    }
    let metrics = orchestrator.metrics().await?;
    println!(
        "\nmetrics: {:?}; attempts {}, failed {}, compensations {}, mean step latency {:?}",
        metrics
            .by_state
            .iter()
            .filter(|(_, n)| *n > 0)
            .collect::<Vec<_>>(),
        metrics.local.attempts,
        metrics.local.failed_attempts,
        metrics.local.compensations_run,
        metrics.local.step_latency.mean()
    );
    Ok(outcome)
}

/// The flags.
#[derive(Debug, Default, clap::Parser)]
#[command(name = "order_saga")]
struct Args {
    /// Make this service refuse every call: inventory, payments or shipping.
    #[arg(long, value_parser = ["inventory", "payments", "shipping"])]
    fail: Option<String>,
    /// Make this service fail its first call (then succeed): inventory, payments or shipping.
    #[arg(long, value_parser = ["inventory", "payments", "shipping"])]
    flaky: Option<String>,
    /// Keep the saga log in this PostgreSQL database instead of memory.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let inventory = Participant::new("inventory", &["Reserve", "Commit"], &args);
    let payments = Participant::new("payments", &["Charge"], &args);
    let shipping = Participant::new("shipping", &["Book"], &args);
    let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into())?;
    let addr = incoming.local_addr()?;
    let server = Server::builder()
        .add_service(serve::<InventoryName>(&inventory))
        .add_service(serve::<PaymentsName>(&payments))
        .add_service(serve::<ShippingName>(&shipping))
        .serve_with_incoming(incoming);
    let server = tokio::spawn(server);
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let saga = order_saga(&channel)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let order = Order {
        id: format!("order-{nanos:x}"),
        sku: "sku-42".into(),
        quantity: 2,
        amount_cents: 4_990,
        reservation: None,
        payment: None,
        shipment: None,
    };
    println!(
        "inventory, payments and shipping on {addr}; log: {}\n",
        if args.postgres.is_some() {
            "postgres"
        } else {
            "memory"
        }
    );
    let outcome = match &args.postgres {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url).await?;
            let store = PostgresStore::builder().table("order_sagas").build(pool)?;
            store.migrate().await?;
            run_order(saga, store, order).await?
        }
        None => run_order(saga, MemoryStore::new(), order).await?,
    };
    println!("\noutcome: {outcome:?}");
    for p in [&inventory, &payments, &shipping] {
        println!("{} ledger: {:?}", p.name, p.ledger());
    }
    server.abort();
    let expected = match args.fail.as_deref() {
        None => "completed",
        Some(_) => "compensated",
    };
    let ok = match (&outcome, args.fail.as_deref()) {
        (SagaOutcome::Completed(_), None) => true,
        (SagaOutcome::Compensated { .. }, Some(_)) => {
            // Everything done before the refusal was undone, in reverse.
            let reserved = inventory.ledger().iter().any(|l| l.starts_with("Reserve"));
            let released = inventory.ledger().iter().any(|l| l.starts_with("Release"));
            let charged = payments.ledger().iter().any(|l| l.starts_with("Charge"));
            let refunded = payments.ledger().iter().any(|l| l.starts_with("Refund"));
            reserved == released && charged == refunded
        }
        _ => false,
    };
    if !ok {
        return Err(
            format!("expected the saga {expected} with every effect undone or kept").into(),
        );
    }
    Ok(())
}
