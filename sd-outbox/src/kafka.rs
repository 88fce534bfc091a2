//! The Kafka sink: one record per event on an idempotent producer (`enable.idempotence`,
//! `acks=all`), keyed by the aggregate id; every delivery report is awaited.
//!
//! # Records
//!
//! - **Topic**: by default `outbox.event.{aggregate type}` (`outbox.event.order`), the
//!   topic Debezium's Outbox Event Router picks by default; [`KafkaPublisherBuilder::topic`]
//!   replaces the rule with a closure. Topics must exist (or the broker must create them
//!   on first use): sd creates none.
//! - **Key**: the aggregate id, so one aggregate's events go to one partition. The
//!   partitioner is `murmur2_random` (the Java client's, so Kafka Connect and Debezium
//!   place a key on the same partition) unless the [`ClientConfig`] names another.
//! - **Value**: the payload (the JSON text, or the bytes as they are).
//! - **Headers**: `id` (the outbox id, the consumer's dedupe key, named as Debezium's
//!   router and the Redis Streams sink name it), then, named as the NATS sink names them,
//!   `Outbox-Aggregate-Type`, `Outbox-Aggregate-Id`, `Outbox-Type` (the event type) and
//!   `Outbox-Payload-Kind` (`json` or `bytes`), then the event's own headers (one whose
//!   name is among these five is left out).
//!
//! # Guarantees
//!
//! - **At least once.** [`Publisher::publish`] returns `Ok` only when the broker
//!   acknowledged every record of the batch (with `acks=all`: every in-sync replica has
//!   it), so the relay marks a row published only after its acknowledgement. On a
//!   failure the error's `published` counts the leading records that were
//!   acknowledged; the rest are sent again later under the same `id`, and a record
//!   whose acknowledgement was lost then appears twice: consumers dedupe on `id` (with
//!   `postgres::Inbox`, for one).
//! - **Per-aggregate order.** One aggregate's events share a key, hence a partition,
//!   and the idempotent producer writes a partition's records once each, in the order
//!   they were sent, across its own retries. With the relay holding back an
//!   aggregate's later events until the earlier one is acknowledged, a partition holds
//!   each aggregate's events in outbox order (a redelivered record may follow its
//!   successors' first copies only after it had already been written before them, so
//!   the first copies are in order). An event dead-lettered by the relay is, as with
//!   every sink, published after its successors once redriven.
//! - **No Kafka transactions.** Each record is acknowledged on its own; sd ships no
//!   transactional producer (exactly-once needs the consumer's dedupe, as above).
//! - **Failures.** A record not acknowledged within the delivery timeout
//!   ([`KafkaPublisherBuilder::delivery_timeout`], 30 s; librdkafka's
//!   `message.timeout.ms`) fails the batch from that record on. An aggregate type whose
//!   topic is not a valid Kafka topic name (1 to 249 of `a-z A-Z 0-9 . _ -`, not `.` or
//!   `..`) fails to publish and is eventually dead-lettered.
//! - **Recovery.** When a delivery times out, when the broker refuses the producer's
//!   id, epoch or sequence (fenced, unknown producer id, out-of-order sequence: its
//!   idempotence state no longer matches the producer's, after a broker restart), or
//!   when librdkafka declares its producer failed for good, the batch fails and the
//!   publisher replaces the producer with a new one, under a new producer id, for the
//!   next batch; the old one is dropped (its queued records purged) once the batches
//!   still using it are over. The relay then sends again from the first record not
//!   acknowledged, so nothing is lost and each aggregate's first copies stay in order.
//!   A broker that is down is therefore met, when it comes back, by a producer with no
//!   history, rather than one retrying under a bumped epoch.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//!
//! use sd_outbox::kafka::KafkaPublisher;
//! use sd_outbox::{Event, Message, Publisher};
//!
//! let sink = KafkaPublisher::builder("localhost:9092")
//!     .delivery_timeout(Duration::from_secs(10))
//!     .build()?;
//! let message = Message::json("order", "o-1", "order_created", serde_json::json!({"total": 1250}));
//! let event = Event::from_message(message);
//! assert_eq!(sink.topic_of(&event), "outbox.event.order");
//! sink.publish(&[event]).await?; // acknowledged on `outbox.event.order`, key `o-1`
//!
//! // Every aggregate type to one topic of your choice:
//! let one_topic = KafkaPublisher::builder("localhost:9092")
//!     .topic(|_: &Event| "events".to_owned())
//!     .build()?;
//! # let _ = one_topic;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};

use crate::error::{Error, Result};
use crate::message::Event;
use crate::publisher::Publisher;

/// The header carrying the outbox id.
pub const ID_HEADER: &str = "id";

/// The headers sd writes on every record, in order: the outbox id, then the names the
/// NATS sink uses.
const SD_HEADERS: [&str; 5] = [
    ID_HEADER,
    "Outbox-Aggregate-Type",
    "Outbox-Aggregate-Id",
    "Outbox-Type",
    "Outbox-Payload-Kind",
];

/// The librdkafka properties sd sets from its own setters, with the setter to use.
const OWN_PROPERTIES: [(&str, &str); 3] = [
    ("bootstrap.servers", "`KafkaPublisher::builder`"),
    ("message.timeout.ms", "`delivery_timeout`"),
    ("delivery.timeout.ms", "`delivery_timeout`"),
];

/// Delivery errors after which a new producer takes over: broker answers that refuse
/// the producer's id, epoch or sequence (its idempotence state no longer matches the
/// broker's), and a delivery that timed out (librdkafka then bumps the epoch of an
/// idempotent producer itself and sends its requests again, which not every broker
/// accepts after a restart; a new producer starts from a new id instead).
const REPLACE_AFTER: [RDKafkaErrorCode; 6] = [
    RDKafkaErrorCode::MessageTimedOut,
    RDKafkaErrorCode::ProducerFenced,
    RDKafkaErrorCode::InvalidProducerEpoch,
    RDKafkaErrorCode::OutOfOrderSequenceNumber,
    RDKafkaErrorCode::UnknownProducerId,
    RDKafkaErrorCode::InvalidProducerIdMapping,
];

type TopicFn = Arc<dyn Fn(&Event) -> String + Send + Sync>;

/// Options of a [`KafkaPublisher`].
#[derive(Clone)]
pub struct KafkaPublisherBuilder {
    bootstrap_servers: String,
    config: ClientConfig,
    topic: TopicFn,
    delivery_timeout: Duration,
}

impl fmt::Debug for KafkaPublisherBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisherBuilder")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("delivery_timeout", &self.delivery_timeout)
            .finish_non_exhaustive()
    }
}

/// Debezium's default route: `outbox.event.{aggregate type}`.
fn default_topic(event: &Event) -> String {
    format!("outbox.event.{}", event.aggregate_type)
}

impl KafkaPublisherBuilder {
    /// Further librdkafka properties (TLS, SASL, `linger.ms`, `partitioner`, ...). They
    /// may not set `bootstrap.servers` or `message.timeout.ms` (the builder's argument
    /// and [`delivery_timeout`](Self::delivery_timeout) do), nor turn idempotence or
    /// `acks=all` off.
    pub fn client_config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// The topic of an event (default: `outbox.event.{aggregate type}`, Debezium's
    /// default route). The closure runs for every event published.
    pub fn topic(mut self, topic: impl Fn(&Event) -> String + Send + Sync + 'static) -> Self {
        self.topic = Arc::new(topic);
        self
    }

    /// How long a record may wait for its acknowledgement, retries included, before its
    /// batch fails (default 30 s; whole milliseconds). Keep it below the relay's
    /// `timeout`.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// The publisher and its producer; fails with [`Error::InvalidConfig`] naming
    /// `bootstrap_servers`, `delivery_timeout` or `client_config` (a property sd sets,
    /// or one librdkafka refuses), or with [`Error::Backend`] when librdkafka cannot
    /// create the producer.
    pub fn build(self) -> Result<KafkaPublisher> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(Error::config(
                "bootstrap_servers",
                "must name at least one `host:port`",
            ));
        }
        let millis = self.delivery_timeout.as_millis();
        if millis == 0 || millis > i32::MAX as u128 {
            return Err(Error::config(
                "delivery_timeout",
                "must be at least 1 ms and at most about 24 days",
            ));
        }
        let mut config = self.config;
        for (property, setter) in OWN_PROPERTIES {
            if config.get(property).is_some() {
                return Err(Error::config(
                    "client_config",
                    format!("sets `{property}`; use {setter} instead"),
                ));
            }
        }
        for (property, allowed) in [
            ("enable.idempotence", &["true"][..]),
            ("acks", &["all", "-1"][..]),
        ] {
            if let Some(value) = config.get(property)
                && !allowed.contains(&value)
            {
                return Err(Error::config(
                    "client_config",
                    format!(
                        "sets `{property}={value}`; the outbox needs `{property}={}` (or leave it out)",
                        allowed[0]
                    ),
                ));
            }
        }
        if config.get("partitioner").is_none() {
            config.set("partitioner", "murmur2_random");
        }
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", millis.to_string());
        let producer: FutureProducer = config.create().map_err(|e| match e {
            KafkaError::ClientConfig(..) => Error::config("client_config", e.to_string()),
            other => Error::Backend {
                backend: "kafka",
                source: Box::new(other),
            },
        })?;
        Ok(KafkaPublisher {
            producer: Arc::new(Producer {
                config,
                current: Mutex::new((0, producer)),
            }),
            topic: self.topic,
            delivery_timeout: self.delivery_timeout,
        })
    }
}

/// The producer in use, numbered, and the configuration that makes its successor.
struct Producer {
    config: ClientConfig,
    current: Mutex<(u64, FutureProducer)>,
}

impl Producer {
    fn lock(&self) -> MutexGuard<'_, (u64, FutureProducer)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The producer in use and its number.
    fn current(&self) -> (u64, FutureProducer) {
        self.lock().clone()
    }

    /// Called once a batch sent through producer `generation` is over: replaces that
    /// producer when the broker refused its identity (`refused`) or librdkafka declared
    /// it failed for good, and lets go of a replaced one off the runtime's threads
    /// (dropping a producer purges and flushes it, which blocks for a moment).
    fn release(
        &self,
        generation: u64,
        producer: FutureProducer,
        refused: Option<RDKafkaErrorCode>,
    ) {
        let mut retired = vec![producer];
        {
            let mut current = self.lock();
            let failed = refused
                .map(|code| {
                    (
                        code,
                        "a delivery timed out, or the broker refused the producer id or epoch"
                            .to_owned(),
                    )
                })
                .or_else(|| retired[0].client().fatal_error());
            if current.0 == generation
                && let Some((code, reason)) = failed
            {
                match self.config.create::<FutureProducer>() {
                    Ok(fresh) => {
                        tracing::warn!(?code, %reason, "kafka producer failed for good; replaced by a new one");
                        retired.push(std::mem::replace(&mut current.1, fresh));
                        current.0 += 1;
                    }
                    Err(e) => {
                        tracing::warn!(?code, %reason, error = %e, "kafka producer failed for good and cannot be replaced yet");
                    }
                }
            }
            if current.0 == generation {
                return; // still in use: this was not its last handle
            }
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(retired))),
            Err(_) => drop(retired),
        }
    }
}

/// Publishes to Kafka through an idempotent rdkafka producer; see the
/// [module docs](self). Clones share the producer.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: Arc<Producer>,
    topic: TopicFn,
    delivery_timeout: Duration,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("delivery_timeout", &self.delivery_timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// Options for a producer on `bootstrap_servers` (`host:port`, comma separated).
    pub fn builder(bootstrap_servers: impl Into<String>) -> KafkaPublisherBuilder {
        KafkaPublisherBuilder {
            bootstrap_servers: bootstrap_servers.into(),
            config: ClientConfig::new(),
            topic: Arc::new(default_topic),
            delivery_timeout: Duration::from_secs(30),
        }
    }

    /// The topic `event` goes to.
    pub fn topic_of(&self, event: &Event) -> String {
        (self.topic)(event)
    }

    fn headers(event: &Event) -> OwnedHeaders {
        let id = event.id.to_string();
        let own = [
            id.as_str(),
            event.aggregate_type.as_str(),
            event.aggregate_id.as_str(),
            event.event_type.as_str(),
            event.payload.kind(),
        ];
        let mut headers = OwnedHeaders::new_with_capacity(own.len() + event.headers.len());
        for (key, value) in SD_HEADERS.into_iter().zip(own) {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        for (key, value) in &event.headers {
            if !SD_HEADERS.contains(&key.as_str()) {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_str()),
                });
            }
        }
        headers
    }

    /// Queues `events` on `producer` in order until the first that cannot be queued:
    /// their delivery reports, and the error of that first one.
    fn enqueue(
        &self,
        producer: &FutureProducer,
        events: &[Event],
    ) -> (Vec<DeliveryFuture>, Option<Error>) {
        let mut deliveries = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let topic = self.topic_of(event);
            if !sd_core::name::is_kafka_topic(&topic) {
                let reason = format!(
                    "topic `{topic}` is not a valid Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
                );
                return (deliveries, Some(Error::publish(i, reason)));
            }
            let payload = event.payload.to_bytes();
            let record = FutureRecord::to(&topic)
                .key(event.aggregate_id.as_str())
                .payload(payload.as_slice())
                .headers(Self::headers(event));
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => return (deliveries, Some(Error::publish(i, format!("kafka: {e}")))),
            }
        }
        (deliveries, None)
    }
}

impl Publisher for KafkaPublisher {
    fn system(&self) -> &'static str {
        sd_core::observe::backend::KAFKA
    }

    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        // Queued before the future, in order: the records borrow `events`.
        let (generation, producer) = self.producer.current();
        let (deliveries, failure) = self.enqueue(&producer, events);
        let shared = Arc::clone(&self.producer);
        async move {
            let mut outcome = failure.map_or(Ok(()), Err);
            let mut refused = None;
            for (i, delivery) in deliveries.into_iter().enumerate() {
                let failed = match delivery.await {
                    Ok(Ok(_)) => continue,
                    Ok(Err((e, _))) => {
                        refused = e.rdkafka_error_code().filter(|c| REPLACE_AFTER.contains(c));
                        Error::publish(i, format!("kafka: {e}"))
                    }
                    Err(_) => Error::publish(i, "kafka: the producer was dropped"),
                };
                outcome = Err(failed);
                break;
            }
            shared.release(generation, producer, refused);
            outcome
        }
    }
}
