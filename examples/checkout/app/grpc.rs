//! The messages and the service glue tonic-build would generate, written by hand (no
//! build script, no protoc), for
//!
//! ```proto
//! package sd.checkout.v1;
//! message PlaceOrder { string sku = 1; uint32 quantity = 2; string card = 3; }
//! message OrderReply { string order_id = 1; bool placed = 2; string reason = 3;
//!                      uint64 amount_cents = 4; }
//! message StockRequest { string order_id = 1; string sku = 2; uint32 quantity = 3;
//!                        uint64 fencing_token = 4; string idempotency_key = 5; }
//! message ChargeRequest { string order_id = 1; uint64 amount_cents = 2; string card = 3;
//!                         string idempotency_key = 4; }
//! message Ack { string id = 1; bool replayed = 2; }
//! service Orders { rpc Place(PlaceOrder) returns (OrderReply); }   // idempotency-key, x-client-id metadata
//! service Inventory { rpc Reserve(StockRequest) returns (Ack); rpc Release(StockRequest) returns (Ack); }
//! service Payments { rpc Charge(ChargeRequest) returns (Ack); rpc Refund(ChargeRequest) returns (Ack); }
//! ```

use std::convert::Infallible;
use std::sync::Arc;

use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, body::Body};
use tonic_prost::ProstCodec;

pub(crate) const PLACE: &str = "/sd.checkout.v1.Orders/Place";
pub(crate) const RESERVE: &str = "/sd.checkout.v1.Inventory/Reserve";
pub(crate) const RELEASE: &str = "/sd.checkout.v1.Inventory/Release";
pub(crate) const CHARGE: &str = "/sd.checkout.v1.Payments/Charge";
pub(crate) const REFUND: &str = "/sd.checkout.v1.Payments/Refund";

/// An order as the client sends it.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PlaceOrder {
    #[prost(string, tag = "1")]
    pub(crate) sku: String,
    #[prost(uint32, tag = "2")]
    pub(crate) quantity: u32,
    /// `declined` makes the payment service refuse the charge.
    #[prost(string, tag = "3")]
    pub(crate) card: String,
}

/// The order service's answer; serde too, because the idempotency store keeps it as JSON.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize)]
pub(crate) struct OrderReply {
    #[prost(string, tag = "1")]
    pub(crate) order_id: String,
    #[prost(bool, tag = "2")]
    pub(crate) placed: bool,
    /// Why the order was not placed (the saga compensated), empty when it was.
    #[prost(string, tag = "3")]
    pub(crate) reason: String,
    #[prost(uint64, tag = "4")]
    pub(crate) amount_cents: u64,
}

/// Reserve or release stock, under the fencing token of the lease on the SKU.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StockRequest {
    #[prost(string, tag = "1")]
    pub(crate) order_id: String,
    #[prost(string, tag = "2")]
    pub(crate) sku: String,
    #[prost(uint32, tag = "3")]
    pub(crate) quantity: u32,
    #[prost(uint64, tag = "4")]
    pub(crate) fencing_token: u64,
    #[prost(string, tag = "5")]
    pub(crate) idempotency_key: String,
}

/// Charge or refund an order.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ChargeRequest {
    #[prost(string, tag = "1")]
    pub(crate) order_id: String,
    #[prost(uint64, tag = "2")]
    pub(crate) amount_cents: u64,
    #[prost(string, tag = "3")]
    pub(crate) card: String,
    #[prost(string, tag = "4")]
    pub(crate) idempotency_key: String,
}

/// What a participant did: an id, and whether it was a replay of a served key.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Ack {
    #[prost(string, tag = "1")]
    pub(crate) id: String,
    #[prost(bool, tag = "2")]
    pub(crate) replayed: bool,
}

/// One gRPC service: its name, its message types and a handler per method.
pub(crate) trait Rpc: Send + Sync + 'static {
    /// `package.Service`.
    const NAME: &'static str;
    /// The request message of every method.
    type Req: prost::Message + Default + Send + 'static;
    /// The reply message of every method.
    type Reply: prost::Message + Default + Send + 'static;
    /// Handles `method` (the last path segment).
    fn handle(
        self: Arc<Self>,
        method: String,
        request: Request<Self::Req>,
    ) -> BoxFuture<Response<Self::Reply>, Status>;
}

/// The server side: routes `/{NAME}/{Method}` to [`Rpc::handle`].
#[derive(Debug)]
pub(crate) struct Server<T>(pub(crate) Arc<T>);

impl<T> Clone for Server<T> {
    fn clone(&self) -> Self {
        Server(self.0.clone())
    }
}

impl<T: Rpc> NamedService for Server<T> {
    const NAME: &'static str = T::NAME;
}

impl<T: Rpc> Service<http::Request<Body>> for Server<T> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.0.clone();
        let method = request
            .uri()
            .path()
            .strip_prefix(&format!("/{}/", T::NAME))
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<T::Reply, T::Req>::default());
            Ok(grpc.unary(Method(service, method), request).await)
        })
    }
}

struct Method<T>(Arc<T>, String);

impl<T: Rpc> UnaryService<T::Req> for Method<T> {
    type Response = T::Reply;
    type Future = BoxFuture<Response<T::Reply>, Status>;

    fn call(&mut self, request: Request<T::Req>) -> Self::Future {
        self.0.clone().handle(self.1.clone(), request)
    }
}

/// The client side: one unary call on a shared HTTP/2 channel.
pub(crate) async fn unary<Req, Reply>(
    channel: &Channel,
    path: &'static str,
    request: Request<Req>,
) -> Result<Response<Reply>, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Reply: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(request, path, ProstCodec::<Req, Reply>::default())
        .await
}

/// A metadata entry as text; a value that is not visible ASCII is refused.
pub(crate) fn metadata<T>(request: &Request<T>, name: &str) -> Result<Option<String>, Status> {
    match request.metadata().get(name).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(text)) => Ok(Some(text.to_owned())),
        Some(Err(_)) => Err(Status::invalid_argument(format!(
            "`{name}` must be printable ascii"
        ))),
    }
}
