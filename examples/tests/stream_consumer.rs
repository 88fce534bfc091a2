//! The stream consumer example against a Redis server started by the testkit: a few
//! thousand events, every one acknowledged, per-key order kept, the queue within bound.
#![cfg(feature = "stream-consumer")]
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../stream_consumer.rs"]
mod stream_consumer;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_consumer_keeps_key_order_and_its_bound_on_redis() {
    let redis = sd_testkit::redis().expect("redis-server");
    let flags = format!(
        "--redis {} --workers 4 --keys 8 --events 3000 --timeout 120",
        redis.url()
    );
    let args = stream_consumer::parse_args(flags.split_whitespace().map(String::from)).unwrap();
    assert_eq!(args.timeout, Duration::from_secs(120));
    let summary = stream_consumer::run(&args).await.unwrap();
    println!("{summary}");
    assert!(summary.problems().is_empty(), "{:#?}", summary.problems());
    assert_eq!(
        (summary.read, summary.acked, summary.pending),
        (3000, 3000, 0)
    );
    assert!(summary.queued_peak <= 16 && summary.running_peak <= 4);
}

#[test]
fn a_run_that_breaks_a_promise_reports_it() {
    let redis = sd_testkit::redis().expect("redis-server");
    let mut args = stream_consumer::Args {
        redis: redis.url().to_owned(),
        events: 200,
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut summary = rt.block_on(stream_consumer::run(&args)).unwrap();
    assert!(summary.problems().is_empty(), "{:#?}", summary.problems());
    summary.out_of_order = 1;
    summary.queued_peak = summary.capacity + 1;
    assert_eq!(summary.problems().len(), 2, "{:#?}", summary.problems());
    // An unreachable server ends the run with an error instead of waiting forever.
    args.redis = "redis://127.0.0.1:1".into();
    assert!(rt.block_on(stream_consumer::run(&args)).is_err());
}
