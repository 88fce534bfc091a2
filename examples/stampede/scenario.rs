//! The stampede scenario shared by `examples/stampede.rs` and `benches/benches/cache.rs`:
//! readers hammer one hot key across its expiry, behind a slow loader, once with naive
//! cache-aside and once with sd-cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sd_cache::Cache;

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// Loader calls during the run (the first load included).
    pub(crate) loader_calls: usize,
    /// Reads made.
    pub(crate) reads: usize,
    /// Read latency percentiles.
    pub(crate) p50: Duration,
    /// 99th percentile.
    pub(crate) p99: Duration,
    /// Slowest read.
    pub(crate) max: Duration,
}

/// The knobs of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scenario {
    /// Concurrent readers.
    pub(crate) readers: usize,
    /// How long the loader takes.
    pub(crate) load_time: Duration,
    /// The key's TTL.
    pub(crate) ttl: Duration,
    /// How long the readers read.
    pub(crate) run_for: Duration,
    /// Pause between one reader's reads.
    pub(crate) think: Duration,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            readers: 1_000,
            load_time: Duration::from_millis(50),
            ttl: Duration::from_millis(2_000),
            run_for: Duration::from_millis(4_500),
            think: Duration::from_millis(2),
        }
    }
}

/// The slow "database query".
async fn load(calls: &AtomicUsize, took: Duration) -> u64 {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(took).await;
    7
}

/// Runs `read` from `s.readers` tasks for `s.run_for` and collects latencies.
pub(crate) async fn drive<R, Fut>(s: Scenario, read: R) -> (usize, Duration, Duration, Duration)
where
    R: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let deadline = Instant::now() + s.run_for;
    let tasks: Vec<_> = (0..s.readers)
        .map(|_| {
            let read = read.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    read().await;
                    lat.push(start.elapsed());
                    tokio::time::sleep(s.think).await;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_unstable();
    let pick = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
    };
    let reads = all.len();
    (
        reads,
        pick(0.5).unwrap_or_default(),
        pick(0.99).unwrap_or_default(),
        all.last().copied().unwrap_or_default(),
    )
}

/// Warms the key with one read, then drives the readers and counts the loader calls.
pub(crate) async fn measure<R, Fut>(s: Scenario, calls: &AtomicUsize, read: R) -> Outcome
where
    R: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    read().await;
    let (reads, p50, p99, max) = drive(s, read).await;
    Outcome {
        loader_calls: calls.load(Ordering::SeqCst),
        reads,
        p50,
        p99,
        max,
    }
}

/// The moka cache every moka row reads through (the scenario's TTL, 1,000 entries), and
/// the counter of its loader calls.
pub(crate) fn moka_cache(s: Scenario) -> (moka::sync::Cache<&'static str, u64>, Arc<AtomicUsize>) {
    let cache = moka::sync::Cache::builder()
        .max_capacity(1_000)
        .time_to_live(s.ttl)
        .build();
    (cache, Arc::new(AtomicUsize::new(0)))
}

/// Naive cache-aside on moka: get, and on a miss load and insert.
pub(crate) async fn naive_memory(s: Scenario) -> Outcome {
    let (cache, calls) = moka_cache(s);
    let (c, k) = (cache.clone(), calls.clone());
    let read = move || {
        let (cache, calls) = (c.clone(), k.clone());
        async move {
            if cache.get("hot").is_none() {
                let v = load(&calls, s.load_time).await;
                cache.insert("hot", v);
            }
        }
    };
    measure(s, &calls, read).await
}

/// sd-cache: single-flight and XFetch early refresh.
pub(crate) async fn sd_memory(s: Scenario) -> Outcome {
    let cache: Cache<&'static str, u64> =
        match Cache::builder().max_capacity(1_000).ttl(s.ttl).build() {
            Ok(c) => c,
            Err(e) => panic!("valid settings: {e}"),
        };
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, k) = (cache.clone(), calls.clone());
    let read = move || {
        let (cache, calls) = (c.clone(), k.clone());
        async move {
            let _ = cache
                .get_or_load(
                    "hot",
                    move || async move { load(&calls, s.load_time).await },
                )
                .await;
        }
    };
    measure(s, &calls, read).await
}

/// Prints one row.
pub(crate) fn row(name: &str, o: &Outcome) {
    println!(
        "{name:<28} loader calls {:>5}   reads {:>7}   p50 {:>9.3?}   p99 {:>9.3?}   max {:>9.3?}",
        o.loader_calls, o.reads, o.p50, o.p99, o.max
    );
}
