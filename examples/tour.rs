//! The tour: what each sd crate does, run on in-memory backends, no server needed.
//!
//! `cargo run -p sd-examples --example tour`
//!
//! `-- --redis URL --postgres URL` runs the same scenarios on the real backends (either
//! flag alone too): rate limiting, the cache and idempotency on Redis; idempotency, the
//! lock and the saga log on PostgreSQL; the lock on Redis. The outbox runs on its
//! in-memory unit of work, or with `--postgres` in an sqlx transaction.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sd_examples::CRATES;

#[path = "tour/outbox.rs"]
mod outbox;
#[path = "tour/saga.rs"]
mod saga;

use outbox::outbox;
use saga::saga;

/// The servers given on the command line; none means memory everywhere.
#[derive(Debug, Default)]
struct Backends {
    redis: Option<redis::aio::ConnectionManager>,
    postgres: Option<sqlx::PgPool>,
    /// Names this run's keys and tables, so runs on one server do not meet.
    run: String,
}

/// The tour: one short scenario per sd crate, on memory unless servers are given.
#[derive(Debug, clap::Parser)]
#[command(name = "tour")]
struct Args {
    /// Run the Redis-backed scenarios on this server (`redis://127.0.0.1:6379`).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Run the PostgreSQL-backed scenarios on this server.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let failures = run(args.redis, args.postgres);
    if failures > 0 {
        eprintln!("\n{failures} scenario check(s) failed (marked !! above)");
        std::process::exit(1);
    }
}

/// Runs every scenario (on memory, or on the servers given) and returns how many of the
/// facts the scenarios state did not hold (each is printed, marked `!!`).
pub(crate) fn run(redis_url: Option<String>, postgres_url: Option<String>) -> usize {
    FAILURES.set(0);
    let Some(runtime) = runtime() else {
        return 1;
    };
    let backends = match runtime.block_on(connect(redis_url, postgres_url)) {
        Ok(backends) => backends,
        Err(e) => {
            fail(format!("cannot reach a backend: {e}"));
            return FAILURES.get();
        }
    };
    println!("sd: system-design patterns for Rust services\n");
    let width = CRATES.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for krate in CRATES {
        println!("{:width$}  {}", krate.name, krate.pattern);
        println!("{:width$}  today: {}\n", "", krate.today);
    }
    let ready = CRATES
        .iter()
        .filter(|c| !c.today.starts_with("planned"))
        .count();
    println!(
        "{ready} of {} crates are usable today; the scenarios below run them on memory.",
        CRATES.len()
    );
    hashring();
    runtime.block_on(async {
        ratelimit(&backends).await;
        cache(&backends).await;
        idempotency(&backends).await;
        lock(&backends).await;
    });
    pool();
    runtime.block_on(async {
        saga(&backends).await;
        outbox(&backends).await;
    });
    FAILURES.get()
}

thread_local! {
    // Facts the scenarios state that did not hold in this run. Per thread: every scenario runs on the calling thread (current-thread runtimes), and
    // two tests running the tour at once must not count each other's failures.
    static FAILURES: Cell<usize> = const { Cell::new(0) };
}

/// Prints `what` went wrong, and counts it.
fn fail(what: String) {
    FAILURES.set(FAILURES.get() + 1);
    println!("  !! {what}");
}

/// Runs a scenario's setup and run, counting its first error as a failure.
async fn attempt(scenario: impl Future<Output = Result<(), Box<dyn std::error::Error>>>) {
    if let Err(e) = scenario.await {
        fail(format!("failed: {e}"));
    }
}

/// Counts a failure unless `fact` holds.
fn expect(fact: bool, what: &str) {
    if !fact {
        fail(format!("expected {what}"));
    }
}

async fn connect(
    redis_url: Option<String>,
    postgres_url: Option<String>,
) -> Result<Backends, Box<dyn std::error::Error>> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let mut backends = Backends {
        run: format!("tour{:x}", nanos & 0xff_ffff_ffff),
        ..Backends::default()
    };
    if let Some(url) = redis_url {
        let client = redis::Client::open(url)?;
        backends.redis = Some(redis::aio::ConnectionManager::new(client).await?);
    }
    if let Some(url) = postgres_url {
        backends.postgres = Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .connect(&url)
                .await?,
        );
    }
    Ok(backends)
}

/// sd-hashring: where keys live, what moves when a node joins, replicas, bounded loads.
fn hashring() {
    use sd_hashring::{BoundedLoad, Change, HashRing, Node};

    println!("\n== sd-hashring: 10 000 keys over three cache nodes ==");
    let Ok(ring) = HashRing::new(["cache-a", "cache-b", "cache-c"].map(Node::new)) else {
        return;
    };
    let keys: Vec<String> = (0..10_000).map(|i| format!("user:{i}")).collect();
    let count = |ring: &HashRing, id: &str| {
        keys.iter()
            .filter(|k| ring.node(k).is_some_and(|n| n.id() == id))
            .count()
    };
    for node in ring.nodes() {
        println!("  {} holds {} keys", node.id(), count(&ring, node.id()));
    }
    let Ok(grown) = ring.with_changes([Change::add(Node::new("cache-d"))]) else {
        return;
    };
    let moved = keys
        .iter()
        .filter(|k| ring.node(k) != grown.node(k))
        .count();
    let to_d = keys
        .iter()
        .filter(|k| {
            ring.node(k) != grown.node(k) && grown.node(k).is_some_and(|n| n.id() == "cache-d")
        })
        .count();
    println!(
        "  cache-d joins: {moved} keys move ({:.1}%, ideal 25%), {to_d} of them to cache-d; modulo hashing would move about 75%",
        moved as f64 / 100.0
    );
    expect(
        (1500..=3500).contains(&moved) && to_d == moved,
        "about a quarter of the keys to move, all to cache-d",
    );
    if let Ok(plan) = ring.diff(&grown) {
        println!(
            "  the move plan lists {} hash ranges to migrate, {:.1}% of hash space",
            plan.moves().len(),
            plan.moved_fraction() * 100.0
        );
    }
    let replicas: Vec<&str> = grown
        .owners("user:42", 3)
        .map(|n| n.id().as_str())
        .collect();
    if let Some((owner, others)) = replicas.split_first() {
        println!(
            "  user:42 lives on {owner} (replicas on {})",
            others.join(", ")
        );
    }
    let bound = BoundedLoad::default();
    let mut loads = vec![0u64; grown.len()];
    for k in &keys {
        if let Ok(pick) = grown.node_bounded(k, &loads, &bound) {
            loads[pick.index] += 1;
        }
    }
    let max = loads.iter().max().copied().unwrap_or(0) as f64;
    println!(
        "  bounded loads (c = 1.25): busiest node holds {:.2}x the average",
        max / 2500.0
    );
}

/// sd-ratelimit: a burst, a denial with its retry-after, and the next request after it.
async fn ratelimit(backends: &Backends) {
    use sd_ratelimit::memory::{ManualClock, MemoryLimiterBuilder};
    use sd_ratelimit::{Limit, Quota};

    let Ok(quota) = Quota::per_second(2).and_then(|q| q.with_burst(3)) else {
        return;
    };
    let limit = Limit::gcra(quota);
    if let Some(conn) = &backends.redis {
        println!("\n== sd-ratelimit: 2 per second, burst 3, on Redis ==");
        attempt(async {
            let limiter = sd_ratelimit::redis::RedisLimiterBuilder::new(limit)
                .prefix(format!("{}:rl", backends.run))
                .build(conn.clone())?;
            ratelimit_run(&limiter, None).await;
            Ok(())
        })
        .await;
        return;
    }
    println!("\n== sd-ratelimit: 2 per second, burst 3, on memory ==");
    let clock = ManualClock::new();
    if let Ok(limiter) = MemoryLimiterBuilder::new(limit)
        .clock(clock.clone())
        .keyed::<String>()
    {
        ratelimit_run(&limiter, Some(&clock)).await;
    }
}

/// Four requests from one client (waiting out the denial: on the manual clock of the
/// memory limiter, or for real on Redis), then one from another client.
async fn ratelimit_run(
    limiter: &impl sd_ratelimit::RateLimiter,
    clock: Option<&sd_ratelimit::memory::ManualClock>,
) {
    for i in 1..=4 {
        match limiter.check_key("203.0.113.7", 1).await {
            Ok(d) => {
                println!(
                    "  request {i}: allowed={} remaining={} retry_after={:?}",
                    d.allowed, d.remaining, d.retry_after
                );
                if !d.allowed {
                    match clock {
                        Some(clock) => clock.advance(d.retry_after),
                        None => tokio::time::sleep(d.retry_after).await,
                    }
                    let again = limiter.check_key("203.0.113.7", 1).await.map(|d| d.allowed);
                    println!("  after waiting {:?}: allowed={again:?}", d.retry_after);
                    expect(
                        matches!(again, Ok(true)),
                        "a request after the retry-after to pass",
                    );
                }
                expect(
                    d.allowed == (i <= 3),
                    "the burst of 3 to pass and the 4th to wait",
                );
            }
            Err(e) => fail(format!("request {i} failed: {e}")),
        }
    }
    let other = limiter
        .check_key("198.51.100.1", 1)
        .await
        .map(|d| d.allowed);
    println!("  another client meanwhile: allowed={other:?}");
    expect(
        matches!(other, Ok(true)),
        "another client to have its own limit",
    );
}

/// sd-idempotency: one payment sent 20 times with one key, 5 ms apart, while the charge
/// takes 40 ms: it is charged once; the other sends hear that it is running or get its
/// result; the key reused for another amount is refused.
async fn idempotency(backends: &Backends) {
    use sd_idempotency::{MemoryStore, postgres::PostgresStore, redis::RedisStore};

    let scope = format!("alice-{}", backends.run);
    if backends.redis.is_none() && backends.postgres.is_none() {
        println!("\n== sd-idempotency: one payment sent 20 times with one key, on memory ==");
        idempotency_run(MemoryStore::new(), &scope).await;
    }
    if let Some(conn) = &backends.redis {
        println!("\n== sd-idempotency: one payment sent 20 times with one key, on Redis ==");
        attempt(async {
            let store = RedisStore::builder()
                .prefix(format!("{}:idem", backends.run))
                .build(conn.clone())?;
            idempotency_run(store, &scope).await;
            Ok(())
        })
        .await;
    }
    if let Some(pool) = &backends.postgres {
        println!("\n== sd-idempotency: one payment sent 20 times with one key, on PostgreSQL ==");
        attempt(async {
            let store = PostgresStore::builder()
                .table("tour_idempotency")
                .build(pool.clone())?;
            store.migrate().await?;
            idempotency_run(store, &scope).await;
            Ok(())
        })
        .await;
    }
}

async fn idempotency_run<S>(store: S, scope: &str)
where
    S: sd_idempotency::Store + Clone + 'static,
{
    use std::collections::BTreeSet;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use sd_idempotency::{Error, Fingerprint, RunError, run_once};

    let charges = Arc::new(AtomicU32::new(0));
    let eur_10 = Fingerprint::of(r#"{"amount":1000,"currency":"EUR"}"#);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (store, charges, scope) = (store.clone(), charges.clone(), scope.to_owned());
        sends.spawn(async move {
            tokio::time::sleep(Duration::from_millis(5 * i)).await;
            let charge = async {
                tokio::time::sleep(Duration::from_millis(40)).await;
                let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
                Ok::<_, Infallible>(format!("pay_{n}"))
            };
            run_once(&store, &scope, "key-1", &eur_10, charge).await
        });
    }
    let (mut executed, mut replayed, mut in_flight) = (0, 0, 0);
    let mut ids = BTreeSet::new();
    while let Some(Ok(answer)) = sends.join_next().await {
        match answer {
            Ok(outcome) => {
                if outcome.is_replay() {
                    replayed += 1;
                } else {
                    executed += 1;
                }
                ids.insert(outcome.into_inner());
            }
            Err(RunError::Idempotency(Error::InFlight { .. })) => in_flight += 1,
            Err(e) => fail(format!("unexpected: {e}")),
        }
    }
    let charged = charges.load(Ordering::SeqCst);
    println!("  charged {charged} time(s): {executed} send ran the charge,");
    println!("  {in_flight} arrived while it ran and were told to retry later,");
    println!("  {replayed} arrived after and got the stored result; payment ids seen: {ids:?}");

    let eur_9999 = Fingerprint::of(r#"{"amount":999900,"currency":"EUR"}"#);
    let ran = Arc::new(AtomicU32::new(0));
    let work = async {
        ran.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Infallible>(String::new())
    };
    match run_once(&store, scope, "key-1", &eur_9999, work).await {
        Err(e) => println!("  key-1 again for 9999 EUR: refused ({e})"),
        Ok(_) => fail("key-1 again for 9999 EUR: accepted".into()),
    }
    println!("  its work ran {} time(s)", ran.load(Ordering::SeqCst));
    expect(
        charged == 1 && executed == 1 && in_flight + replayed == 19 && ids.len() == 1,
        "one charge for 20 sends, every other send told to wait or replayed",
    );
    expect(
        ran.load(Ordering::SeqCst) == 0,
        "the reused key's work not to run",
    );
}

/// sd-lock: two holders of one lease, their fencing tokens, a stale write refused.
async fn lock(backends: &Backends) {
    use sd_lock::memory::MemoryLock;
    use sd_lock::postgres::PostgresLock;
    use sd_lock::redis::RedisLock;

    let resource = format!("nightly-job-{}", backends.run);
    if backends.redis.is_none() && backends.postgres.is_none() {
        println!("\n== sd-lock: a holder paused past its lease, on memory ==");
        lock_run(&MemoryLock::new(), &resource).await;
    }
    if let Some(conn) = &backends.redis {
        println!("\n== sd-lock: a holder paused past its lease, on Redis ==");
        attempt(async {
            let lock = RedisLock::builder(conn.clone())
                .prefix("tour-lock")
                .build()?;
            lock_run(&lock, &resource).await;
            Ok(())
        })
        .await;
    }
    if let Some(pool) = &backends.postgres {
        println!("\n== sd-lock: a holder paused past its lease, on PostgreSQL ==");
        attempt(async {
            let lock = PostgresLock::new(pool.clone());
            lock.migrate().await?;
            lock_run(&lock, &resource).await;
            Ok(())
        })
        .await;
    }
}

async fn lock_run(lock: &impl sd_lock::Lock, resource: &str) {
    use sd_lock::Error;
    use sd_lock::fence::FencedRegister;

    let register = FencedRegister::new(0_u32);
    let ttl = Duration::from_millis(100);
    let a = match lock.try_acquire(resource, ttl).await {
        Ok(a) => a,
        Err(e) => return fail(format!("failed: {e}")),
    };
    println!("  A takes the lease: token {}", a.token());
    tokio::time::sleep(ttl * 2).await;
    let b = match lock.try_acquire(resource, ttl).await {
        Ok(b) => b,
        Err(e) => return fail(format!("failed: {e}")),
    };
    println!("  A pauses past its ttl; B takes over: token {}", b.token());
    let _ = register.write(b.token(), 2);
    match register.write(a.token(), 1) {
        Err(Error::StaleToken { token, current }) => {
            println!("  A's late write (token {token}) is refused: the register saw {current}")
        }
        other => fail(format!("unexpected: {other:?}")),
    }
    println!("  register holds B's value: {}", register.peek());
    expect(register.peek() == 2, "the register to keep B's write");
    let _ = lock.release(b).await;
}

/// sd-pool: per-key order, a full queue pushing back on a fast producer, the watermark.
fn pool() {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use sd_pool::{Job, Order, Pool};

    println!("\n== sd-pool: 2 workers, a queue of 4, per-key order, on tokio ==");
    let Some(runtime) = runtime() else {
        return;
    };
    runtime.block_on(async {
        let Ok(pool) = Pool::builder().workers(2).queue(4).order(Order::PerKey).build() else {
            return;
        };
        let finished = Arc::new(Mutex::new(Vec::new()));
        let (mut pushed_back, mut queued_max, mut marks) = (0, 0, vec![None]);
        for offset in 0..12_u64 {
            // ann's jobs take 8 ms, bob's and cy's 1 ms: they overtake her, hers keep order.
            let user = ["ann", "bob", "cy"][offset as usize % 3];
            let ms = if user == "ann" { 8 } else { 1 };
            let log = Arc::clone(&finished);
            let job = Job::new(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Ok(mut log) = log.lock() {
                    log.push(format!("{user}#{offset}"));
                }
            })
            .with_key(user)
            .with_offset(0, offset);
            // The producer has all 12 jobs at once; the queue takes 4.
            let job = match pool.try_submit(job) {
                Ok(_) => None,
                Err(full) => Some(full.into_job()),
            };
            if let Some(job) = job {
                pushed_back += 1;
                if pool.submit(job).await.is_err() {
                    return;
                }
            }
            queued_max = queued_max.max(pool.metrics().queued);
            if marks.last() != Some(&pool.watermark(0)) {
                marks.push(pool.watermark(0));
            }
        }
        let drained = pool.drain(Duration::from_secs(5)).await.is_complete();
        if marks.last() != Some(&pool.watermark(0)) {
            marks.push(pool.watermark(0));
        }
        let order = finished.lock().map(|l| l.clone()).unwrap_or_default();
        let ann: Vec<&String> = order.iter().filter(|j| j.starts_with("ann")).collect();
        println!("  finish order: {}", order.join(" "));
        println!("  ann's jobs, in submission order although others overtook them: {ann:?}");
        expect(
            ann == ["ann#0", "ann#3", "ann#6", "ann#9"] && queued_max <= 4,
            "ann's jobs in order and at most 4 queued",
        );
        println!(
            "  backpressure: the queue held at most {queued_max} jobs (its capacity is 4); {pushed_back} of 12 submissions found it full and waited"
        );
        let marks: Vec<String> = marks
            .iter()
            .map(|m| m.map_or("none".to_owned(), |m| m.to_string()))
            .collect();
        println!(
            "  watermark (every offset up to it is done: safe to commit), as the producer went on: {}; ann's slow jobs hold it back while later offsets finish",
            marks.join(" -> ")
        );
        let m = pool.metrics();
        expect(drained && m.completed == 12, "the drain to finish all 12 jobs");
        println!(
            "  drained: {drained}; {} completed, at most {} at once, {:?} total time in queue",
            m.completed, m.running_peak, m.queue_time_total
        );
    });
}

/// sd-cache: 200 requests miss one hot key at once; how many reach the database?
async fn cache(backends: &Backends) {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    let on = if backends.redis.is_some() {
        "Redis"
    } else {
        "memory"
    };
    println!("\n== sd-cache: 200 requests miss one hot key at once, on {on} ==");
    // The "database": a 20 ms query that counts how often it runs.
    let queries = Arc::new(AtomicU32::new(0));
    let query = |queries: Arc<AtomicU32>| async move {
        queries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        "espresso machine, 249 EUR".to_owned()
    };

    // Cache-aside written by hand: look, miss, query, store.
    let naive: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    herd(|| {
        let (naive, queries) = (naive.clone(), queries.clone());
        async move {
            let hit = naive.lock().ok().and_then(|m| m.get("product:7").cloned());
            if hit.is_none() {
                let value = query(queries).await;
                if let Ok(mut m) = naive.lock() {
                    m.insert("product:7".to_owned(), value);
                }
            }
            true
        }
    })
    .await;
    let naive_queries = queries.swap(0, Ordering::Relaxed);

    let served = if let Some(conn) = &backends.redis {
        let built =
            sd_cache::redis::RedisCache::<String>::builder(format!("{}:cache", backends.run))
                .ttl(Duration::from_secs(60))
                .build(conn.clone())
                .await;
        let cache = match built {
            Ok(cache) => cache,
            Err(e) => return fail(format!("failed: {e}")),
        };
        herd(|| {
            let (cache, queries) = (cache.clone(), queries.clone());
            async move {
                let loader = move || query(queries);
                cache.get_or_load("product:7", loader).await.is_ok()
            }
        })
        .await
    } else {
        let Ok(cache) = sd_cache::Cache::<String, String>::builder()
            .ttl(Duration::from_secs(60))
            .build()
        else {
            return;
        };
        herd(|| {
            let (cache, queries) = (cache.clone(), queries.clone());
            async move {
                let loader = move || query(queries);
                cache
                    .get_or_load("product:7".to_owned(), loader)
                    .await
                    .is_ok()
            }
        })
        .await
    };
    let sd_queries = queries.load(Ordering::Relaxed);
    println!("  hand-written cache-aside: {naive_queries} database queries for 200 requests");
    println!("  sd-cache get_or_load: {sd_queries} query, {served} requests served its result");
    expect(
        sd_queries == 1 && served == 200,
        "one query for 200 concurrent misses",
    );
}

/// Runs 200 copies of `request` at once; how many answered `true`.
async fn herd<F, Fut>(request: F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        tasks.spawn(request());
    }
    let mut served = 0;
    while let Some(done) = tasks.join_next().await {
        served += usize::from(done.unwrap_or(false));
    }
    served
}

/// A single-threaded tokio runtime with timers and I/O, for the scenarios that need one;
/// `None` (with the reason printed) when it cannot be built, so the tour goes on without
/// them.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            println!("  (skipped: no tokio runtime: {e})");
            None
        }
    }
}
