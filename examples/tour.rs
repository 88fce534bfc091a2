//! The tour: what each sd crate does, run on in-memory backends, no server needed.
//!
//! `cargo run -p sd-examples --example tour`

use sd_examples::CRATES;

fn main() {
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
    ratelimit();
    cache();
    idempotency();
    lock();
    pool();
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
fn ratelimit() {
    use sd_ratelimit::memory::{Builder, ManualClock};
    use sd_ratelimit::{Limit, Quota};

    println!("\n== sd-ratelimit: 2 per second, burst 3, on memory ==");
    let Ok(quota) = Quota::per_second(2).and_then(|q| q.with_burst(3)) else {
        return;
    };
    let clock = ManualClock::new();
    let Ok(limiter) = Builder::new(Limit::gcra(quota))
        .clock(clock.clone())
        .keyed::<String>()
    else {
        return;
    };
    for i in 1..=4 {
        if let Ok(d) = limiter.check("203.0.113.7") {
            println!(
                "  request {i}: allowed={} remaining={} retry_after={:?}",
                d.allowed, d.remaining, d.retry_after
            );
            if !d.allowed {
                clock.advance(d.retry_after);
                let again = limiter.check("203.0.113.7").map(|d| d.allowed);
                println!("  after waiting {:?}: allowed={again:?}", d.retry_after);
            }
        }
    }
    let other = limiter.check("198.51.100.1").map(|d| d.allowed);
    println!("  another client meanwhile: allowed={other:?}");
}

/// sd-idempotency: one payment sent 20 times with one key, 5 ms apart, while the charge
/// takes 40 ms: it is charged once; the other sends hear that it is running or get its
/// result; the key reused for another amount is refused.
fn idempotency() {
    use std::collections::BTreeSet;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use sd_idempotency::{Error, Fingerprint, MemoryStore, RunError, run_once};

    println!("\n== sd-idempotency: one payment sent 20 times with one key, on memory ==");
    let Some(runtime) = runtime() else {
        return;
    };
    runtime.block_on(async {
        let store = MemoryStore::new();
        let charges = Arc::new(AtomicU32::new(0));
        let eur_10 = Fingerprint::of(r#"{"amount":1000,"currency":"EUR"}"#);
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (store, charges) = (store.clone(), charges.clone());
            sends.spawn(async move {
                tokio::time::sleep(Duration::from_millis(5 * i)).await;
                let charge = async {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok::<_, Infallible>(format!("pay_{n}"))
                };
                run_once(&store, "alice", "key-1", &eur_10, charge).await
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
                Err(e) => println!("  unexpected: {e}"),
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
        match run_once(&store, "alice", "key-1", &eur_9999, work).await {
            Err(e) => println!("  key-1 again for 9999 EUR: refused ({e})"),
            Ok(_) => println!("  key-1 again for 9999 EUR: accepted (unexpected)"),
        }
        println!("  its work ran {} time(s)", ran.load(Ordering::SeqCst));
    });
}

/// sd-lock: two holders of one lease, their fencing tokens, a stale write refused.
fn lock() {
    use std::time::Duration;

    use sd_lock::fence::FencedRegister;
    use sd_lock::memory::MemoryLock;
    use sd_lock::{Error, Lock};

    println!("\n== sd-lock: a holder paused past its lease, on memory ==");
    let Some(runtime) = runtime() else {
        return;
    };
    runtime.block_on(async {
        let lock = MemoryLock::new();
        let register = FencedRegister::new(0_u32);
        let ttl = Duration::from_millis(30);
        let Ok(a) = lock.try_acquire("nightly-job", ttl).await else {
            return;
        };
        println!("A takes the lease: token {}", a.token());
        tokio::time::sleep(ttl * 2).await;
        let Ok(b) = lock.try_acquire("nightly-job", ttl).await else {
            return;
        };
        println!("A pauses past its ttl; B takes over: token {}", b.token());
        let _ = register.write(b.token(), 2);
        match register.write(a.token(), 1) {
            Err(Error::StaleToken { token, current }) => {
                println!("A's late write (token {token}) is refused: the register saw {current}")
            }
            other => println!("unexpected: {other:?}"),
        }
        println!("register holds B's value: {}", register.peek());
    });
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
        let Ok(pool) = Pool::builder(2, 4).order(Order::PerKey).build() else {
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
        println!(
            "  drained: {drained}; {} completed, at most {} at once, {:?} total time in queue",
            m.completed, m.running_peak, m.queue_time_total
        );
    });
}

/// sd-cache: 200 requests miss one hot key at once; how many reach the database?
fn cache() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    println!("\n== sd-cache: 200 requests miss one hot key at once, on memory ==");
    let Some(runtime) = runtime() else {
        return;
    };
    runtime.block_on(async {
        // The "database": a 20 ms query that counts how often it runs.
        let queries = Arc::new(AtomicU32::new(0));
        let query = |queries: Arc<AtomicU32>| async move {
            queries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            "espresso machine, 249 EUR".to_owned()
        };

        // Cache-aside written by hand: look, miss, query, store.
        let naive: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let (naive, queries) = (naive.clone(), queries.clone());
            tasks.spawn(async move {
                let hit = naive.lock().ok().and_then(|m| m.get("product:7").cloned());
                if hit.is_none() {
                    let value = query(queries).await;
                    if let Ok(mut m) = naive.lock() {
                        m.insert("product:7".to_owned(), value);
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let naive_queries = queries.swap(0, Ordering::Relaxed);

        let Ok(cache) = sd_cache::Cache::<String, String>::builder()
            .ttl(Duration::from_secs(60))
            .build()
        else {
            return;
        };
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let (cache, queries) = (cache.clone(), queries.clone());
            tasks.spawn(async move {
                cache
                    .get_or_load("product:7".to_owned(), move || query(queries))
                    .await
                    .is_ok()
            });
        }
        let mut served = 0;
        while let Some(done) = tasks.join_next().await {
            served += usize::from(done.unwrap_or(false));
        }
        let sd_queries = queries.load(Ordering::Relaxed);
        println!("  hand-written cache-aside: {naive_queries} database queries for 200 requests");
        println!("  sd-cache get_or_load: {sd_queries} query, {served} requests served its result");
    });
}

/// A single-threaded tokio runtime with timers, for the scenarios that need one; `None`
/// (with the reason printed) when it cannot be built, so the tour goes on without them.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            println!("  (skipped: no tokio runtime: {e})");
            None
        }
    }
}
