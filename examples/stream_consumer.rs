//! A Redis Streams consumer on sd-pool: a producer writes events faster than the workers
//! handle them; the pool's queue stays bounded, per-key order holds and the watermark
//! (and with it XACK) advances.
//!
//! `cargo run -p sd-examples --example stream_consumer --features stream-consumer -- \
//!    --redis redis://127.0.0.1:6379 --workers 8 --keys 16 --events 2000 --timeout 120`
//!
//! It exits non-zero when an event of a key arrives out of order, the queue ever held
//! more than its bound, an event was not acknowledged, or the consumer failed or did not
//! finish within `--timeout` seconds.

use std::collections::HashMap;
use std::fmt;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_pool::redis::{Entry, StreamConsumer};
use sd_pool::{Order, Pool};
use tokio::time::Instant;

/// Errors of the example.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "stream_consumer")]
pub(crate) struct Args {
    /// The Redis server.
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) redis: String,
    /// The pool's maximum concurrency.
    #[arg(long, default_value_t = 8)]
    pub(crate) workers: usize,
    /// Distinct event keys (accounts); events of one key must be handled in order.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) keys: u64,
    /// Events to produce.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) events: u64,
    /// Give up (and fail) after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "120", value_parser = seconds)]
    pub(crate) timeout: Duration,
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s}: {e}"))
}

impl Default for Args {
    fn default() -> Self {
        Self {
            redis: "redis://127.0.0.1:6379".into(),
            workers: 8,
            keys: 16,
            events: 2_000,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Parses `--redis URL --workers N --keys N --events N --timeout SECONDS` (without the
/// program name).
#[allow(dead_code)] // the binary parses with `Args::parse`; examples/tests calls this
pub(crate) fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, clap::Error> {
    <Args as clap::Parser>::try_parse_from(
        std::iter::once("stream_consumer".to_owned()).chain(args),
    )
}

/// What one run showed.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    /// Events written by the producer.
    pub(crate) produced: u64,
    /// Entries the consumer read.
    pub(crate) read: u64,
    /// Entries acknowledged.
    pub(crate) acked: u64,
    /// Entries still pending in the group at the end.
    pub(crate) pending: u64,
    /// Events of a key handled after a later event of the same key.
    pub(crate) out_of_order: u64,
    /// The most jobs ever queued at once.
    pub(crate) queued_peak: usize,
    /// The pool's queue capacity.
    pub(crate) capacity: usize,
    /// The most jobs ever running at once.
    pub(crate) running_peak: usize,
    /// The pool's maximum concurrency.
    pub(crate) workers: usize,
    /// Events per second written by the producer.
    pub(crate) producer_rate: f64,
    /// Events per second handled by the workers.
    pub(crate) consumer_rate: f64,
    /// The last watermark of partition 0.
    pub(crate) watermark: Option<u64>,
}

impl Summary {
    /// The promises this run broke; empty when it kept them all.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.out_of_order > 0 {
            problems.push(format!("{} events out of key order", self.out_of_order));
        }
        if self.queued_peak > self.capacity {
            problems.push(format!(
                "queue reached {} above its bound {}",
                self.queued_peak, self.capacity
            ));
        }
        if self.running_peak > self.workers {
            problems.push(format!(
                "{} jobs ran at once, above {} workers",
                self.running_peak, self.workers
            ));
        }
        if self.acked != self.produced || self.pending != 0 {
            problems.push(format!(
                "{} of {} events acknowledged, {} pending",
                self.acked, self.produced, self.pending
            ));
        }
        if self.produced > 0 && self.watermark != Some(self.produced - 1) {
            problems.push(format!(
                "watermark {:?} short of {}",
                self.watermark,
                self.produced - 1
            ));
        }
        problems
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "done: produced {}, read {}, acked {}, pending {}",
            self.produced, self.read, self.acked, self.pending
        )?;
        writeln!(
            f,
            "  producer {:.0} events/s, consumer {:.0} events/s ({:.1}x)",
            self.producer_rate,
            self.consumer_rate,
            self.producer_rate / self.consumer_rate.max(f64::MIN_POSITIVE)
        )?;
        write!(
            f,
            "  queue peak {} (bound {}), running peak {} (workers {}), per-key order violations {}",
            self.queued_peak, self.capacity, self.running_peak, self.workers, self.out_of_order
        )
    }
}

/// Produces `args.events` events to a fresh stream and consumes them through a per-key
/// pool, printing the pool's state every 250 ms; fails on a Redis error, a consumer
/// error, or `args.timeout`.
pub(crate) async fn run(args: &Args) -> Result<Summary, BoxError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let stream = format!("sd-pool-example-{}-{nanos}", std::process::id());
    let client = redis::Client::open(args.redis.as_str())?;
    let conn = redis::aio::ConnectionManager::new(client).await?;
    let capacity = 4 * args.workers.max(1);
    let pool = Pool::builder()
        .workers(args.workers)
        .queue(capacity)
        .order(Order::PerKey)
        .build()?;
    let cfg = StreamConsumer::builder()
        .stream(&stream)
        .group("workers")
        .consumer("worker-1")
        .batch(50)
        .key_field("key");
    let consumer = cfg.build(conn.clone(), pool.clone()).await?;
    let started = Instant::now();

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
        Ok::<Duration, redis::RedisError>(started.elapsed())
    });

    // The handler: 2 ms of work, and a check that each key's events arrive in order.
    let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let out_of_order = Arc::new(Mutex::new(0u64));
    let (l, o) = (last.clone(), out_of_order.clone());
    let handler = move |entry: Entry| {
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
        consumer
            .run(handler, async move {
                let _ = stopped.await;
            })
            .await
    });

    println!(
        "stream {stream}: {events} events, {keys} keys, {} workers, queue capacity {capacity}",
        args.workers
    );
    let deadline = started + args.timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (mut producer, mut produced_in) = (Some(producer), None);
    let consumed = loop {
        tick.tick().await;
        let m = pool.metrics();
        let watermark = pool
            .watermark(0)
            .map_or(-1, |w| i64::try_from(w).unwrap_or(i64::MAX));
        println!(
            "  queued {:>3}/{capacity}  running {:>2}  completed {:>5}  watermark {watermark:>5}",
            m.queued, m.running, m.completed
        );
        if m.completed >= events {
            break started.elapsed();
        }
        // The consumer ends before the stop signal only on an error; a finished producer
        // is awaited at once, so that its error, if any, ends the run.
        if run.is_finished() {
            run.await??;
            return Err("the consumer stopped before every event was handled".into());
        }
        if producer.as_ref().is_some_and(|p| p.is_finished())
            && let Some(p) = producer.take()
        {
            produced_in = Some(p.await??);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "gave up after {:?}: {} of {events} events handled",
                args.timeout, m.completed
            )
            .into());
        }
    };
    let produced_in = match (producer, produced_in) {
        (Some(p), _) => p.await??,
        (None, d) => d.unwrap_or(consumed),
    };
    let _ = stop.send(());
    let report = run.await??;
    let m = pool.metrics();
    let mut conn = conn;
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("workers")
        .query_async(&mut conn)
        .await?;
    let pending = match pending {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        },
        _ => 0,
    };
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await?;
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let out_of_order = *out_of_order.lock().map_err(|_| "poisoned")?;
    Ok(Summary {
        produced: events,
        read: report.read,
        acked: report.acked,
        pending,
        out_of_order,
        queued_peak: m.queued_peak,
        capacity,
        running_peak: m.running_peak,
        workers: args.workers,
        producer_rate: rate(events, produced_in),
        consumer_rate: rate(m.completed, consumed),
        watermark: pool.watermark(0),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    match run(&args).await {
        Ok(summary) => {
            println!("{summary}");
            let problems = summary.problems();
            for p in &problems {
                eprintln!("!! {p}");
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("stream consumer failed: {e}");
            ExitCode::FAILURE
        }
    }
}
