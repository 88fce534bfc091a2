//! What the Kafka test binaries share: a broker, a producer, members that log every
//! handler run raw (start, finish, who), and the checks over that history.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // Each binary uses its own subset.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sd_pool::kafka::{KafkaConsumer, KafkaConsumerBuilder, KafkaReport, Record, RecordOrder};
use sd_pool::{Order, Pool};
use sd_testkit::KafkaBroker;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A tansu broker on its SQLite engine: its memory engine cannot serve a fetch that
/// starts inside a stored batch (it answers from the next batch), which a consumer
/// needs after a pause, a seek, a rebalance or a restart from a commit.
pub fn broker() -> KafkaBroker {
    KafkaBroker::start_durable()
        .expect("a tansu broker (scripts/test.sh builds it; or set SD_TANSU)")
}

/// The value of record `seq` of key `key`: `key:seq`.
pub fn value(key: usize, seq: usize) -> String {
    format!("k{key}:{seq}")
}

/// Produces `per_key` records for each of `keys` keys, key `k{n}`, interleaved (seq 0 of
/// every key, then seq 1, ...), and waits for every acknowledgement.
pub async fn produce(bootstrap: &str, topic: &str, keys: usize, per_key: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut pending = Vec::with_capacity(keys * per_key);
    for seq in 0..per_key {
        for key in 0..keys {
            let (k, v) = (format!("k{key}"), value(key, seq));
            let producer = producer.clone();
            let topic = topic.to_owned();
            pending.push(tokio::spawn(async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&k).payload(&v),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(drop)
                    .map_err(|(e, _)| e)
            }));
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
}

/// One handler run, as the handler saw it.
#[derive(Debug, Clone)]
pub struct Run {
    pub member: usize,
    pub key: String,
    pub seq: usize,
    pub partition: i32,
    pub offset: i64,
    pub attempt: u32,
    pub start: Instant,
    pub end: Instant,
}

/// Every handler run of every member, unfiltered.
#[derive(Debug, Clone, Default)]
pub struct History(Arc<Mutex<Vec<Run>>>);

impl History {
    pub fn push(&self, run: Run) {
        self.0.lock().unwrap().push(run);
    }

    pub fn runs(&self) -> Vec<Run> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// How many distinct (partition, offset) ran.
    pub fn distinct(&self) -> usize {
        let runs = self.0.lock().unwrap();
        let mut seen: Vec<(i32, i64)> = runs.iter().map(|r| (r.partition, r.offset)).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }
}

/// Parses a `k{key}:{seq}` payload.
pub fn parse(record: &Record) -> (String, usize) {
    let text = std::str::from_utf8(record.payload().unwrap()).unwrap();
    let (key, seq) = text.split_once(':').unwrap();
    (key.to_owned(), seq.parse().unwrap())
}

/// How long a job of member `i` sleeps, asked afresh for each record: `pace(i)`.
pub type Pace = Arc<dyn Fn(usize) -> Duration + Send + Sync>;

/// Every job of every member sleeps `work`.
pub fn steady(work: Duration) -> Pace {
    Arc::new(move |_| work)
}

/// A handler that sleeps `work` and logs its run into `history` as `member`.
pub fn logging_handler(
    member: usize,
    history: History,
    work: Duration,
) -> impl Fn(Record) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
+ Send
+ Sync
+ 'static {
    paced_handler(member, history, steady(work))
}

/// A handler that sleeps what `pace` says and logs its run into `history` as `member`.
pub fn paced_handler(
    member: usize,
    history: History,
    pace: Pace,
) -> impl Fn(Record) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
+ Send
+ Sync
+ 'static {
    move |record: Record| {
        let history = history.clone();
        let work = pace(member);
        Box::pin(async move {
            let start = Instant::now();
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            let (key, seq) = parse(&record);
            history.push(Run {
                member,
                key,
                seq,
                partition: record.partition(),
                offset: record.offset(),
                attempt: record.attempt(),
                start,
                end: Instant::now(),
            });
            Ok(())
        })
    }
}

/// A per-key member of `group` on `topic`: commits every 100 ms, three attempts 10 ms
/// apart, a window of 200.
pub fn member(bootstrap: &str, group: &str, topic: &str) -> KafkaConsumerBuilder {
    KafkaConsumer::builder(bootstrap)
        .group(group)
        .topic(topic)
        .order(RecordOrder::PerKey)
        .commit_interval(Duration::from_millis(100))
        .client_config(fast_group())
        .retry(
            sd_core::RetryPolicy::builder()
                .initial_interval(Duration::from_millis(10))
                .max_attempts(3)
                .jitter(0.0)
                .build()
                .unwrap(),
        )
        .revoke_timeout(Duration::from_secs(20))
        .drain_timeout(Duration::from_secs(20))
        .max_window(200)
}

/// Group timings that make a member that died or left noticed in seconds.
pub fn fast_group() -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("isolation.level", "read_uncommitted");
    config
}

/// A per-key pool of `workers`.
pub fn pool(workers: usize) -> Pool {
    Pool::builder()
        .workers(workers)
        .queue(workers * 4)
        .order(Order::PerKey)
        .build()
        .unwrap()
}

/// Waits until `history` covers `total` distinct offsets, or panics after `limit`.
pub async fn until_all_ran(history: &History, total: usize, limit: Duration) {
    let start = Instant::now();
    while history.distinct() < total {
        if start.elapsed() >= limit {
            let mut last: BTreeMap<i32, (usize, i64)> = BTreeMap::new();
            for r in history.runs() {
                let e = last.entry(r.partition).or_default();
                e.0 += 1;
                e.1 = e.1.max(r.offset);
            }
            panic!(
                "only {} of {total} records ran within {limit:?}; per partition (runs, last offset): {last:?}",
                history.distinct()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the whole history: every record of every key ran, each key's first runs are in
/// offset order (a key lives in one partition; the producer's concurrent sends decide
/// that order, not the payload's number), and no two runs of one key overlapped in time
/// (one at a time per key, across members too). Returns the number of runs beyond the
/// first of a record.
pub fn check_per_key(runs: &[Run], keys: usize, per_key: usize) -> usize {
    let mut by_key: HashMap<&str, Vec<&Run>> = HashMap::new();
    for run in runs {
        by_key.entry(run.key.as_str()).or_default().push(run);
    }
    assert_eq!(by_key.len(), keys, "every key ran");
    let mut repeats = 0;
    for (key, mut runs) in by_key {
        runs.sort_by_key(|r| r.start);
        for pair in runs.windows(2) {
            assert!(
                pair[0].end <= pair[1].start,
                "two runs of {key} overlapped: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
        let mut first = BTreeMap::new();
        for (i, r) in runs.iter().enumerate() {
            first.entry((r.partition, r.offset)).or_insert(i);
        }
        let seqs: BTreeSet<usize> = runs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), per_key, "every record of {key} ran");
        assert_eq!(
            first.len(),
            per_key,
            "{key}'s records are at {per_key} offsets"
        );
        let order: Vec<usize> = first.values().copied().collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{key}'s records first ran out of order: {:?}",
            runs.iter()
                .map(|r| (r.seq, r.partition, r.offset, r.member, r.attempt))
                .collect::<Vec<_>>()
        );
        repeats += runs.len() - per_key;
    }
    repeats
}

/// The offsets `group` has committed on `topic`, with their metadata (0 and none where
/// it has committed nothing).
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<(i64, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => (o, e.metadata().to_owned()),
            // Nothing committed: the group starts from the beginning (`earliest`).
            Offset::Invalid => (0, String::new()),
            other => panic!("partition {}: {other:?}", e.partition()),
        })
        .collect()
}

/// A running member: dropping (or sending) the first stops it; the second gives its report.
pub type Member = (
    oneshot::Sender<()>,
    JoinHandle<sd_pool::Result<KafkaReport>>,
);

/// Runs `consumer` with `handler` until its stop is sent or dropped.
pub fn spawn_member<H, Fut>(consumer: KafkaConsumer, handler: H) -> Member
where
    H: Fn(Record) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        consumer
            .run(handler, async move {
                let _ = stopped.await;
            })
            .await
    });
    (stop, task)
}

/// Starts logging members of `group` one after another, member `i` (with `workers`
/// workers and jobs as long as `pace` says) once `start_after[i]` records have run.
pub async fn staggered_members(
    (bootstrap, group, topic): (&str, &str, &str),
    history: &History,
    start_after: &[usize],
    workers: usize,
    pace: Pace,
) -> Vec<Member> {
    let mut members = Vec::new();
    for (i, after) in start_after.iter().enumerate() {
        until_all_ran(history, *after, Duration::from_secs(60)).await;
        let consumer = member(bootstrap, group, topic)
            .build(pool(workers))
            .unwrap();
        members.push(spawn_member(
            consumer,
            paced_handler(i, history.clone(), Arc::clone(&pace)),
        ));
    }
    members
}

/// Stops every member and returns their reports, in order.
pub async fn stop_all(members: Vec<Member>) -> Vec<KafkaReport> {
    let mut reports = Vec::new();
    for (stop, task) in members {
        drop(stop);
        reports.push(task.await.unwrap().unwrap());
    }
    reports
}
