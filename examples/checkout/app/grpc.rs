//! The messages tonic-build would generate, written by hand (no build script, no
//! protoc; the service glue is `sd_examples::grpc`), for
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

pub(crate) use sd_examples::grpc::{Rpc, Server, metadata, unary};

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
