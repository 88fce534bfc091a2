//! Feature `metrics` of the stream consumers, on a real Redis and a tansu Kafka broker:
//! `messaging.client.consumed.messages` counts what each consumer read or polled, and
//! `messaging.process.duration` has one sample per handler run, labelled `error.type`
//! when the run failed or panicked.
#![cfg(all(feature = "metrics", feature = "redis", feature = "kafka"))]
#![allow(clippy::unwrap_used)] // tests may unwrap

mod kafka_support;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::{Arc, Mutex};

use sd_core::observe::{Capture, backend, label, operation, outcome};
use sd_pool::kafka::Record;
use sd_pool::redis::{Entry, StreamConsumer};
use sd_pool::{Order, Pool};
use sd_testkit::{eventually, unique_name};

/// Runs `future` with `capture` as the current recorder in every poll, so the handles an
/// async `build` registers report to it.
async fn under<F: Future>(capture: &Capture, future: F) -> F::Output {
    let mut future = pin!(future);
    poll_fn(|cx| capture.build(|| future.as_mut().poll(cx))).await
}

fn pool(name: &str) -> Pool {
    Pool::builder()
        .name(name)
        .workers(2)
        .queue(8)
        .order(Order::PerKey)
        .build()
        .unwrap()
}

/// Resolves once `runs` handler runs were logged.
async fn ran(log: &Arc<Mutex<Vec<String>>>, runs: usize) {
    eventually("the handler runs", || {
        let n = log.lock().unwrap().len();
        async move { n >= runs }
    })
    .await;
}

/// The consumed count and the process samples (all, failed, panicked) of `system` for
/// the pool `name`.
fn read(capture: &Capture, name: &str, system: &str) -> (u64, usize, usize, usize) {
    let consumed = capture.counter(
        "messaging.client.consumed.messages",
        &[
            (label::NAME, name),
            (label::MESSAGING_SYSTEM, system),
            (label::MESSAGING_OPERATION, operation::RECEIVE),
        ],
    );
    let process = [
        (label::NAME, name),
        (label::MESSAGING_SYSTEM, system),
        (label::MESSAGING_OPERATION, operation::PROCESS),
    ];
    let samples = |error: Option<&str>| {
        let mut labels = process.to_vec();
        labels.extend(error.map(|e| (label::ERROR_TYPE, e)));
        capture.samples("messaging.process.duration", &labels).len()
    };
    (
        consumed,
        samples(None),
        samples(Some(outcome::ERROR)),
        samples(Some(outcome::PANICKED)),
    )
}

#[tokio::test]
async fn the_stream_consumer_counts_what_it_read_and_times_each_handler_run() {
    let redis =
        sd_testkit::redis().expect("a redis server (install redis-server or set SD_REDIS_URL)");
    let mut conn = redis::aio::ConnectionManager::new(redis::Client::open(redis.url()).unwrap())
        .await
        .unwrap();
    let stream = unique_name("orders");
    for n in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("n")
            .arg(n)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let capture = Capture::new();
    let name = unique_name("billing");
    let builder = StreamConsumer::builder()
        .stream(&stream)
        .group("billing")
        .consumer("c1");
    let consumer = under(&capture, builder.build(conn, pool(&name)))
        .await
        .unwrap();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let handler = {
        let log = Arc::clone(&log);
        move |entry: Entry| {
            let n = entry.get_str("n").unwrap_or_default().to_owned();
            log.lock().unwrap().push(n.clone());
            async move {
                if n == "1" {
                    Err("entry 1 fails")
                } else {
                    Ok(())
                }
            }
        }
    };
    let report = consumer.run(handler, ran(&log, 3)).await.unwrap();
    assert_eq!(report.read, 3);
    // Read 3; three runs, one failed (a failing entry is left pending, not retried here).
    assert_eq!(read(&capture, &name, backend::REDIS), (3, 3, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_consumer_counts_what_it_polled_and_times_each_attempt() {
    let broker = kafka_support::broker();
    let topic = unique_name("orders");
    broker.create_topic(&topic, 1).unwrap();
    kafka_support::produce(&broker.bootstrap(), &topic, 3, 1).await;
    let capture = Capture::new();
    let name = unique_name("billing");
    let consumer = capture.build(|| {
        kafka_support::member(&broker.bootstrap(), &unique_name("group"), &topic)
            .build(pool(&name))
            .unwrap()
    });
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let handler = {
        let log = Arc::clone(&log);
        move |record: Record| {
            let (key, _) = kafka_support::parse(&record);
            let attempt = record.attempt();
            log.lock().unwrap().push(format!("{key}#{attempt}"));
            async move {
                match (key.as_str(), attempt) {
                    ("k1", 1) => Err("k1 fails its first attempt"),
                    ("k2", 1) => panic!("k2 panics in its first attempt"),
                    _ => Ok(()),
                }
            }
        }
    };
    let report = consumer.run(handler, ran(&log, 5)).await.unwrap();
    assert_eq!((report.received, report.handled, report.retries), (3, 3, 2));
    // Polled 3; five attempts: three succeeded, one failed, one panicked.
    assert_eq!(read(&capture, &name, backend::KAFKA), (3, 5, 1, 1));
}
