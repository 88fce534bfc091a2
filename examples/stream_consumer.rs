//! A Redis Streams consumer on sd-pool: a producer writes events faster than the workers
//! handle them; the pool's queue stays bounded, per-key order holds and the watermark
//! (and with it XACK) advances.
//!
//! `cargo run -p sd-examples --example stream_consumer --features stream-consumer -- \
//!    --redis redis://127.0.0.1:6379 --workers 8 --keys 16`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_pool::redis::{StreamConfig, StreamConsumer};
use sd_pool::{Order, Pool};

struct Args {
    redis: String,
    workers: usize,
    keys: u64,
    events: u64,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        redis: "redis://127.0.0.1:6379".into(),
        workers: 8,
        keys: 16,
        events: 2_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--redis" => args.redis = value.clone(),
            "--workers" => args.workers = usize::try_from(number()?).map_err(|e| e.to_string())?,
            "--keys" => args.keys = number()?.max(1),
            "--events" => args.events = number()?,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; use --redis URL --workers N --keys N --events N"
                ));
            }
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let stream = format!("sd-pool-example-{}", std::process::id());
    let client = redis::Client::open(args.redis.as_str())?;
    let conn = redis::aio::ConnectionManager::new(client).await?;
    let capacity = 4 * args.workers.max(1);
    let pool = Pool::builder(args.workers, capacity)
        .order(Order::PerKey)
        .build()?;
    let cfg = StreamConfig::new(&stream, "workers", "worker-1")
        .batch(50)
        .key_field("key");
    let consumer = StreamConsumer::new(conn.clone(), pool.clone(), cfg).await?;

    // The producer: pipelines of 100 XADDs, far faster than the workers.
    let mut producer_conn = conn.clone();
    let (events, keys, s) = (args.events, args.keys, stream.clone());
    let producer = tokio::spawn(async move {
        let mut i = 0;
        while i < events {
            let mut pipe = redis::pipe();
            for n in i..(i + 100).min(events) {
                pipe.cmd("XADD")
                    .arg(&s)
                    .arg("*")
                    .arg("key")
                    .arg(format!("account-{}", n % keys))
                    .arg("n")
                    .arg(n)
                    .ignore();
            }
            pipe.query_async::<()>(&mut producer_conn).await?;
            i = (i + 100).min(events);
        }
        Ok::<(), redis::RedisError>(())
    });

    // The handler: 2 ms of work, and a check that each key's events arrive in order.
    let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let out_of_order = Arc::new(Mutex::new(0u64));
    let (l, o) = (last.clone(), out_of_order.clone());
    let handler = move |entry: sd_pool::redis::Entry| {
        let (l, o) = (l.clone(), o.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let key = entry.get_str("key").unwrap_or_default().to_owned();
            let n: u64 = entry.get_str("n").and_then(|n| n.parse().ok()).unwrap_or(0);
            let mut last = l.lock().map_err(|_| "poisoned")?;
            if last.get(&key).is_some_and(|&prev| prev >= n) {
                *o.lock().map_err(|_| "poisoned")? += 1;
            }
            last.insert(key, n);
            Ok::<(), &'static str>(())
        }
    };

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        let report = consumer
            .run(handler, async move {
                let _ = stopped.await;
            })
            .await;
        (consumer, report)
    });

    println!(
        "stream {stream}: {events} events, {keys} keys, {} workers, queue capacity {capacity}",
        args.workers
    );
    let mut worst_queue = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let m = pool.metrics();
        worst_queue = worst_queue.max(m.queued);
        let watermark = pool
            .watermark(0)
            .map_or(-1, |w| i64::try_from(w).unwrap_or(i64::MAX));
        println!(
            "  queued {:>3}/{capacity}  running {:>2}  completed {:>5}  watermark {watermark:>5}",
            m.queued, m.running, m.completed
        );
        if m.completed >= events {
            break;
        }
    }
    producer.await??;
    let _ = stop.send(());
    let (_consumer, report) = run.await?;
    let report = report?;
    let violations = *out_of_order.lock().map_err(|_| "poisoned")?;
    println!(
        "done: read {}, acked {}, worst queue {worst_queue} (bound {capacity}), per-key order violations {violations}",
        report.read, report.acked
    );
    let mut conn = conn;
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await?;
    Ok(())
}
