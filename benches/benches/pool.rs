//! sd-pool beside `tokio::spawn` + `Semaphore` and `futures` `buffer_unordered`.
//!
//! - `pool/overhead`: 100,000 tiny jobs, at most 64 at once (per-job overhead).
//! - `pool/parallel_consumer`: Confluent Parallel Consumer's experiment (jobs of 0-5 ms
//!   random work, concurrency 100): unordered, per key with 1/10/20/100/1000 keys, and
//!   serial, with real sleeps. Scaled to 1,000 jobs (PC used 10,000) so the serial runs
//!   stay at a few seconds; compare the ratios, not the absolute times.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use sd_pool::{Job, Order, Pool};
use tokio::sync::Semaphore;

const TINY_JOBS: u64 = 100_000;
const TINY_CONCURRENCY: usize = 64;
const PC_JOBS: usize = 1_000;
const PC_CONCURRENCY: usize = 100;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn sd_pool_tiny() {
    let pool = Pool::new(TINY_CONCURRENCY, 1024).expect("pool");
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
    let pool = Pool::builder(PC_CONCURRENCY, 1024)
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

fn parallel_consumer(c: &mut Criterion) {
    let rt = runtime();
    let jobs = pc_jobs();
    let mut g = c.benchmark_group("pool/parallel_consumer");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(100));
    g.bench_function("spawn_semaphore_unordered", |b| {
        b.iter(|| rt.block_on(semaphore_pc(&jobs)))
    });
    g.bench_function("sd_pool_unordered", |b| {
        b.iter(|| rt.block_on(sd_pool_pc(Order::Unordered, 1, &jobs)))
    });
    for keys in [1000, 100, 20, 10, 1] {
        g.bench_function(format!("sd_pool_per_key_{keys}"), |b| {
            b.iter(|| rt.block_on(sd_pool_pc(Order::PerKey, keys, &jobs)))
        });
    }
    g.bench_function("sd_pool_serial", |b| {
        b.iter(|| rt.block_on(sd_pool_pc(Order::Serial, 1, &jobs)))
    });
    g.finish();
}

criterion_group!(benches, overhead, parallel_consumer);
criterion_main!(benches);
