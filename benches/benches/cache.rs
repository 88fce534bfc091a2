//! sd-cache beside moka (memory) and beside raw `GET` (Redis).
//!
//! `cargo bench -p sd-benches --bench cache`
//!
//! - `cache/hit`: 10,000 preloaded `u64` keys read in a fixed shuffled order: sd `get` and
//!   `get_or_load` vs moka `get` and `get_with` on the bare engine with the same capacity,
//!   TTL and hasher (moka's default `RandomState`, which sd's engine keeps). The same four
//!   reads are then timed again in alternating rounds (`cache/hit interleaved`), so the
//!   ratios hold on a loaded machine.
//! - `cache/stampede` (printed before the groups): 1,000 tasks read one hot key across its
//!   expiry behind a 50 ms loader: loader calls and p50/p99 read latency, naive cache-aside
//!   on moka, moka's coalescing `get_with` (its answer to a stampede: one loader per key,
//!   the other callers wait for it) and sd (the scenario of `examples/stampede.rs`).
//! - `cache/hit/metrics`: the same `get` hits with feature `metrics` compiled in, without a
//!   recorder (`off`) and with one installed when the cache was built (`on`), then the two
//!   interleaved in rounds as above.
//! - `cache/redis`: one hit read, sd `RedisCache::get` (one `HMGET` round trip) vs raw
//!   `GET` of the same payload on the same server and connection.
//! - `cache/two-tier`: a hit in the memory tier of a two-tier cache (`TwoTier::get` and
//!   `get_or_load` on 10,000 preloaded `String` keys) vs moka `get` / `get_with` on the
//!   bare engine with the same keys, and vs a raw Redis `GET` (what the memory tier saves).
#![allow(clippy::unwrap_used, missing_docs)] // A bench binary: failures should stop it.

#[path = "../../examples/stampede/scenario.rs"]
#[allow(dead_code)]
mod scenario;

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use sd_cache::{Cache, RedisCache, TwoTier};

const KEYS: u64 = 10_000;

/// A fixed pseudo-random order over the keys (xorshift), the same for every contender.
fn order() -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..KEYS * 4)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % KEYS
        })
        .collect()
}

fn hit(c: &mut Criterion) {
    let keys = order();
    let ttl = Duration::from_secs(600);
    let sd: Cache<u64, u64> = Cache::builder()
        .max_capacity(100_000)
        .ttl(ttl)
        .build()
        .unwrap();
    let moka: moka::sync::Cache<u64, u64> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(ttl)
        .build();
    for k in 0..KEYS {
        sd.insert(k, k);
        moka.insert(k, k);
    }
    sd.run_pending_tasks();
    moka.run_pending_tasks();

    let mut g = c.benchmark_group("cache/hit");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("get/sd", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(sd.get(&keys[i]))
        })
    });
    g.bench_function("get/moka", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(moka.get(&keys[i]))
        })
    });
    // A hit never awaits, so the future is ready on first poll.
    g.bench_function("get_or_load/sd", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let k = keys[i];
            black_box(sd.get_or_load(k, move || async move { k }).now_or_never())
        })
    });
    g.bench_function("get_with/moka", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let k = keys[i];
            black_box(moka.get_with(k, || k))
        })
    });
    g.finish();
    let at = |i: usize| keys[i % keys.len()];
    interleaved(
        "cache/hit",
        [
            &|i| {
                black_box(sd.get(&at(i)));
            },
            &|i| {
                black_box(moka.get(&at(i)));
            },
            &|i| {
                let k = at(i);
                black_box(sd.get_or_load(k, move || async move { k }).now_or_never());
            },
            &|i| {
                let k = at(i);
                black_box(moka.get_with(k, || k));
            },
        ],
    );
}

fn stampede(_: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = scenario::Scenario::default();
    println!(
        "cache/stampede: {} readers, loader {:?}, ttl {:?}, {:?} of reads",
        s.readers, s.load_time, s.ttl, s.run_for
    );
    rt.block_on(async {
        scenario::row(
            "  naive cache-aside (moka)",
            &scenario::naive_memory(s).await,
        );
        scenario::row("  moka get_with (coalescing)", &moka_get_with(s).await);
        scenario::row("  sd-cache", &scenario::sd_memory(s).await);
    });
}

/// moka's coalescing loader on the same scenario: a hit is a plain `get` on the task; a
/// miss goes through `get_with`, which runs one loader per key while the other callers
/// wait for its value. moka's sync cache blocks the waiting callers, so the miss runs on
/// tokio's blocking pool (as an async service would call it), never on a worker.
async fn moka_get_with(s: scenario::Scenario) -> scenario::Outcome {
    use std::sync::atomic::Ordering;

    let (cache, calls) = scenario::moka_cache(s);
    let (c, k) = (cache.clone(), calls.clone());
    let read = move || {
        let (cache, calls) = (c.clone(), k.clone());
        async move {
            if cache.get("hot").is_some() {
                return;
            }
            tokio::task::spawn_blocking(move || {
                cache.get_with("hot", || {
                    // The same slow "database query" as the other rows, blocking here.
                    calls.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(s.load_time);
                    7
                })
            })
            .await
            .unwrap();
        }
    };
    scenario::measure(s, &calls, read).await
}

fn redis(c: &mut Criterion) {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let rt = sd_testkit::runtime_with(1);
    let prefix = sd_testkit::unique_name("bench-cache");
    let (sd, mut conn, raw_key) = rt.block_on(async {
        let conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let sd: RedisCache<String, _> = RedisCache::builder(prefix.as_str())
            .ttl(Duration::from_secs(600))
            .build(conn.clone())
            .await
            .unwrap();
        let payload = "x".repeat(100);
        sd.insert("k", &payload).await.unwrap();
        let raw_key = format!("{prefix}:raw");
        let mut c2 = conn.clone();
        let _: () = redis::cmd("SET")
            .arg(&raw_key)
            .arg(serde_json::to_string(&payload).unwrap())
            .query_async(&mut c2)
            .await
            .unwrap();
        (sd, conn, raw_key)
    });
    let mut g = c.benchmark_group("cache/redis");
    g.throughput(Throughput::Elements(1));
    g.bench_function("get/sd", |b| {
        b.iter(|| rt.block_on(async { black_box(sd.get("k").await.unwrap()) }))
    });
    g.bench_function("GET/raw", |b| {
        b.iter(|| {
            rt.block_on(async {
                let v: Option<String> = redis::cmd("GET")
                    .arg(&raw_key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(v)
            })
        })
    });
    g.finish();
}

fn two_tier(c: &mut Criterion) {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    // Worker threads keep the heartbeat and the subscription going while the hit loop runs.
    let rt = sd_testkit::runtime_with(1);
    let prefix = sd_testkit::unique_name("bench-two-tier");
    let names: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    let keys = order();
    let ttl = Duration::from_secs(600);
    let moka: moka::sync::Cache<String, u64> = moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(ttl)
        .build();
    let (sd, mut conn) = rt.block_on(async {
        let conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let sd: TwoTier<u64, _> = TwoTier::builder(RedisCache::builder(prefix.as_str()).ttl(ttl))
            .local_capacity(100_000)
            .local_ttl(ttl)
            .build(conn.clone(), redis::Client::open(server.url()).unwrap())
            .await
            .unwrap();
        while !sd.is_serving_local() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (k, name) in names.iter().enumerate() {
            sd.insert(name, &(k as u64)).await.unwrap();
            // The first read fills the memory tier.
            sd.get(name).await.unwrap();
        }
        (sd, conn)
    });
    for (k, name) in names.iter().enumerate() {
        moka.insert(name.clone(), k as u64);
    }
    moka.run_pending_tasks();
    let before = sd.stats().hits;
    // Were a read to miss the memory tier, its Redis read needs the runtime.
    let _enter = rt.enter();

    let mut g = c.benchmark_group("cache/two-tier");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("get/sd-two-tier", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            // A memory hit never awaits, so the future is ready on first poll.
            black_box(sd.get(&names[keys[i] as usize]).now_or_never())
        })
    });
    g.bench_function("get/moka", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(moka.get(names[keys[i] as usize].as_str()))
        })
    });
    g.bench_function("get_or_load/sd-two-tier", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let k = keys[i];
            black_box(
                sd.get_or_load(&names[k as usize], move || async move { k })
                    .now_or_never(),
            )
        })
    });
    g.bench_function("get_with/moka", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let k = keys[i];
            // By reference, so moka allocates a key only on a miss, as sd does.
            black_box(
                moka.entry_by_ref(names[k as usize].as_str())
                    .or_insert_with(|| k)
                    .into_value(),
            )
        })
    });
    g.bench_function("GET/raw-redis", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            rt.block_on(async {
                let v: Option<String> = redis::cmd("GET")
                    .arg(&names[keys[i] as usize])
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(v)
            })
        })
    });
    g.finish();
    let name = |i: usize| names[keys[i % keys.len()] as usize].as_str();
    interleaved(
        "cache/two-tier",
        [
            &|i| {
                black_box(sd.get(name(i)).now_or_never());
            },
            &|i| {
                black_box(moka.get(name(i)));
            },
            &|i| {
                let k = keys[i % keys.len()];
                black_box(
                    sd.get_or_load(name(i), move || async move { k })
                        .now_or_never(),
                );
            },
            &|i| {
                let k = keys[i % keys.len()];
                black_box(moka.entry_by_ref(name(i)).or_insert_with(|| k).into_value());
            },
        ],
    );
    let stats = sd.stats();
    println!(
        "cache/two-tier: memory-tier hits {} of the sd reads, misses {}, instance still serving locally: {}",
        stats.hits - before,
        stats.misses,
        sd.is_serving_local()
    );
}

/// The hit ratios again, robust to a loaded machine: sd and moka alternate in rounds of
/// 100,000 reads, each round starting one read further on, and each keeps its fastest
/// round, so both are timed in the same quiet spells. `reads` are sd `get`, moka `get`,
/// sd `get_or_load`, moka's loading read.
fn interleaved(group: &str, reads: [&dyn Fn(usize); 4]) {
    let best = sd_benches::fastest_interleaved(20, 100_000, &reads);
    println!(
        "{group} interleaved (fastest of 20 rounds of 100k): get sd {:.1} ns moka {:.1} ns ({:.2}x); get_or_load sd {:.1} ns moka {:.1} ns ({:.2}x)",
        best[0],
        best[1],
        best[0] / best[1],
        best[2],
        best[3],
        best[2] / best[3]
    );
}

/// A memory hit with feature `metrics` compiled in, without a recorder (`off`) and with
/// one installed when the cache was built (`on`: sd-core's `Capture`, an atomic counter
/// per series as exporters keep them).
fn metrics_cost(c: &mut Criterion) {
    let keys = order();
    let capture = sd_core::observe::Capture::new();
    let build = || {
        let cache: Cache<u64, u64> = Cache::builder().max_capacity(100_000).build().unwrap();
        for k in 0..KEYS {
            cache.insert(k, k);
        }
        cache.run_pending_tasks();
        cache
    };
    let off = build();
    let on = capture.build(build);
    let mut g = c.benchmark_group("cache/hit/metrics");
    g.throughput(Throughput::Elements(1));
    for (name, cache) in [("get/off", &off), ("get/on", &on)] {
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(cache.get(&keys[i]))
            })
        });
    }
    g.finish();
    let at = |i: usize| keys[i % keys.len()];
    let best = sd_benches::fastest_interleaved(
        20,
        100_000,
        &[
            &|i| {
                black_box(off.get(&at(i)));
            },
            &|i| {
                black_box(on.get(&at(i)));
            },
        ],
    );
    println!(
        "cache/hit/metrics interleaved (fastest of 20 rounds of 100k): get off {:.1} ns on {:.1} ns ({:.3}x)",
        best[0],
        best[1],
        best[1] / best[0]
    );
}

criterion_group!(benches, stampede, hit, metrics_cost, redis, two_tier);
criterion_main!(benches);
