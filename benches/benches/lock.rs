//! sd-lock: acquire + release, uncontended and with 8 contending tasks, on Redis single
//! node and Redlock over 3 and 5 masters beside `rslock` on the same servers; memory,
//! PostgreSQL and etcd alone. `sd/*` runs on `ConnectionManager`s (what the docs
//! recommend), `sd-mux/*` on plain `MultiplexedConnection`s, the connection type rslock
//! uses inside: the same servers, TTL, retry delay cap and work per iteration.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sd_lock::{Lock, Release, RetryPolicy};
use tokio::runtime::Runtime;

const TTL: Duration = Duration::from_secs(10);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn retry() -> RetryPolicy {
    RetryPolicy::new(Duration::from_micros(100), Duration::from_millis(2)).unwrap()
}

async fn sd_cycle<L: Lock>(lock: &L, resource: &str) {
    let lease = lock
        .acquire(resource, TTL, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(lock.release(lease).await.unwrap(), Release::Released);
}

async fn rslock_cycle(lock: &rslock::LockManager, resource: &str) {
    let guard = lock.acquire(resource, TTL).await.unwrap();
    guard.release().await;
}

/// Mean time of one acquire + release with `tasks` tasks on one resource.
fn bench_sd<L: Lock + Clone + 'static>(c: &mut Criterion, rt: &Runtime, name: &str, lock: L) {
    let mut group = c.benchmark_group("lock");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for tasks in [1usize, 8] {
        group.bench_function(format!("{name}/tasks={tasks}"), |b| {
            b.iter_custom(|iters| {
                let lock = lock.clone();
                rt.block_on(async move {
                    let per = (iters as usize).div_ceil(tasks);
                    let start = Instant::now();
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let lock = lock.clone();
                            tokio::spawn(async move {
                                for _ in 0..per {
                                    sd_cycle(&lock, "bench").await;
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.await.unwrap();
                    }
                    start.elapsed().mul_f64(iters as f64 / (per * tasks) as f64)
                })
            });
        });
    }
    group.finish();
}

fn bench_rslock(c: &mut Criterion, rt: &Runtime, name: &str, lock: rslock::LockManager) {
    let lock = Arc::new(lock);
    let mut group = c.benchmark_group("lock");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for tasks in [1usize, 8] {
        group.bench_function(format!("{name}/tasks={tasks}"), |b| {
            b.iter_custom(|iters| {
                let lock = lock.clone();
                rt.block_on(async move {
                    let per = (iters as usize).div_ceil(tasks);
                    let start = Instant::now();
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let lock = lock.clone();
                            tokio::spawn(async move {
                                for _ in 0..per {
                                    rslock_cycle(&lock, "bench-rslock").await;
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.await.unwrap();
                    }
                    start.elapsed().mul_f64(iters as f64 / (per * tasks) as f64)
                })
            });
        });
    }
    group.finish();
}

async fn managers(urls: &[String]) -> Vec<(String, redis::aio::ConnectionManager)> {
    let mut out = Vec::new();
    for url in urls {
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        out.push((url.clone(), conn));
    }
    out
}

/// Plain multiplexed connections: the connection type rslock uses inside.
async fn multiplexed(urls: &[String]) -> Vec<(String, redis::aio::MultiplexedConnection)> {
    let mut out = Vec::new();
    for url in urls {
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        out.push((url.clone(), conn));
    }
    out
}

fn locks(c: &mut Criterion) {
    let servers = sd_testkit::RedisServer::start_many(5).expect("redis-server");
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let db = sd_testkit::database().expect("postgres");
    let etcd = sd_testkit::etcd().expect("etcd");
    let rt = runtime();

    bench_sd(
        c,
        &rt,
        "sd/memory",
        sd_lock::memory::MemoryLock::new().with_retry(retry()),
    );

    let single = rt.block_on(managers(&urls[..1])).remove(0).1;
    let redis = sd_lock::redis::RedisLock::new(single).with_retry(retry());
    bench_sd(c, &rt, "sd/redis", redis);
    let single = rt.block_on(multiplexed(&urls[..1])).remove(0).1;
    let redis = sd_lock::redis::RedisLock::new(single).with_retry(retry());
    bench_sd(c, &rt, "sd-mux/redis", redis);
    let mut peer = rslock::LockManager::new(urls[..1].to_vec());
    peer.set_retry(u32::MAX, Duration::from_millis(2));
    bench_rslock(c, &rt, "rslock/redis", peer);

    for n in [3usize, 5] {
        let masters = rt.block_on(managers(&urls[..n]));
        let redlock = sd_lock::redlock::Redlock::new(masters)
            .unwrap()
            .with_retry(retry());
        bench_sd(c, &rt, &format!("sd/redlock{n}"), redlock);
        let masters = rt.block_on(multiplexed(&urls[..n]));
        let redlock = sd_lock::redlock::Redlock::new(masters)
            .unwrap()
            .with_retry(retry());
        bench_sd(c, &rt, &format!("sd-mux/redlock{n}"), redlock);
        let mut peer = rslock::LockManager::new(urls[..n].to_vec());
        peer.set_retry(u32::MAX, Duration::from_millis(2));
        bench_rslock(c, &rt, &format!("rslock/redlock{n}"), peer);
    }

    let pg = rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(db.url())
            .await
            .unwrap();
        let lock = sd_lock::postgres::PostgresLock::new(pool).with_retry(retry());
        lock.migrate().await.unwrap();
        lock
    });
    bench_sd(c, &rt, "sd/postgres", pg);

    let etcd = rt.block_on(async {
        let client = etcd_client::Client::connect([etcd.url()], None)
            .await
            .unwrap();
        sd_lock::etcd::EtcdLock::new(client).with_retry(retry())
    });
    bench_sd(c, &rt, "sd/etcd", etcd);
    drop(servers);
}

criterion_group!(benches, locks);
criterion_main!(benches);
