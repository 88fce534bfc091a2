//! The transactional outbox end to end: orders and their events are written in one
//! transaction, relays publish the events to Redis Streams or NATS JetStream, and the
//! program checks that every event arrived, in order per order.
//!
//! `cargo run -p sd-examples --example outbox_relay --features outbox -- \
//!    --postgres postgres://postgres@127.0.0.1:5432/postgres \
//!    --redis redis://127.0.0.1:6379 --relays 3 --mode parallel`
//!
//! (or `--nats nats://127.0.0.1:4222` instead of `--redis`; `--orders N`, default 2,000).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sd_outbox::nats::JetStreamPublisher;
use sd_outbox::postgres::{Mode, Outbox, Relay, RelayHandle};
use sd_outbox::redis::RedisStreamsPublisher;
use sd_outbox::{Message, Publisher};

enum Sink {
    Redis(String),
    Nats(String),
}

struct Args {
    postgres: String,
    sink: Sink,
    relays: usize,
    mode: Mode,
    orders: u64,
}

/// The flags.
#[derive(Debug, clap::Parser)]
#[command(name = "outbox_relay")]
struct Cli {
    /// The PostgreSQL database holding the orders and their outbox.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres: String,
    /// Publish to Redis Streams on this server.
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "nats",
        conflicts_with = "nats"
    )]
    redis: Option<String>,
    /// Publish to NATS JetStream on this server.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// How many relays run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    relays: u64,
    /// ordered or parallel.
    #[arg(long, default_value = "parallel", value_parser = ["ordered", "parallel"])]
    mode: String,
    /// How many orders to write.
    #[arg(long, default_value_t = 2_000)]
    orders: u64,
}

fn args() -> Result<Args, String> {
    let cli = <Cli as clap::Parser>::parse();
    let sink = match (cli.redis, cli.nats) {
        (Some(url), _) => Sink::Redis(url),
        (None, Some(url)) => Sink::Nats(url),
        (None, None) => return Err("name a broker with --redis URL or --nats URL".into()),
    };
    Ok(Args {
        postgres: cli.postgres,
        sink,
        relays: usize::try_from(cli.relays).unwrap_or(1),
        mode: if cli.mode == "ordered" {
            Mode::Ordered
        } else {
            Mode::Parallel
        },
        orders: cli.orders,
    })
}

fn spawn<P: Publisher + Clone>(outbox: &Outbox, publisher: &P, args: &Args) -> Vec<RelayHandle> {
    (0..args.relays)
        .map(|_| {
            Relay::builder(outbox.clone(), publisher.clone())
                .mode(args.mode)
                .build()
                .expect("valid relay options")
                .spawn()
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(20)
        .connect(&args.postgres)
        .await?;
    let outbox = Outbox::builder()
        .table("example_outbox")
        .build(pool.clone())?;
    outbox.migrate().await?;
    for sql in [
        "CREATE TABLE IF NOT EXISTS example_orders (id TEXT PRIMARY KEY, total_cents BIGINT NOT NULL)",
        "TRUNCATE example_orders, example_outbox",
    ] {
        sqlx::query(sql).execute(&pool).await?;
    }
    let run = std::process::id();

    // The relays, on the broker picked.
    let (relays, broker) = match &args.sink {
        Sink::Redis(url) => {
            let conn =
                redis::aio::ConnectionManager::new(redis::Client::open(url.as_str())?).await?;
            let publisher = RedisStreamsPublisher::builder(conn.clone())
                .prefix(format!("example-outbox-{run}"))
                .build()?;
            (
                spawn(&outbox, &publisher, &args),
                Broker::Redis(conn, publisher.stream("order")),
            )
        }
        Sink::Nats(url) => {
            let context = async_nats::jetstream::new(async_nats::connect(url.as_str()).await?);
            let publisher = JetStreamPublisher::builder(context.clone())
                .prefix(format!("example_{run}"))
                .build()?;
            let stream = format!("EXAMPLE_OUTBOX_{run}");
            publisher
                .ensure_stream(&stream, Duration::from_secs(120))
                .await?;
            (
                spawn(&outbox, &publisher, &args),
                Broker::Nats(Box::new(context), stream),
            )
        }
    };

    // The service: each order and its two events commit together (or not at all).
    let started = Instant::now();
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (outbox, pool) = (outbox.clone(), pool.clone());
            let orders = args.orders;
            tokio::spawn(async move {
                for i in (w..orders).step_by(4) {
                    let id = format!("order-{i}");
                    let mut tx = pool.begin().await?;
                    sqlx::query("INSERT INTO example_orders (id, total_cents) VALUES ($1, $2)")
                        .bind(&id)
                        .bind(1_000 + i as i64)
                        .execute(&mut *tx)
                        .await?;
                    let created =
                        serde_json::json!({ "order": id, "total_cents": 1_000 + i, "step": 0 });
                    outbox
                        .enqueue(
                            &mut tx,
                            Message::json("order", &id, "order_created", created),
                        )
                        .await?;
                    let paid = serde_json::json!({ "order": id, "step": 1 });
                    outbox
                        .enqueue(&mut tx, Message::json("order", &id, "order_paid", paid))
                        .await?;
                    if i % 10 == 9 {
                        // A failed checkout: neither the order nor its events exist.
                        tx.rollback().await?;
                    } else {
                        tx.commit().await?;
                    }
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .collect();
    for writer in writers {
        writer.await?.map_err(|e| e.to_string())?;
    }
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM example_orders")
        .fetch_one(&pool)
        .await?;
    let expected = 2 * committed as u64;
    let wrote = started.elapsed();
    while outbox.stats().await?.backlog > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = started.elapsed();

    // What arrived: every committed event, none of the rolled-back ones, in order per order.
    let arrived = broker.read().await?;
    let distinct: HashSet<&String> = arrived.iter().map(|(id, _, _)| id).collect();
    let mut last_step: HashMap<&str, u64> = HashMap::new();
    let mut in_order = true;
    let mut seen = HashSet::new();
    for (id, order, step) in &arrived {
        if !seen.insert(id) {
            continue;
        }
        if let Some(prev) = last_step.insert(order, *step) {
            in_order &= prev < *step;
        } else {
            in_order &= *step == 0;
        }
    }
    println!(
        "{} orders written ({} rolled back) in {wrote:?}; {} relay(s) in {:?} mode drained the outbox after {drained:?}",
        args.orders,
        args.orders - committed as u64,
        args.relays,
        args.mode,
    );
    println!(
        "broker holds {} entries, {} distinct events of {expected} committed; order per order kept: {in_order}",
        arrived.len(),
        distinct.len()
    );
    for (i, relay) in relays.into_iter().enumerate() {
        let m = relay.metrics().await?;
        println!(
            "relay {i}: published {}, failures {}, batches {}, active {}",
            m.published, m.failures, m.batches, m.active
        );
        relay.shutdown().await;
    }
    if distinct.len() as u64 != expected || !in_order {
        return Err("events lost or out of order".into());
    }
    Ok(())
}

enum Broker {
    Redis(redis::aio::ConnectionManager, String),
    Nats(Box<async_nats::jetstream::Context>, String),
}

impl Broker {
    /// Every entry as (outbox id, order id, step).
    async fn read(&self) -> Result<Vec<(String, String, u64)>, Box<dyn std::error::Error>> {
        let mut out = Vec::new();
        let mut push = |id: String, payload: &[u8]| -> Result<(), Box<dyn std::error::Error>> {
            let v: serde_json::Value = serde_json::from_slice(payload)?;
            let order = v["order"].as_str().unwrap_or_default().to_owned();
            out.push((id, order, v["step"].as_u64().unwrap_or_default()));
            Ok(())
        };
        match self {
            Broker::Redis(conn, stream) => {
                let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(stream)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn.clone())
                    .await?;
                for entry in &reply.ids {
                    let id: String = entry.get("id").unwrap_or_default();
                    let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
                    push(id, &payload)?;
                }
            }
            Broker::Nats(context, name) => {
                let mut stream = context.get_stream(name).await?;
                let state = stream.info().await?.state.clone();
                for seq in state.first_sequence..=state.last_sequence {
                    if state.messages == 0 {
                        break;
                    }
                    let msg = stream.get_raw_message(seq).await?;
                    let id = msg
                        .headers
                        .get("Nats-Msg-Id")
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default();
                    push(id, &msg.payload)?;
                }
                context.delete_stream(name).await?;
            }
        }
        Ok(out)
    }
}
