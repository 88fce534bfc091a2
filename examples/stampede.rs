//! A hot key behind a slow loader (50 ms) expires while 1,000 tasks read it: loader calls
//! and read latency for naive cache-aside and for sd-cache, on memory and, with
//! `--redis URL`, across 4 independent clients of one Redis (the Redis tier, and the
//! two-tier cache: memory in front of that Redis).
//!
//! ```text
//! cargo run --release -p sd-examples --example stampede --features cache
//! cargo run --release -p sd-examples --example stampede --features cache -- --redis redis://127.0.0.1:6379
//! ```

#[path = "stampede/scenario.rs"]
mod scenario;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use scenario::{Outcome, Scenario, measure, row};
use sd_cache::{CacheBackend, RedisCache, TwoTier};

/// A boxed future, as a loader passed to `get_or_load` returns.
type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

type Error = Box<dyn std::error::Error>;

/// The flags.
#[derive(Debug, clap::Parser)]
#[command(name = "stampede")]
struct Args {
    /// Also run the Redis tier and the two-tier cache on this server.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
}

fn main() -> Result<(), Error> {
    let redis_url = <Args as clap::Parser>::parse().redis;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let s = Scenario::default();
        println!(
            "{} readers, loader {:?}, ttl {:?}, reading for {:?}\n",
            s.readers, s.load_time, s.ttl, s.run_for
        );
        println!("memory");
        row(
            "  naive cache-aside (moka)",
            &scenario::naive_memory(s).await,
        );
        row("  sd-cache", &scenario::sd_memory(s).await);
        if let Some(url) = redis_url {
            println!("\nredis at {url}, 4 clients");
            row(
                "  naive cache-aside (GET/SET)",
                &naive_redis(&url, s).await?,
            );
            row("  sd-cache", &sd_redis(&url, s).await?);
            row("  sd-cache two-tier", &sd_two_tier(&url, s).await?);
        }
        Ok(())
    })
}

async fn connections(url: &str, n: usize) -> Result<Vec<ConnectionManager>, Error> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(redis::Client::open(url)?.get_connection_manager().await?);
    }
    Ok(out)
}

fn prefix() -> String {
    format!("stampede-{}", std::process::id())
}

async fn slow_load(calls: &AtomicUsize, took: Duration) -> u64 {
    calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(took).await;
    7
}

async fn naive_redis(url: &str, s: Scenario) -> Result<Outcome, Error> {
    let conns = Arc::new(connections(url, 4).await?);
    let key = format!("{}:naive", prefix());
    let calls = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let ttl_ms = s.ttl.as_millis() as u64;
    let read = {
        let (conns, calls, key) = (conns.clone(), calls.clone(), key.clone());
        move || {
            let mut conn = conns[next.fetch_add(1, Ordering::Relaxed) % 4].clone();
            let (calls, key) = (calls.clone(), key.clone());
            async move {
                let hit: Option<u64> = conn.get(&key).await.unwrap_or(None);
                if hit.is_none() {
                    let v = slow_load(&calls, s.load_time).await;
                    let _: redis::RedisResult<()> = conn.pset_ex(&key, v, ttl_ms).await;
                }
            }
        }
    };
    let outcome = measure(s, &calls, read).await;
    let _: redis::RedisResult<()> = conns[0].clone().del(&key).await;
    Ok(outcome)
}

async fn sd_redis(url: &str, s: Scenario) -> Result<Outcome, Error> {
    let mut clients = Vec::new();
    for conn in connections(url, 4).await? {
        let cache: RedisCache<u64, _> = RedisCache::builder(prefix())
            .ttl(s.ttl)
            .notifications(redis::Client::open(url)?)
            .build(conn)
            .await?;
        clients.push(cache);
    }
    Ok(
        in_turn(s, clients, |cache: RedisCache<u64, _>, load| async move {
            let _ = cache.get_or_load("hot", load).await;
        })
        .await,
    )
}

async fn sd_two_tier(url: &str, s: Scenario) -> Result<Outcome, Error> {
    let prefix = format!("{}-two-tier", prefix());
    let mut clients = Vec::new();
    for conn in connections(url, 4).await? {
        let cache: TwoTier<u64, _> =
            TwoTier::builder(RedisCache::builder(prefix.as_str()).ttl(s.ttl))
                .local_ttl(s.ttl)
                .build(conn, redis::Client::open(url)?)
                .await?;
        while !cache.is_serving_local() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        clients.push(cache);
    }
    Ok(
        in_turn(s, clients, |cache: TwoTier<u64, _>, load| async move {
            let _ = cache.get_or_load("hot", load).await;
        })
        .await,
    )
}

/// Measures reads of "hot" through the four `clients` in turn, `get_or_load` being a
/// client's `get_or_load("hot", load)`, each load a counted `slow_load`; then
/// invalidates "hot" through the first client.
async fn in_turn<C, G, Fut>(s: Scenario, clients: Vec<C>, get_or_load: G) -> Outcome
where
    C: CacheBackend<u64>,
    G: Fn(C, Box<dyn FnOnce() -> BoxFuture<u64> + Send>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let clients = Arc::new(clients);
    let calls = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let read = {
        let (clients, calls) = (clients.clone(), calls.clone());
        move || {
            let cache = clients[next.fetch_add(1, Ordering::Relaxed) % 4].clone();
            let calls = calls.clone();
            get_or_load(
                cache,
                Box::new(move || Box::pin(async move { slow_load(&calls, s.load_time).await })),
            )
        }
    };
    let outcome = measure(s, &calls, read).await;
    let _ = clients[0].invalidate("hot").await;
    outcome
}
