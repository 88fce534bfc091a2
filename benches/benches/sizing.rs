//! Sizing: how many operations a second ONE Redis server (one shard) sustains for each
//! Redis-backed sd crate, beside the commands users would otherwise send (or the crate they
//! would pick) doing the same work on the same server, connection and concurrency.
//!
//! ```text
//! since=$(date +%s)
//! CRITERION_HOME="$PWD/target/criterion" cargo bench -p sd-benches --bench sizing
//! cargo run -p sd-benches --bin results -- --sizing target/criterion benches/RESULTS.md \
//!     "$since" "cargo bench -p sd-benches --bench sizing"
//! ```
//!
//! The last command rewrites only the Sizing section of `benches/RESULTS.md` (operations a
//! second per shard, and the shards a load needs); `scripts/bench.sh` writes it with the
//! rest.
//!
//! One file rather than a group in each crate's bench: the figures must come from one
//! server under one setup to be set side by side, and this file starts that server only
//! (the outbox and lock benches start PostgreSQL, Kafka, etcd or five Redis servers before
//! any group filter applies).
//!
//! Setup for every group: one `redis-server` started by sd-testkit (no persistence), on the
//! same two cores as the client; a tokio runtime of 2 workers; one multiplexed connection
//! shared by the callers (the consumer rows: one of their own). Criterion reports elements
//! per second (`Throughput::Elements`): one decision, hit, load, cycle or event each, and
//! for the consumer rows one whole backlog of entries per iteration.
//!
//! Each sample of a row also runs a block of a partner row (sd's: the group's last row, a
//! peer; a peer's: sd), before or after its own by turns, and times only its own: on a
//! machine shared with other work, busy and quiet spells then fall on both sides alike,
//! where criterion alone times one row after the other. It doubles the time a group takes.
//!
//! - `sizing/ratelimit`: 64 tasks over 10,000 keys, GCRA 1,000,000/s burst 1000:
//!   `RedisLimiter::check` (one `EVALSHA` each), the same with `batch(64)` (concurrent
//!   decisions share one), beside go-redis/redis_rate's GCRA script (the `ratelimit`
//!   bench's peer).
//! - `sizing/cache`: hits, 64 tasks over 1,000 preloaded keys of a 100-byte value:
//!   `RedisCache::get` (an `HMGET`) beside raw `GET` of the same JSON; loads, 64 tasks on
//!   keys never seen: `get_or_load` (lock script, loader, write script) beside hand-written
//!   cache-aside (`GET`, then `SET .. PX`).
//! - `sizing/lock`: 64 tasks, each cycle on a resource of its own: `RedisLock`'s
//!   `try_acquire` then `release` beside rslock (the `lock` bench's peer) and beside
//!   redis.io's single-instance pattern (`SET NX PX`, then a compare-and-delete script).
//! - `sizing/idempotency`: 64 tasks, a new key each: `RedisStore` claim + complete beside a
//!   hand-written idempotency key (`SET NX PX` of the fingerprint, then `SET XX PX` of the
//!   same encoded response).
//! - `sizing/outbox`: 8 tasks, each publishing batches of 100 events of one aggregate type
//!   (one stream): the Redis Streams sink's `publish` beside a raw pipeline of the same
//!   `XADD`s (the naive relay's, with sd's fields).
//! - `sizing/pool`: a backlog of 20,000 entries over 1,000 keys in a stream, timed from
//!   the first read to the last acknowledgement: one `StreamConsumer` (batch 100, 64
//!   workers, per key, a handler that does nothing) beside a bare loop of
//!   `XREADGROUP COUNT 100` and `XACK` of each batch.
#![allow(clippy::unwrap_used, missing_docs)] // A bench binary: failures should stop it.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use sd_lock::{Lock, Release};
use tokio::runtime::Runtime;

/// Callers at once in the per-operation groups: enough to keep the shard busy (the
/// `ratelimit` bench's figure; more only lengthens the queue on the connection).
const CALLERS: u64 = 64;
/// Publishers at once in the outbox group: 8 relays' batches in flight.
const PUBLISHERS: u64 = 8;
/// Events per published batch (the relay's default batch size).
const BATCH: u64 = 100;
/// Entries in the consumer's backlog, per iteration.
const ENTRIES: u64 = 20_000;

/// A number no other operation of this run got: keys for operations that need new ones.
static NEXT: AtomicU64 = AtomicU64::new(0);

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A boxed operation: it gets a number no other call got.
type Op = Arc<dyn Fn(u64) -> BoxFuture<'static, ()> + Send + Sync>;
/// A boxed clean-up, run once after each block, untimed.
type After = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// One row of a group: its name, its operation and its clean-up.
struct Contender {
    name: &'static str,
    op: Op,
    after: After,
}

fn contender<F, Fut, A, AFut>(name: &'static str, op: F, after: A) -> Contender
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    A: Fn() -> AFut + Send + Sync + 'static,
    AFut: Future<Output = ()> + Send + 'static,
{
    Contender {
        name,
        op: Arc::new(move |i| op(i).boxed()),
        after: Arc::new(move || after().boxed()),
    }
}

/// No clean-up after a block.
async fn nothing() {}

/// `iters` calls of `c`'s operation shared by `tasks` tasks; the time they took (scaled
/// to `iters` when the tasks' shares round up). Its clean-up runs after, untimed.
async fn block(c: &Contender, tasks: u64, iters: u64) -> Duration {
    let per = iters.div_ceil(tasks);
    let base = NEXT.fetch_add(per * tasks, Ordering::Relaxed);
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = c.op.clone();
            tokio::spawn(async move {
                for i in 0..per {
                    op(base + t * per + i).await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let took = start.elapsed();
    (c.after)().await;
    took.mul_f64(iters as f64 / (per * tasks) as f64)
}

/// Benches each contender as one operation per iteration, `tasks` tasks sharing them.
/// Each sample also runs a block of a partner (sd's is the group's last contender, the
/// others' is sd, the first), before or after its own by turns, and times only its own:
/// a loaded machine's spells then fall on both sides alike, which criterion's runs one
/// after the other do not give.
fn race(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, tasks: u64, contenders: &[Contender]) {
    for (i, own) in contenders.iter().enumerate() {
        let partner = &contenders[if i == 0 { contenders.len() - 1 } else { 0 }];
        let mut partner_first = true;
        g.bench_function(own.name, |b| {
            b.iter_custom(|iters| {
                partner_first = !partner_first;
                rt.block_on(async {
                    if partner_first {
                        block(partner, tasks, iters).await;
                    }
                    let took = block(own, tasks, iters).await;
                    if !partner_first {
                        block(partner, tasks, iters).await;
                    }
                    took
                })
            })
        });
    }
}

fn ratelimit(c: &mut Criterion, rt: &Runtime, url: &str) {
    use sd_ratelimit::{Limit, Quota};
    const KEYS: u64 = 10_000;
    let conn = rt.block_on(connect(url));
    let prefix = sd_testkit::unique_name("sizing-rl");
    let build = |batch| {
        let limit = Limit::gcra(
            Quota::per_second(1_000_000)
                .unwrap()
                .with_burst(1000)
                .unwrap(),
        );
        Arc::new(
            sd_ratelimit::redis::RedisLimiterBuilder::new(limit)
                .prefix(prefix.as_str())
                .timeout(Duration::from_secs(5))
                .batch(batch)
                .build(conn.clone())
                .unwrap(),
        )
    };
    let mut g = c.benchmark_group("sizing/ratelimit");
    g.throughput(Throughput::Elements(1));
    let mut contenders = Vec::new();
    for (name, sd) in [("sd", build(1)), ("sd-batched", build(CALLERS as usize))] {
        contenders.push(contender(
            name,
            move |i| {
                let sd = sd.clone();
                async move {
                    black_box(sd.check(&(i % KEYS).to_string()).await.unwrap());
                }
            },
            nothing,
        ));
    }
    let (c, script) = (conn, redis::Script::new(sd_benches::REDIS_RATE_GCRA));
    let raw = format!("{prefix}-raw");
    contenders.push(contender(
        "redis-rate-gcra",
        move |i| {
            let (mut conn, script, key) =
                (c.clone(), script.clone(), format!("{raw}:{}", i % KEYS));
            async move {
                let reply: (i64, i64, String, String) = script
                    .key(key)
                    .arg(1000)
                    .arg(1_000_000)
                    .arg(1)
                    .arg(1)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                black_box(reply.0 > 0);
            }
        },
        nothing,
    ));
    race(&mut g, rt, CALLERS, &contenders);
    g.finish();
}

fn cache(c: &mut Criterion, rt: &Runtime, url: &str) {
    use sd_cache::RedisCache;
    const KEYS: u64 = 1_000;
    let ttl = Duration::from_secs(30);
    let payload = "x".repeat(100);
    let prefix = sd_testkit::unique_name("sizing-cache");
    let raw = format!("{prefix}-raw");
    let (conn, sd) = rt.block_on(async {
        let mut conn = connect(url).await;
        let sd: RedisCache<String, _> = RedisCache::builder(prefix.as_str())
            .ttl(Duration::from_secs(3600))
            .build(conn.clone())
            .await
            .unwrap();
        let json = serde_json::to_string(&payload).unwrap();
        let mut pipe = redis::pipe();
        for k in 0..KEYS {
            sd.insert(&format!("k{k}"), &payload).await.unwrap();
            pipe.cmd("SET")
                .arg(format!("{raw}:k{k}"))
                .arg(&json)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
        (conn, Arc::new(sd))
    });
    let mut g = c.benchmark_group("sizing/cache");
    g.throughput(Throughput::Elements(1));
    let mut contenders = Vec::new();
    let cache = sd.clone();
    contenders.push(contender(
        "hit/sd",
        move |i| {
            let cache = cache.clone();
            async move {
                let hit = cache.get(&format!("k{}", i % KEYS)).await.unwrap();
                assert!(hit.is_some());
            }
        },
        nothing,
    ));
    let (c, r) = (conn.clone(), raw.clone());
    contenders.push(contender(
        "hit/raw-get",
        move |i| {
            let (mut conn, key) = (c.clone(), format!("{r}:k{}", i % KEYS));
            async move {
                let json: Option<String> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let value: String = serde_json::from_str(&json.unwrap()).unwrap();
                black_box(value);
            }
        },
        nothing,
    ));
    race(&mut g, rt, CALLERS, &contenders);
    contenders.clear();
    // Loads: keys no caller asked for before, each stored for `ttl` (the load's write).
    let loads: RedisCache<String, _> = rt.block_on(async {
        RedisCache::builder(format!("{prefix}-load"))
            .ttl(ttl)
            .build(conn.clone())
            .await
            .unwrap()
    });
    let (loads, value) = (Arc::new(loads), payload.clone());
    contenders.push(contender(
        "load/sd",
        move |i| {
            let (cache, value) = (loads.clone(), value.clone());
            async move {
                let got = cache
                    .get_or_load(&format!("n{i}"), move || async move { value })
                    .await
                    .unwrap();
                black_box(got);
            }
        },
        nothing,
    ));
    let json = serde_json::to_string(&payload).unwrap();
    contenders.push(contender(
        "load/raw-get-set",
        move |i| {
            let (mut conn, key, json) = (conn.clone(), format!("{raw}:n{i}"), json.clone());
            async move {
                let miss: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(miss.is_none());
                let () = redis::cmd("SET")
                    .arg(&key)
                    .arg(json)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        },
        nothing,
    ));
    race(&mut g, rt, CALLERS, &contenders);
    g.finish();
}

/// redis.io's release for a single-instance lock: delete the key only if it holds our value.
const COMPARE_AND_DELETE: &str = r#"
if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("del", KEYS[1])
else
  return 0
end
"#;

fn lock(c: &mut Criterion, rt: &Runtime, url: &str) {
    const TTL: Duration = Duration::from_secs(10);
    let conn = rt.block_on(connect(url));
    let prefix = sd_testkit::unique_name("sizing-lock");
    let sd = Arc::new(
        sd_lock::redis::RedisLock::builder(conn.clone())
            .prefix(prefix.as_str())
            .build()
            .unwrap(),
    );
    let mut g = c.benchmark_group("sizing/lock");
    g.throughput(Throughput::Elements(1));
    let mut contenders = Vec::new();
    contenders.push(contender(
        "sd",
        move |i| {
            let (lock, resource) = (sd.clone(), format!("r{i}"));
            async move {
                let lease = lock.try_acquire(&resource, TTL).await.unwrap();
                assert_eq!(lock.release(lease).await.unwrap(), Release::Released);
            }
        },
        nothing,
    ));
    let rslock = rslock::LockManager::new(vec![url.to_owned()]);
    let rs_prefix = format!("{prefix}-rslock");
    contenders.push(contender(
        "rslock",
        move |i| {
            let (lock, resource) = (rslock.clone(), format!("{rs_prefix}:r{i}"));
            async move {
                let guard = lock.acquire(resource.as_bytes(), TTL).await.unwrap();
                guard.release().await;
            }
        },
        nothing,
    ));
    let script = redis::Script::new(COMPARE_AND_DELETE);
    let raw = format!("{prefix}-raw");
    contenders.push(contender(
        "raw-set-nx-px",
        move |i| {
            let (mut conn, script) = (conn.clone(), script.clone());
            let (key, value) = (format!("{raw}:r{i}"), rand::random::<u128>().to_string());
            async move {
                let taken: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .arg("NX")
                    .arg("PX")
                    .arg(TTL.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(taken.is_some());
                let released: i64 = script
                    .key(key)
                    .arg(value)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!(released, 1);
            }
        },
        nothing,
    ));
    race(&mut g, rt, CALLERS, &contenders);
    g.finish();
}

fn idempotency(c: &mut Criterion, rt: &Runtime, url: &str) {
    use sd_idempotency::redis::RedisStore;
    use sd_idempotency::{ClaimOutcome, Fingerprint, Store, StoredResponse};
    const LOCK_TTL: Duration = Duration::from_secs(10);
    const RETENTION: Duration = Duration::from_secs(30);
    let conn = rt.block_on(connect(url));
    let prefix = sd_testkit::unique_name("sizing-idem");
    let store = Arc::new(
        RedisStore::builder()
            .prefix(prefix.as_str())
            .build(conn.clone())
            .unwrap(),
    );
    let fingerprint = Fingerprint::of(r#"{"amount":1000,"currency":"EUR"}"#);
    let response = StoredResponse::new(201, r#"{"id":"pay_1","amount":1000,"currency":"EUR"}"#)
        .with_header("content-type", "application/json");
    let mut g = c.benchmark_group("sizing/idempotency");
    g.throughput(Throughput::Elements(1));
    let mut contenders = Vec::new();
    let (fp, resp) = (fingerprint, response.clone());
    contenders.push(contender(
        "sd",
        move |i| {
            let (store, resp) = (store.clone(), resp.clone());
            async move {
                let ClaimOutcome::Claimed(claim) = store
                    .claim("bench", &format!("k{i}"), &fp, LOCK_TTL)
                    .await
                    .unwrap()
                else {
                    panic!("a new key was not claimed");
                };
                store.complete(&claim, &resp, RETENTION).await.unwrap();
            }
        },
        nothing,
    ));
    let (fp, resp) = (fingerprint.to_hex(), response.to_bytes().unwrap());
    let raw = format!("{prefix}-raw");
    contenders.push(contender(
        "raw-set-nx-then-set-xx",
        move |i| {
            let (mut conn, fp, resp, key) = (
                conn.clone(),
                fp.clone(),
                resp.clone(),
                format!("{raw}:k{i}"),
            );
            async move {
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(fp)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(claimed.is_some());
                let completed: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(resp)
                    .arg("XX")
                    .arg("PX")
                    .arg(RETENTION.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(completed.is_some());
            }
        },
        nothing,
    ));
    race(&mut g, rt, CALLERS, &contenders);
    g.finish();
}

fn outbox(c: &mut Criterion, rt: &Runtime, url: &str) {
    use sd_outbox::redis::RedisStreamsPublisher;
    use sd_outbox::{Event, Message, Publisher};
    let conn = rt.block_on(connect(url));
    let prefix = sd_testkit::unique_name("sizing-outbox");
    let publisher = RedisStreamsPublisher::builder(conn.clone())
        .prefix(prefix.as_str())
        .build()
        .unwrap();
    let events: Arc<Vec<Event>> = Arc::new(
        (0..BATCH)
            .map(|n| {
                Event::from_message(Message::json(
                    "order",
                    format!("agg-{}", n % 50),
                    "order_changed",
                    serde_json::json!({ "n": n, "total": 1250, "currency": "EUR" }),
                ))
            })
            .collect(),
    );
    let (sd_stream, raw_stream) = (publisher.stream("order"), format!("{prefix}-raw:order"));
    let clear = |stream: String| {
        let conn = conn.clone();
        move || {
            let (mut conn, stream) = (conn.clone(), stream.clone());
            async move {
                redis::cmd("DEL")
                    .arg(stream)
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
        }
    };
    let mut g = c.benchmark_group("sizing/outbox");
    g.throughput(Throughput::Elements(BATCH));
    let mut contenders = Vec::new();
    let batch = events.clone();
    contenders.push(contender(
        "sd",
        move |_| {
            let (publisher, batch) = (publisher.clone(), batch.clone());
            async move { publisher.publish(&batch).await.unwrap() }
        },
        clear(sd_stream),
    ));
    let (c, stream) = (conn.clone(), raw_stream.clone());
    contenders.push(contender(
        "raw-xadd-pipeline",
        move |_| {
            let (mut conn, batch, stream) = (c.clone(), events.clone(), stream.clone());
            async move {
                let mut pipe = redis::pipe();
                for e in batch.iter() {
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("id")
                        .arg(e.id.to_string())
                        .arg("aggregatetype")
                        .arg(&e.aggregate_type)
                        .arg("aggregateid")
                        .arg(&e.aggregate_id)
                        .arg("type")
                        .arg(&e.event_type)
                        .arg("payload_kind")
                        .arg(e.payload.kind())
                        .arg("payload")
                        .arg(e.payload.to_bytes())
                        .arg("headers")
                        .arg(serde_json::to_string(&e.headers).unwrap())
                        .ignore();
                }
                pipe.query_async::<()>(&mut conn).await.unwrap();
            }
        },
        clear(raw_stream),
    ));
    race(&mut g, rt, PUBLISHERS, &contenders);
    g.finish();
}

/// A fresh stream holding [`ENTRIES`] entries (`key` = `k{i % 1000}`, `n` = i) and a
/// group `g` on it reading from the start.
async fn backlog(conn: &mut MultiplexedConnection) -> String {
    let stream = sd_testkit::unique_name("sizing-pool");
    for chunk in (0..ENTRIES).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("key")
                .arg(format!("k{}", i % 1000))
                .arg("n")
                .arg(i)
                .ignore();
        }
        pipe.query_async::<()>(conn).await.unwrap();
    }
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .query_async(conn)
        .await
        .unwrap();
    stream
}

/// Who drains a backlog.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// sd-pool's `StreamConsumer` feeding a pool.
    Sd,
    /// A bare `XREADGROUP` + `XACK` loop.
    Raw,
}

/// Drains a fresh backlog with `reader`: the time from its first read to its last
/// acknowledgement. The stream is deleted afterwards, untimed.
async fn drain(conn: &mut MultiplexedConnection, url: &str, reader: Reader) -> Duration {
    let stream = backlog(conn).await;
    let took = match reader {
        Reader::Sd => drain_sd(url, &stream).await,
        Reader::Raw => drain_raw(url, &stream).await,
    };
    redis::cmd("DEL")
        .arg(stream)
        .query_async::<()>(conn)
        .await
        .unwrap();
    took
}

/// One `StreamConsumer` (batch 100) on a pool of 64 workers, per key, whose handler does
/// nothing: from the start of `run` until it returned, every entry acknowledged.
async fn drain_sd(url: &str, stream: &str) -> Duration {
    use sd_pool::redis::{Entry, StreamConsumer};
    use sd_pool::{Order, Pool};
    let pool = Pool::builder()
        .workers(64)
        .queue(256)
        .order(Order::PerKey)
        .build()
        .unwrap();
    let consumer = StreamConsumer::builder()
        .stream(stream)
        .group("g")
        .consumer("c")
        .batch(100)
        .key_field("key")
        .build(connect(url).await, pool)
        .await
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (h, d) = (handled.clone(), done.clone());
    let handler = move |_: Entry| {
        let (handled, done) = (h.clone(), d.clone());
        async move {
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == ENTRIES {
                done.notify_one();
            }
            Ok::<(), Infallible>(())
        }
    };
    let start = Instant::now();
    let report = consumer
        .run(handler, async move { done.notified().await })
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(report.acked, ENTRIES, "{report:?}");
    took
}

/// `XREADGROUP COUNT 100` and an `XACK` of what it read, until every entry is acknowledged.
async fn drain_raw(url: &str, stream: &str) -> Duration {
    let mut conn = connect(url).await;
    let start = Instant::now();
    let mut handled = 0;
    while handled < ENTRIES {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(100)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let ids: Vec<String> = reply
            .keys
            .into_iter()
            .flat_map(|k| k.ids)
            .map(|entry| {
                black_box(entry.map.get("key"));
                entry.id
            })
            .collect();
        handled += ids.len() as u64;
        let acked: u64 = redis::cmd("XACK")
            .arg(stream)
            .arg("g")
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(acked, ids.len() as u64);
    }
    start.elapsed()
}

/// Each reader drains [`ENTRIES`] per iteration; each iteration also runs the other
/// reader on a backlog of its own, before or after by turns, untimed (see [`race`]).
fn pool(c: &mut Criterion, rt: &Runtime, url: &str) {
    let mut g = c.benchmark_group("sizing/pool");
    g.throughput(Throughput::Elements(ENTRIES));
    g.sample_size(10);
    for (name, own, partner) in [
        ("sd", Reader::Sd, Reader::Raw),
        ("raw-xreadgroup-xack", Reader::Raw, Reader::Sd),
    ] {
        let mut partner_first = true;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                partner_first = !partner_first;
                rt.block_on(async {
                    let mut conn = connect(url).await;
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        if partner_first {
                            drain(&mut conn, url, partner).await;
                        }
                        total += drain(&mut conn, url, own).await;
                        if !partner_first {
                            drain(&mut conn, url, partner).await;
                        }
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

fn sizing(c: &mut Criterion) {
    let server =
        sd_testkit::redis().expect("redis-server must be installed (apt-get install redis-server)");
    let rt = sd_testkit::runtime();
    let url = server.url();
    ratelimit(c, &rt, url);
    cache(c, &rt, url);
    lock(c, &rt, url);
    idempotency(c, &rt, url);
    outbox(c, &rt, url);
    pool(c, &rt, url);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = sizing
}
criterion_main!(benches);
