//! What goes into the outbox ([`Message`]) and what comes out of it ([`Event`]).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::error::{Error, Result};

/// Header names and values carried with an event (a JSON object of strings in the table).
pub type Headers = BTreeMap<String, String>;

/// The longest aggregate type, aggregate id or event type accepted: Debezium's
/// `varchar(255)`.
pub const MAX_FIELD_LEN: usize = 255;

/// An event's body: JSON (stored in the `payload` jsonb column, Debezium's default) or
/// opaque bytes (stored in `payload_bytes`).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A JSON document.
    Json(serde_json::Value),
    /// Opaque bytes (protobuf, Avro, ...).
    Bytes(Vec<u8>),
}

impl Payload {
    /// The bytes a sink sends: the JSON text, or the bytes as they are.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            // Serializing a `Value` cannot fail: its map keys are strings.
            Payload::Json(value) => serde_json::to_vec(value).unwrap_or_default(),
            Payload::Bytes(bytes) => bytes.clone(),
        }
    }

    /// `"json"` or `"bytes"`: how sinks label the payload.
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Json(_) => "json",
            Payload::Bytes(_) => "bytes",
        }
    }
}

/// An event to write into the outbox with the business rows of the same transaction.
///
/// The three names map onto Debezium's Outbox Event Router columns: `aggregatetype`
/// (the destination: a Redis stream, a NATS subject, a Kafka topic), `aggregateid` (the
/// ordering key) and `type`.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The kind of aggregate, e.g. `order`; picks the stream or subject.
    pub aggregate_type: String,
    /// The aggregate instance, e.g. an order id; events of one aggregate keep their order.
    pub aggregate_id: String,
    /// The event type, e.g. `order_created`.
    pub event_type: String,
    /// The body.
    pub payload: Payload,
    /// Extra headers, sent with the event.
    pub headers: Headers,
}

impl Message {
    /// A message with a JSON payload.
    pub fn json(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self::new(
            aggregate_type,
            aggregate_id,
            event_type,
            Payload::Json(payload),
        )
    }

    /// A message with an opaque byte payload.
    pub fn bytes(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self::new(
            aggregate_type,
            aggregate_id,
            event_type,
            Payload::Bytes(payload.into()),
        )
    }

    /// A message with any payload and no headers.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: Payload,
    ) -> Self {
        Message {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload,
            headers: Headers::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// With feature `otel`, records the current `tracing` span's W3C trace context in
    /// the headers (`traceparent`, and `tracestate` when the span has vendor state), as
    /// `enqueue` does. Nothing is written outside a span or without the
    /// tracing-opentelemetry layer, and a `traceparent` the message already carries (in
    /// any letter case) is kept, with whatever `tracestate` it has.
    #[cfg(feature = "otel")]
    pub(crate) fn with_current_trace(mut self) -> Self {
        use sd_core::trace::{TRACEPARENT, TraceParent};
        if self
            .headers
            .keys()
            .any(|name| name.eq_ignore_ascii_case(TRACEPARENT))
        {
            return self;
        }
        if let Some(parent) = TraceParent::current() {
            parent.inject(|name, value| {
                self.headers.entry(name.to_owned()).or_insert(value);
            });
        }
        self
    }

    /// Checks the message can be stored and sent: the three names are 1 to 255
    /// characters without control characters, header names are non-empty and free of
    /// `:` and control characters, header values free of line breaks.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
            ("event_type", &self.event_type),
        ] {
            if value.is_empty() || value.chars().count() > MAX_FIELD_LEN {
                return Err(Error::invalid(
                    field,
                    format!("must be 1 to {MAX_FIELD_LEN} characters"),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(Error::invalid(field, "must not contain control characters"));
            }
        }
        for (name, value) in &self.headers {
            if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
                return Err(Error::invalid(
                    "headers",
                    format!(
                        "header name `{name}` must be non-empty, without `:` or control characters"
                    ),
                ));
            }
            if value.contains(['\r', '\n']) {
                return Err(Error::invalid(
                    "headers",
                    format!("the value of header `{name}` must not contain line breaks"),
                ));
            }
        }
        Ok(())
    }
}

/// A message as it comes out of the outbox: with its id, the end-to-end dedupe key
/// that every sink sends and every inbox records.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event {
    /// The outbox id (a UUIDv7, so ids sort by creation time).
    pub id: Uuid,
    /// The kind of aggregate.
    pub aggregate_type: String,
    /// The aggregate instance.
    pub aggregate_id: String,
    /// The event type.
    pub event_type: String,
    /// The body.
    pub payload: Payload,
    /// Extra headers.
    pub headers: Headers,
    /// Failed publish attempts so far.
    pub attempts: u32,
}

impl Event {
    /// An event for `message` under a new id, as [`enqueue`] creates it.
    ///
    #[cfg_attr(
        feature = "postgres",
        doc = "[`enqueue`]: crate::postgres::Outbox::enqueue"
    )]
    #[cfg_attr(not(feature = "postgres"), doc = "[`enqueue`]: Event::from_message")]
    pub fn from_message(message: Message) -> Self {
        Event {
            id: new_id(),
            aggregate_type: message.aggregate_type,
            aggregate_id: message.aggregate_id,
            event_type: message.event_type,
            payload: message.payload,
            headers: message.headers,
            attempts: 0,
        }
    }
}

/// A new UUIDv7: the millisecond clock, then random bits.
pub fn new_id() -> Uuid {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ok = Message::json("order", "1", "created", serde_json::json!({"a": 1}));
        assert!(ok.validate().is_ok());
        let cases = [
            (
                Message {
                    aggregate_type: String::new(),
                    ..ok.clone()
                },
                "aggregate_type",
            ),
            (
                Message {
                    aggregate_id: "x".repeat(256),
                    ..ok.clone()
                },
                "aggregate_id",
            ),
            (
                Message {
                    event_type: "a\nb".into(),
                    ..ok.clone()
                },
                "event_type",
            ),
            (ok.clone().header("", "v"), "headers"),
            (ok.clone().header("a:b", "v"), "headers"),
            (ok.clone().header("k", "a\r\nb"), "headers"),
        ];
        for (message, field) in cases {
            match message.validate() {
                Err(Error::InvalidMessage { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn ids_are_v7_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert_eq!(a.get_version_num(), 7);
    }

    #[test]
    fn payload_bytes() {
        assert_eq!(
            Payload::Json(serde_json::json!({"a": 1})).to_bytes(),
            br#"{"a":1}"#
        );
        assert_eq!(Payload::Bytes(vec![0, 1]).to_bytes(), vec![0, 1]);
    }
}
