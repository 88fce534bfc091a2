//! sd-pool's Kafka consumer beside the rdkafka consumers users write themselves, on one
//! tansu broker (SQLite engine), same topic layout and records.
//!
//! - `pool/kafka_1ms_jobs`: 8,000 records over 1,000 keys on 4 partitions, each job a
//!   1 ms sleep. sd per key and unordered with 64 workers, beside the usual rdkafka
//!   consumer that runs each partition's records in order on a task of its own
//!   (parallelism = partitions).
//! - `pool/kafka_zero_work`: 20,000 records whose handler does nothing, sd per key with
//!   64 workers beside a bare rdkafka poll loop that commits the same way (each
//!   partition's next offset, every second): the cost of sd's bookkeeping. The two are
//!   then run again in alternating rounds (`pool/kafka_zero_work interleaved`), so both
//!   meet the broker in the same state: most of a round is the broker serving the
//!   records, it uses both cores for it, and it slows as its file grows round by round.
//!
//! Each round consumes a fresh topic with a fresh group; the clock runs from the first
//! record handled to the last (joining the group is left out on both sides), read where
//! the records are handled, with no watcher polling beside the consumer.
//! `SD_BENCH_REPORT=1` prints each round's timeline (when every 1,000th record was
//! handled): on this broker both sides read the first partition at once and then wait
//! 0.3 to 0.9 s for the others, a wait that is the broker's and varies from round to round.
//!
//! Every consumer here, sd's and the peers', sets `fetch.wait.max.ms` to 10 ms (librdkafka's
//! default is 500 ms). librdkafka keeps one fetch request in flight per broker: at the start
//! of a round the first partition ready is fetched alone, its next fetch then waits at the
//! end of that partition for the long poll, and the partitions that became ready meanwhile
//! sit idle until it returns (about 0.3 s on this broker, seen with the default). That stall
//! is the client's and the broker's, the same for every consumer, and would hide the
//! throughput measured here.
#![allow(clippy::unwrap_used, missing_docs)] // A bench binary: failures should stop it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sd_pool::kafka::{KafkaConsumer, RecordOrder};
use sd_pool::{Order, Pool};
use sd_testkit::{KafkaBroker, unique_name};
use tokio::sync::Notify;

const PARTITIONS: i32 = 4;
const KEYS: usize = 1_000;

/// When the first and the `n`th record were handled. Handlers tick it; the round waits on
/// it without polling, so neither side pays for a watcher waking up while it runs. Shared
/// as one `Arc`: a handler's clone is one count.
struct Clock {
    first: OnceLock<Instant>,
    last: OnceLock<Instant>,
    done: AtomicUsize,
    n: usize,
    reached: Notify,
    /// When each 1,000th record was handled.
    marks: Mutex<Vec<(usize, Instant)>>,
}

impl Clock {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            first: OnceLock::new(),
            last: OnceLock::new(),
            done: AtomicUsize::new(0),
            n,
            reached: Notify::new(),
            marks: Mutex::default(),
        })
    }

    fn tick(&self) {
        let now = Instant::now();
        let _ = self.first.get_or_init(|| now);
        let c = self.done.fetch_add(1, Ordering::AcqRel) + 1;
        if c.is_multiple_of(1000) {
            self.marks.lock().unwrap().push((c, now));
        }
        if c == self.n {
            let _ = self.last.set(now);
            self.reached.notify_one();
        }
    }

    /// Waits until `n` records were handled; the time from the first to the `n`th.
    async fn until(&self) -> Duration {
        self.reached.notified().await;
        let first = self.first.get().expect("a record was handled");
        let last = self.last.get().expect("the nth record was handled");
        let marks: Vec<(usize, Duration)> = self
            .marks
            .lock()
            .unwrap()
            .iter()
            .map(|(c, t)| (*c, t.saturating_duration_since(*first)))
            .collect();
        timeline("sd", &marks);
        last.saturating_duration_since(*first)
    }
}

/// With `SD_BENCH_REPORT` set, prints when every 1,000th record was handled (ms since the
/// first): it shows where a round waited on the broker and where on the consumer.
fn timeline(side: &str, marks: &[(usize, Duration)]) {
    if std::env::var_os("SD_BENCH_REPORT").is_some() {
        let marks: Vec<String> = marks
            .iter()
            .map(|(count, at)| format!("{}k:{}", count / 1000, at.as_millis()))
            .collect();
        eprintln!("{side} timeline {}", marks.join(" "));
    }
}

/// A new topic holding `n` records over `KEYS` keys.
async fn topic_with(broker: &KafkaBroker, producer: &FutureProducer, n: usize) -> String {
    let topic = unique_name("bench");
    broker.create_topic(&topic, PARTITIONS as u32).unwrap();
    let sends = (0..n).map(|i| {
        let key = format!("k{}", i % KEYS);
        let topic = topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&key),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    });
    futures::future::join_all(sends).await;
    topic
}

fn config(broker: &KafkaBroker) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", broker.bootstrap())
        .set("group.id", unique_name("g"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    c.set(FETCH_WAIT.0, FETCH_WAIT.1);
    c
}

/// The fetch setting every consumer of this bench shares (see the module docs).
const FETCH_WAIT: (&str, &str) = ("fetch.wait.max.ms", "10");

/// sd's consumer: the time to handle `n` records of a fresh topic.
async fn sd_round(
    broker: &KafkaBroker,
    producer: &FutureProducer,
    n: usize,
    order: RecordOrder,
    work: Duration,
) -> Duration {
    let topic = topic_with(broker, producer, n).await;
    let pool_order = match order {
        RecordOrder::Unordered => Order::Unordered,
        _ => Order::PerKey,
    };
    let pool = Pool::builder()
        .workers(64)
        .queue(256)
        .order(pool_order)
        .build()
        .unwrap();
    let consumer = KafkaConsumer::builder(broker.bootstrap())
        .group(unique_name("g"))
        .topic(&topic)
        .order(order)
        .client_config(ClientConfig::new().set(FETCH_WAIT.0, FETCH_WAIT.1).clone())
        .build(pool)
        .unwrap();
    let clock = Clock::new(n);
    let c = Arc::clone(&clock);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        consumer
            .run(
                move |_record| {
                    let c = Arc::clone(&c);
                    async move {
                        if !work.is_zero() {
                            tokio::time::sleep(work).await;
                        }
                        c.tick();
                        Ok::<(), String>(())
                    }
                },
                async move {
                    let _ = stopped.await;
                },
            )
            .await
    });
    let took = clock.until().await;
    drop(stop);
    let report = run.await.unwrap().unwrap();
    if std::env::var_os("SD_BENCH_REPORT").is_some() {
        eprintln!("{took:?} {report:?}");
    }
    took
}

/// The usual hand-written consumer: one task per partition, each running its records
/// in order, offsets stored as they finish and committed every second.
async fn per_partition_round(
    broker: &KafkaBroker,
    producer: &FutureProducer,
    n: usize,
    work: Duration,
) -> Duration {
    let topic = topic_with(broker, producer, n).await;
    let consumer: Arc<StreamConsumer> = Arc::new(
        config(broker)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .create()
            .unwrap(),
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let clock = Clock::new(n);
    let mut tasks = Vec::new();
    for p in 0..PARTITIONS {
        let queue = consumer.split_partition_queue(&topic, p).unwrap();
        let (consumer, clock) = (consumer.clone(), Arc::clone(&clock));
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(m) = queue.recv().await else { break };
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                consumer
                    .store_offset(m.topic(), m.partition(), m.offset() + 1)
                    .unwrap();
                clock.tick();
            }
        }));
    }
    // The main queue must be polled for the partition queues to be served.
    let main = consumer.clone();
    let serve = tokio::spawn(async move {
        let _ = main.recv().await;
    });
    let took = clock.until().await;
    serve.abort();
    for t in tasks {
        t.abort();
    }
    took
}

/// A bare poll loop that counts records and commits each partition's next offset every
/// second, as sd does.
fn bare_round(broker: &KafkaBroker, topic: &str, n: usize) -> Duration {
    let consumer: BaseConsumer = config(broker).create().unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut next = [0i64; PARTITIONS as usize];
    let (mut seen, mut first) = (0, None);
    let mut marks = Vec::new();
    let mut commit_at = Instant::now() + Duration::from_secs(1);
    while seen < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            first.get_or_insert_with(Instant::now);
            next[m.partition() as usize] = m.offset() + 1;
            seen += 1;
            if seen.is_multiple_of(1000)
                && let Some(first) = first
            {
                marks.push((seen, first.elapsed()));
            }
        }
        if Instant::now() >= commit_at {
            commit_at = Instant::now() + Duration::from_secs(1);
            let mut tpl = TopicPartitionList::new();
            for (p, o) in next.iter().enumerate() {
                if *o > 0 {
                    tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o))
                        .unwrap();
                }
            }
            let _ = consumer.commit(&tpl, CommitMode::Async);
        }
    }
    timeline("bare", &marks);
    first.expect("records").elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The SQLite engine: the memory engine cannot serve a fetch from inside a batch.
    let broker = KafkaBroker::start_durable().expect("a tansu broker");
    let producer: FutureProducer = {
        let _guard = rt.enter();
        ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("linger.ms", "5")
            .create()
            .unwrap()
    };
    let ms = Duration::from_millis(1);

    let n = 8_000;
    let mut g = c.benchmark_group("pool/kafka_1ms_jobs");
    // Each round is a whole topic: flat samples of one round each.
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(n as u64));
    let rounds = |b: &mut criterion::Bencher<'_>, f: &dyn Fn() -> Duration| {
        b.iter_custom(|iters| (0..iters).map(|_| f()).sum())
    };
    g.bench_function("sd_per_key_64", |b| {
        rounds(b, &|| {
            rt.block_on(sd_round(&broker, &producer, n, RecordOrder::PerKey, ms))
        })
    });
    g.bench_function("sd_unordered_64", |b| {
        rounds(b, &|| {
            rt.block_on(sd_round(&broker, &producer, n, RecordOrder::Unordered, ms))
        })
    });
    g.bench_function("rdkafka_per_partition_task", |b| {
        rounds(b, &|| {
            rt.block_on(per_partition_round(&broker, &producer, n, ms))
        })
    });
    g.finish();

    let n = 20_000;
    let mut g = c.benchmark_group("pool/kafka_zero_work");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("sd_per_key_64", |b| {
        rounds(b, &|| {
            rt.block_on(sd_round(
                &broker,
                &producer,
                n,
                RecordOrder::PerKey,
                Duration::ZERO,
            ))
        })
    });
    g.bench_function("rdkafka_bare_loop", |b| {
        rounds(b, &|| {
            let topic = rt.block_on(topic_with(&broker, &producer, n));
            bare_round(&broker, &topic, n)
        })
    });
    g.finish();

    // The same rounds again, alternating, each pair led by the other side: both meet the
    // broker in the same state (its serving time sets most of a round, and drifts as its
    // file grows with every topic).
    const ROUNDS: usize = 10;
    let (mut sd, mut bare) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for side in [round % 2, (round + 1) % 2] {
            if side == 0 {
                let zero = Duration::ZERO;
                sd.push(rt.block_on(sd_round(&broker, &producer, n, RecordOrder::PerKey, zero)));
            } else {
                let topic = rt.block_on(topic_with(&broker, &producer, n));
                bare.push(bare_round(&broker, &topic, n));
            }
        }
    }
    sd.sort_unstable();
    bare.sort_unstable();
    // Medians: a round is mostly the broker's wait, and the fastest bare round is one
    // where the broker happened to serve every partition at once.
    let median = |d: &[Duration]| d[d.len() / 2];
    println!(
        "pool/kafka_zero_work interleaved (medians of {ROUNDS} alternating rounds of 20k records each side): sd per key {:.1?} (fastest {:.1?}), bare loop {:.1?} (fastest {:.1?}); sd's throughput {:.2}x the bare loop's",
        median(&sd),
        sd[0],
        median(&bare),
        bare[0],
        median(&bare).as_secs_f64() / median(&sd).as_secs_f64(),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
