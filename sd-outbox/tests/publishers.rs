//! The publisher contract through a [`BoxPublisher`] chosen from a configuration string
//! at run time, as a service picks its sink: `memory`, a `redis://` URL (Redis Streams)
//! and a `nats://` URL (NATS JetStream), each from the testkit.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sd_outbox::nats::JetStreamPublisher;
use sd_outbox::redis::RedisStreamsPublisher;
use sd_outbox::{BoxPublisher, MemoryPublisher, conformance};
use uuid::Uuid;

/// The ids a sink holds for an aggregate type, in the broker's order.
type Read = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Vec<Uuid>> + Send>> + Send + Sync>;

/// The sink a configuration string names, and how to read back what it published.
async fn publisher_from(config: &str) -> (BoxPublisher, Read) {
    if config == "memory" {
        let sink = MemoryPublisher::new();
        let read: Read = Arc::new({
            let sink = sink.clone();
            move |t: String| {
                let sink = sink.clone();
                Box::pin(async move {
                    let events = sink.events().into_iter();
                    events
                        .filter(|e| e.aggregate_type == t)
                        .map(|e| e.id)
                        .collect()
                })
            }
        });
        (BoxPublisher::new(sink), read)
    } else if config.starts_with("redis://") {
        let client = redis::Client::open(config).unwrap();
        let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
        let sink = RedisStreamsPublisher::builder(conn.clone())
            .prefix(sd_testkit::unique_name("outbox"))
            .build()
            .unwrap();
        let read: Read = Arc::new({
            let sink = sink.clone();
            move |t: String| {
                let (stream, mut conn) = (sink.stream(&t), conn.clone());
                Box::pin(async move {
                    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                        .arg(stream)
                        .arg("-")
                        .arg("+")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    reply
                        .ids
                        .iter()
                        .map(|e| e.get::<String>("id").unwrap().parse().unwrap())
                        .collect()
                })
            }
        });
        (BoxPublisher::new(sink), read)
    } else if config.starts_with("nats://") {
        let client = async_nats::connect(config).await.unwrap();
        let context = async_nats::jetstream::new(client);
        let stream = sd_testkit::unique_name("OUTBOX");
        let sink = JetStreamPublisher::builder(context.clone())
            .prefix(sd_testkit::unique_name("outbox"))
            .build()
            .unwrap();
        sink.ensure_stream(&stream, Duration::from_secs(120))
            .await
            .unwrap();
        let read: Read = Arc::new({
            let sink = sink.clone();
            move |t: String| {
                let (subject, context, stream) =
                    (sink.subject(&t), context.clone(), stream.clone());
                Box::pin(async move {
                    let mut stream = context.get_stream(&stream).await.unwrap();
                    let state = stream.info().await.unwrap().state.clone();
                    let mut ids = Vec::new();
                    for seq in state.first_sequence..=state.last_sequence {
                        if state.messages == 0 {
                            break;
                        }
                        let msg = stream.get_raw_message(seq).await.unwrap();
                        if msg.subject.as_str() == subject {
                            let id = msg.headers.get("Nats-Msg-Id").unwrap();
                            ids.push(id.as_str().parse().unwrap());
                        }
                    }
                    ids
                })
            }
        });
        (BoxPublisher::new(sink), read)
    } else {
        panic!("unknown sink `{config}`")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boxed_publisher_from_configuration_keeps_the_contract() {
    let redis =
        sd_testkit::redis().expect("a redis server (install redis-server or set SD_REDIS_URL)");
    let nats = sd_testkit::nats().expect("a nats server (install nats-server or set SD_NATS_URL)");
    for config in ["memory", redis.url(), nats.url()] {
        let (sink, read) = publisher_from(config).await;
        conformance::run_all(&sink, |t| read(t)).await;
    }
}
