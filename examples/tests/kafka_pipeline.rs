//! The Kafka pipeline example on a tansu broker and a PostgreSQL database started by the
//! testkit, its members run as child processes of this test binary (`pipeline_member`),
//! one of them SIGKILLed mid-run.
#![cfg(feature = "kafka-pipeline")]
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../kafka_pipeline.rs"]
mod kafka_pipeline;

use std::process::Command;

/// A member's flags, separated by newlines.
const MEMBER_ENV: &str = "SD_KAFKA_PIPELINE_MEMBER";

#[test]
#[ignore = "a member process of the pipeline test; it runs it"]
fn pipeline_member() {
    let Ok(flags) = std::env::var(MEMBER_ENV) else {
        return;
    };
    let args = kafka_pipeline::parse_args(flags.lines().map(str::to_owned)).unwrap();
    let rt = sd_testkit::runtime_with(4);
    rt.block_on(kafka_pipeline::member(&args)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_keeps_its_promises_through_a_killed_member() {
    // The SQLite engine: the memory engine cannot serve a fetch from inside a batch.
    let broker = sd_testkit::KafkaBroker::start_durable().expect("a tansu broker");
    let db = sd_testkit::database().unwrap();
    let topic = sd_testkit::unique_name("orders");
    broker.create_topic(&topic, 12).unwrap();
    broker.create_topic(&format!("{topic}.dlq"), 1).unwrap();
    let flags = format!(
        "--bootstrap {} --postgres {} --topic {topic} --customers 100 --orders 20 \
         --members 3 --kill-after 600 --timeout 150",
        broker.bootstrap(),
        db.url()
    );
    let args = kafka_pipeline::parse_args(flags.split_whitespace().map(str::to_owned)).unwrap();
    let spawn = |i: usize| {
        let mut member = args.clone();
        member.member = Some(i);
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "pipeline_member",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MEMBER_ENV, member.to_flags().join("\n"));
        c
    };
    let summary = kafka_pipeline::run(&args, spawn).await.unwrap();
    println!("{summary}");
    assert!(summary.problems().is_empty(), "{:#?}", summary.problems());
    // 20 orders a customer, every 7th failing: orders 6 and 13.
    assert_eq!((summary.orders, summary.failing), (2_000, 200));
    assert_eq!(summary.effects, 1_800);
    assert_eq!(
        summary.dead_letters, 200,
        "every failing order was dead-lettered"
    );
    assert!(summary.dead_letter_records >= 200);
    assert!(summary.runs >= 1_800);
}

#[test]
fn a_run_that_breaks_a_promise_reports_it() {
    let summary = kafka_pipeline::Summary {
        orders: 10,
        failing: 1,
        dead_letters: 0,
        missing: 1,
        doubled: 1,
        out_of_order: vec!["c1".into()],
        ..Default::default()
    };
    assert_eq!(summary.problems().len(), 4, "{:#?}", summary.problems());
}
