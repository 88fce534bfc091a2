//! The Redis Streams consumer against a real server: at-least-once, watermark acks,
//! redelivery of failed entries, reclaim after a consumer dies mid-batch, and a consumer
//! whose `run` is retried after the server restarted or stalled.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_pool::redis::{ConsumerReport, Entry, StreamConsumer, StreamConsumerBuilder};
use sd_pool::{Error, Order, Pool};
use sd_testkit::{RedisOptions, RedisServer, eventually, runtime};

type Seen = Arc<Mutex<HashMap<String, Vec<u64>>>>;

async fn connect(url: &str) -> ConnectionManager {
    ConnectionManager::new(redis::Client::open(url).unwrap())
        .await
        .unwrap()
}

/// Adds `n` entries (`key` = `k{i % keys}`, `n` = i) and returns their ids.
async fn produce(conn: &mut ConnectionManager, stream: &str, n: u64, keys: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("key")
            .arg(format!("k{}", i % keys))
            .arg("n")
            .arg(i)
            .query_async(conn)
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

/// The ids of the group's pending entries.
async fn pending_ids(conn: &mut ConnectionManager, stream: &str, group: &str) -> HashSet<String> {
    let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query_async(conn)
        .await
        .unwrap();
    reply.into_iter().map(|(id, ..)| id).collect()
}

/// The number of the group's pending entries (on a clone of `conn`, so a check passed to
/// `eventually` can call it).
async fn pending(conn: &ConnectionManager, stream: &str, group: &str) -> i64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    match reply {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("XPENDING count: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

fn n_of(entry: &Entry) -> u64 {
    entry.get_str("n").unwrap().parse().unwrap()
}

/// What a test on a shared server starts from: the server's URL, a connection, and a
/// fresh stream holding the entries [`produce`] added (`ids`).
struct Fixture {
    url: String,
    conn: ConnectionManager,
    stream: String,
    ids: Vec<String>,
}

/// Runs `test` on the shared Redis with a fresh stream of `n` entries over `keys` keys.
fn with_stream<F, Fut>(n: u64, keys: u64, test: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = sd_testkit::redis().expect("redis-server for the test");
    let url = server.url().to_owned();
    let stream = sd_testkit::unique_name("pool");
    runtime().block_on(async move {
        let mut conn = connect(&url).await;
        let ids = produce(&mut conn, &stream, n, keys).await;
        test(Fixture {
            url,
            conn,
            stream,
            ids,
        })
        .await;
    });
}

/// A pool of `workers` and `queue` that runs the entries of one key in order.
fn per_key_pool(workers: usize, queue: usize) -> Pool {
    Pool::builder()
        .workers(workers)
        .queue(queue)
        .order(Order::PerKey)
        .build()
        .unwrap()
}

/// A consumer `consumer` of group "g" on `stream`.
fn consumer_of(stream: &str, consumer: &str) -> StreamConsumerBuilder {
    StreamConsumer::builder()
        .stream(stream)
        .group("g")
        .consumer(consumer)
}

/// Builds the consumer `cfg` on `conn` and `pool` and runs it with `handler` on a task
/// until the returned sender fires (or is dropped); the task gives back the report and
/// the consumer.
async fn run_until_stopped<C, H, Fut, E>(
    cfg: StreamConsumerBuilder,
    conn: C,
    pool: Pool,
    handler: H,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<(ConsumerReport, StreamConsumer<C>)>,
)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    H: Fn(Entry) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let consumer = cfg.build(conn, pool).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        let stop = async move {
            let _ = stop_rx.await;
        };
        let report = consumer.run(handler, stop).await.unwrap();
        (report, consumer)
    });
    (stop_tx, run)
}

#[test]
fn every_entry_is_processed_in_key_order_and_acked() {
    with_stream(300, 7, |Fixture { conn, stream, .. }| async move {
        let pool = per_key_pool(8, 16);
        let cfg = consumer_of(&stream, "c1").batch(50).key_field("key");
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let (stop_tx, run) = run_until_stopped(cfg, conn.clone(), pool, move |entry| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                let key = entry.get_str("key").unwrap().to_owned();
                s.lock().unwrap().entry(key).or_default().push(n_of(&entry));
                Ok::<(), std::io::Error>(())
            }
        })
        .await;
        let s = seen.clone();
        eventually("all 300 processed", || async {
            s.lock().unwrap().values().map(Vec::len).sum::<usize>() >= 300
        })
        .await;
        stop_tx.send(()).unwrap();
        let (report, consumer) = run.await.unwrap();
        let metrics = consumer.pool().metrics();
        assert_eq!(report.read, 300);
        assert_eq!(report.acked, 300);
        assert!(metrics.queued_peak <= 16 && metrics.running_peak <= 8);
        for (key, ns) in seen.lock().unwrap().iter() {
            assert!(ns.windows(2).all(|w| w[0] < w[1]), "{key}: {ns:?}");
        }
        assert_eq!(pending(&conn, &stream, "g").await, 0);
    });
}

#[test]
fn failed_entries_stay_pending_and_are_redelivered() {
    with_stream(60, 3, |Fixture { conn, stream, .. }| async move {
        let pool = Pool::builder().workers(4).queue(8).build().unwrap();
        let cfg = consumer_of(&stream, "c1")
            .min_idle(Duration::from_millis(100))
            .claim_every(Duration::from_millis(50));
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let (stop_tx, run) = run_until_stopped(cfg, conn.clone(), pool, move |entry| {
            let s = s.clone();
            async move {
                let n = n_of(&entry);
                let first = {
                    let mut s = s.lock().unwrap();
                    let tries = s.entry(entry.id.clone()).or_default();
                    tries.push(n);
                    tries.len() == 1
                };
                // Every tenth entry fails once, every fifteenth panics once.
                if first && n % 10 == 3 {
                    return Err("try again");
                }
                if first && n % 15 == 4 {
                    panic!("boom");
                }
                Ok(())
            }
        })
        .await;
        let c = conn.clone();
        let st = stream.clone();
        let s = seen.clone();
        eventually("all acked", || async {
            s.lock().unwrap().len() == 60 && pending(&c, &st, "g").await == 0
        })
        .await;
        stop_tx.send(()).unwrap();
        let (report, _) = run.await.unwrap();
        // Every entry was handled; the 6 that failed (n % 10 == 3) and the 4 that
        // panicked (n % 15 == 4) on their first try were redelivered and run exactly once
        // more (their second try succeeds); the other 50 ran once.
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 60, "every entry is handled");
        for (id, tries) in seen.iter() {
            let n = tries[0];
            assert!(tries.iter().all(|&t| t == n), "{id}: {tries:?}");
            let expected = if n % 10 == 3 || n % 15 == 4 { 2 } else { 1 };
            assert_eq!(
                tries.len(),
                expected,
                "entry {id} (n = {n}) tries: {tries:?}"
            );
        }
        assert_eq!(report.read, 60);
        assert_eq!(report.left_pending, 10);
        assert!(report.reclaimed >= 10);
        assert_eq!(report.acked, 60);
    });
}

#[test]
fn a_consumer_killed_mid_batch_loses_nothing() {
    let total = 200u64;
    with_stream(total, 5, |Fixture { conn, stream, .. }| async move {
        // Successful handler runs per entry, across both consumers.
        let done: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();

        // Consumer A works for a while; entries with n % 10 == 7 hang, as if A were stuck
        // when it crashed. Then A dies: its task is aborted and its pool shut down.
        let pool_a = per_key_pool(4, 16);
        let cfg_a = consumer_of(&stream, "a").batch(20).key_field("key");
        let a = cfg_a.build(conn.clone(), pool_a.clone()).await.unwrap();
        let d = done.clone();
        let task_a = tokio::spawn(async move {
            a.run(
                move |entry| {
                    let d = d.clone();
                    async move {
                        let n = n_of(&entry);
                        if n % 10 == 7 {
                            std::future::pending::<()>().await;
                        }
                        *d.lock().unwrap().entry(n).or_default() += 1;
                        Ok::<(), std::io::Error>(())
                    }
                },
                std::future::pending(),
            )
            .await
        });
        let d = done.clone();
        eventually("A made progress", || async {
            d.lock().unwrap().len() >= 20
        })
        .await;
        task_a.abort();
        assert!(task_a.await.unwrap_err().is_cancelled());
        pool_a.shutdown_now();
        let c = conn.clone();
        let st = stream.clone();
        assert!(pending(&c, &st, "g").await > 0, "A died holding entries");

        // Consumer B reclaims A's pending entries after min_idle and reads the rest.
        let pool_b = per_key_pool(4, 16);
        let cfg_b = consumer_of(&stream, "b")
            .key_field("key")
            .min_idle(Duration::from_millis(200))
            .claim_every(Duration::from_millis(50));
        let d = done.clone();
        let (stop_tx, task_b) = run_until_stopped(cfg_b, conn.clone(), pool_b, move |entry| {
            let d = d.clone();
            async move {
                *d.lock().unwrap().entry(n_of(&entry)).or_default() += 1;
                Ok::<(), std::io::Error>(())
            }
        })
        .await;
        let d = done.clone();
        eventually("every entry done and acked", || async {
            d.lock().unwrap().len() as u64 == total && pending(&c, &st, "g").await == 0
        })
        .await;
        stop_tx.send(()).unwrap();
        let (report, _) = task_b.await.unwrap();
        assert!(report.reclaimed > 0, "B took over A's entries");
        let all_done = {
            let done = done.lock().unwrap();
            (0..total).all(|n| done.get(&n).is_some_and(|&c| c >= 1))
        };
        assert!(all_done);
        assert_eq!(pending(&conn, &stream, "g").await, 0);
    });
}

#[test]
fn acks_follow_the_watermark_while_an_entry_is_held() {
    with_stream(20, 20, |fixture| async move {
        let Fixture {
            mut conn,
            stream,
            ids,
            ..
        } = fixture;
        let pool = Pool::builder().workers(4).queue(32).build().unwrap();
        let cfg = consumer_of(&stream, "c1");
        let held = 5u64;
        let gate = Arc::new(tokio::sync::Notify::new());
        let done: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let (g, d) = (gate.clone(), done.clone());
        let handler = move |entry| {
            let (g, d) = (g.clone(), d.clone());
            async move {
                let n = n_of(&entry);
                if n == held {
                    g.notified().await;
                }
                d.lock().unwrap().insert(n);
                Ok::<(), std::io::Error>(())
            }
        };
        let (stop_tx, run) = run_until_stopped(cfg, conn.clone(), pool.clone(), handler).await;
        // Everything but the held entry finishes, and the entries before it are acked.
        let (d, c, st) = (done.clone(), conn.clone(), stream.clone());
        eventually(
            "all but the held entry done, those before it acked",
            || async { d.lock().unwrap().len() == 19 && pending(&c, &st, "g").await <= 15 },
        )
        .await;
        assert_eq!(pool.watermark(0), Some(held - 1));
        // While entry 5 is held, it and every later entry stay pending, though all of the
        // later ones finished.
        let expected: HashSet<String> = ids[held as usize..].iter().cloned().collect();
        assert_eq!(pending_ids(&mut conn, &stream, "g").await, expected);
        gate.notify_one();
        let (c, st) = (conn.clone(), stream.clone());
        eventually("all acked after the release", || async {
            pending(&c, &st, "g").await == 0
        })
        .await;
        stop_tx.send(()).unwrap();
        let (report, _) = run.await.unwrap();
        assert_eq!(
            (report.read, report.acked, report.left_pending),
            (20, 20, 0)
        );
    });
}

/// What a retrying runner handled: how many times each entry's `n` was run.
type Handled = Arc<Mutex<HashMap<u64, u32>>>;

/// Runs `consumer` as a service would: every handled entry (after `delay`) is counted in
/// the returned map, and `run` is called again after each Redis error, until `true` is
/// sent. The runner returns the errors it retried after; `run` must not return `Ok`
/// before the stop.
fn spawn_retrying(
    consumer: StreamConsumer,
    delay: Duration,
) -> (
    Handled,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let done = Handled::default();
    let d = done.clone();
    let handler = move |entry: Entry| {
        let d = d.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            *d.lock().unwrap().entry(n_of(&entry)).or_default() += 1;
            Ok::<(), std::io::Error>(())
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(async move {
        let mut errors = Vec::new();
        loop {
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            match consumer.run(handler.clone(), shutdown).await {
                Ok(report) => {
                    assert!(
                        *stop_rx.borrow(),
                        "run returned Ok before shutdown after {errors:?}: {report:?}"
                    );
                    return errors;
                }
                Err(e) => {
                    assert!(matches!(e, Error::Backend { .. }), "{e}");
                    errors.push(e.to_string());
                    // Back off before retrying, as a service would.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    (done, stop_tx, runner)
}

/// Runs a consumer whose `run` is retried on error, as a service would
/// (`loop { consumer.run(..) }`), while `fault` hits the server mid-run. Every entry must
/// end up processed and acknowledged, and no `run` may return `Ok` before shutdown.
fn consumer_survives(fault: impl FnOnce(&mut RedisServer) + Send + 'static) {
    let mut server = RedisServer::start_with(RedisOptions::persistent()).expect("redis-server");
    let url = server.url();
    let stream = sd_testkit::unique_name("pool");
    runtime().block_on(async move {
        let mut conn = connect(&url).await;
        let total = 400u64;
        produce(&mut conn, &stream, total, 7).await;
        let pool = per_key_pool(4, 16);
        // A short min_idle: an entry whose XREADGROUP reply was lost to the fault is
        // reclaimed by this same consumer.
        let cfg = consumer_of(&stream, "c1")
            .batch(20)
            .key_field("key")
            .min_idle(Duration::from_secs(2))
            .claim_every(Duration::from_millis(100));
        let consumer = cfg.build(conn.clone(), pool).await.unwrap();
        let (done, stop_tx, runner) = spawn_retrying(consumer, Duration::from_millis(1));
        let d = done.clone();
        eventually("a quarter processed", || async {
            d.lock().unwrap().len() >= 100
        })
        .await;
        let server = tokio::task::spawn_blocking(move || {
            fault(&mut server);
            server
        })
        .await
        .unwrap();
        // A fresh connection: the old one may still report the fault once.
        let c = connect(&url).await;
        let st = stream.clone();
        let d = done.clone();
        eventually(
            "every entry processed and acked (or the runner gave up)",
            || async {
                runner.is_finished()
                    || (d.lock().unwrap().len() as u64 == total && pending(&c, &st, "g").await == 0)
            },
        )
        .await;
        // The runner may be gone (it panicked): its panic is the failure to report.
        let _ = stop_tx.send(true);
        let errors = runner.await.unwrap();
        assert!(!errors.is_empty(), "the fault reached the consumer");
        let missing: Vec<u64> = {
            let done = done.lock().unwrap();
            (0..total).filter(|n| !done.contains_key(n)).collect()
        };
        assert!(missing.is_empty(), "never processed: {missing:?}");
        assert_eq!(pending(&c, &stream, "g").await, 0);
        drop(server);
    });
}

#[test]
fn consumer_survives_a_redis_restart() {
    consumer_survives(|server| server.restart().expect("restart redis"));
}

#[test]
fn consumer_survives_a_paused_redis() {
    consumer_survives(|server| {
        server.pause().expect("SIGSTOP redis");
        // Longer than the client's 500 ms response timeout: the commands in flight fail.
        std::thread::sleep(Duration::from_millis(1500));
        server.resume().expect("SIGCONT redis");
    });
}

/// Redis restarted empty (no persistence): the stream and the group are gone. A retried
/// `run` creates them again and processes what is produced after the restart.
#[test]
fn consumer_rejoins_after_redis_restarts_empty() {
    let mut server = RedisServer::start().expect("redis-server");
    let url = server.url();
    let stream = sd_testkit::unique_name("pool");
    runtime().block_on(async move {
        let mut conn = connect(&url).await;
        produce(&mut conn, &stream, 50, 5).await;
        let pool = per_key_pool(4, 16);
        let cfg = consumer_of(&stream, "c1")
            .batch(20)
            .key_field("key")
            .claim_every(Duration::from_millis(100));
        let consumer = cfg.build(conn.clone(), pool).await.unwrap();
        let (done, stop_tx, runner) = spawn_retrying(consumer, Duration::ZERO);
        let d = done.clone();
        eventually("the first 50 processed", || async {
            d.lock().unwrap().len() == 50
        })
        .await;
        let server = tokio::task::spawn_blocking(move || {
            server.restart_clean().expect("restart redis empty");
            server
        })
        .await
        .unwrap();
        let mut c = connect(&url).await;
        for i in 0..50u64 {
            let _: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("key")
                .arg(format!("k{}", i % 5))
                .arg("n")
                .arg(1000 + i)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        let (st, d) = (stream.clone(), done.clone());
        eventually(
            "the 50 produced after the restart processed and acked",
            || async {
                runner.is_finished()
                    || ((1000..1050).all(|n| d.lock().unwrap().contains_key(&n))
                        && pending(&c, &st, "g").await == 0)
            },
        )
        .await;
        let _ = stop_tx.send(true);
        let errors = runner.await.unwrap();
        assert!(!errors.is_empty(), "the restart reached the consumer");
        let done = done.lock().unwrap();
        assert!((1000..1050).all(|n| done.contains_key(&n)), "{done:?}");
        drop(server);
    });
}

#[test]
fn config_errors_name_the_field() {
    let server = sd_testkit::redis().expect("redis-server for the test");
    let url = server.url().to_owned();
    runtime().block_on(async move {
        let conn = connect(&url).await;
        let base = || {
            StreamConsumer::builder()
                .stream(sd_testkit::unique_name("pool"))
                .group("g")
                .consumer("c1")
        };
        let cases = [
            (base().batch(0), "batch"),
            // BLOCK 0 would block forever; under 1 ms rounds down to it.
            (base().block(Duration::ZERO), "block"),
            (base().block(Duration::from_micros(900)), "block"),
            (base().min_idle(Duration::ZERO), "min_idle"),
            (base().claim_every(Duration::ZERO), "claim_every"),
            (base().stream(""), "stream"),
            (
                StreamConsumer::builder().stream("s").consumer("c1"),
                "group",
            ),
            (StreamConsumer::builder().stream("s").group("g"), "consumer"),
        ];
        for (cfg, field) in cases {
            let pool = Pool::builder().workers(1).queue(1).build().unwrap();
            let err = cfg.clone().build(conn.clone(), pool).await.unwrap_err();
            assert!(
                matches!(err, Error::InvalidConfig { field: f, .. } if f == field),
                "{field}: {err}"
            );
            let pool = Pool::builder().workers(1).queue(1).build().unwrap();
            let err = cfg.connect(&url, pool).await.unwrap_err();
            assert!(
                matches!(err, Error::InvalidConfig { field: f, .. } if f == field),
                "{field}: {err}"
            );
        }
        // `connect` knows its connection's response timeout (redis-rs' 500 ms): a read
        // blocking that long would time out every time it finds nothing.
        let pool = Pool::builder().workers(1).queue(1).build().unwrap();
        let err = base()
            .block(Duration::from_millis(500))
            .connect(&url, pool)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { field: "block", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("response timeout"), "{err}");
        let pool = Pool::builder().workers(1).queue(1).build().unwrap();
        base()
            .block(Duration::from_millis(400))
            .connect(&url, pool)
            .await
            .unwrap();
    });
}

/// The consumer takes any redis-rs connection, not only a `ConnectionManager`: here a
/// `MultiplexedConnection` of its own.
#[test]
fn a_consumer_on_a_multiplexed_connection_processes_and_acks() {
    with_stream(30, 3, |fixture| async move {
        let Fixture {
            url, conn, stream, ..
        } = fixture;
        let multiplexed = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let pool = Pool::builder().workers(2).queue(8).build().unwrap();
        let cfg = consumer_of(&stream, "c1");
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let s = seen.clone();
        let handler = move |entry: Entry| {
            let s = s.clone();
            async move {
                s.lock().unwrap().insert(entry.id);
                Ok::<(), std::io::Error>(())
            }
        };
        let (stop_tx, run) = run_until_stopped(cfg, multiplexed, pool, handler).await;
        let (s, c, st) = (seen.clone(), conn.clone(), stream.clone());
        eventually("all acked", || async {
            s.lock().unwrap().len() == 30 && pending(&c, &st, "g").await == 0
        })
        .await;
        stop_tx.send(()).unwrap();
        let (report, _) = run.await.unwrap();
        assert_eq!((report.read, report.acked), (30, 30));
    });
}
