//! The relay to NATS JetStream on real PostgreSQL and nats-server: `Nats-Msg-Id` lets
//! the stream drop a redelivery after a crash, and a server killed for a while loses
//! nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, Context};
use common::*;
use sd_outbox::Message;
use sd_outbox::nats::JetStreamPublisher;
use sd_outbox::postgres::{Inbox, Mode};
use uuid::Uuid;

async fn jetstream(url: &str) -> Context {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_millis(500))
        .connect(url)
        .await
        .unwrap();
    let mut context = jetstream::new(client);
    context.set_timeout(Duration::from_millis(500));
    context
}

/// The stream one test publishes to, on a server that tests may share (`SD_NATS_URL`):
/// its name and subject prefix are the test's own.
struct Sink {
    context: Context,
    publisher: JetStreamPublisher,
    stream: String,
    prefix: String,
}

/// A publisher to a new stream of this test (2 minute dedupe window).
async fn sink(url: &str) -> Sink {
    let context = jetstream(url).await;
    let stream = sd_testkit::unique_name("OUTBOX");
    let prefix = sd_testkit::unique_name("outbox");
    let publisher = JetStreamPublisher::builder(context.clone())
        .prefix(&prefix)
        .build()
        .unwrap();
    publisher
        .ensure_stream(&stream, Duration::from_secs(120))
        .await
        .unwrap();
    Sink {
        context,
        publisher,
        stream,
        prefix,
    }
}

/// Every message of the stream: (Nats-Msg-Id, aggregate id, payload `n`, subject).
async fn messages(sink: &Sink) -> Vec<(Uuid, String, usize, String)> {
    let mut stream = sink.context.get_stream(&sink.stream).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let msg = stream.get_raw_message(seq).await.unwrap();
        let header = |name: &str| msg.headers.get(name).unwrap().as_str().to_owned();
        let payload: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        out.push((
            header("Nats-Msg-Id").parse().unwrap(),
            header("Outbox-Aggregate-Id"),
            payload["n"].as_u64().unwrap_or(0) as usize,
            msg.subject.to_string(),
        ));
    }
    out
}

async fn count(sink: &Sink) -> u64 {
    let mut stream = sink.context.get_stream(&sink.stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[test]
fn a_redelivery_after_a_crash_is_dropped_by_the_stream_via_nats_msg_id() {
    let server =
        sd_testkit::nats().expect("a nats server (install nats-server or set SD_NATS_URL)");
    with_outbox(|outbox| async move {
        let sink = sink(server.url()).await;
        let publisher = &sink.publisher;
        let inbox = Inbox::builder().build(outbox.pool().clone()).unwrap();
        inbox.migrate().await.unwrap();
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(write(&outbox, order_event("o-1", n).header("trace", "t")).await);
        }
        let relay = crash_after_publish(
            &outbox,
            publisher,
            Mode::Ordered,
            5,
            || async { count(&sink).await == 5 },
            || ordered_relay(&outbox, publisher.clone()),
        )
        .await;
        let got = messages(&sink).await;
        let got_ids: Vec<Uuid> = got.iter().map(|m| m.0).collect();
        assert_eq!(got_ids, ids, "the broker kept one copy of each, in order");
        let subject = format!("{}.order", sink.prefix);
        assert!(got.iter().all(|m| m.3 == subject && m.1 == "o-1"));
        // A consumer that saw both copies (a stream without dedupe) is still safe.
        let twice = ids.iter().chain(ids.iter()).copied();
        let effects = consume_all(&inbox, outbox.pool(), twice).await;
        assert_eq!(applied(&effects), 5);
        relay.shutdown().await;
    });
}

#[test]
fn nats_killed_for_a_while_the_backlog_grows_then_drains() {
    let mut server = sd_testkit::NatsServer::start().expect("a nats server");
    with_outbox(|outbox| async move {
        let sink = sink(&server.url()).await;
        let relays = outage_relays(&outbox, &sink.publisher);
        write_round_robin(&outbox, 0..50).await;
        eventually("the first fifty", || async { count(&sink).await == 50 }).await;
        server.kill().unwrap();
        write_round_robin(&outbox, 50..200).await;
        failures_seen(&relays).await;
        let stats = outbox.stats().await.unwrap();
        assert!(stats.backlog >= 100, "the backlog grows: {stats:?}");
        server.start_again().unwrap();
        drains_in_order(&outbox, relays, 40, || messages(&sink)).await;
    });
}

#[test]
fn an_aggregate_type_that_is_no_subject_token_is_dead_lettered() {
    let server = sd_testkit::nats().expect("a nats server");
    with_outbox(|outbox| async move {
        let sink = sink(server.url()).await;
        let relay = impatient_relay(&outbox, sink.publisher.clone(), Mode::Parallel, 2);
        let bad = write(
            &outbox,
            Message::json("bad.type", "x", "t", serde_json::json!({})),
        )
        .await;
        let good = write(&outbox, order_event("y", 0)).await;
        eventually("the dead letter", || async {
            outbox.stats().await.unwrap().dead == 1
        })
        .await;
        eventually("the good event", || async { count(&sink).await == 1 }).await;
        assert_eq!(messages(&sink).await[0].0, good);
        let dead = outbox.dead_letters(5).await.unwrap();
        assert_eq!(dead[0].event.id, bad);
        assert!(dead[0].last_error.as_deref().unwrap().contains("subject"));
        relay.shutdown().await;
    });
}

#[test]
fn bad_nats_sink_configuration_is_refused() {
    let server = sd_testkit::nats().expect("a nats server");
    runtime().block_on(async {
        let context = jetstream(server.url()).await;
        for bad in ["", "a..b", "a b", "a.*", ">"] {
            let built = JetStreamPublisher::builder(context.clone())
                .prefix(bad)
                .build();
            assert_eq!(invalid_field(built), "prefix", "{bad}");
        }
        assert!(
            JetStreamPublisher::builder(context)
                .prefix("app.events")
                .build()
                .is_ok()
        );
    });
}
