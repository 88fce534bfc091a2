//! The [`Publisher`] contract as a suite of async checks, for any sink: the crate's own
//! sinks run it (memory, Redis Streams, NATS JetStream, Kafka), and so can a new broker
//! (feature `test-util`).
//!
//! Each case publishes events of an aggregate type of its own, then asks `read` for the
//! ids the broker holds for that type, in the broker's order, and panics when the sink
//! breaks the contract: acknowledged events are there, in the order given, with their
//! ids; an empty batch sends nothing; an event sent again keeps its id (a broker that
//! dedupes may keep one copy); both payload kinds are accepted.
//!
//! ```
//! use sd_outbox::{MemoryPublisher, conformance};
//!
//! let sink = MemoryPublisher::new();
//! let read = |aggregate_type: String| {
//!     let sink = sink.clone();
//!     async move {
//!         sink.events()
//!             .into_iter()
//!             .filter(|e| e.aggregate_type == aggregate_type)
//!             .map(|e| e.id)
//!             .collect::<Vec<_>>()
//!     }
//! };
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! rt.block_on(conformance::run_all(&sink, read));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::future::Future;

use uuid::Uuid;

use crate::message::{Event, Message};
use crate::publisher::Publisher;

/// A fresh aggregate type: letters and digits, a valid Redis key part and NATS subject
/// token.
fn aggregate_type(case: &str) -> String {
    format!("{case}{:08x}", rand::random::<u32>())
}

fn events(aggregate_type: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let message = if i % 2 == 0 {
                Message::json(
                    aggregate_type,
                    format!("a-{}", i % 3),
                    "changed",
                    serde_json::json!({ "n": i }),
                )
            } else {
                Message::bytes(
                    aggregate_type,
                    format!("a-{}", i % 3),
                    "changed",
                    i.to_be_bytes().to_vec(),
                )
            };
            Event::from_message(message.header("n", i.to_string()))
        })
        .collect()
}

/// What the broker holds for an aggregate type: the ids of its events, in the broker's
/// order. Any `Fn(String) -> impl Future<Output = Vec<Uuid>>` is one.
pub trait Read {
    /// The ids the broker holds for `aggregate_type`, in its order.
    fn read(&self, aggregate_type: String) -> impl Future<Output = Vec<Uuid>>;
}

impl<F, Fut> Read for F
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Vec<Uuid>>,
{
    fn read(&self, aggregate_type: String) -> impl Future<Output = Vec<Uuid>> {
        self(aggregate_type)
    }
}

fn ids(events: &[Event]) -> Vec<Uuid> {
    events.iter().map(|e| e.id).collect()
}

async fn publish<P: Publisher>(publisher: &P, events: &[Event]) {
    if let Err(e) = publisher.publish(events).await {
        panic!("the sink refused {} event(s): {e}", events.len());
    }
}

/// The contract: once `publish` returns, every event of the batch is at the broker, in
/// the order given, under its own id; json and byte payloads alike.
pub async fn acknowledged_events_are_there_in_order<P: Publisher>(publisher: &P, read: &impl Read) {
    let t = aggregate_type("ordered");
    let batch = events(&t, 10);
    publish(publisher, &batch).await;
    assert_eq!(read.read(t.clone()).await, ids(&batch), "the first batch");
    let more = events(&t, 3);
    publish(publisher, &more).await;
    let mut want = ids(&batch);
    want.extend(ids(&more));
    assert_eq!(read.read(t).await, want, "a second batch follows the first");
}

/// The contract: an empty batch is acknowledged and sends nothing.
pub async fn an_empty_batch_sends_nothing<P: Publisher>(publisher: &P, read: &impl Read) {
    let t = aggregate_type("empty");
    publish(publisher, &[]).await;
    assert_eq!(read.read(t).await, Vec::<Uuid>::new());
}

/// The contract: an event sent again (after a lost acknowledgement) arrives under the
/// same id, so consumers can dedupe; a broker that dedupes itself keeps one copy.
pub async fn a_republished_event_keeps_its_id<P: Publisher>(publisher: &P, read: &impl Read) {
    let t = aggregate_type("again");
    let batch = events(&t, 2);
    publish(publisher, &batch).await;
    publish(publisher, &batch[1..]).await;
    let got = read.read(t).await;
    assert!(
        got == ids(&batch) || got == [batch[0].id, batch[1].id, batch[1].id],
        "expected the two ids, the second maybe twice; got {got:?}"
    );
}

/// The contract: a batch of 500 keeps its order.
pub async fn a_large_batch_keeps_its_order<P: Publisher>(publisher: &P, read: &impl Read) {
    let t = aggregate_type("large");
    let batch = events(&t, 500);
    publish(publisher, &batch).await;
    assert_eq!(read.read(t).await, ids(&batch));
}

/// Runs every case on `publisher`; `read` returns the ids the broker holds for an
/// aggregate type, in the broker's order.
pub async fn run_all<P: Publisher>(publisher: &P, read: impl Read) {
    acknowledged_events_are_there_in_order(publisher, &read).await;
    an_empty_batch_sends_nothing(publisher, &read).await;
    a_republished_event_keeps_its_id(publisher, &read).await;
    a_large_batch_keeps_its_order(publisher, &read).await;
}
