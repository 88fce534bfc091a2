//! The relay to Redis Streams on real PostgreSQL and Redis: entries per aggregate
//! type, a crash between publish and mark absorbed by the inbox, and a Redis that is
//! frozen for a while.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sd_outbox::Message;
use sd_outbox::postgres::{Inbox, Mode, Outbox, Relay};
use sd_outbox::redis::RedisStreamsPublisher;
use uuid::Uuid;

async fn redis(url: &str) -> ConnectionManager {
    let client = redis::Client::open(url).unwrap();
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(300)))
        .set_response_timeout(Some(Duration::from_millis(300)));
    ConnectionManager::new_with_config(client, config)
        .await
        .unwrap()
}

/// One stream entry: (outbox id, aggregate id, the payload's `n`, event type).
type Entry = (Uuid, String, usize, String);

async fn entries(conn: &mut ConnectionManager, stream: &str) -> Vec<Entry> {
    // Pages of 500, so a reply stays well within the connection's response timeout.
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await
            .unwrap();
        let Some(last) = reply.ids.last() else {
            return out;
        };
        start = format!("({}", last.id);
        out.extend(reply.ids.iter().map(|entry| {
            let field = |name: &str| -> String { entry.get(name).unwrap() };
            let payload: serde_json::Value = serde_json::from_str(&field("payload")).unwrap();
            (
                field("id").parse().unwrap(),
                field("aggregateid"),
                payload["n"].as_u64().unwrap_or(0) as usize,
                field("type"),
            )
        }));
    }
}

fn redis_url() -> sd_testkit::Redis {
    sd_testkit::redis().expect("a redis server (install redis-server or set SD_REDIS_URL)")
}

/// Runs `test` with an outbox, a connection to a shared Redis and a fresh key prefix.
fn with_redis_outbox<F, Fut>(test: F)
where
    F: FnOnce(Outbox, ConnectionManager, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = redis_url();
    with_outbox(|outbox| async move {
        let conn = redis(server.url()).await;
        test(outbox, conn, sd_testkit::unique_name("outbox")).await;
    });
}

#[test]
fn events_land_in_a_stream_per_aggregate_type_with_their_id() {
    with_redis_outbox(|outbox, mut conn, prefix| async move {
        let publisher = RedisStreamsPublisher::builder(conn.clone())
            .prefix(prefix.clone())
            .max_len(Some(10_000))
            .build()
            .unwrap();
        let relay = Relay::builder(outbox.clone(), publisher)
            .build()
            .unwrap()
            .spawn();
        let order = write(&outbox, order_event("o-1", 0).header("trace", "t1")).await;
        let invoice = write(
            &outbox,
            Message::bytes("invoice", "i-1", "issued", b"raw".to_vec()),
        )
        .await;
        eventually("both streams", || {
            let mut conn = conn.clone();
            let prefix = prefix.clone();
            async move {
                entries(&mut conn, &format!("{prefix}:order")).await.len() == 1
                    && redis::cmd("XLEN")
                        .arg(format!("{prefix}:invoice"))
                        .query_async::<u64>(&mut conn)
                        .await
                        .unwrap()
                        == 1
            }
        })
        .await;
        let got = entries(&mut conn, &format!("{prefix}:order")).await;
        assert_eq!(
            got,
            vec![(order, "o-1".to_owned(), 0, "order_changed".to_owned())]
        );
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{prefix}:invoice"))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let entry = &reply.ids[0];
        assert_eq!(entry.get::<String>("id").unwrap(), invoice.to_string());
        assert_eq!(entry.get::<Vec<u8>>("payload").unwrap(), b"raw");
        assert_eq!(entry.get::<String>("payload_kind").unwrap(), "bytes");
        assert_eq!(entry.get::<String>("headers").unwrap(), "{}");
        relay.shutdown().await;
    });
}

#[test]
fn crash_after_xadd_redelivers_the_same_id_and_the_inbox_absorbs_it() {
    with_redis_outbox(|outbox, mut conn, prefix| async move {
        let inbox = Inbox::builder().build(outbox.pool().clone()).unwrap();
        inbox.migrate().await.unwrap();
        let stream = format!("{prefix}:order");
        let publisher = RedisStreamsPublisher::builder(conn.clone())
            .prefix(prefix.clone())
            .build()
            .unwrap();
        let ids: Vec<Uuid> = {
            let mut v = Vec::new();
            for n in 0..3 {
                v.push(write(&outbox, order_event("o-crash", n)).await);
            }
            v
        };
        let xadds = || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move { entries(&mut conn, &stream).await.len() == 3 }
        };
        let fresh = || ordered_relay(&outbox, publisher.clone());
        let relay = crash_after_publish(&outbox, &publisher, Mode::Ordered, 3, xadds, fresh).await;
        let got = entries(&mut conn, &stream).await;
        let delivered: Vec<Uuid> = got.iter().map(|e| e.0).collect();
        let twice: Vec<Uuid> = ids.iter().chain(ids.iter()).copied().collect();
        assert_eq!(delivered, twice, "the same ids again, in order");
        // The consumer reads the stream and applies each entry through the inbox.
        let effects = consume_all(&inbox, outbox.pool(), delivered).await;
        assert_eq!(applied(&effects), 3);
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(outbox.pool())
            .await
            .unwrap();
        assert_eq!(rows, 3);
        relay.shutdown().await;
    });
}

#[test]
fn redis_frozen_for_a_while_the_backlog_grows_then_drains() {
    let mut server = sd_testkit::RedisServer::start().expect("a redis server");
    with_outbox(|outbox| async move {
        let mut conn = redis(&server.url()).await;
        let publisher = RedisStreamsPublisher::builder(conn.clone())
            .build()
            .unwrap();
        let relays = outage_relays(&outbox, &publisher);
        write_round_robin(&outbox, 0..100).await;
        eventually("the first hundred", || {
            let mut conn = conn.clone();
            async move { entries(&mut conn, "outbox:order").await.len() >= 100 }
        })
        .await;
        server.pause().unwrap();
        write_round_robin(&outbox, 100..400).await;
        failures_seen(&relays).await;
        let stats = outbox.stats().await.unwrap();
        assert!(stats.backlog >= 250, "the backlog grows: {stats:?}");
        assert!(stats.oldest_pending_age.is_some());
        server.resume().unwrap();
        drains_in_order(&outbox, relays, 80, || entries(&mut conn, "outbox:order")).await;
    });
}

#[test]
fn three_parallel_relays_to_redis_lose_nothing_and_keep_order_per_aggregate() {
    with_redis_outbox(|outbox, mut conn, prefix| async move {
        let stream = format!("{prefix}:order");
        let publisher = RedisStreamsPublisher::builder(conn.clone())
            .prefix(prefix)
            .build()
            .unwrap();
        let relays: Vec<_> = (0..3)
            .map(|_| {
                Relay::builder(outbox.clone(), publisher.clone())
                    .lanes_per_claim(8)
                    .build()
                    .unwrap()
                    .spawn()
            })
            .collect();
        write_concurrently(&outbox, 50, 200).await;
        // In two stages, each under the testkit's hang guard: a loaded machine is slow.
        eventually("half the drain", || async {
            outbox.stats().await.unwrap().backlog <= 5_000
        })
        .await;
        eventually("the drain", || async {
            outbox.stats().await.unwrap().backlog == 0
        })
        .await;
        let got: Vec<_> = entries(&mut conn, &stream)
            .await
            .into_iter()
            .map(|(id, aggregate, n, _)| (aggregate, n, id))
            .collect();
        assert_eq!(got.len(), 10_000, "no duplicates without faults");
        assert_order_per_aggregate(&got, 200);
        for relay in relays {
            assert_eq!(relay.metrics().await.unwrap().failures, 0);
            relay.shutdown().await;
        }
    });
}

#[test]
fn bad_redis_sink_configuration_is_refused() {
    let server = redis_url();
    runtime().block_on(async {
        let conn = redis(server.url()).await;
        let builder = || RedisStreamsPublisher::builder(conn.clone());
        let cases = [
            (builder().prefix("p".repeat(129)), "prefix"),
            // One rule for prefixes: sd adds the colon, so a prefix may not end with one.
            (builder().prefix("outbox:"), "prefix"),
            (builder().max_len(Some(0)), "max_len"),
        ];
        for (cfg, field) in cases {
            assert_eq!(invalid_field(cfg.build()), field);
        }
        let default = builder().build().unwrap();
        assert_eq!(default.stream("order"), "outbox:order");
    });
}
