//! Keys spread over three Redis servers through the ring; a fourth joins, and the move
//! plan migrates only the keys that change owner.
//!
//! Start four servers yourself (this example starts none), then:
//!
//! ```text
//! cargo run -p sd-examples --features redis --example shard_redis -- \
//!     --redis redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003,redis://127.0.0.1:7004 \
//!     --keys 10000
//! ```
//!
//! It only touches keys under `--prefix` (default `sd-example:shard:`), and clears them
//! on start so that it can run again.

use std::collections::BTreeMap;
use std::error::Error;

use redis::aio::MultiplexedConnection;
use sd_hashring::{Change, HashRing, MovePlan, Node, SharedRing};

const NAMES: [&str; 4] = ["shard-a", "shard-b", "shard-c", "shard-d"];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let (urls, keys, prefix) = parse_args()?;
    let mut shards: BTreeMap<&str, MultiplexedConnection> = BTreeMap::new();
    for (name, url) in NAMES.iter().zip(&urls) {
        let client = redis::Client::open(url.as_str())?;
        let mut con = client.get_multiplexed_async_connection().await?;
        for key in scan(&mut con, &prefix).await? {
            redis::cmd("DEL")
                .arg(&key)
                .query_async::<()>(&mut con)
                .await?;
        }
        shards.insert(name, con);
    }

    // Three shards, named (not addressed) so a shard can move host without moving keys.
    let ring = SharedRing::new(HashRing::new(NAMES[..3].iter().map(|n| Node::new(*n)))?);
    for i in 0..keys {
        let key = format!("{prefix}user:{i}");
        let owner = ring.node_id(&key).ok_or("the ring is empty")?;
        let con = shards
            .get_mut(owner.as_str())
            .ok_or("no connection for shard")?;
        redis::cmd("SET")
            .arg(&key)
            .arg(i)
            .query_async::<()>(con)
            .await?;
    }
    println!(
        "wrote {keys} keys over 3 shards: {}",
        counts(&mut shards, &prefix).await?
    );

    // The fourth shard joins: one rebuild, one swap, and the plan of what moves.
    let swap = ring.update([Change::add(Node::new(NAMES[3]))])?;
    let plan = swap.plan()?;
    println!(
        "shard-d joined: {} hash ranges change owner, {:.1}% of hash space (ideal 25%)",
        plan.moves().len(),
        plan.moved_fraction() * 100.0
    );

    let moved = migrate(&plan, &mut shards, &prefix).await?;
    println!(
        "migrated {moved} of {keys} keys ({:.1}%); no other key was touched",
        moved as f64 * 100.0 / keys as f64
    );
    println!("after: {}", counts(&mut shards, &prefix).await?);

    // Every key is now where the new ring says, with its value.
    let snapshot = ring.snapshot();
    for i in 0..keys {
        let key = format!("{prefix}user:{i}");
        let owner = snapshot.node(&key).ok_or("the ring is empty")?.id().clone();
        let con = shards
            .get_mut(owner.as_str())
            .ok_or("no connection for shard")?;
        let value: Option<u64> = redis::cmd("GET").arg(&key).query_async(con).await?;
        if value != Some(i) {
            return Err(format!("{key} is not on {owner} after the migration").into());
        }
    }
    println!("verified: all {keys} keys read back from their new owners");
    Ok(())
}

/// Moves the keys of each shard whose position lies in a moving range: DUMP on the old
/// owner, RESTORE on the new one (TTL kept), then DEL. Keys outside the plan stay put.
async fn migrate(
    plan: &MovePlan,
    shards: &mut BTreeMap<&str, MultiplexedConnection>,
    prefix: &str,
) -> Result<usize, Box<dyn Error>> {
    let mut moved = 0;
    let sources: Vec<&str> = shards.keys().copied().collect();
    for from in sources {
        if plan.moves_from(from).next().is_none() {
            continue;
        }
        let mut src = shards.get(from).ok_or("no connection")?.clone();
        for key in scan(&mut src, prefix).await? {
            let Some(step) = plan.destination(&key) else {
                continue;
            };
            let mut dst = shards.get(step.to.as_str()).ok_or("no connection")?.clone();
            let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(&key).query_async(&mut src).await?;
            let Some(dump) = dump else { continue };
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut src).await?;
            redis::cmd("RESTORE")
                .arg(&key)
                .arg(ttl.max(0))
                .arg(dump)
                .arg("REPLACE")
                .query_async::<()>(&mut dst)
                .await?;
            redis::cmd("DEL")
                .arg(&key)
                .query_async::<()>(&mut src)
                .await?;
            moved += 1;
        }
    }
    Ok(moved)
}

async fn scan(
    con: &mut MultiplexedConnection,
    prefix: &str,
) -> Result<Vec<String>, Box<dyn Error>> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

async fn counts(
    shards: &mut BTreeMap<&str, MultiplexedConnection>,
    prefix: &str,
) -> Result<String, Box<dyn Error>> {
    let mut out = Vec::new();
    for (name, con) in shards.iter_mut() {
        out.push(format!("{name} {}", scan(con, prefix).await?.len()));
    }
    Ok(out.join(", "))
}

/// The flags.
#[derive(Debug, clap::Parser)]
#[command(name = "shard_redis")]
struct Cli {
    /// Four Redis URLs, comma-separated; the fourth joins later.
    #[arg(
        long,
        value_name = "URL1,URL2,URL3,URL4",
        value_delimiter = ',',
        num_args = 4,
        required = true
    )]
    redis: Vec<String>,
    /// How many keys to write.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// The key prefix.
    #[arg(long, default_value = "sd-example:shard:")]
    prefix: String,
}

fn parse_args() -> Result<(Vec<String>, u64, String), Box<dyn Error>> {
    let cli = <Cli as clap::Parser>::parse();
    if cli.redis.len() != 4 {
        return Err(
            "give four Redis URLs: --redis URL1,URL2,URL3,URL4 (the fourth joins later)".into(),
        );
    }
    Ok((cli.redis, cli.keys, cli.prefix))
}
