//! The Redis Streams consumer's delivery limit against a real server: a poison entry
//! among 10,000 goes to the dead-letter stream after exactly `max_deliveries` handler
//! runs while the rest keep flowing in per-key order; a redrive moves it back; a handler
//! that panics is dead-lettered without another run; two consumers move it once; an
//! entry acknowledged meanwhile is not moved; bad settings name their field.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sd_pool::redis::{
    ConsumerReport, DLQ_DELIVERIES, DLQ_ERROR, DLQ_GROUP, DLQ_ID, DLQ_STREAM, Entry,
    StreamConsumer, StreamConsumerBuilder,
};
use sd_pool::{Error, Order, Pool};
use sd_testkit::{eventually, runtime};

/// Entries `0..n`, fields `key` = `k{i % keys}` and `n` = `i`, plus `poison` = `1` on
/// entry `poison`; returns the poison's id.
async fn fill(
    conn: &mut ConnectionManager,
    stream: &str,
    n: u64,
    keys: u64,
    poison: u64,
) -> String {
    let mut poison_id = String::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let add = pipe.cmd("XADD").arg(stream).arg("*");
            add.arg("key").arg(format!("k{}", i % keys)).arg("n").arg(i);
            if i == poison {
                add.arg("poison").arg(1);
            }
        }
        let ids: Vec<String> = pipe.query_async(conn).await.unwrap();
        if let Some(at) = chunk.iter().position(|&i| i == poison) {
            poison_id.clone_from(&ids[at]);
        }
    }
    poison_id
}

/// Every entry of `stream` as `(id, fields)`.
async fn entries_of(
    conn: &mut ConnectionManager,
    stream: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let reply: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    reply
        .into_iter()
        .map(|(id, kv)| {
            let fields = kv.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            (id, fields)
        })
        .collect()
}

/// How many entries the group has pending.
async fn pending_count(conn: &mut ConnectionManager, stream: &str) -> u64 {
    let (count, ..): (u64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
        .arg(stream)
        .arg("g")
        .query_async(conn)
        .await
        .unwrap();
    count
}

async fn xlen(conn: &mut ConnectionManager, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap()
}

/// A consumer `name` of group `g` on `stream` that claims quickly (idle 100 ms, every
/// 20 ms) and gives up after `max` deliveries.
fn quick(stream: &str, name: &str, max: u64) -> StreamConsumerBuilder {
    StreamConsumer::builder()
        .stream(stream)
        .group("g")
        .consumer(name)
        .block(Duration::from_millis(20))
        .min_idle(Duration::from_millis(100))
        .claim_every(Duration::from_millis(20))
        .max_deliveries(max)
}

fn keyed_pool() -> Pool {
    Pool::builder()
        .workers(8)
        .queue(256)
        .order(Order::PerKey)
        .build()
        .unwrap()
}

/// Runs `test` on a connection to the Redis the tests share.
fn on_redis<F, Fut>(test: F)
where
    F: FnOnce(ConnectionManager) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = sd_testkit::redis().expect("redis-server for the test");
    runtime().block_on(async {
        let client = redis::Client::open(server.url()).unwrap();
        // Reading back 10,000 entries on a loaded machine outlasts the default response
        // timeout.
        let config =
            ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        let conn = ConnectionManager::new_with_config(client, config);
        test(conn.await.unwrap()).await;
    });
}

/// Runs `consumer` with `handler` on a task until the sender fires.
fn spawn_run<H, Fut>(
    consumer: StreamConsumer,
    handler: H,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<(ConsumerReport, StreamConsumer)>,
)
where
    H: Fn(Entry) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let report = consumer
            .run(handler, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        (report, consumer)
    });
    (stop, task)
}

/// What the handler saw: per key, the `n` of each entry it handled, in the order it
/// handled them; the poison's deliveries; one global sequence of handler calls.
#[derive(Default)]
struct Log {
    by_key: HashMap<String, Vec<u64>>,
    poison: Vec<(u64, usize)>,
    calls: Vec<u64>,
}

#[test]
fn a_poison_entry_among_10000_is_dead_lettered_after_exactly_n_deliveries_and_redriven() {
    const N: u64 = 10_000;
    const KEYS: u64 = 50;
    const POISON: u64 = 4321;
    on_redis(|mut conn| async move {
        let stream = sd_testkit::unique_name("dlq");
        let dead = format!("{{{stream}}}:dead");
        let poison_id = fill(&mut conn, &stream, N, KEYS, POISON).await;
        let consumer = quick(&stream, "c1", 3)
            .batch(100)
            .key_field("key")
            .build(conn.clone(), keyed_pool())
            .await
            .unwrap();
        let log: Arc<Mutex<Log>> = Arc::default();
        let l = Arc::clone(&log);
        let (stop, task) = spawn_run(consumer, move |entry| {
            let l = Arc::clone(&l);
            async move {
                let n: u64 = entry.get_str("n").unwrap().parse().unwrap();
                let mut log = l.lock().unwrap();
                log.calls.push(n);
                if entry.get("poison").is_some() {
                    let at = log.calls.len();
                    log.poison.push((entry.deliveries, at));
                    return Err(format!("entry {n} cannot be parsed"));
                }
                assert_eq!(entry.deliveries, 1, "only the poison is redelivered");
                let key = entry.get_str("key").unwrap().to_owned();
                log.by_key.entry(key).or_default().push(n);
                Ok(())
            }
        });
        let (l, mut c) = (Arc::clone(&log), conn.clone());
        eventually("the rest handled and the poison dead-lettered", || {
            let l = Arc::clone(&l);
            let (mut c, dead) = (c.clone(), dead.clone());
            async move {
                let handled: usize = l.lock().unwrap().by_key.values().map(Vec::len).sum();
                handled == (N - 1) as usize && xlen(&mut c, &dead).await == 1
            }
        })
        .await;
        stop.send(()).unwrap();
        let (report, consumer) = task.await.unwrap();

        let log = std::mem::take(&mut *log.lock().unwrap());
        // Exactly three handler runs, counted 1, 2, 3.
        let deliveries: Vec<u64> = log.poison.iter().map(|(d, _)| *d).collect();
        assert_eq!(deliveries, [1, 2, 3]);
        // Per key, from the raw log: every other entry once, in stream order.
        for k in 0..KEYS {
            let want: Vec<u64> = (k..N)
                .step_by(KEYS as usize)
                .filter(|&n| n != POISON)
                .collect();
            assert_eq!(log.by_key[&format!("k{k}")], want, "key k{k}");
        }
        // The poison held nothing up: the next entry of its key ran before its
        // second delivery.
        let next = POISON + KEYS;
        let next_at = log.calls.iter().position(|&n| n == next).unwrap();
        assert!(
            next_at < log.poison[1].1,
            "entry {next} waited for the poison"
        );
        assert_eq!(report.dead_lettered, 1);
        assert_eq!(report.left_pending, 2);
        assert_eq!(report.acked, N - 1);
        assert_eq!(
            pending_count(&mut c, &stream).await,
            0,
            "the poison was acknowledged"
        );

        // The dead letter: the entry's fields, the error, the count, where it came from.
        let letters = entries_of(&mut c, &dead).await;
        let (_, fields) = &letters[0];
        let expect = [
            ("key", format!("k{}", POISON % KEYS)),
            ("n", POISON.to_string()),
            ("poison", "1".to_owned()),
            (DLQ_STREAM, stream.clone()),
            (DLQ_GROUP, "g".to_owned()),
            (DLQ_ID, poison_id.clone()),
            (DLQ_ERROR, format!("entry {POISON} cannot be parsed")),
            (DLQ_DELIVERIES, "3".to_owned()),
        ];
        let expect: HashMap<String, String> =
            expect.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(*fields, expect);

        // Redrive: back to the stream as a new entry with its own fields only, and
        // handled once the cause is fixed.
        assert_eq!(consumer.redrive(10).await.unwrap(), 1);
        assert_eq!(xlen(&mut c, &dead).await, 0);
        let (last_id, last) = entries_of(&mut c, &stream).await.pop().unwrap();
        assert!(last_id > poison_id);
        assert_eq!(last.len(), 3, "{last:?}");
        assert_eq!(last.get("poison").map(String::as_str), Some("1"));
        let healed: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
        let h = Arc::clone(&healed);
        // The first consumer drained its pool on shutdown: a new one, as after a deploy.
        let consumer = quick(&stream, "c1", 3)
            .build(conn.clone(), keyed_pool())
            .await
            .unwrap();
        let (stop, task) = spawn_run(consumer, move |entry| {
            let h = Arc::clone(&h);
            async move {
                h.lock().unwrap().push((entry.deliveries, entry.id));
                Ok(())
            }
        });
        let h = Arc::clone(&healed);
        eventually("the redriven entry handled", || async {
            !h.lock().unwrap().is_empty()
        })
        .await;
        stop.send(()).unwrap();
        let (report, _) = task.await.unwrap();
        assert_eq!(*healed.lock().unwrap(), [(1, last_id)]);
        assert_eq!((report.acked, report.dead_lettered), (1, 0));
        assert_eq!(pending_count(&mut c, &stream).await, 0);
    });
}

#[test]
fn a_handler_that_panics_is_dead_lettered_without_running_again() {
    on_redis(|mut conn| async move {
        let stream = format!("{{{}}}:in", sd_testkit::unique_name("dlq"));
        let dead = format!("{stream}:parked");
        fill(&mut conn, &stream, 40, 4, 17).await;
        let consumer = quick(&stream, "c1", 2)
            .dead_letter_stream(&dead)
            .build(
                conn.clone(),
                Pool::builder().workers(4).queue(8).build().unwrap(),
            )
            .await
            .unwrap();
        let runs: Arc<Mutex<Vec<u64>>> = Arc::default();
        let r = Arc::clone(&runs);
        let (stop, task) = spawn_run(consumer, move |entry| {
            let r = Arc::clone(&r);
            async move {
                if entry.get("poison").is_some() {
                    r.lock().unwrap().push(entry.deliveries);
                    panic!("the parser crashed");
                }
                Ok(())
            }
        });
        let c = conn.clone();
        eventually("the poison dead-lettered", || {
            let (mut c, dead) = (c.clone(), dead.clone());
            async move { xlen(&mut c, &dead).await == 1 }
        })
        .await;
        stop.send(()).unwrap();
        let (report, _) = task.await.unwrap();
        assert_eq!(*runs.lock().unwrap(), [1, 2], "two runs, no third");
        let letters = entries_of(&mut conn, &dead).await;
        let fields = &letters[0].1;
        assert_eq!(fields[DLQ_DELIVERIES], "3");
        assert!(
            fields[DLQ_ERROR].contains("over max_deliveries 2"),
            "{fields:?}"
        );
        assert_eq!((report.acked, report.dead_lettered), (39, 1));
        assert_eq!(pending_count(&mut conn, &stream).await, 0);
    });
}

#[test]
fn two_consumers_run_the_poison_n_times_in_all_and_move_it_once() {
    on_redis(|mut conn| async move {
        let stream = sd_testkit::unique_name("dlq");
        let dead = format!("{{{stream}}}:dead");
        fill(&mut conn, &stream, 500, 10, 250).await;
        let runs: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let mut tasks = Vec::new();
        for name in ["a", "b"] {
            let consumer = quick(&stream, name, 4)
                .build(
                    conn.clone(),
                    Pool::builder().workers(4).queue(16).build().unwrap(),
                )
                .await
                .unwrap();
            let r = Arc::clone(&runs);
            tasks.push(spawn_run(consumer, move |entry| {
                let r = Arc::clone(&r);
                async move {
                    if entry.get("poison").is_none() {
                        return Ok(());
                    }
                    r.lock().unwrap().push((name.to_owned(), entry.deliveries));
                    Err("still poison".to_owned())
                }
            }));
        }
        let c = conn.clone();
        eventually("the poison dead-lettered", || {
            let (mut c, stream, dead) = (c.clone(), stream.clone(), dead.clone());
            async move { xlen(&mut c, &dead).await == 1 && pending_count(&mut c, &stream).await == 0 }
        })
        .await;
        // Well past another min_idle: nobody runs or moves it again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut moved = 0;
        for (stop, task) in tasks {
            stop.send(()).unwrap();
            moved += task.await.unwrap().0.dead_lettered;
        }
        let counts: Vec<u64> = runs.lock().unwrap().iter().map(|(_, d)| *d).collect();
        assert_eq!(counts, [1, 2, 3, 4], "{:?}", runs.lock().unwrap());
        assert_eq!((moved, xlen(&mut conn, &dead).await), (1, 1));
    });
}

#[test]
fn an_entry_acknowledged_meanwhile_is_not_dead_lettered() {
    on_redis(|mut conn| async move {
        let stream = sd_testkit::unique_name("dlq");
        let dead = format!("{{{stream}}}:dead");
        fill(&mut conn, &stream, 20, 2, 5).await;
        let consumer = quick(&stream, "c1", 1)
            .build(
                conn.clone(),
                Pool::builder().workers(2).queue(4).build().unwrap(),
            )
            .await
            .unwrap();
        let (c, st) = (conn.clone(), stream.clone());
        // The poison's one delivery fails after another party (a consumer that took it
        // over, say) acknowledged it: the move must find it gone and write nothing.
        let (stop, task) = spawn_run(consumer, move |entry| {
            let (mut c, st) = (c.clone(), st.clone());
            async move {
                if entry.get("poison").is_none() {
                    return Ok(());
                }
                let acked: u64 = redis::cmd("XACK")
                    .arg(&st)
                    .arg("g")
                    .arg(&entry.id)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert_eq!(acked, 1);
                Err("failed after someone else acknowledged it".to_owned())
            }
        });
        let c = conn.clone();
        eventually("all acknowledged", || {
            let (mut c, stream) = (c.clone(), stream.clone());
            async move { pending_count(&mut c, &stream).await == 0 }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        let (report, _) = task.await.unwrap();
        assert_eq!((report.acked, report.dead_lettered), (19, 0));
        assert_eq!(xlen(&mut conn, &dead).await, 0);
    });
}

#[test]
fn delivery_limit_settings_name_their_field() {
    on_redis(|conn| async move {
        let base = || {
            StreamConsumer::builder()
                .stream("{s}")
                .group("g")
                .consumer("c")
        };
        let cases = [
            (base().max_deliveries(0), "max_deliveries"),
            (base().dead_letter_stream("{s}:dead"), "dead_letter_stream"),
            (
                base().max_deliveries(3).dead_letter_stream(""),
                "dead_letter_stream",
            ),
            (
                base().max_deliveries(3).dead_letter_stream("{s}"),
                "dead_letter_stream",
            ),
            (
                base().max_deliveries(3).dead_letter_stream("s:dead"),
                "dead_letter_stream",
            ),
        ];
        for (cfg, field) in cases {
            let pool = Pool::builder().workers(1).queue(1).build().unwrap();
            match cfg.build(conn.clone(), pool).await {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let pool = Pool::builder().workers(1).queue(1).build().unwrap();
        let ok = base().max_deliveries(1).dead_letter_stream("{s}:dead");
        assert!(ok.build(conn, pool).await.is_ok());
    });
}
