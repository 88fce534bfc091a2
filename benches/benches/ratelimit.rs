//! sd-ratelimit beside governor (memory) and beside raw Redis commands (Redis).
//!
//! `cargo bench -p sd-benches --bench ratelimit`
//!
//! - `memory/direct`: one limiter for the process, sd `DirectLimiter` vs governor's
//!   direct limiter, same quota, each with its default clock. `sd` is `check()` (a full
//!   `Decision`), `sd-allow` is `allow()` (admitted or not, as governor's `check()`).
//! - `memory/keyed/{1,2} threads`: 10,000 `u64` keys round-robin, sd `KeyedLimiter`
//!   vs governor's default keyed limiter (DashMap with SipHash) and, as a second peer
//!   row, governor's DashMap with sd's hasher (foldhash), so the hasher is not the
//!   difference.
//! - `memory/metrics`: the same decisions with feature `metrics` compiled in, without a
//!   recorder (`off`: the handles do nothing) and with one installed when the limiter was
//!   built (`on`: sd-core's `Capture`, an atomic counter per series, as exporters keep
//!   them), so the cost of counting every decision comes from one run.
//!   Then the four are timed again interleaved in rounds (fastest of 20 rounds each).
//! - `redis/64 callers`: 64 tasks on one multiplexed connection, same keys, sd decisions
//!   (one EVALSHA each; `batched`: concurrent decisions share an EVALSHA, one round trip
//!   each) beside what users would otherwise deploy on the same server: the GCRA script
//!   of go-redis/redis_rate (one EVALSHA over one key, server `TIME`) and a fixed window
//!   as Envoy's ratelimit service keeps it (an `INCR` + `PEXPIRE` pipeline per decision);
//!   and beside raw `SET` and `EVALSHA` of `return 1`, the floor of one round trip.
#![allow(clippy::unwrap_used, missing_docs)] // A bench binary: failures should stop it.

use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use sd_ratelimit::memory::MemoryLimiterBuilder;
use sd_ratelimit::{Limit, Quota};
use tokio::runtime::Runtime;

const KEYS: u64 = 10_000;

fn quota() -> (Limit, governor::Quota) {
    // A high rate so most checks admit, as on a healthy service: 1,000,000/s, burst 1000.
    let ours = Limit::gcra(
        Quota::per_second(1_000_000)
            .unwrap()
            .with_burst(1000)
            .unwrap(),
    );
    let theirs = governor::Quota::per_second(NonZeroU32::new(1_000_000).unwrap())
        .allow_burst(NonZeroU32::new(1000).unwrap());
    (ours, theirs)
}

/// Runs `f(thread, iters_per_thread)` on `threads` threads; returns the wall time.
fn on_threads(threads: u64, iters: u64, f: impl Fn(u64, u64) + Sync) -> Duration {
    let per = iters.div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || f(t, per));
        }
    });
    start.elapsed()
}

fn memory(c: &mut Criterion) {
    let (ours, theirs) = quota();
    let mut g = c.benchmark_group("ratelimit/memory");
    g.throughput(Throughput::Elements(1));

    let sd = MemoryLimiterBuilder::new(ours).direct().unwrap();
    g.bench_function("direct/sd", |b| {
        b.iter(|| black_box(sd.check().unwrap().allowed))
    });
    g.bench_function("direct/sd-allow", |b| b.iter(|| black_box(sd.allow())));
    let gov = governor::RateLimiter::direct(theirs);
    g.bench_function("direct/governor", |b| {
        b.iter(|| black_box(gov.check().is_ok()))
    });

    let sd = Arc::new(MemoryLimiterBuilder::new(ours).keyed::<u64>().unwrap());
    let gov = Arc::new(governor::RateLimiter::keyed(theirs));
    let gov_foldhash = Arc::new(governor::RateLimiter::dashmap_with_hasher(
        theirs,
        foldhash::fast::RandomState::default(),
    ));
    for threads in [1u64, 2] {
        let row = |peer: &str| format!("keyed/{threads}-thread/{peer}");
        keyed_row(&mut g, row("sd"), threads, |key| {
            sd.check(&key).unwrap().allowed
        });
        keyed_row(&mut g, row("governor"), threads, |key| {
            gov.check_key(&key).is_ok()
        });
        keyed_row(&mut g, row("governor-foldhash"), threads, |key| {
            gov_foldhash.check_key(&key).is_ok()
        });
    }
    g.finish();
}

/// Decisions with metrics off (no recorder) and on (a recorder installed at build).
fn metrics_cost(c: &mut Criterion) {
    let (ours, _) = quota();
    let mut g = c.benchmark_group("ratelimit/memory/metrics");
    g.throughput(Throughput::Elements(1));
    let capture = sd_core::observe::Capture::new();
    let directs = (
        MemoryLimiterBuilder::new(ours).direct().unwrap(),
        capture.build(|| MemoryLimiterBuilder::new(ours).direct().unwrap()),
    );
    g.bench_function("direct/off", |b| {
        b.iter(|| black_box(directs.0.check().unwrap().allowed))
    });
    g.bench_function("direct/on", |b| {
        b.iter(|| black_box(directs.1.check().unwrap().allowed))
    });
    let off = MemoryLimiterBuilder::new(ours).keyed::<u64>().unwrap();
    let on = capture.build(|| MemoryLimiterBuilder::new(ours).keyed::<u64>().unwrap());
    keyed_row(&mut g, "keyed/1-thread/off".into(), 1, |key| {
        off.check(&key).unwrap().allowed
    });
    keyed_row(&mut g, "keyed/1-thread/on".into(), 1, |key| {
        on.check(&key).unwrap().allowed
    });
    g.finish();
    let [direct_off, direct_on] = [&directs.0, &directs.1];
    let best = sd_benches::fastest_interleaved(
        20,
        100_000,
        &[
            &|_| {
                black_box(direct_off.check().unwrap().allowed);
            },
            &|_| {
                black_box(direct_on.check().unwrap().allowed);
            },
            &|i| {
                black_box(off.check(&(i as u64 % KEYS)).unwrap().allowed);
            },
            &|i| {
                black_box(on.check(&(i as u64 % KEYS)).unwrap().allowed);
            },
        ],
    );
    println!(
        "ratelimit/memory/metrics interleaved (fastest of 20 rounds of 100k): direct off {:.1} ns on {:.1} ns ({:.3}x); keyed off {:.1} ns on {:.1} ns ({:.3}x)",
        best[0],
        best[1],
        best[1] / best[0],
        best[2],
        best[3],
        best[3] / best[2]
    );
}

/// Benches `check` on `threads` threads over [`KEYS`] keys round-robin.
fn keyed_row(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: String,
    threads: u64,
    check: impl Fn(u64) -> bool + Sync,
) {
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            on_threads(threads, iters, |t, n| {
                for i in 0..n {
                    black_box(check((i * 7 + t) % KEYS));
                }
            })
        })
    });
}

const CALLERS: u64 = 64;

/// Benches `op` as one decision per iteration, the iterations shared by [`CALLERS`]
/// tasks on `rt` (so on one multiplexed connection when `op` uses one).
fn callers_row<F, Fut>(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, name: &str, op: F)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let per = iters.div_ceil(CALLERS);
                let start = Instant::now();
                let tasks: Vec<_> = (0..CALLERS)
                    .map(|t| {
                        let op = op.clone();
                        tokio::spawn(async move {
                            for i in 0..per {
                                op(t * per + i).await;
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start.elapsed()
            })
        })
    });
}

fn redis(c: &mut Criterion) {
    let server =
        sd_testkit::redis().expect("redis-server must be installed (apt-get install redis-server)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(async {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let limit = Limit::gcra(
        Quota::per_second(1_000_000)
            .unwrap()
            .with_burst(1000)
            .unwrap(),
    );
    let build = |batch| {
        Arc::new(
            sd_ratelimit::redis::RedisLimiterBuilder::new(limit)
                .prefix(sd_testkit::unique_name("bench"))
                .timeout(Duration::from_secs(5))
                .batch(batch)
                .build(conn.clone())
                .unwrap(),
        )
    };
    let (sd, batched) = (build(1), build(CALLERS as usize));
    let redis_rate = redis::Script::new(sd_benches::REDIS_RATE_GCRA);
    let trivial = redis::Script::new("return 1");
    let sha = rt
        .block_on(trivial.prepare_invoke().load_async(&mut conn.clone()))
        .unwrap();

    let mut g = c.benchmark_group("ratelimit/redis-64-callers");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    for (name, sd) in [("sd-check", &sd), ("sd-check-batched", &batched)] {
        let sd = sd.clone();
        callers_row(&mut g, &rt, name, move |i| {
            let sd = sd.clone();
            async move {
                black_box(sd.check(&(i % KEYS).to_string()).await.unwrap());
            }
        });
    }
    // The same quota as sd's: 1,000,000 a second, burst 1000.
    let (c, script) = (conn.clone(), redis_rate);
    callers_row(&mut g, &rt, "redis-rate-gcra", move |i| {
        let (mut conn, script) = (c.clone(), script.clone());
        async move {
            let reply: (i64, i64, String, String) = script
                .key(format!("rate:{}", i % KEYS))
                .arg(1000)
                .arg(1_000_000)
                .arg(1)
                .arg(1)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            black_box(reply.0 > 0);
        }
    });
    // Envoy's ratelimit: the key names the window (here the second), INCR counts and
    // PEXPIRE ends it, pipelined; admitted while the count is within the limit.
    let c = conn.clone();
    callers_row(&mut g, &rt, "envoy-fixed-window", move |i| {
        let mut conn = c.clone();
        async move {
            let window = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let key = format!("envoy:{}:{window}", i % KEYS);
            let (count, _): (u64, bool) = redis::pipe()
                .cmd("INCR")
                .arg(&key)
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(1000)
                .query_async(&mut conn)
                .await
                .unwrap();
            black_box(count <= 1_000_000);
        }
    });
    let c = conn.clone();
    callers_row(&mut g, &rt, "raw-set", move |i| {
        let mut conn = c.clone();
        async move {
            let () = redis::cmd("SET")
                .arg(format!("bench:{}", i % KEYS))
                .arg(i)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    });
    let c = conn.clone();
    callers_row(&mut g, &rt, "raw-evalsha-return-1", move |_| {
        let (mut conn, sha) = (c.clone(), sha.clone());
        async move {
            let one: i64 = redis::cmd("EVALSHA")
                .arg(&sha)
                .arg(0)
                .query_async(&mut conn)
                .await
                .unwrap();
            black_box(one);
        }
    });
    g.finish();
}

criterion_group!(benches, memory, metrics_cost, redis);
criterion_main!(benches);
