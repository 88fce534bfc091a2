//! Feature `metrics`: an outbox and its relay to Redis Streams count what they do with the
//! documented names and labels; Redis killed under the relay makes a dead letter.
#![cfg(all(feature = "metrics", feature = "postgres", feature = "redis"))]
#![allow(clippy::unwrap_used)]

#[allow(unused_imports)] // `common` serves every suite.
mod common;

use std::time::Duration;

use common::*;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sd_core::observe::{Capture, backend, label};
use sd_outbox::postgres::{Mode, Outbox};
use sd_outbox::redis::RedisStreamsPublisher;

const TABLE: &str = "metrics_outbox";

#[test]
fn enqueued_published_and_dead_letters_are_counted() {
    let db = sd_testkit::database().expect("a postgres server (install postgresql)");
    let mut server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let capture = Capture::new();
    let rt = runtime();
    let (outbox, relay) = rt.block_on(async {
        let pg = pool(db.url()).await;
        let outbox = capture.build(|| Outbox::builder().table(TABLE).build(pg).unwrap());
        outbox.migrate().await.unwrap();
        sqlx::query("CREATE TABLE orders (id UUID PRIMARY KEY)")
            .execute(outbox.pool())
            .await
            .unwrap();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(300)))
            .set_response_timeout(Some(Duration::from_millis(300)));
        let client = redis::Client::open(server.url()).unwrap();
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .unwrap();
        let publisher = RedisStreamsPublisher::builder(conn).build().unwrap();
        let relay = capture.build(|| impatient_relay(&outbox, publisher, Mode::Ordered, 2));
        (outbox, relay)
    });
    let table = [(label::NAME, TABLE)];
    let publish = [
        (label::NAME, TABLE),
        (label::MESSAGING_SYSTEM, backend::REDIS),
        (label::MESSAGING_OPERATION, "publish"),
    ];
    rt.block_on(async {
        for n in 0..3 {
            write(&outbox, order_event("a", n)).await;
        }
        eventually("three published", || async { relay.published() == 3 }).await;
    });
    assert_eq!(capture.counter("sd.outbox.enqueued", &table), 3);
    assert_eq!(
        capture.counter("messaging.client.sent.messages", &publish),
        3
    );
    let publishes = capture.samples("messaging.client.operation.duration", &publish);
    assert!(
        !publishes.is_empty() && publishes.len() <= 3,
        "{publishes:?}"
    );
    assert_eq!(capture.counter("sd.outbox.publish.failures", &publish), 0);
    // Read when the relay started: nothing had waited long.
    let age = capture.gauges("sd.outbox.oldest_unpublished.age", &table);
    assert!(age.len() == 1 && (0.0..60.0).contains(&age[0]), "{age:?}");

    server.kill().unwrap();
    rt.block_on(async {
        write(&outbox, order_event("a", 3)).await;
        eventually("a dead letter", || async {
            relay.metrics().await.unwrap().dead_lettered == 1
        })
        .await;
    });
    assert_eq!(capture.counter("sd.outbox.enqueued", &table), 4);
    assert_eq!(capture.counter("sd.outbox.dead_letters", &table), 1);
    assert_eq!(capture.counter("sd.outbox.publish.failures", &publish), 2);
    assert_eq!(
        capture.counter("messaging.client.sent.messages", &publish),
        3
    );
    rt.block_on(relay.shutdown());
}
