//! sd-pool beside `tokio::spawn` + `Semaphore` and `futures` `buffer_unordered`.
//!
//! - `pool/overhead`: 100,000 tiny jobs, at most 64 at once (per-job overhead).
//! - `pool/parallel_consumer`: Confluent Parallel Consumer's experiment, as PC ran it:
//!   10,000 jobs of 0-5 ms random work (real sleeps), concurrency 100; unordered (sd and
//!   spawn + `Semaphore`) and per key with 1000/100/20/10 keys, the 1000/100/20 cases
//!   beside `ideal_per_key`: one task per key running that key's jobs in order (the
//!   partition is known up front), each job under a `Semaphore(100)` permit. That is the
//!   best schedule per-key order allows, without a queue bound or a streaming producer.
//! - `pool/parallel_consumer_1k`: per key with 1 key and serial, on the first 1,000 of
//!   those jobs. Not 10,000: one key runs every job back to back, ~28 s an iteration at
//!   10,000, and criterion takes at least 10 iterations, so the two cases alone would
//!   take ~10 minutes. Multiply by 10 to compare.
//!
//! Per key cannot beat its arithmetic floor: with k keys at most min(k, 100) jobs run at
//! once, and the busiest key runs its jobs back to back. The bench prints, for each
//! case, that floor (the busiest key's total work) beside the unordered floor (total
//! work / 100). With 20 keys the busiest key holds ~1250 ms of serial work against
//! ~250 ms for unordered, so per key over 20 keys is ~5× unordered by arithmetic, not
//! 1.2×; compare it with `ideal_per_key` instead. tokio's timer fires on millisecond
//! ticks, so each job of a key's serial chain costs ~1 ms more than its sleep, and
//! measured times sit above these floors by about that much a job.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use sd_pool::{Job, Order, Pool};
use tokio::sync::Semaphore;

const TINY_JOBS: u64 = 100_000;
const TINY_CONCURRENCY: usize = 64;
const PC_JOBS: usize = 10_000;
const PC_JOBS_SERIAL: usize = 1_000;
const PC_CONCURRENCY: usize = 100;

fn runtime() -> tokio::runtime::Runtime {
    sd_testkit::runtime()
}

async fn sd_pool_tiny() {
    let pool = Pool::builder()
        .workers(TINY_CONCURRENCY)
        .queue(1024)
        .build()
        .expect("pool");
    for i in 0..TINY_JOBS {
        let _ = pool
            .submit(async move {
                black_box(i);
            })
            .await;
    }
    black_box(pool.drain(Duration::from_secs(60)).await);
}

async fn semaphore_tiny() {
    let sem = Arc::new(Semaphore::new(TINY_CONCURRENCY));
    for i in 0..TINY_JOBS {
        let permit = Arc::clone(&sem)
            .acquire_owned()
            .await
            .expect("open semaphore");
        tokio::spawn(async move {
            black_box(i);
            drop(permit);
        });
    }
    let all = u32::try_from(TINY_CONCURRENCY).expect("small");
    drop(black_box(
        sem.acquire_many(all).await.expect("open semaphore"),
    ));
}

async fn buffer_unordered_tiny() {
    futures::stream::iter(0..TINY_JOBS)
        .map(|i| async move { black_box(i) })
        .buffer_unordered(TINY_CONCURRENCY)
        .for_each(|_| async {})
        .await;
}

fn overhead(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("pool/overhead");
    g.sample_size(10);
    g.bench_function("sd_pool", |b| b.iter(|| rt.block_on(sd_pool_tiny())));
    g.bench_function("spawn_semaphore", |b| {
        b.iter(|| rt.block_on(semaphore_tiny()))
    });
    g.bench_function("buffer_unordered", |b| {
        b.iter(|| rt.block_on(buffer_unordered_tiny()))
    });
    g.finish();
}

/// The same random work for every run: (key index, work in microseconds, 0-5 ms).
fn pc_jobs() -> Vec<(usize, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..PC_JOBS)
        .map(|i| (i, rng.random_range(0..=5_000u64)))
        .collect()
}

async fn sd_pool_pc(order: Order, keys: usize, jobs: &[(usize, u64)]) {
    let pool = Pool::builder()
        .workers(PC_CONCURRENCY)
        .queue(1024)
        .order(order)
        .build()
        .expect("pool");
    for &(i, us) in jobs {
        let job = Job::new(async move { tokio::time::sleep(Duration::from_micros(us)).await })
            .with_key(&(i % keys));
        let _ = pool.submit(job).await;
    }
    black_box(pool.drain(Duration::from_secs(600)).await);
}

async fn semaphore_pc(jobs: &[(usize, u64)]) {
    let sem = Arc::new(Semaphore::new(PC_CONCURRENCY));
    for &(_, us) in jobs {
        let permit = Arc::clone(&sem)
            .acquire_owned()
            .await
            .expect("open semaphore");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(us)).await;
            drop(permit);
        });
    }
    let all = u32::try_from(PC_CONCURRENCY).expect("small");
    drop(black_box(
        sem.acquire_many(all).await.expect("open semaphore"),
    ));
}

/// The ideal per-key schedule: the jobs split by key up front, one task per key running
/// its jobs in order, each job holding one of `PC_CONCURRENCY` permits while it runs.
async fn ideal_per_key_pc(keys: usize, jobs: &[(usize, u64)]) {
    let mut by_key = vec![Vec::new(); keys];
    for &(i, us) in jobs {
        by_key[i % keys].push(us);
    }
    let sem = Arc::new(Semaphore::new(PC_CONCURRENCY));
    let tasks: Vec<_> = by_key
        .into_iter()
        .map(|work| {
            let sem = Arc::clone(&sem);
            tokio::spawn(async move {
                for us in work {
                    let permit = sem.acquire().await.expect("open semaphore");
                    tokio::time::sleep(Duration::from_micros(us)).await;
                    drop(permit);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("ideal per-key task");
    }
}

/// Prints the floor no scheduler can beat: total work / concurrency for unordered, the
/// busiest key's total work (or that, if higher) for per key.
fn print_floor(jobs: &[(usize, u64)], keys: usize) {
    let mut per_key = vec![0u64; keys];
    for &(i, us) in jobs {
        per_key[i % keys] += us;
    }
    let total: u64 = per_key.iter().sum();
    let unordered = total / PC_CONCURRENCY as u64;
    let busiest = per_key.iter().copied().max().unwrap_or(0);
    eprintln!(
        "floor, {} jobs, {keys} keys: {:.0} ms (unordered floor {:.0} ms, {} jobs at once at most)",
        jobs.len(),
        busiest.max(unordered) as f64 / 1e3,
        unordered as f64 / 1e3,
        keys.min(PC_CONCURRENCY),
    );
}

/// A group of the parallel-consumer runs: 10 flat samples, 100 ms of warm-up, 1 s of
/// measurement.
fn consumer_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(100));
    g.measurement_time(Duration::from_secs(1));
    g
}

fn parallel_consumer(c: &mut Criterion) {
    let rt = runtime();
    let jobs = pc_jobs();
    for keys in [1000, 100, 20, 10] {
        print_floor(&jobs, keys);
    }
    print_floor(&jobs[..PC_JOBS_SERIAL], 1);
    let mut g = consumer_group(c, "pool/parallel_consumer");
    g.bench_function("spawn_semaphore_unordered", |b| {
        b.iter(|| rt.block_on(semaphore_pc(&jobs)))
    });
    g.bench_function("sd_pool_unordered", |b| {
        b.iter(|| rt.block_on(sd_pool_pc(Order::Unordered, 1, &jobs)))
    });
    for keys in [1000, 100, 20, 10] {
        g.bench_function(format!("sd_pool_per_key_{keys}"), |b| {
            b.iter(|| rt.block_on(sd_pool_pc(Order::PerKey, keys, &jobs)))
        });
        if keys >= 20 {
            g.bench_function(format!("ideal_per_key_{keys}"), |b| {
                b.iter(|| rt.block_on(ideal_per_key_pc(keys, &jobs)))
            });
        }
    }
    g.finish();

    let jobs = &jobs[..PC_JOBS_SERIAL];
    let mut g = consumer_group(c, "pool/parallel_consumer_1k");
    g.bench_function("sd_pool_per_key_1", |b| {
        b.iter(|| rt.block_on(sd_pool_pc(Order::PerKey, 1, jobs)))
    });
    g.bench_function("sd_pool_serial", |b| {
        b.iter(|| rt.block_on(sd_pool_pc(Order::Serial, 1, jobs)))
    });
    g.finish();
}

criterion_group!(benches, overhead, parallel_consumer);
criterion_main!(benches);
