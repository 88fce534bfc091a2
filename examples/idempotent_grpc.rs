//! A gRPC `Payments/Create` on tonic that charges once per idempotency key, however often
//! the client retries: the handler runs through [`RunOnce`] on the memory store.
//!
//! The client sends its key in the `idempotency-key` metadata and its identity in
//! `x-api-key`. The key is scoped to the caller and the method, and the request message
//! is fingerprinted, so one caller never replays another's payment and a key reused for
//! another payment is refused. What the client gets:
//!
//! | case | status |
//! |---|---|
//! | first call | the handler's answer |
//! | a retry after it completed | the stored answer, metadata `idempotency-replayed: true` |
//! | a retry while it still runs | `ABORTED`, metadata `retry-after-ms` |
//! | same key, another request | `FAILED_PRECONDITION` |
//! | no key, or an invalid one | `INVALID_ARGUMENT` |
//! | the store is down | `UNAVAILABLE`, and the handler does not run |
//!
//! No build script and no protoc: the messages below and the service glue
//! (`sd_examples::grpc`) are written by hand, as tonic-build would generate them for
//!
//! ```proto
//! service Payments { rpc Create(CreatePayment) returns (Payment); }
//! ```
//!
//! `main` starts the server on loopback, sends one payment three times at once, retries,
//! reuses the key for another amount, prints each answer and exits:
//!
//! ```text
//! cargo run -p sd-examples --example idempotent_grpc --features idempotency-grpc
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use sd_examples::grpc::{Rpc, Server as GrpcServer, metadata, run_once_status, unary};
use sd_idempotency::{Fingerprint, MemoryStore, RunError, RunOnce};
use tonic::codegen::{BoxFuture, GrpcMethod};
use tonic::metadata::MetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status};

const SERVICE: &str = "sd.payments.v1.Payments";
const CREATE: &str = "/sd.payments.v1.Payments/Create";

/// `message CreatePayment { uint64 amount = 1; string currency = 2; }`
#[derive(Clone, PartialEq, Message)]
struct CreatePayment {
    #[prost(uint64, tag = "1")]
    amount: u64,
    #[prost(string, tag = "2")]
    currency: String,
}

/// `message Payment { string id = 1; uint64 amount = 2; string currency = 3; }`; serde
/// too, because `run_once` stores the result as JSON.
#[derive(Clone, PartialEq, Message, serde::Serialize, serde::Deserialize)]
struct Payment {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(uint64, tag = "2")]
    amount: u64,
    #[prost(string, tag = "3")]
    currency: String,
}

// ---- the service ----------------------------------------------------------------------

#[derive(Debug)]
struct Payments {
    run_once: RunOnce<MemoryStore>,
    charges: AtomicU64,
}

impl Payments {
    async fn create(&self, request: Request<CreatePayment>) -> Result<Response<Payment>, Status> {
        let caller = metadata(&request, "x-api-key")?
            .ok_or_else(|| Status::unauthenticated("send your api key in `x-api-key`"))?;
        let key = metadata(&request, "idempotency-key")?.ok_or_else(|| {
            Status::invalid_argument("send an `idempotency-key` of 1 to 255 printable ascii")
        })?;
        // Bound to caller and method, as the HTTP middleware binds keys to method and path.
        let scope = format!("{caller} {CREATE}");
        // prost encodes fields in tag order, so equal messages (without maps) hash alike.
        let fingerprint = Fingerprint::of(request.get_ref().encode_to_vec());
        let work = self.charge(request.into_inner());
        let outcome = self
            .run_once
            .run(&scope, &key, &fingerprint, work)
            .await
            .map_err(to_status)?;
        let replayed = outcome.is_replay();
        let mut response = Response::new(outcome.into_inner());
        if replayed {
            let md = response.metadata_mut();
            md.insert("idempotency-replayed", MetadataValue::from_static("true"));
        }
        Ok(response)
    }

    /// The side effect that must happen once: a call to the card network.
    async fn charge(&self, payment: CreatePayment) -> Result<Payment, Status> {
        if payment.amount == 0 {
            return Err(Status::invalid_argument("amount must be positive"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Payment {
            id: format!("pay_{n}"),
            amount: payment.amount,
            currency: payment.currency,
        })
    }
}

/// The idempotency outcomes as gRPC statuses.
fn to_status(error: RunError<Status>) -> Status {
    run_once_status(error, || {})
}

// ---- the glue tonic-build would generate ----------------------------------------------

impl Rpc for Payments {
    const NAME: &'static str = SERVICE;
    type Req = CreatePayment;
    type Reply = Payment;

    fn handle(
        self: Arc<Self>,
        method: String,
        request: Request<CreatePayment>,
    ) -> BoxFuture<Response<Payment>, Status> {
        Box::pin(async move {
            match method.as_str() {
                "Create" => self.create(request).await,
                _ => Err(Status::unimplemented("no such method")),
            }
        })
    }
}

/// The client: one unary call on a shared HTTP/2 channel.
#[derive(Debug, Clone)]
struct PaymentsClient(Channel);

impl PaymentsClient {
    async fn create(
        &mut self,
        mut request: Request<CreatePayment>,
    ) -> Result<Response<Payment>, Status> {
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE, "Create"));
        unary(&self.0, CREATE, request).await
    }

    /// [`create`](Self::create), waiting and retrying while the first call still runs
    /// (at most 250 ms per wait, the server's `retry-after-ms` when shorter).
    async fn create_until_done(&mut self, request: impl Fn() -> Request<CreatePayment>) -> Answer {
        loop {
            match self.create(request()).await {
                Err(status) if status.code() == Code::Aborted => {
                    let hint = retry_after(&status).unwrap_or(Duration::from_millis(250));
                    tokio::time::sleep(hint.min(Duration::from_millis(250))).await;
                }
                other => return Answer(other),
            }
        }
    }
}

fn retry_after(status: &Status) -> Option<Duration> {
    let ms = status.metadata().get("retry-after-ms")?.to_str().ok()?;
    ms.parse().ok().map(Duration::from_millis)
}

fn request(caller: &str, key: Option<&str>, amount: u64) -> Request<CreatePayment> {
    let mut request = Request::new(CreatePayment {
        amount,
        currency: "EUR".to_owned(),
    });
    let md = request.metadata_mut();
    md.insert("x-api-key", caller.parse().expect("an ascii api key"));
    if let Some(key) = key {
        md.insert("idempotency-key", key.parse().expect("an ascii key"));
    }
    request
}

/// One call's answer, printed in a line.
struct Answer(Result<Response<Payment>, Status>);

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |v: &MetadataValue<_>| v.to_str().unwrap_or("?").to_owned();
        match &self.0 {
            Ok(response) => {
                let p = response.get_ref();
                write!(f, "OK {} ({} {})", p.id, p.amount, p.currency)?;
                if let Some(v) = response.metadata().get("idempotency-replayed") {
                    write!(f, ", idempotency-replayed: {}", text(v))?;
                }
            }
            Err(status) => {
                write!(f, "{:?}", status.code())?;
                if let Some(v) = status.metadata().get("retry-after-ms") {
                    write!(f, ", retry-after-ms: {}", text(v))?;
                }
                write!(f, " ({})", status.message())?;
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let payments = Arc::new(Payments {
        // A short lock keeps the in-flight hint small; the heartbeat extends it meanwhile.
        run_once: RunOnce::builder(MemoryStore::new())
            .lock_ttl(Duration::from_secs(2))
            .build()?,
        charges: AtomicU64::new(0),
    });
    let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into())?;
    let addr = incoming.local_addr()?;
    let server = Server::builder()
        .add_service(GrpcServer(payments.clone()))
        .serve_with_incoming(incoming);
    let server = tokio::spawn(server);
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let client = PaymentsClient(channel);
    println!("gRPC {CREATE} on {addr}, each payment run once per idempotency key\n");

    println!("alice sends 10 EUR with key k-1 three times at once:");
    let sends: Vec<_> = (1..=3)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(
                async move { Answer(client.create(request("alice", Some("k-1"), 1000)).await) },
            )
        })
        .collect();
    for (n, send) in sends.into_iter().enumerate() {
        println!("  send {}: {}", n + 1, send.await?);
    }

    let mut client = client.clone();
    let retried = client
        .create_until_done(|| request("alice", Some("k-1"), 1000))
        .await;
    println!("alice retries until it is done: {retried}");
    let reused = Answer(client.create(request("alice", Some("k-1"), 999_900)).await);
    println!("alice reuses k-1 for 9999 EUR: {reused}");
    let no_key = Answer(client.create(request("alice", None, 1000)).await);
    println!("alice sends no key: {no_key}");
    let bob = Answer(client.create(request("bob", Some("k-1"), 1000)).await);
    println!("bob sends 10 EUR with his own k-1: {bob}");

    let charges = payments.charges.load(Ordering::SeqCst);
    println!("\ncharges made: {charges} (one for alice's 4 calls with k-1, one for bob)");
    server.abort();
    if charges != 2 || !matches!(&reused.0, Err(s) if s.code() == Code::FailedPrecondition) {
        return Err("expected 2 charges and a refused reuse".into());
    }
    Ok(())
}
