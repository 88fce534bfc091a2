//! sd-ratelimit beside governor (memory) and beside raw Redis commands (Redis).
//!
//! `cargo bench -p sd-benches --bench ratelimit`
//!
//! - `memory/direct`: one limiter for the process, sd `DirectLimiter` vs governor's
//!   direct limiter, same quota, each with its default clock. `sd` is `check()` (a full
//!   `Decision`), `sd-allow` is `allow()` (admitted or not, as governor's `check()`).
//! - `memory/keyed/{1,2} threads`: 10,000 `u64` keys round-robin, sd `KeyedLimiter`
//!   vs governor's default keyed limiter (DashMap).
//! - `redis/64 callers`: 64 tasks on one multiplexed connection, sd decisions (one
//!   EVALSHA each; `batched`: concurrent decisions share an EVALSHA, one round trip
//!   each) vs raw `SET` and `EVALSHA` of `return 1` on the same server.
#![allow(clippy::unwrap_used, missing_docs)] // A bench binary: failures should stop it.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sd_ratelimit::memory::MemoryLimiterBuilder;
use sd_ratelimit::{Limit, Quota};

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
    for threads in [1u64, 2] {
        g.bench_function(format!("keyed/{threads}-thread/sd"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, |t, n| {
                    for i in 0..n {
                        black_box(sd.check(&((i * 7 + t) % KEYS)).unwrap().allowed);
                    }
                })
            })
        });
        g.bench_function(format!("keyed/{threads}-thread/governor"), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, |t, n| {
                    for i in 0..n {
                        black_box(gov.check_key(&((i * 7 + t) % KEYS)).is_ok());
                    }
                })
            })
        });
    }
    g.finish();
}

const CALLERS: u64 = 64;

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
    let trivial = redis::Script::new("return 1");
    let sha = rt
        .block_on(trivial.prepare_invoke().load_async(&mut conn.clone()))
        .unwrap();

    let mut g = c.benchmark_group("ratelimit/redis-64-callers");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    // Each iteration is one call; 64 tasks share the iterations on one connection.
    let run =
        |iters: u64,
         op: Arc<dyn Fn(u64) -> futures::future::BoxFuture<'static, ()> + Send + Sync>| {
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
        };
    for (name, sd) in [("sd-check", &sd), ("sd-check-batched", &batched)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let sd = sd.clone();
                run(
                    iters,
                    Arc::new(move |i| {
                        let sd = sd.clone();
                        Box::pin(async move {
                            black_box(sd.check(&(i % KEYS).to_string()).await.unwrap());
                        })
                    }),
                )
            })
        });
    }
    g.bench_function("raw-set", |b| {
        b.iter_custom(|iters| {
            let conn = conn.clone();
            run(
                iters,
                Arc::new(move |i| {
                    let mut conn = conn.clone();
                    Box::pin(async move {
                        let () = redis::cmd("SET")
                            .arg(format!("bench:{}", i % KEYS))
                            .arg(i)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                    })
                }),
            )
        })
    });
    g.bench_function("raw-evalsha-return-1", |b| {
        b.iter_custom(|iters| {
            let (conn, sha) = (conn.clone(), sha.clone());
            run(
                iters,
                Arc::new(move |_| {
                    let (mut conn, sha) = (conn.clone(), sha.clone());
                    Box::pin(async move {
                        let one: i64 = redis::cmd("EVALSHA")
                            .arg(&sha)
                            .arg(0)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        black_box(one);
                    })
                }),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, memory, redis);
criterion_main!(benches);
