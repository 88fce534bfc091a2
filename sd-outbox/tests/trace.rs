//! Trace context across the asynchronous hop, on real PostgreSQL, Redis, nats-server and a
//! tansu Kafka broker:
//! a "request" span enqueues an order event in a PostgreSQL transaction, the relay
//! publishes it (to Redis Streams, to NATS JetStream, to Kafka), and the job that handles
//! it (in sd-pool's `StreamConsumer`; in a `Pool` fed by a JetStream pull consumer; in
//! sd-pool's `KafkaConsumer`) is in the request's trace: the spans an in-memory OpenTelemetry exporter collects show one trace
//! id from the request to the job, the job's parent being the span `enqueue` recorded.
//! An event enqueued outside any span gives a job with a trace of its own; a malformed
//! `traceparent` gives a fresh root and no error; a `traceparent` the producer set itself
//! is kept and followed. A job the pool hands back at shutdown and the caller runs itself
//! keeps its parent too.
//!
//! The subscriber is global (spans are entered on every worker thread of the runtime), so
//! this file is a test binary of its own, and each test finds its spans by its pool's
//! name.
#![allow(clippy::unwrap_used)] // a failed step is a test failure

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use common::{eventually, ordered_relay, with_outbox, write};
use futures::StreamExt as _;
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sd_outbox::Message;
use sd_outbox::kafka::KafkaPublisher;
use sd_outbox::nats::JetStreamPublisher;
use sd_outbox::postgres::Outbox;
use sd_outbox::redis::RedisStreamsPublisher;
use sd_outbox::trace::{TRACEPARENT, TraceParent};
use sd_pool::kafka::{KafkaConsumer, Record};
use sd_pool::redis::{Entry, StreamConsumer};
use sd_pool::{Job, Order, Pool};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// A `traceparent` the producer sets itself, of a trace no span here is in.
const USER_SET: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const MALFORMED: &str = "00-0af7651916cd43dd8448eb211c80319c-not-a-span-01";

/// The spans every test of this binary exports.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    let (exporter, _provider) = EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("sd-outbox"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .unwrap();
        (exporter, provider)
    });
    exporter
}

/// What the test enqueued: the request span's trace context, and per aggregate id the
/// `traceparent` the job should continue (`None`: a root of its own).
struct Written {
    request: TraceParent,
    expected: BTreeMap<&'static str, Option<TraceParent>>,
}

/// Enqueues four order events: in the request span, outside any span, with a malformed
/// `traceparent`, and with one of the producer's own inside the request span.
async fn enqueue(outbox: &Outbox) -> Written {
    let event = |aggregate: &str| {
        Message::json(
            "order",
            aggregate,
            "order_created",
            serde_json::json!({"total": 1250}),
        )
    };
    let request = tracing::info_span!("request");
    async {
        write(outbox, event("traced")).await;
        write(outbox, event("user-set").header(TRACEPARENT, USER_SET)).await;
    }
    .instrument(request.clone())
    .await;
    write(outbox, event("untraced")).await;
    write(outbox, event("malformed").header(TRACEPARENT, MALFORMED)).await;
    let request = TraceParent::of(&request).expect("the request span has a trace context");
    let expected = BTreeMap::from([
        ("traced", Some(request.clone())),
        ("user-set", TraceParent::parse(USER_SET, None)),
        ("untraced", None),
        ("malformed", None),
    ]);
    Written { request, expected }
}

/// What a handler saw: the aggregate id and the event's `traceparent` header as it came
/// off the broker.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The handler's own work: a `handle` span (under the job's) that records the event.
fn handle(
    seen: &Seen,
    aggregate: String,
    traceparent: Option<String>,
) -> impl Future<Output = Result<(), String>> + Send + use<> {
    let seen = Arc::clone(seen);
    async move {
        // Made when the job first polls it: under the job's span.
        let span = tracing::info_span!("handle", aggregate = %aggregate);
        let _entered = span.enter();
        seen.lock().unwrap().push((aggregate, traceparent));
        Ok(())
    }
}

/// Resolves once the handlers saw `n` events: a consumer's shutdown signal.
fn handled(seen: &Seen, n: usize) -> impl Future<Output = ()> + use<> {
    let seen = Arc::clone(seen);
    async move {
        eventually("every event handled", || {
            let seen = seen.lock().unwrap().len();
            async move { seen == n }
        })
        .await;
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// Waits until the pool named `pool` exported a job span per event, then checks each
/// job's trace against what was written.
async fn assert_traces(pool: &str, written: &Written, seen: &Seen) {
    let jobs_of_pool = || {
        exporter()
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.name == "pool.job" && attribute(s, "sd.name").as_deref() == Some(pool))
            .collect::<Vec<_>>()
    };
    eventually("a job span per event", || {
        let n = jobs_of_pool().len();
        async move { n == written.expected.len() }
    })
    .await;
    let spans = exporter().get_finished_spans().unwrap();
    let jobs = jobs_of_pool();

    // The headers reached the wire: `enqueue` recorded the request span, and kept the
    // producer's own values.
    let seen: BTreeMap<String, Option<String>> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(seen.len(), written.expected.len(), "{seen:?}");
    assert_eq!(seen["traced"], Some(written.request.to_string()));
    assert_eq!(seen["user-set"].as_deref(), Some(USER_SET), "kept as set");
    assert_eq!(seen["untraced"], None, "no span, no header");
    assert_eq!(seen["malformed"].as_deref(), Some(MALFORMED));

    let mut trace_ids = Vec::new();
    for (aggregate, parent) in &written.expected {
        // The handler's span, under one of this pool's jobs (the other test's handlers
        // see the same aggregate ids).
        let (job, handle) = jobs
            .iter()
            .find_map(|job| {
                let handle = spans.iter().find(|s| {
                    s.name == "handle"
                        && s.parent_span_id == job.span_context.span_id()
                        && attribute(s, "aggregate").as_deref() == Some(aggregate)
                })?;
                Some((job, handle))
            })
            .unwrap_or_else(|| panic!("no job of {pool} ran a handle span for {aggregate}"));
        let trace_id = job.span_context.trace_id();
        assert_eq!(handle.span_context.trace_id(), trace_id);
        match parent {
            Some(parent) => {
                let sc = parent.span_context();
                assert_eq!(trace_id, sc.trace_id(), "{aggregate}: one trace end to end");
                assert_eq!(
                    job.parent_span_id,
                    sc.span_id(),
                    "{aggregate}: the recorded span is the parent"
                );
                assert!(job.parent_span_is_remote, "{aggregate}");
            }
            None => {
                assert_eq!(job.parent_span_id, SpanId::INVALID, "{aggregate}: a root");
                assert_ne!(
                    trace_id,
                    written.request.span_context().trace_id(),
                    "{aggregate}"
                );
            }
        }
        trace_ids.push(trace_id);
    }
    trace_ids.sort_unstable_by_key(|id| id.to_bytes());
    trace_ids.dedup();
    assert_eq!(
        trace_ids.len(),
        4,
        "four traces: request, producer's own, two fresh roots"
    );
}

/// A job the pool hands back at shutdown, run elsewhere, stays in its producer's trace:
/// `ReturnedJob::run` opens the job's span under the parent the job was given.
#[test]
fn a_job_handed_back_at_shutdown_and_run_elsewhere_keeps_its_trace_parent() {
    let exporter = exporter();
    sd_testkit::runtime().block_on(async {
        let name = sd_testkit::unique_name("returned-jobs");
        let pool = Pool::builder()
            .workers(1)
            .queue(4)
            .name(&name)
            .build()
            .unwrap();
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let (running, started) = tokio::sync::oneshot::channel();
        let blocker = pool
            .submit(Job::new(async move {
                let _ = running.send(());
                g.notified().await
            }))
            .await
            .unwrap();
        // The one worker holds the blocker before the job under test is queued, so
        // shutdown finds exactly that job waiting however slowly the worker started.
        started.await.unwrap();
        let parent = TraceParent::parse(USER_SET, None).unwrap();
        let queued = pool
            .submit(
                Job::new(async { tracing::info_span!("handle").in_scope(|| 7) })
                    .with_trace_parent(parent.clone()),
            )
            .await
            .unwrap();
        let mut shutdown = pool.shutdown_now();
        assert_eq!(shutdown.returned.len(), 1, "the queued job is handed back");
        shutdown.returned.pop().unwrap().run().await;
        assert_eq!(queued.await.unwrap(), 7);
        drop((blocker, gate));

        let spans = exporter.get_finished_spans().unwrap();
        // The blocker ran in a `pool.job` span of this pool too, ended by the abort at
        // some point of its own: the returned job's is the one with the `handle` span
        // under it.
        let job = spans
            .iter()
            .filter(|s| s.name == "pool.job" && attribute(s, "sd.name").as_deref() == Some(&name))
            .find(|job| {
                spans
                    .iter()
                    .any(|s| s.name == "handle" && s.parent_span_id == job.span_context.span_id())
            })
            .expect("the returned job ran in a pool.job span");
        let sc = parent.span_context();
        assert_eq!(
            job.span_context.trace_id(),
            sc.trace_id(),
            "the producer's trace"
        );
        assert_eq!(job.parent_span_id, sc.span_id());
        assert!(job.parent_span_is_remote);
        let handle = spans
            .iter()
            .find(|s| s.name == "handle" && s.parent_span_id == job.span_context.span_id())
            .expect("the job's own span is under it");
        assert_eq!(handle.span_context.trace_id(), sc.trace_id());
    });
}

fn pool(name: &str) -> Pool {
    Pool::builder()
        .workers(2)
        .queue(16)
        .order(Order::PerKey)
        .name(name)
        .build()
        .unwrap()
}

#[test]
fn a_job_fed_from_redis_streams_is_in_the_trace_of_the_request_that_enqueued_it() {
    exporter(); // installs the subscriber before any span is made
    let redis =
        sd_testkit::redis().expect("a redis server (install redis-server or set SD_REDIS_URL)");
    with_outbox(|outbox| async move {
        let client = redis::Client::open(redis.url()).unwrap();
        let config =
            ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .unwrap();
        let prefix = sd_testkit::unique_name("outbox");
        let publisher = RedisStreamsPublisher::builder(conn.clone())
            .prefix(&prefix)
            .build()
            .unwrap();
        let stream = publisher.stream("order");
        let written = enqueue(&outbox).await;
        let relay = ordered_relay(&outbox, publisher);

        let name = sd_testkit::unique_name("redis-jobs");
        let consumer = StreamConsumer::builder()
            .stream(&stream)
            .group("billing")
            .consumer("c1")
            .key_field("aggregateid")
            .build(conn, pool(&name))
            .await
            .unwrap();
        let seen: Seen = Arc::default();
        let handler = {
            let seen = Arc::clone(&seen);
            move |entry: Entry| {
                let aggregate = entry.get_str("aggregateid").unwrap_or_default().to_owned();
                let headers: BTreeMap<String, String> = entry
                    .get("headers")
                    .and_then(|h| serde_json::from_slice(h).ok())
                    .unwrap_or_default();
                handle(&seen, aggregate, headers.get(TRACEPARENT).cloned())
            }
        };
        let all = written.expected.len();
        let report = consumer.run(handler, handled(&seen, all)).await.unwrap();
        assert_eq!(
            report.acked, 4,
            "every handler succeeded, the malformed one too: {report:?}"
        );
        assert_eq!(report.left_pending, 0);
        assert_traces(&name, &written, &seen).await;
        relay.shutdown().await;
    });
}

#[test]
fn a_job_fed_from_nats_jetstream_is_in_the_trace_of_the_request_that_enqueued_it() {
    exporter(); // installs the subscriber before any span is made
    let nats = sd_testkit::nats().expect("a nats server (install nats-server or set SD_NATS_URL)");
    with_outbox(|outbox| async move {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .connect(nats.url())
            .await
            .unwrap();
        let context = jetstream::new(client);
        let stream_name = sd_testkit::unique_name("OUTBOX");
        let publisher = JetStreamPublisher::builder(context.clone())
            .prefix(sd_testkit::unique_name("outbox"))
            .build()
            .unwrap();
        publisher
            .ensure_stream(&stream_name, Duration::from_secs(120))
            .await
            .unwrap();
        let written = enqueue(&outbox).await;
        let relay = ordered_relay(&outbox, publisher);

        // The consumer: each message becomes a job whose parent is the message's context.
        let stream = context.get_stream(&stream_name).await.unwrap();
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("billing".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let name = sd_testkit::unique_name("nats-jobs");
        let pool = pool(&name);
        let seen: Seen = Arc::default();
        for _ in 0..written.expected.len() {
            let message = messages.next().await.unwrap().unwrap();
            let headers = message.headers.clone().unwrap_or_default();
            let pairs = || {
                headers.iter().flat_map(|(name, values)| {
                    let name: &str = name.as_ref();
                    values.iter().map(move |v| (name, v.as_str()))
                })
            };
            let header = |wanted: &str| {
                pairs()
                    .find(|(n, _)| *n == wanted)
                    .map(|(_, v)| v.to_owned())
            };
            let aggregate = header("Outbox-Aggregate-Id").unwrap();
            let parent = TraceParent::extract(pairs());
            let job =
                Job::new(handle(&seen, aggregate, header(TRACEPARENT))).with_trace_parent(parent);
            pool.submit(job).await.unwrap().await.unwrap().unwrap();
            message.ack().await.unwrap();
        }
        assert!(pool.drain(Duration::from_secs(5)).await.is_complete());
        assert_traces(&name, &written, &seen).await;
        relay.shutdown().await;
    });
}

#[test]
fn a_job_fed_from_kafka_is_in_the_trace_of_the_request_that_enqueued_it() {
    exporter(); // installs the subscriber before any span is made
    let broker = sd_testkit::KafkaBroker::start()
        .expect("a tansu broker (scripts/test.sh builds it; or set SD_TANSU)");
    let topic = "outbox.event.order"; // the sink's default for `order`
    broker.create_topic(topic, 2).unwrap();
    with_outbox(|outbox| async move {
        let publisher = KafkaPublisher::builder(broker.bootstrap())
            .delivery_timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let written = enqueue(&outbox).await;
        let relay = ordered_relay(&outbox, publisher);

        let name = sd_testkit::unique_name("kafka-jobs");
        let consumer = KafkaConsumer::builder(broker.bootstrap())
            .group(sd_testkit::unique_name("billing"))
            .topic(topic)
            .build(pool(&name))
            .unwrap();
        let seen: Seen = Arc::default();
        let handler = {
            let seen = Arc::clone(&seen);
            move |record: Record| {
                let header = |name: &str| {
                    let value = record.header(name).flatten()?;
                    Some(String::from_utf8_lossy(value).into_owned())
                };
                let aggregate = header("Outbox-Aggregate-Id").unwrap_or_default();
                handle(&seen, aggregate, header(TRACEPARENT))
            }
        };
        let all = written.expected.len();
        let report = consumer.run(handler, handled(&seen, all)).await.unwrap();
        assert_eq!(report.handled, 4, "the malformed one too: {report:?}");
        assert_traces(&name, &written, &seen).await;
        relay.shutdown().await;
    });
}
