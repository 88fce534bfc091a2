//! sd-outbox: relay throughput from PostgreSQL to Redis Streams (batch 100 and 1000,
//! 1 and 3 relays) beside a naive single-reader polling loop (`SELECT .. WHERE
//! status = 'pending' ORDER BY seq LIMIT n`, pipelined XADD, `UPDATE`: the Eventuate
//! polling relay), and one relay to Kafka (a tansu broker, idempotent producer,
//! `acks=all`) at the same batch sizes; enqueue in a transaction beside a bare INSERT of the same row into a
//! plain table; commit-to-publish latency with notifications beside poll-only.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redis::aio::ConnectionManager;
use sd_outbox::kafka::KafkaPublisher;
use sd_outbox::postgres::{Mode, Outbox, Relay};
use sd_outbox::redis::RedisStreamsPublisher;
use sd_outbox::{Event, Message, Publisher};
use sqlx::{PgPool, Row as _};

/// Events per throughput sample.
const EVENTS: u64 = 10_000;

fn message(n: u64) -> Message {
    Message::json(
        "order",
        format!("agg-{}", n % 50),
        "order_changed",
        serde_json::json!({ "n": n, "total": 1250, "currency": "EUR" }),
    )
}

/// Writes `EVENTS` pending rows in one statement (the relay is what is measured).
async fn preload(outbox: &Outbox) {
    sqlx::query(&format!(
        "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload)
         SELECT gen_random_uuid(), 'order', 'agg-' || (i % 50), 'order_changed',
                jsonb_build_object('n', i, 'total', 1250, 'currency', 'EUR')
         FROM generate_series(1, $1) AS i",
        outbox.table()
    ))
    .bind(EVENTS as i64)
    .execute(outbox.pool())
    .await
    .unwrap();
}

async fn reset(outbox: &Outbox, redis: &mut ConnectionManager) {
    sqlx::query(&format!("TRUNCATE {}", outbox.table()))
        .execute(outbox.pool())
        .await
        .unwrap();
    redis::cmd("DEL")
        .arg("outbox:order")
        .query_async::<()>(redis)
        .await
        .unwrap();
}

/// Waits until no row is pending: one probe of the pending index every 5 ms, so the
/// watching costs the two cores next to nothing.
async fn drained(outbox: &Outbox) {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE status = 'pending')",
        outbox.table()
    );
    loop {
        let pending: bool = sqlx::query_scalar(&sql)
            .fetch_one(outbox.pool())
            .await
            .unwrap();
        if !pending {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The naive relay: one reader, no claiming, no lanes, no notifications.
async fn naive_relay(pool: &PgPool, table: &str, redis: &mut ConnectionManager, batch: i64) {
    loop {
        let rows = sqlx::query(&format!(
            "SELECT id, aggregatetype, aggregateid, type, payload FROM {table}
             WHERE status = 'pending' ORDER BY seq LIMIT $1"
        ))
        .bind(batch)
        .fetch_all(pool)
        .await
        .unwrap();
        if rows.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: sqlx::types::Uuid = row.get("id");
            let payload: serde_json::Value = row.get("payload");
            pipe.cmd("XADD")
                .arg(format!("outbox:{}", row.get::<String, _>("aggregatetype")))
                .arg("*")
                .arg("id")
                .arg(id.to_string())
                .arg("aggregateid")
                .arg(row.get::<String, _>("aggregateid"))
                .arg("type")
                .arg(row.get::<String, _>("type"))
                .arg("payload")
                .arg(serde_json::to_vec(&payload).unwrap())
                .ignore();
            ids.push(id);
        }
        pipe.query_async::<()>(redis).await.unwrap();
        sqlx::query(&format!(
            "UPDATE {table} SET status = 'published', published_at = now() WHERE id = ANY($1)"
        ))
        .bind(&ids)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// Runs `drain` `iters` times, each on a fresh backlog of `EVENTS` rows; the sum of
/// the times it reports.
fn drains<F, Fut>(
    rt: &tokio::runtime::Runtime,
    outbox: &Outbox,
    redis: &ConnectionManager,
    iters: u64,
    mut drain: F,
) -> Duration
where
    F: FnMut(ConnectionManager) -> Fut,
    Fut: Future<Output = Duration>,
{
    rt.block_on(async {
        let mut redis = redis.clone();
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            reset(outbox, &mut redis).await;
            preload(outbox).await;
            total += drain(redis.clone()).await;
        }
        total
    })
}

fn throughput(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    outbox: &Outbox,
    redis: &ConnectionManager,
) {
    let mut g = c.benchmark_group("outbox/relay_to_redis");
    g.sample_size(10);
    g.throughput(Throughput::Elements(EVENTS));
    let publisher = RedisStreamsPublisher::builder(redis.clone())
        .build()
        .unwrap();
    for batch in [100u32, 1000] {
        for (mode, relays) in [
            (Mode::Parallel, 1usize),
            (Mode::Parallel, 3),
            (Mode::Ordered, 1),
        ] {
            let id = BenchmarkId::new(
                format!("sd/{mode:?}/{relays}_relays"),
                format!("batch_{batch}"),
            );
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    drains(rt, outbox, redis, iters, |_| {
                        relays_drain(outbox, &publisher, mode, relays, batch)
                    })
                })
            });
        }
        let id = BenchmarkId::new("naive_poll/1_reader", format!("batch_{batch}"));
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                drains(rt, outbox, redis, iters, |mut redis| async move {
                    let start = Instant::now();
                    naive_relay(outbox.pool(), outbox.table(), &mut redis, i64::from(batch)).await;
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// Starts `relays` relays of `mode` over `publisher` and times them until the backlog
/// is gone.
async fn relays_drain<P: Publisher + Clone>(
    outbox: &Outbox,
    publisher: &P,
    mode: Mode,
    relays: usize,
    batch: u32,
) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = (0..relays)
        .map(|_| {
            Relay::builder(outbox.clone(), publisher.clone())
                .mode(mode)
                .batch_size(batch)
                .build()
                .unwrap()
                .spawn()
        })
        .collect();
    drained(outbox).await;
    let took = start.elapsed();
    for h in handles {
        h.shutdown().await;
    }
    took
}

/// One parallel relay to Kafka, at the Redis rows' batch sizes: records go to
/// `outbox.event.order` (4 partitions), keyed by aggregate, each acknowledged by the
/// broker before its row is marked.
fn kafka_throughput(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    outbox: &Outbox,
    redis: &ConnectionManager,
) {
    let broker = sd_testkit::KafkaBroker::start().expect("a tansu broker");
    broker.create_topic("outbox.event.order", 4).unwrap();
    let publisher = KafkaPublisher::builder(broker.bootstrap()).build().unwrap();
    let mut g = c.benchmark_group("outbox/relay_to_kafka");
    g.sample_size(10);
    g.throughput(Throughput::Elements(EVENTS));
    for batch in [100u32, 1000] {
        let id = BenchmarkId::new("sd/Parallel/1_relays", format!("batch_{batch}"));
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                drains(rt, outbox, redis, iters, |_| {
                    relays_drain(outbox, &publisher, Mode::Parallel, 1, batch)
                })
            })
        });
    }
    g.finish();
}

/// The same row into a plain table (primary key only), in a transaction of its own.
async fn bare_insert(pool: &PgPool, m: Message) {
    let sd_outbox::Payload::Json(payload) = m.payload else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO bare_events (id, aggregatetype, aggregateid, type, payload, payload_bytes, headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(sd_outbox::new_id())
    .bind(m.aggregate_type)
    .bind(m.aggregate_id)
    .bind(m.event_type)
    .bind(Some(payload))
    .bind(None::<Vec<u8>>)
    .bind(serde_json::json!({}))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

fn enqueue(c: &mut Criterion, rt: &tokio::runtime::Runtime, outbox: &Outbox) {
    rt.block_on(async {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS bare_events (id UUID PRIMARY KEY, aggregatetype TEXT NOT NULL,
                 aggregateid TEXT NOT NULL, type TEXT NOT NULL, payload JSONB, payload_bytes BYTEA,
                 headers JSONB NOT NULL DEFAULT '{}'::jsonb)",
        )
        .execute(outbox.pool())
        .await
        .unwrap();
    });
    // The two run in turn, a block of each per sample, and each function times only its
    // own block: both see the same table sizes, autovacuum runs and machine load, which
    // two phases minutes apart do not (the one measured second paid for the first's
    // rows). Blocks rather than single operations, because a commit leaves work behind
    // (WAL writing, index pages) that lands on whatever runs next.
    let mut g = c.benchmark_group("outbox/enqueue_tx");
    let mut n = 0u64;
    for (name, sd_first) in [("bare_insert", false), ("sd_enqueue", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let first = Instant::now();
                    block(outbox, &mut n, iters, sd_first).await;
                    let timed = first.elapsed();
                    block(outbox, &mut n, iters, !sd_first).await;
                    timed
                })
            })
        });
    }
    g.finish();
    // Medians over 200 rounds of 10 bare inserts then 10 enqueues, each block's mean
    // per operation: the mean above carries the rare slow commit of either side.
    let (mut bare, mut sd) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for _ in 0..200 {
            for sd_turn in [false, true] {
                let start = Instant::now();
                block(outbox, &mut n, 10, sd_turn).await;
                let per_op = start.elapsed() / 10;
                if sd_turn {
                    sd.push(per_op)
                } else {
                    bare.push(per_op)
                }
            }
        }
    });
    bare.sort();
    sd.sort();
    eprintln!(
        "outbox/enqueue_tx over 200 rounds of 10 + 10: median bare {:?}, sd {:?}, overhead {:?}",
        bare[100],
        sd[100],
        sd[100].saturating_sub(bare[100]),
    );
}

/// `iters` enqueues (`sd`) or bare inserts, each in a transaction of its own.
async fn block(outbox: &Outbox, n: &mut u64, iters: u64, sd: bool) {
    for _ in 0..iters {
        *n += 1;
        if sd {
            sd_enqueue(outbox, message(*n)).await;
        } else {
            bare_insert(outbox.pool(), message(*n)).await;
        }
    }
}

async fn sd_enqueue(outbox: &Outbox, m: Message) {
    let mut tx = outbox.pool().begin().await.unwrap();
    outbox.enqueue(&mut tx, m).await.unwrap();
    tx.commit().await.unwrap();
}

/// Publishes to Redis and then reports when each event was acknowledged.
#[derive(Clone)]
struct Timed {
    inner: RedisStreamsPublisher<ConnectionManager>,
    acked: tokio::sync::mpsc::UnboundedSender<(u128, Instant)>,
}

impl Publisher for Timed {
    fn publish(&self, events: &[Event]) -> impl Future<Output = sd_outbox::Result<()>> + Send {
        let publish = self.inner.publish(events);
        let ids: Vec<u128> = events.iter().map(|e| e.id.as_u128()).collect();
        let acked = self.acked.clone();
        async move {
            publish.await?;
            let now = Instant::now();
            for id in ids {
                let _ = acked.send((id, now));
            }
            Ok(())
        }
    }
}

fn latency(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    outbox: &Outbox,
    redis: &ConnectionManager,
) {
    let mut g = c.benchmark_group("outbox/commit_to_publish");
    g.sample_size(20);
    for (name, listen, poll) in [
        ("notify", true, Duration::from_secs(1)),
        ("poll_100ms_only", false, Duration::from_millis(100)),
    ] {
        let samples = Arc::new(Mutex::new(Vec::<Duration>::new()));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let publisher = Timed {
            inner: RedisStreamsPublisher::builder(redis.clone())
                .build()
                .unwrap(),
            acked: tx,
        };
        let relay = rt.block_on(async {
            let mut redis = redis.clone();
            reset(outbox, &mut redis).await;
            Relay::builder(outbox.clone(), publisher)
                .listen(listen)
                .poll_interval(poll)
                .build()
                .unwrap()
                .spawn()
        });
        let mut n = 0;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    let mut rx = rx.lock().await;
                    for _ in 0..iters {
                        n += 1;
                        let mut tx = outbox.pool().begin().await.unwrap();
                        let id = outbox.enqueue(&mut tx, message(n)).await.unwrap().as_u128();
                        tx.commit().await.unwrap();
                        let committed = Instant::now();
                        let at = loop {
                            let (got, at) = rx.recv().await.unwrap();
                            if got == id {
                                break at;
                            }
                        };
                        let took = at.saturating_duration_since(committed);
                        samples.lock().unwrap().push(took);
                        total += took;
                    }
                    total
                })
            })
        });
        rt.block_on(relay.shutdown());
        let mut all = samples.lock().unwrap().clone();
        all.sort();
        if !all.is_empty() {
            let p = |q: f64| all[((all.len() - 1) as f64 * q) as usize];
            eprintln!(
                "outbox/commit_to_publish/{name}: p50 {:?}, p99 {:?} over {} events",
                p(0.5),
                p(0.99),
                all.len()
            );
        }
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    let rt = sd_testkit::runtime();
    let db = sd_testkit::database().expect("a postgres server");
    let redis_server = sd_testkit::redis().expect("a redis server");
    let (outbox, redis) = rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(db.url())
            .await
            .unwrap();
        let outbox = Outbox::new(pool).unwrap();
        outbox.migrate().await.unwrap();
        let client = redis::Client::open(redis_server.url()).unwrap();
        let redis = ConnectionManager::new(client).await.unwrap();
        (outbox, redis)
    });
    enqueue(c, &rt, &outbox);
    latency(c, &rt, &outbox, &redis);
    throughput(c, &rt, &outbox, &redis);
    kafka_throughput(c, &rt, &outbox, &redis);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
