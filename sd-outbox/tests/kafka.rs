//! The Kafka sink on a real Kafka-API broker (tansu, from sd-testkit), read back with an
//! rdkafka consumer: the Publisher contract, keys and topics, per-aggregate order over
//! many partitions, and the PostgreSQL relay through a paused broker and through one
//! killed and started again on its data.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use sd_outbox::kafka::KafkaPublisher;
use sd_outbox::{Error, Event, Message, Publisher, conformance};
use sd_testkit::KafkaBroker;
use uuid::Uuid;

/// The default topic of the `order` aggregate type.
const ORDERS: &str = "outbox.event.order";

fn broker() -> KafkaBroker {
    KafkaBroker::start().expect("a tansu broker (scripts/test.sh builds it; or set SD_TANSU)")
}

/// A publisher to `broker` that gives up on a record after `timeout`.
fn publisher(broker: &KafkaBroker, timeout: Duration) -> KafkaPublisher {
    KafkaPublisher::builder(broker.bootstrap())
        .delivery_timeout(timeout)
        .build()
        .unwrap()
}

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
struct Record {
    partition: i32,
    key: String,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

impl Record {
    fn header(&self, name: &str) -> &str {
        let found = self.headers.iter().find(|(k, _)| k == name);
        &found
            .unwrap_or_else(|| panic!("no `{name}` header in {self:?}"))
            .1
    }

    fn id(&self) -> Uuid {
        self.header("id").parse().unwrap()
    }

    /// The JSON payload's `n` (0 for a byte payload).
    fn n(&self) -> usize {
        let payload: serde_json::Value = serde_json::from_slice(&self.payload).unwrap_or_default();
        payload["n"].as_u64().unwrap_or(0) as usize
    }
}

/// Every record of `topic`, partition after partition, each in offset order: reads from
/// the beginning until every partition passed its high watermark and then a second went
/// by without a record (blocking). tansu 0.6 answers `ListOffsets` (latest) with the last
/// record batch's base offset + 1, short of the last record when that batch holds
/// several: the watermark is only a floor, and the quiet second finds the rest of what
/// was acknowledged before the read began.
fn read_topic(bootstrap: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", sd_testkit::unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assert!(partitions > 0, "topic `{topic}` has no partitions");
    let mut assignment = TopicPartitionList::new();
    let mut high = HashMap::new();
    for p in 0..partitions {
        let (_, end) = consumer.fetch_watermarks(topic, p, timeout).unwrap();
        high.insert(p, end);
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut next: HashMap<i32, i64> = (0..partitions).map(|p| (p, 0)).collect();
    let mut by_partition: HashMap<i32, Vec<Record>> = HashMap::new();
    let start = Instant::now();
    let mut last = Instant::now();
    while (0..partitions).any(|p| next[&p] < high[&p]) || last.elapsed() < Duration::from_secs(1) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "reading `{topic}`: at {next:?} of {high:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        last = Instant::now();
        let message = message.unwrap();
        next.insert(message.partition(), message.offset() + 1);
        let headers = message.headers().map_or_else(Vec::new, |headers| {
            headers
                .iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        });
        by_partition
            .entry(message.partition())
            .or_default()
            .push(Record {
                partition: message.partition(),
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                headers,
                payload: message.payload().unwrap_or_default().to_vec(),
            });
    }
    (0..partitions)
        .flat_map(|p| by_partition.remove(&p).unwrap_or_default())
        .collect()
}

/// [`read_topic`] off the runtime's threads.
async fn records(bootstrap: &str, topic: &str) -> Vec<Record> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_topic(&bootstrap, &topic))
        .await
        .unwrap()
}

/// The records of `topic` as `drains_in_order` takes them: (id, aggregate id, `n`, topic).
async fn as_rows(bootstrap: &str, topic: &str) -> Vec<(Uuid, String, usize, String)> {
    let all = records(bootstrap, topic).await;
    all.iter()
        .map(|r| (r.id(), r.key.clone(), r.n(), topic.to_owned()))
        .collect()
}

#[test]
fn the_publisher_contract_holds_on_one_topic() {
    let broker = broker();
    // The suite makes up aggregate types and the broker creates no topic on first use,
    // so every event goes to one topic; one partition keeps the broker's order total.
    broker.create_topic("conformance", 1).unwrap();
    let bootstrap = broker.bootstrap();
    let sink = KafkaPublisher::builder(&bootstrap)
        .topic(|_: &Event| "conformance".to_owned())
        .build()
        .unwrap();
    runtime().block_on(async {
        let read = |aggregate_type: String| {
            let bootstrap = bootstrap.clone();
            async move {
                let all = records(&bootstrap, "conformance").await;
                all.iter()
                    .filter(|r| r.header("Outbox-Aggregate-Type") == aggregate_type)
                    .map(Record::id)
                    .collect::<Vec<_>>()
            }
        };
        conformance::run_all(&sink, read).await;
    });
}

/// `per_aggregate` events for each of `aggregates` aggregates of type `order`, round robin
/// (aggregate `agg-{a}` gets `n` = 0, 1, ...).
fn order_events(aggregates: usize, per_aggregate: usize) -> Vec<Event> {
    (0..aggregates * per_aggregate)
        .map(|i| {
            Event::from_message(order_event(
                &format!("agg-{}", i % aggregates),
                i / aggregates,
            ))
        })
        .collect()
}

#[test]
fn records_are_keyed_by_aggregate_and_keep_its_order_in_one_partition() {
    let broker = broker();
    broker.create_topic(ORDERS, 12).unwrap();
    broker.create_topic("outbox.event.invoice", 1).unwrap();
    let sink = publisher(&broker, Duration::from_secs(10));
    runtime().block_on(async {
        let events = order_events(200, 10);
        for batch in events.chunks(100) {
            sink.publish(batch).await.unwrap();
        }
        let invoice = Event::from_message(
            Message::bytes("invoice", "i-1", "issued", b"raw".to_vec())
                .header("trace", "t1")
                .header("id", "not the outbox id"),
        );
        sink.publish(std::slice::from_ref(&invoice)).await.unwrap();

        let got = records(&broker.bootstrap(), ORDERS).await;
        assert_eq!(got.len(), events.len(), "each event once");
        let sent: HashMap<Uuid, &Event> = events.iter().map(|e| (e.id, e)).collect();
        let mut partition_of: HashMap<&str, i32> = HashMap::new();
        let mut next: HashMap<&str, usize> = HashMap::new();
        for record in &got {
            let event = sent[&record.id()];
            assert_eq!(
                record.key, event.aggregate_id,
                "the key is the aggregate id"
            );
            assert_eq!(record.header("Outbox-Aggregate-Id"), event.aggregate_id);
            assert_eq!(record.header("Outbox-Aggregate-Type"), "order");
            assert_eq!(record.header("Outbox-Type"), "order_changed");
            assert_eq!(record.header("Outbox-Payload-Kind"), "json");
            let aggregate = event.aggregate_id.as_str();
            let partition = *partition_of.entry(aggregate).or_insert(record.partition);
            assert_eq!(record.partition, partition, "{aggregate} in one partition");
            let expected = next.entry(aggregate).or_insert(0);
            assert_eq!(
                record.n(),
                *expected,
                "{aggregate} in order in its partition"
            );
            *expected += 1;
        }
        assert!(next.values().all(|&n| n == 10));
        let used: std::collections::HashSet<i32> = partition_of.values().copied().collect();
        assert!(
            used.len() >= 8,
            "200 keys spread over the partitions: {used:?}"
        );

        let got = records(&broker.bootstrap(), "outbox.event.invoice").await;
        assert_eq!(got.len(), 1);
        let record = &got[0];
        assert_eq!(
            record.id(),
            invoice.id,
            "sd's `id` header, not the event's own"
        );
        assert_eq!(record.headers.iter().filter(|(k, _)| k == "id").count(), 1);
        assert_eq!(record.header("trace"), "t1");
        assert_eq!(record.header("Outbox-Payload-Kind"), "bytes");
        assert_eq!(record.payload, b"raw");
        assert_eq!(record.key, "i-1");
    });
}

#[test]
fn topic_routing_can_be_replaced_and_a_bad_topic_is_a_typed_error() {
    let broker = broker();
    broker.create_topic("app.order.events", 2).unwrap();
    let sink = KafkaPublisher::builder(broker.bootstrap())
        .topic(|e: &Event| format!("app.{}.events", e.aggregate_type))
        .build()
        .unwrap();
    runtime().block_on(async {
        let first = Event::from_message(order_event("o-1", 0));
        assert_eq!(sink.topic_of(&first), "app.order.events");
        let bad = Event::from_message(Message::json("bad type", "x", "t", serde_json::json!({})));
        let after = Event::from_message(order_event("o-1", 1));
        match sink.publish(&[first.clone(), bad, after]).await {
            Err(Error::Publish { published, reason }) => {
                assert_eq!(published, 1, "{reason}");
                assert!(reason.contains("`app.bad type.events`"), "{reason}");
            }
            other => panic!("expected a publish error, got {other:?}"),
        }
        let got = records(&broker.bootstrap(), "app.order.events").await;
        let ids: Vec<Uuid> = got.iter().map(Record::id).collect();
        assert_eq!(
            ids,
            [first.id],
            "the events before the bad one went, none after"
        );
    });
}

/// The PostgreSQL relay while the broker is frozen: 100 events are published, the broker
/// is paused (SIGSTOP), 300 more are written and fail to publish (their deliveries time
/// out unacknowledged) without one row being marked; once it is resumed every event
/// arrives, each aggregate's in order.
#[test]
fn a_paused_broker_marks_nothing_published_and_then_loses_nothing() {
    let (before, during) = (100, 300);
    let mut broker = broker();
    broker.create_topic(ORDERS, 4).unwrap();
    let bootstrap = broker.bootstrap();
    let sink = publisher(&broker, Duration::from_secs(1));
    with_outbox(|outbox| async move {
        let relays = outage_relays(&outbox, &sink);
        write_round_robin(&outbox, 0..before).await;
        eventually("the first events", || drained(&outbox)).await;
        assert_eq!(outbox.stats().await.unwrap().published, before as u64);
        broker.pause().unwrap();
        write_round_robin(&outbox, before..before + during).await;
        failures_seen(&relays).await;
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            stats.published, before as u64,
            "nothing marked meanwhile: {stats:?}"
        );
        assert_eq!(stats.backlog, during as u64);
        broker.resume().unwrap();
        let per_aggregate = (before + during) / 5;
        drains_in_order(&outbox, relays, per_aggregate, || {
            as_rows(&bootstrap, ORDERS)
        })
        .await;
    });
}

/// The PostgreSQL relay through a broker killed (SIGKILL) under load and started again on
/// its SQLite data: 100 events are published, the broker is killed, 300 more are written
/// and fail to publish (their deliveries time out, so the publisher replaces its
/// producer); the broker is started again after the old producer's last delivery timed
/// out, and every event arrives, each aggregate's in order, none marked before.
#[test]
fn a_killed_broker_restarted_on_its_data_loses_nothing() {
    let (before, during) = (100, 300);
    let mut broker = KafkaBroker::start_durable().expect("a tansu broker with the libsql feature");
    broker.create_topic(ORDERS, 4).unwrap();
    let bootstrap = broker.bootstrap();
    let timeout = Duration::from_secs(1);
    let sink = publisher(&broker, timeout);
    with_outbox(|outbox| async move {
        let relays = outage_relays(&outbox, &sink);
        write_round_robin(&outbox, 0..before).await;
        eventually("the first events", || drained(&outbox)).await;
        broker.kill().unwrap();
        write_round_robin(&outbox, before..before + during).await;
        failures_seen(&relays).await;
        // Every delivery queued before the kill has timed out by now.
        tokio::time::sleep(timeout * 2).await;
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            stats.published, before as u64,
            "nothing marked meanwhile: {stats:?}"
        );
        broker.start_again().unwrap();
        let per_aggregate = (before + during) / 5;
        drains_in_order(&outbox, relays, per_aggregate, || {
            as_rows(&bootstrap, ORDERS)
        })
        .await;
    });
}

#[test]
fn bad_kafka_sink_configuration_is_refused() {
    let builder = || KafkaPublisher::builder("127.0.0.1:9092");
    let config = |key: &str, value: &str| {
        let mut config = ClientConfig::new();
        config.set(key, value);
        config
    };
    let cases = [
        (KafkaPublisher::builder(" "), "bootstrap_servers"),
        (
            builder().delivery_timeout(Duration::ZERO),
            "delivery_timeout",
        ),
        (
            builder().delivery_timeout(Duration::from_secs(30 * 24 * 3600)),
            "delivery_timeout",
        ),
        (
            builder().client_config(config("enable.idempotence", "false")),
            "client_config",
        ),
        (
            builder().client_config(config("acks", "1")),
            "client_config",
        ),
        (
            builder().client_config(config("bootstrap.servers", "elsewhere:9092")),
            "client_config",
        ),
        (
            builder().client_config(config("message.timeout.ms", "5")),
            "client_config",
        ),
        (
            builder().client_config(config("no.such.property", "1")),
            "client_config",
        ),
    ];
    for (cfg, field) in cases {
        assert_eq!(invalid_field(cfg.build()), field);
    }
    let built = builder()
        .client_config(config("acks", "-1"))
        .build()
        .unwrap();
    let event = Event::from_message(order_event("o-1", 0));
    assert_eq!(built.topic_of(&event), ORDERS, "Debezium's default route");
}
