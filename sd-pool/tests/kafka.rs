//! The Kafka consumer on a real Kafka-API broker (tansu, from sd-testkit): per-key order
//! and every record once across members joining mid-run, poison records to the
//! dead-letter topic, paused partitions under backpressure, the watermark fallback when
//! the broker drops commit metadata, and bad configuration.
#![allow(clippy::unwrap_used)]

mod kafka_support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kafka_support::*;
use rdkafka::ClientConfig;
use sd_pool::kafka::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_OFFSET, DLQ_PARTITION, DLQ_TOPIC, KafkaConsumer, Record,
    RecordOrder,
};
use sd_pool::{Error, Order, Pool};
use sd_testkit::unique_name;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_keep_per_key_order_and_run_every_record_once() {
    let broker = broker();
    let topic = unique_name("orders");
    broker.create_topic(&topic, 12).unwrap();
    let (keys, per_key) = (1_000, 20);
    produce(&broker.bootstrap(), &topic, keys, per_key).await;
    let group = unique_name("billing");
    let history = History::default();
    let at = (broker.bootstrap(), group, topic);
    let plan = [0, 2_000, 8_000];
    // Jobs take 2 ms, except between the third member's start and its first record, when
    // the first two slow to 25 ms: on a loaded machine the third member's join and the
    // rebalance may take seconds, and at full speed the first two would finish the topic
    // before it got a partition.
    let third_ran = Arc::new(AtomicBool::new(false));
    let (h, t) = (history.clone(), Arc::clone(&third_ran));
    let pace: Pace = Arc::new(move |member| {
        if member == 2 {
            t.store(true, Ordering::Relaxed);
        }
        if member < 2 && h.len() >= plan[2] && !t.load(Ordering::Relaxed) {
            Duration::from_millis(25)
        } else {
            Duration::from_millis(2)
        }
    });
    let members = staggered_members((&at.0, &at.1, &at.2), &history, &plan, 8, pace).await;
    until_all_ran(&history, keys * per_key, Duration::from_secs(120)).await;
    let reports = stop_all(members).await;
    let runs = history.runs();
    let repeats = check_per_key(&runs, keys, per_key);
    assert_eq!(
        repeats,
        0,
        "a clean rebalance drains and commits before the partitions move: nothing runs twice; \
         repeated (partition, offset): runs as (member, ms after the first run): {:?}; reports: {:?}",
        repeated_runs(&runs),
        reports
    );
    let ran_by: BTreeSet<usize> = runs.iter().map(|r| r.member).collect();
    assert_eq!(ran_by.len(), 3, "every member took partitions");
    assert!(
        reports[0].assigned > 12 && reports[0].revoked > 0,
        "the first member took all 12 partitions, gave them up and took its share back: {:?}",
        reports[0]
    );
    let handled: u64 = reports.iter().map(|r| r.handled).sum();
    assert_eq!(handled, (keys * per_key) as u64);
}

/// A record's (partition, offset).
type Position = (i32, i64);

/// The first ten records that ran more than once, each with its runs as (member, ms after
/// the history's first run), for a failure's message.
fn repeated_runs(runs: &[Run]) -> Vec<(Position, Vec<(usize, u128)>)> {
    let Some(origin) = runs.iter().map(|r| r.start).min() else {
        return Vec::new();
    };
    let mut by_record: std::collections::BTreeMap<Position, Vec<(usize, u128)>> =
        std::collections::BTreeMap::new();
    for r in runs {
        by_record
            .entry((r.partition, r.offset))
            .or_default()
            .push((r.member, (r.start - origin).as_millis()));
    }
    by_record
        .into_iter()
        .filter(|(_, rs)| rs.len() > 1)
        .take(10)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_while_slow_jobs_run_never_runs_a_record_on_two_members_at_once() {
    let broker = broker();
    let topic = unique_name("slow");
    broker.create_topic(&topic, 4).unwrap();
    let (keys, per_key) = (120, 5);
    produce(&broker.bootstrap(), &topic, keys, per_key).await;
    let group = unique_name("g");
    let history = History::default();
    // 150 ms jobs, 16 at a time (about 6 s of work): jobs are running whenever the second
    // member joins.
    let at = (broker.bootstrap(), group, topic);
    let members = staggered_members(
        (&at.0, &at.1, &at.2),
        &history,
        &[0, 20],
        16,
        steady(Duration::from_millis(150)),
    )
    .await;
    until_all_ran(&history, keys * per_key, Duration::from_secs(120)).await;
    let reports = stop_all(members).await;
    let runs = history.runs();
    // No two runs of a key overlap, across members: a revoked partition's running jobs
    // finished before its new owner started.
    assert_eq!(check_per_key(&runs, keys, per_key), 0);
    assert!(
        runs.iter().any(|r| r.member == 1),
        "the second member took partitions"
    );
    assert_eq!(reports[0].revoke_overran, 0, "{:?}", reports[0]);
    assert!(reports[0].revoked > 0, "{:?}", reports[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_reach_the_dead_letter_topic_after_their_attempts() {
    let broker = broker();
    let (topic, dlq) = (unique_name("payments"), unique_name("payments-dlq"));
    broker.create_topic(&topic, 2).unwrap();
    broker.create_topic(&dlq, 1).unwrap();
    let (keys, per_key) = (10, 20);
    produce(&broker.bootstrap(), &topic, keys, per_key).await;
    let history = History::default();
    let log = logging_handler(0, history.clone(), Duration::ZERO);
    // k3's record 5 always fails; k4's record 7 always panics.
    let handler = move |record: Record| {
        let (key, seq) = parse(&record);
        let run = log(record);
        async move {
            run.await?;
            match (key.as_str(), seq) {
                ("k3", 5) => Err("card declined".to_owned()),
                ("k4", 7) => panic!("bad payload"),
                _ => Ok(()),
            }
        }
    };
    let consumer = member(&broker.bootstrap(), &unique_name("g"), &topic)
        .dead_letter_topic(&dlq)
        .build(pool(4))
        .unwrap();
    let (stop, task) = spawn_member(consumer, handler);
    until_all_ran(&history, keys * per_key, Duration::from_secs(60)).await;
    // Read the dead-letter topic with another member.
    let letters = Arc::new(Mutex::new(Vec::new()));
    let l = letters.clone();
    let reader = KafkaConsumer::builder(broker.bootstrap())
        .group(unique_name("reader"))
        .topic(&dlq)
        .order(RecordOrder::Unordered)
        .build(pool(1))
        .unwrap();
    let (stop_reader, reader) = spawn_member(reader, move |r: Record| {
        l.lock().unwrap().push(r);
        async { Ok(()) }
    });
    let start = std::time::Instant::now();
    while letters.lock().unwrap().len() < 2 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((stop, stop_reader));
    let report = task.await.unwrap().unwrap();
    reader.await.unwrap().unwrap();

    let runs = history.runs();
    let attempts = |key: &str, seq: usize| -> Vec<u32> {
        runs.iter()
            .filter(|r| r.key == key && r.seq == seq)
            .map(|r| r.attempt)
            .collect()
    };
    assert_eq!(attempts("k3", 5), vec![1, 2, 3]);
    assert_eq!(attempts("k4", 7), vec![1, 2, 3]);
    assert_eq!(
        runs.len(),
        keys * per_key + 4,
        "every other record ran once"
    );
    // The partitions moved on: the poison keys' later records ran.
    assert_eq!(attempts("k3", 19), vec![1]);
    assert_eq!(attempts("k4", 19), vec![1]);
    assert_eq!(check_per_key(&runs, keys, per_key), 4);
    assert_eq!((report.dead_lettered, report.retries), (2, 4));

    let letters = letters.lock().unwrap().clone();
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        let header = |name| std::str::from_utf8(letter.header(name).unwrap().unwrap()).unwrap();
        let (key, seq) = parse(letter);
        let original = runs.iter().find(|r| r.key == key && r.seq == seq).unwrap();
        assert_eq!(header(DLQ_TOPIC), topic);
        assert_eq!(header(DLQ_PARTITION), original.partition.to_string());
        assert_eq!(header(DLQ_OFFSET), original.offset.to_string());
        assert_eq!(header(DLQ_ATTEMPTS), "3");
        let expected = if key == "k3" {
            "card declined"
        } else {
            "panicked: bad payload"
        };
        assert!(
            header(DLQ_ERROR).contains(expected),
            "{}",
            header(DLQ_ERROR)
        );
        assert_eq!(letter.key(), Some(key.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_pool_pauses_partitions_and_the_member_keeps_its_place() {
    let broker = broker();
    let topic = unique_name("slow");
    broker.create_topic(&topic, 4).unwrap();
    let (keys, per_key) = (40, 10);
    produce(&broker.bootstrap(), &topic, keys, per_key).await;
    let history = History::default();
    let tiny = Pool::builder()
        .workers(1)
        .queue(1)
        .order(Order::PerKey)
        .build()
        .unwrap();
    let mut config = fast_group();
    // A poll loop that stopped polling this long would be evicted from the group.
    config.set("max.poll.interval.ms", "7000");
    let consumer = member(&broker.bootstrap(), &unique_name("g"), &topic)
        .max_window(4)
        .max_held(8)
        .client_config(config)
        .build(tiny)
        .unwrap();
    let (stop, task) = spawn_member(
        consumer,
        logging_handler(0, history.clone(), Duration::from_millis(20)),
    );
    until_all_ran(&history, keys * per_key, Duration::from_secs(60)).await;
    drop(stop);
    let report = task.await.unwrap().unwrap();
    assert_eq!(check_per_key(&history.runs(), keys, per_key), 0);
    assert!(report.paused > 0, "{report:?}");
    assert_eq!(
        report.assigned, 4,
        "never evicted and assigned again: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_done_above_a_stuck_one_run_again_only_when_the_metadata_is_lost() {
    let broker = broker();
    let topic = unique_name("stuck");
    broker.create_topic(&topic, 1).unwrap();
    let (keys, per_key) = (20, 5);
    produce(&broker.bootstrap(), &topic, keys, per_key).await;
    let group = unique_name("g");
    let history = History::default();
    // The first member's record at offset 5 never finishes; the records of other keys
    // complete above it.
    const STUCK: i64 = 5;
    let log = logging_handler(0, history.clone(), Duration::ZERO);
    let stuck = move |record: Record| {
        let blocked = record.offset() == STUCK;
        let run = log(record);
        async move {
            if blocked {
                std::future::pending::<()>().await;
            }
            run.await
        }
    };
    let first = member(&broker.bootstrap(), &group, &topic)
        .drain_timeout(Duration::from_millis(200))
        .build(pool(8))
        .unwrap();
    let (stop, task) = spawn_member(first, stuck);
    // Only the stuck record and the later ones of its key wait.
    until_all_ran(&history, (keys - 1) * per_key, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stop);
    let report = task.await.unwrap().unwrap();
    let done_first: BTreeSet<i64> = history.runs().iter().map(|r| r.offset).collect();
    assert!(!done_first.contains(&STUCK));
    assert_eq!(report.handled as usize, done_first.len(), "{report:?}");

    let commits = committed(&broker.bootstrap(), &group, &topic, 1);
    let (next, metadata) = commits[0].clone();
    assert_eq!(
        next, STUCK,
        "the commit stops at the record that never finished"
    );
    let above: BTreeSet<i64> = done_first.iter().copied().filter(|o| *o >= next).collect();

    let second = member(&broker.bootstrap(), &group, &topic)
        .build(pool(8))
        .unwrap();
    let again = History::default();
    let (stop, task) = spawn_member(second, logging_handler(1, again.clone(), Duration::ZERO));
    let total = keys * per_key;
    let from_commit = total - STUCK as usize;
    let expected_runs = if metadata.is_empty() {
        from_commit // the broker dropped the metadata: everything from the commit runs again
    } else {
        from_commit - above.len() // the listed offsets are skipped
    };
    until_all_ran(&again, expected_runs, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stop);
    let report = task.await.unwrap().unwrap();
    assert_eq!(
        again.len(),
        expected_runs,
        "metadata {metadata:?}: {report:?}"
    );
    let repeated = again
        .runs()
        .iter()
        .filter(|r| done_first.contains(&r.offset))
        .count();
    assert!(
        repeated <= 200,
        "duplicates stay within the window (200): {repeated}"
    );
    if metadata.is_empty() {
        assert_eq!(
            repeated,
            above.len(),
            "exactly what was done above the commit"
        );
    } else {
        assert_eq!((repeated, report.skipped), (0, above.len() as u64));
    }
}

#[test]
fn bad_consumer_configuration_is_refused_by_field() {
    let rt = sd_testkit::runtime();
    let _guard = rt.enter();
    let per_key = || pool(2);
    let unordered = || Pool::builder().workers(2).queue(4).build().unwrap();
    let base = || KafkaConsumer::builder("127.0.0.1:9").group("g").topic("t");
    let field = |r: sd_pool::Result<KafkaConsumer>| match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    let with = |property: &str, value: &str| {
        let mut c = ClientConfig::new();
        c.set(property, value);
        c
    };
    let cases: Vec<(&str, sd_pool::Result<KafkaConsumer>)> = vec![
        (
            "bootstrap_servers",
            KafkaConsumer::builder(" ")
                .group("g")
                .topic("t")
                .build(per_key()),
        ),
        (
            "group",
            KafkaConsumer::builder("h:1").topic("t").build(per_key()),
        ),
        (
            "topic",
            KafkaConsumer::builder("h:1").group("g").build(per_key()),
        ),
        ("topic", base().topic("no spaces").build(per_key())),
        ("order", base().build(unordered())),
        (
            "commit_interval",
            base().commit_interval(Duration::ZERO).build(per_key()),
        ),
        ("max_window", base().max_window(0).build(per_key())),
        ("max_held", base().max_held(1).build(per_key())),
        (
            "revoke_timeout",
            base().revoke_timeout(Duration::ZERO).build(per_key()),
        ),
        (
            "drain_timeout",
            base().drain_timeout(Duration::ZERO).build(per_key()),
        ),
        (
            "retry",
            base()
                .retry(
                    sd_core::RetryPolicy::builder()
                        .unlimited_attempts()
                        .build()
                        .unwrap(),
                )
                .build(per_key()),
        ),
        (
            "dead_letter_topic",
            base().dead_letter_topic("t").build(per_key()),
        ),
        (
            "dead_letter_topic",
            base().dead_letter_topic("").build(per_key()),
        ),
        (
            "client_config",
            base()
                .client_config(with("enable.auto.commit", "true"))
                .build(per_key()),
        ),
        (
            "client_config",
            base().client_config(with("group.id", "x")).build(per_key()),
        ),
        (
            "client_config",
            base()
                .client_config(with("no.such.property", "1"))
                .build(per_key()),
        ),
    ];
    for (expected, result) in cases {
        assert_eq!(field(result), expected);
    }
    assert!(
        base()
            .order(RecordOrder::Unordered)
            .build(unordered())
            .is_ok()
    );
}
