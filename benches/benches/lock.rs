//! sd-lock: acquire + release, uncontended and with 8 contending tasks, on Redis single
//! node and Redlock over 3 and 5 masters beside `rslock` on the same servers; memory,
//! PostgreSQL and etcd alone. `sd/*` runs on `ConnectionManager`s (what the docs
//! recommend), `sd-mux/*` on plain `MultiplexedConnection`s, the connection type rslock
//! uses inside: the same servers, TTL, longest retry wait and work per iteration.
//!
//! On loopback a "round trip" is mostly the system calls and wake-ups of one request on
//! one connection, so talking to N masters costs about N times one (even answered in
//! parallel), which hides what parallel fan-out buys. The `rtt500us/*` benches put a
//! proxy that delays every byte by 250 µs each way in front of each master, as a network
//! between hosts in one region would: there one round trip dominates, as it does in
//! production, and the fan-out shows.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sd_lock::{Lock, Release, RetryPolicy};
use tokio::runtime::Runtime;

const TTL: Duration = Duration::from_secs(10);

fn runtime() -> Runtime {
    sd_testkit::runtime()
}

/// Contended cycles wait between attempts, so both sides get the same longest wait:
/// rslock sleeps a whole number of milliseconds drawn below its delay (2 ms gives 0 or
/// 1 ms, mean 0.5 ms), sd's backoff with full jitter from 100 µs grows to at most 1 ms
/// (mean 0.5 ms once grown).
fn retry() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_micros(100))
        .max_interval(Duration::from_millis(1))
        .jitter(1.0)
        .unlimited_attempts()
        .build()
        .unwrap()
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
fn bench_sd<L: Lock + Send + Sync + 'static>(c: &mut Criterion, rt: &Runtime, name: &str, lock: L) {
    bench_cycles(c, rt, name, lock, |lock| async move {
        sd_cycle(&*lock, "bench").await;
    });
}

fn bench_rslock(c: &mut Criterion, rt: &Runtime, name: &str, lock: rslock::LockManager) {
    bench_cycles(c, rt, name, lock, |lock| async move {
        rslock_cycle(&lock, "bench-rslock").await;
    });
}

/// Uncontended cycles of sd and rslock in alternating blocks of 20, 100 rounds, as
/// medians of the per-cycle block means: both sides see the same machine load, which
/// criterion's runs minutes apart do not (on a two-core VM they swing by a third). Each
/// round swaps which side runs first, so neither always follows the other's warm-up.
///
/// The medians go to stderr and, in criterion's file layout, to
/// `<criterion dir>/lock_paired/<name>/{sd,rslock}/new/`, as `lock/paired/<name>/sd` and
/// `lock/paired/<name>/rslock`: `scripts/bench.sh`'s `results` step reads them from
/// there with criterion's own figures and writes the pair to `benches/RESULTS.md`.
fn paired<L: Lock + Clone + Send + Sync + 'static>(
    rt: &Runtime,
    name: &str,
    sd: &L,
    peer: &rslock::LockManager,
) {
    let (sd, peer) = (sd.clone(), peer.clone());
    // On a worker thread, as the criterion cycles run (`block_on` polls on this thread,
    // and every reply would then cross threads to wake it).
    let (mut ours, mut theirs) = rt
        .block_on(rt.spawn(async move {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 0..100 {
                if round % 2 == 1 {
                    theirs.push(rslock_block(&peer).await);
                }
                let start = Instant::now();
                for _ in 0..20 {
                    sd_cycle(&sd, "paired").await;
                }
                ours.push(start.elapsed() / 20);
                if round % 2 == 0 {
                    theirs.push(rslock_block(&peer).await);
                }
            }
            (ours, theirs)
        }))
        .unwrap();
    ours.sort();
    theirs.sort();
    let (ours, theirs) = (ours[ours.len() / 2], theirs[theirs.len() / 2]);
    eprintln!(
        "lock/paired/{name}: medians over 100 rounds of 20 + 20 uncontended cycles: \
         sd {ours:?}, rslock {theirs:?}, {:.2}x",
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
    write_estimate(&format!("{name}/sd"), ours);
    write_estimate(&format!("{name}/rslock"), theirs);
}

/// One block of 20 rslock cycles: the mean time of one.
async fn rslock_block(peer: &rslock::LockManager) -> Duration {
    let start = Instant::now();
    for _ in 0..20 {
        rslock_cycle(peer, "paired-rslock").await;
    }
    start.elapsed() / 20
}

/// Where criterion writes: `$CRITERION_HOME`, else `criterion` in the cargo target
/// directory (`$CARGO_TARGET_DIR`, else the workspace's `target`).
fn criterion_dir() -> std::path::PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
            std::path::PathBuf::from,
        )
        .join("criterion")
}

/// Writes `median` as criterion would for the bench `lock/paired/<id>` (the two files
/// and the two fields `results` reads).
fn write_estimate(id: &str, median: Duration) {
    let dir = criterion_dir()
        .join("lock_paired")
        .join(id.replace('/', std::path::MAIN_SEPARATOR_STR))
        .join("new");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| {
            std::fs::write(
                dir.join("benchmark.json"),
                format!(r#"{{"full_id":"lock/paired/{id}"}}"#),
            )
        })
        .and_then(|()| {
            std::fs::write(
                dir.join("estimates.json"),
                format!(
                    r#"{{"median":{{"point_estimate":{}}}}}"#,
                    median.as_secs_f64() * 1e9
                ),
            )
        });
    if let Err(e) = written {
        eprintln!("lock/paired/{id}: not written to {}: {e}", dir.display());
    }
}

/// Runs `cycle` (one acquire + release) from 1 and from 8 tasks at once on one shared
/// `lock` (an `Arc` clone per cycle, the same for every lock measured), and reports the
/// mean time of one cycle.
fn bench_cycles<T, F, Fut>(c: &mut Criterion, rt: &Runtime, name: &str, lock: T, cycle: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut group = c.benchmark_group("lock");
    let lock = Arc::new(lock);
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
                                    cycle(lock.clone()).await;
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

/// A TCP proxy in front of `upstream` that delivers every chunk `one_way` after it
/// arrived, in both directions (plain threads, so the bench's runtime is not involved).
fn delay_proxy(upstream: SocketAddr, one_way: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(upstream) else {
                return;
            };
            for stream in [&client, &server] {
                stream.set_nodelay(true).unwrap();
            }
            pump(
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                one_way,
            );
            pump(server, client, one_way);
        }
    });
    addr
}

/// Copies `from` to `to`, each chunk held until `one_way` after it was read.
fn pump(mut from: TcpStream, mut to: TcpStream, one_way: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if tx
                .send((Instant::now() + one_way, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    });
    thread::spawn(move || {
        for (due, bytes) in rx {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                return;
            }
        }
    });
}

/// A connection to each of `urls`, named by its URL, opened by `connect`.
async fn connections<C, Fut>(
    urls: &[String],
    connect: impl Fn(redis::Client) -> Fut,
) -> Vec<(String, C)>
where
    Fut: Future<Output = redis::RedisResult<C>>,
{
    let mut out = Vec::new();
    for url in urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        out.push((url.clone(), connect(client).await.unwrap()));
    }
    out
}

/// `ConnectionManager`s: what the docs recommend.
async fn managers(urls: &[String]) -> Vec<(String, redis::aio::ConnectionManager)> {
    connections(urls, |client| async move {
        client.get_connection_manager().await
    })
    .await
}

/// Plain multiplexed connections: the connection type rslock uses inside.
async fn multiplexed(urls: &[String]) -> Vec<(String, redis::aio::MultiplexedConnection)> {
    connections(urls, |client| async move {
        client.get_multiplexed_async_connection().await
    })
    .await
}

/// sd's Redlock over `masters` with the benches' retry policy.
fn sd_redlock<C>(masters: Vec<(String, C)>) -> sd_lock::redlock::Redlock<C>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    sd_lock::redlock::Redlock::new(masters)
        .unwrap()
        .with_retry(retry())
}

/// rslock over `urls`, retrying as the contended cycles need (see [`retry`]).
fn rslock_peer(urls: &[String]) -> rslock::LockManager {
    let mut peer = rslock::LockManager::new(urls.to_vec());
    peer.set_retry(u32::MAX, Duration::from_millis(2));
    peer
}

/// The Redis rows over `urls` (the first one, then Redlock over the first 3 and 5), each
/// named under `prefix`: sd on `ConnectionManager`s paired with rslock, sd on plain
/// multiplexed connections (for the single node only when `mux_single`), then rslock.
fn redis_rows(c: &mut Criterion, rt: &Runtime, prefix: &str, urls: &[String], mux_single: bool) {
    let single = rt.block_on(managers(&urls[..1])).remove(0).1;
    let redis = sd_lock::redis::RedisLock::new(single).with_retry(retry());
    paired(
        rt,
        &format!("{prefix}redis"),
        &redis,
        &rslock::LockManager::new(urls[..1].to_vec()),
    );
    bench_sd(c, rt, &format!("{prefix}sd/redis"), redis);
    if mux_single {
        let single = rt.block_on(multiplexed(&urls[..1])).remove(0).1;
        let redis = sd_lock::redis::RedisLock::new(single).with_retry(retry());
        bench_sd(c, rt, &format!("{prefix}sd-mux/redis"), redis);
    }
    bench_rslock(
        c,
        rt,
        &format!("{prefix}rslock/redis"),
        rslock_peer(&urls[..1]),
    );
    for n in [3usize, 5] {
        let redlock = sd_redlock(rt.block_on(managers(&urls[..n])));
        paired(
            rt,
            &format!("{prefix}redlock{n}"),
            &redlock,
            &rslock::LockManager::new(urls[..n].to_vec()),
        );
        bench_sd(c, rt, &format!("{prefix}sd/redlock{n}"), redlock);
        let redlock = sd_redlock(rt.block_on(multiplexed(&urls[..n])));
        bench_sd(c, rt, &format!("{prefix}sd-mux/redlock{n}"), redlock);
        bench_rslock(
            c,
            rt,
            &format!("{prefix}rslock/redlock{n}"),
            rslock_peer(&urls[..n]),
        );
    }
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

    redis_rows(c, &rt, "", &urls, true);
    // A network between hosts: 250 µs each way in front of every master.
    let far: Vec<String> = servers
        .iter()
        .map(|s| {
            let upstream: SocketAddr = format!("127.0.0.1:{}", s.port()).parse().unwrap();
            format!(
                "redis://{}",
                delay_proxy(upstream, Duration::from_micros(250))
            )
        })
        .collect();
    redis_rows(c, &rt, "rtt500us/", &far, false);

    // Redlock over three logical databases of ONE server: the same client fan-out and
    // quorum work as `sd/redlock3`, but one server process answers all three requests in
    // one wake-up. Beside `sd/redis` it shows what the fan-out itself costs, apart from
    // scheduling three server processes on this machine's cores.
    let one_server: Vec<String> = (0..3).map(|db| format!("{}/{db}", urls[0])).collect();
    let masters = rt.block_on(managers(&one_server));
    bench_sd(c, &rt, "sd/redlock3-one-server", sd_redlock(masters));

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
