//! The whole pipeline on a Redis Cluster with a replica per master and on a Sentinel
//! group, through sd-core's `FailoverConnection`: a writer enqueues events in PostgreSQL
//! at a steady pace, a relay publishes them to two streams (`order` and `invoice`, on
//! different shards of the cluster, so a batch spans slots), and sd-pool's
//! `StreamConsumer` runs them with per-key order. Mid-run the master holding the `order`
//! stream fails over three times: a manual failover (`CLUSTER FAILOVER`, `SENTINEL
//! FAILOVER`), a killed master, and a killed master whose replica lagged behind (see
//! `fail_over_three_times`); each killed node is started again as a replica.
//!
//! The oracle reads every delivery the handlers saw, duplicates included: every event
//! the outbox holds was handled at least once (with `wait_for_replicas`, asserted;
//! without it, losses are counted), each aggregate's first-time handlings are in its
//! publish order (asserted), and duplicates are counted, inside and outside the failover
//! windows. RELIABILITY.md quotes the one-line summary each run prints.
#![cfg(all(feature = "postgres", feature = "redis"))]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

mod common;
mod oracle;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{drained, waits, write};
use oracle::{AFTERMATH, Delivery, Written, delivery, judge};
use sd_core::failover::{FailoverClient, FailoverConnection};
use sd_outbox::Message;
use sd_outbox::postgres::{Mode, Relay};
use sd_outbox::redis::RedisStreamsPublisher;
use sd_pool::redis::{Entry, StreamConsumer};
use sd_pool::{Order, Pool};
use sd_testkit::{RedisCluster, RedisSentinelGroup};
use uuid::Uuid;

/// The replicas `WAIT` asks for, and how long it waits.
const WAIT: (u32, Duration) = (1, Duration::from_millis(500));
const TYPES: [&str; 2] = ["order", "invoice"];
const AGGREGATES: usize = 8;

/// One consumer per stream, each on a connection of its own (`XREADGROUP` blocks), its
/// `run` called again after an error, recording every delivery into `seen`; `hold`
/// stops them (draining what they run) until it is released.
fn spawn_consumers(
    conns: Vec<FailoverConnection>,
    streams: Vec<String>,
    seen: Arc<Mutex<Vec<Delivery>>>,
    stop: tokio::sync::watch::Receiver<bool>,
    hold: tokio::sync::watch::Receiver<bool>,
    run_errors: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    conns
        .into_iter()
        .zip(streams)
        .map(|(conn, stream)| {
            let (seen, stop, mut hold, run_errors) =
                (seen.clone(), stop.clone(), hold.clone(), run_errors.clone());
            tokio::spawn(async move {
                let handler = move |entry: Entry| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(delivery(&entry));
                        Ok::<(), String>(())
                    }
                };
                loop {
                    // Held: down until released (a consumer down through a failover).
                    let _ = hold.wait_for(|h| !*h).await;
                    if *stop.borrow() {
                        return;
                    }
                    // A consumer process: a pool of its own (`run` drains it and a
                    // drained pool is closed), built again after each hold; under the
                    // same name it reclaims what it left pending after `min_idle`.
                    let pool = Pool::builder()
                        .workers(4)
                        .queue(64)
                        .order(Order::PerKey)
                        .build()
                        .unwrap();
                    let built = StreamConsumer::builder()
                        .stream(&stream)
                        .group("billing")
                        .consumer("c1")
                        .key_field("aggregateid")
                        .block(Duration::from_millis(100))
                        .min_idle(Duration::from_secs(2))
                        .claim_every(Duration::from_millis(500))
                        .build(conn.clone(), pool)
                        .await;
                    let consumer = match built {
                        Ok(consumer) => consumer,
                        Err(e) => {
                            run_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "consumer build failed; again");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    loop {
                        let shutdown = {
                            let (mut stop, mut hold) = (stop.clone(), hold.clone());
                            async move {
                                tokio::select! {
                                    _ = stop.wait_for(|s| *s) => {}
                                    _ = hold.wait_for(|h| *h) => {}
                                }
                            }
                        };
                        match consumer.run(handler.clone(), shutdown).await {
                            Ok(_) => break,
                            Err(e) => {
                                run_errors.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(error = %e, "consumer run failed; again");
                                if *stop.borrow() {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    if *stop.borrow() {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// What one run found.
struct Outcome {
    lost: usize,
    out_of_order: usize,
}

fn role(cluster: &RedisCluster, node: usize) -> Option<String> {
    match sd_testkit::resp::command(cluster.nodes()[node].port(), &["ROLE"]).ok()? {
        sd_testkit::resp::Reply::Array(Some(items)) => items.first()?.as_text(),
        _ => None,
    }
}

/// The fault sequence on the shard of node `shard`, each step waiting until the cluster
/// serves the slot again, and each killed node started again as a replica (with
/// `WAIT`, nothing on the shard counts while it has none):
///
/// 1. `CLUSTER FAILOVER` to its replica (no write lost);
/// 2. a second later, that new master killed;
/// 3. a second later, a lagging replica: the consumers held, the replica paused
///    (SIGSTOP) and 32 MB written to the shard (so the replication stream backs up into
///    the master's memory), for a second the master takes writes it never passes on, the
///    master killed, the replica resumed and elected with what it had; then the
///    consumers released. What the dead master acknowledged in that second and nobody
///    read is gone from the stream: without `WAIT` the outbox counted it published.
///
/// Returns the three windows, from the first command until the slot was served again
/// and the killed node was back in sync.
fn fail_over_three_times(
    cluster: &mut RedisCluster,
    shard: usize,
    stream: &str,
    hold: &tokio::sync::watch::Sender<bool>,
) -> Vec<(Instant, Instant)> {
    const TIMEOUT: Duration = Duration::from_secs(45);
    let manual = Instant::now();
    let replica = cluster.replica_of(shard).unwrap();
    cluster.failover(replica).unwrap();
    let manual_end = Instant::now();
    std::thread::sleep(Duration::from_secs(1));

    let crash = Instant::now();
    let (killed, master) = (replica, cluster.kill_master(replica).unwrap());
    cluster.nodes_mut()[killed].start_again().unwrap();
    cluster.wait_replica_of(killed, master).unwrap();
    let crash_end = Instant::now();
    std::thread::sleep(Duration::from_secs(1));

    let lagging = Instant::now();
    let _ = hold.send(true);
    let replica = cluster.replica_of(master).unwrap();
    cluster.nodes_mut()[replica].pause().unwrap();
    // A paused replica still receives: the kernel buffers the replication stream for it.
    // 32 MB of ballast on the shard fill those buffers, so what the master takes next
    // waits in its own output buffer to the replica and dies with it.
    let ballast = "x".repeat(32 << 20);
    let port = cluster.nodes()[master].port();
    sd_testkit::resp::command(port, &["SET", &format!("{{{stream}}}:ballast"), &ballast]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    cluster.nodes_mut()[master].kill().unwrap();
    cluster.nodes_mut()[replica].resume().unwrap();
    let started = Instant::now();
    while role(cluster, replica).as_deref() != Some("master") {
        assert!(
            started.elapsed() < TIMEOUT,
            "the lagging replica was not elected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.wait_running_ok(TIMEOUT).unwrap();
    let _ = hold.send(false);
    cluster.nodes_mut()[master].start_again().unwrap();
    cluster.wait_replica_of(master, replica).unwrap();
    vec![
        (manual, manual_end),
        (crash, crash_end),
        (lagging, Instant::now()),
    ]
}

/// Where the streams live and how they fail over.
trait Faults: Send + 'static {
    /// The backend, for the summary.
    const NAME: &'static str;
    /// The settings every connection of the test is made from.
    fn client(&self) -> FailoverClient;
    /// Where `streams` sit, for the summary.
    fn placement(&self, streams: &[String]) -> String;
    /// Runs the failovers (blocking) on the master that holds `stream`, holding the
    /// consumers with `hold` for the last one (the lagging replica); returns the
    /// windows, that one last, and what happened, for the summary.
    fn fail_over(
        &mut self,
        stream: &str,
        hold: &tokio::sync::watch::Sender<bool>,
    ) -> (Vec<(Instant, Instant)>, String);
}

impl Faults for RedisCluster {
    const NAME: &'static str = "redis cluster";

    fn client(&self) -> FailoverClient {
        FailoverConnection::builder()
            .cluster(self.urls())
            .build()
            .unwrap()
    }

    fn placement(&self, streams: &[String]) -> String {
        let same = self.master_of(&streams[0]).unwrap() == self.master_of(&streams[1]).unwrap();
        format!(
            "`{}` on {}",
            TYPES[1],
            if same {
                "the same shard"
            } else {
                "another shard"
            }
        )
    }

    fn fail_over(
        &mut self,
        stream: &str,
        hold: &tokio::sync::watch::Sender<bool>,
    ) -> (Vec<(Instant, Instant)>, String) {
        let shard = self.master_of(stream).unwrap();
        let windows = fail_over_three_times(self, shard, stream, hold);
        let what = format!(
            "3 failovers of the `{}` stream's shard, each killed node restarted as a replica \
             (CLUSTER FAILOVER {:.1?}; master killed, back in sync {:.1?}; lagging replica \
             paused 1 s, master killed, consumers held, back in sync {:.1?})",
            TYPES[0],
            span(&windows[0]),
            span(&windows[1]),
            span(&windows[2]),
        );
        (windows, what)
    }
}

impl Faults for RedisSentinelGroup {
    const NAME: &'static str = "redis sentinel";

    fn client(&self) -> FailoverClient {
        FailoverConnection::builder()
            .sentinel(self.sentinel_urls(), self.master_name())
            .build()
            .unwrap()
    }

    fn placement(&self, _streams: &[String]) -> String {
        "both streams on the one master".to_owned()
    }

    /// A forced promotion (the old master takes writes until the Sentinels demote it,
    /// discarding them), a crashed master restarted as a replica, then the lagging
    /// replica as on the cluster.
    fn fail_over(
        &mut self,
        stream: &str,
        hold: &tokio::sync::watch::Sender<bool>,
    ) -> (Vec<(Instant, Instant)>, String) {
        const TIMEOUT: Duration = Duration::from_secs(60);
        let forced = Instant::now();
        let new = self.start_failover().unwrap();
        self.wait_settled(new, TIMEOUT).unwrap();
        let forced_end = Instant::now();
        std::thread::sleep(Duration::from_secs(1));

        let crash = Instant::now();
        self.kill_master().unwrap();
        let crash_end = Instant::now();
        std::thread::sleep(Duration::from_secs(1));

        let lagging = Instant::now();
        let _ = hold.send(true);
        let old = self.master_port().unwrap();
        let master = self.node_index(old).unwrap();
        let replica = 1 - master;
        self.nodes_mut()[replica].pause().unwrap();
        let ballast = "x".repeat(32 << 20);
        sd_testkit::resp::command(old, &["SET", &format!("{stream}:ballast"), &ballast]).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        self.nodes_mut()[master].kill().unwrap();
        self.nodes_mut()[replica].resume().unwrap();
        self.wait_new_master(old, TIMEOUT).unwrap();
        let _ = hold.send(false);
        self.nodes_mut()[master].start_again().unwrap();
        self.wait_settled_on_any(TIMEOUT).unwrap();
        let windows = vec![
            (forced, forced_end),
            (crash, crash_end),
            (lagging, Instant::now()),
        ];
        let what = format!(
            "3 failovers, each old master restarted as a replica (SENTINEL FAILOVER, settled \
             in {:.1?}; master killed, settled in {:.1?}; lagging replica paused 1 s, master \
             killed, consumers held, settled in {:.1?})",
            span(&windows[0]),
            span(&windows[1]),
            span(&windows[2]),
        );
        (windows, what)
    }
}

fn span(window: &(Instant, Instant)) -> Duration {
    window.1 - window.0
}

/// Runs the pipeline on `backend`, `wait` or not, through its failovers; prints the
/// summary and returns what the oracle found.
fn pipeline_through_failovers<F: Faults>(backend: F, wait: Option<(u32, Duration)>) -> Outcome {
    let client = backend.client();
    let backend = Arc::new(Mutex::new(backend));
    let db = sd_testkit::database()
        .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
    let outcome = sd_testkit::runtime().block_on(async {
        let outbox = common::outbox(db.url()).await;
        let sink_conn = client.connect().await.unwrap();
        let mut consumer_conns = Vec::new();
        for _ in TYPES {
            consumer_conns.push(client.connect().await.unwrap());
        }
        let mut builder = RedisStreamsPublisher::builder(sink_conn);
        if let Some((replicas, timeout)) = wait {
            builder = builder.wait_for_replicas(replicas, timeout);
        }
        let publisher = builder.build().unwrap();
        let streams: Vec<String> = TYPES.iter().map(|t| publisher.stream(t)).collect();
        let placement = backend.lock().unwrap().placement(&streams);
        let relay = Relay::builder(outbox.clone(), publisher)
            .mode(Mode::Parallel)
            .poll_interval(Duration::from_millis(100))
            .retry(waits(Duration::from_millis(50), Duration::from_millis(400)))
            .max_attempts(100_000)
            .build()
            .unwrap()
            .spawn();

        let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
        let hold_tx = Arc::new(hold_tx);
        let run_errors = Arc::new(AtomicU64::new(0));
        let consumers = spawn_consumers(
            consumer_conns,
            streams.clone(),
            seen.clone(),
            stop_rx,
            hold_rx,
            run_errors.clone(),
        );

        // Steady load: one event per transaction, round-robin over the two types and
        // eight aggregates each, a few milliseconds apart.
        let written: Arc<Mutex<HashMap<Uuid, Written>>> = Arc::default();
        let writing = Arc::new(AtomicBool::new(true));
        let writer = {
            let (outbox, written, writing) = (outbox.clone(), written.clone(), writing.clone());
            tokio::spawn(async move {
                let mut next: HashMap<(String, String), usize> = HashMap::new();
                let mut i = 0usize;
                while writing.load(Ordering::Relaxed) {
                    let ty = TYPES[i % TYPES.len()];
                    let key = (ty.to_owned(), format!("a{}", (i / 2) % AGGREGATES));
                    let n = *next.entry(key.clone()).and_modify(|n| *n += 1).or_insert(0);
                    let message =
                        Message::json(ty, key.1.clone(), "changed", serde_json::json!({ "n": n }));
                    let id = write(&outbox, message).await;
                    written.lock().unwrap().insert(
                        id,
                        Written {
                            key,
                            n,
                            at: Instant::now(),
                        },
                    );
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        };

        // The faults, on the `order` stream's shard, while the load runs.
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (windows, what) = {
            let (backend, hold) = (backend.clone(), hold_tx.clone());
            let stream = streams[0].clone();
            tokio::task::spawn_blocking(move || backend.lock().unwrap().fail_over(&stream, &hold))
                .await
                .unwrap()
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        writing.store(false, Ordering::Relaxed);
        writer.await.unwrap();
        let load_time = started.elapsed();

        // Recovery: the relay publishes what is left and the consumers catch up; then
        // the oracle judges whatever was handled.
        let total = written.lock().unwrap().len();
        let recovery = Instant::now();
        // Until everything was handled, or nothing new came for 10 s with the outbox
        // drained (what is lost never comes), or a minute.
        let (mut last_count, mut last_change) = (0, Instant::now());
        while recovery.elapsed() < Duration::from_secs(60) {
            let handled: HashSet<Uuid> = seen.lock().unwrap().iter().map(|d| d.id).collect();
            if handled.len() != last_count {
                (last_count, last_change) = (handled.len(), Instant::now());
            }
            let drained = drained(&outbox).await;
            if drained
                && (handled.len() >= total || last_change.elapsed() > Duration::from_secs(10))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Whatever a late claim brings in.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let metrics = relay.metrics().await.unwrap();
        let _ = stop_tx.send(true);
        for consumer in consumers {
            consumer.await.unwrap();
        }
        relay.shutdown().await;

        let written = written.lock().unwrap().clone();
        let seen = seen.lock().unwrap().clone();
        let found = judge(&written, &seen, &windows);
        let waits = match wait {
            Some((replicas, timeout)) => format!("WAIT {replicas} replica, {timeout:?}"),
            None => "no WAIT".to_owned(),
        };
        println!(
            "outbox+pool {}, {waits}: {total} events ({} types x {AGGREGATES} aggregates) \
             enqueued over {load_time:.1?}, {} deliveries handled; {what}; {placement}; {} \
             lost ({} written in the lagging-replica window), {} out of per-key order, {} \
             duplicate deliveries ({} in the failover windows + {AFTERMATH:?}, {} outside); \
             relay: {} publish failures, {} dead; consumers: {} failed runs retried",
            F::NAME,
            TYPES.len(),
            seen.len(),
            found.lost,
            found.lost_in_lagging,
            found.out_of_order,
            found.duplicates,
            found.duplicates_in_windows,
            found.duplicates - found.duplicates_in_windows,
            metrics.failures,
            metrics.dead,
            run_errors.load(Ordering::Relaxed),
        );
        for line in found.examples.iter().take(10) {
            println!("  {line}");
        }
        Outcome {
            lost: found.lost,
            out_of_order: found.out_of_order,
        }
    });
    drop(backend);
    outcome
}

#[test]
fn with_wait_no_event_is_lost_and_per_key_order_holds_across_cluster_failovers() {
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    let found = pipeline_through_failovers(cluster, Some(WAIT));
    assert_eq!(found.lost, 0, "an event was lost although WAIT counted it");
    assert_eq!(
        found.out_of_order, 0,
        "a key's events were handled out of order"
    );
}

#[test]
fn without_wait_losses_are_counted_and_per_key_order_holds_across_cluster_failovers() {
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    let found = pipeline_through_failovers(cluster, None);
    assert_eq!(
        found.out_of_order, 0,
        "a key's events were handled out of order"
    );
}

#[test]
fn with_wait_no_event_is_lost_and_per_key_order_holds_across_sentinel_failovers() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    let found = pipeline_through_failovers(group, Some(WAIT));
    assert_eq!(found.lost, 0, "an event was lost although WAIT counted it");
    assert_eq!(
        found.out_of_order, 0,
        "a key's events were handled out of order"
    );
}

#[test]
fn without_wait_losses_are_counted_and_per_key_order_holds_across_sentinel_failovers() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    let found = pipeline_through_failovers(group, None);
    assert_eq!(
        found.out_of_order, 0,
        "a key's events were handled out of order"
    );
}

#[test]
fn a_wait_that_cannot_be_met_publishes_nothing_that_counts() {
    // One server, no replica: `WAIT 1` can never be met.
    let server = sd_testkit::RedisServer::start().expect("start redis");
    sd_testkit::runtime().block_on(async {
        let conn = FailoverConnection::builder()
            .server(server.url())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        for (replicas, timeout) in [(0, Duration::from_secs(1)), (1, Duration::ZERO)] {
            let built = RedisStreamsPublisher::builder(conn.clone())
                .wait_for_replicas(replicas, timeout)
                .build();
            assert_eq!(common::invalid_field(built), "wait_for_replicas");
        }
        let waiting = RedisStreamsPublisher::builder(conn.clone())
            .wait_for_replicas(1, Duration::from_millis(100))
            .build()
            .unwrap();
        let events: Vec<sd_outbox::Event> = ["order", "invoice", "order"]
            .iter()
            .map(|ty| {
                sd_outbox::Event::from_message(Message::json(
                    *ty,
                    "a0",
                    "changed",
                    serde_json::json!({}),
                ))
            })
            .collect();
        match sd_outbox::Publisher::publish(&waiting, &events).await {
            Err(sd_outbox::Error::Publish { published, reason }) => {
                assert_eq!(published, 0, "{reason}");
                assert!(reason.contains("WAIT"), "{reason}");
            }
            other => panic!("published without a replica: {other:?}"),
        }
        // Without `WAIT` the same batch is acknowledged, one entry per event.
        let plain = RedisStreamsPublisher::builder(conn.clone())
            .build()
            .unwrap();
        sd_outbox::Publisher::publish(&plain, &events)
            .await
            .unwrap();
        let order: u64 = redis::cmd("XLEN")
            .arg(plain.stream("order"))
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        assert_eq!(
            order, 4,
            "two entries per run: the waiting one landed too, unconfirmed"
        );
    });
}

#[test]
fn a_batch_spanning_slots_is_published_in_one_call_on_a_cluster() {
    let cluster = RedisCluster::start().expect("start a cluster");
    sd_testkit::runtime().block_on(async {
        let conn = FailoverConnection::builder()
            .cluster(cluster.urls())
            .build()
            .unwrap()
            .connect()
            .await
            .unwrap();
        let publisher = RedisStreamsPublisher::builder(conn.clone())
            .build()
            .unwrap();
        let types = ["order", "invoice", "payment", "shipment"];
        let slots: HashSet<u16> = types
            .iter()
            .map(|ty| cluster.key_slot(&publisher.stream(ty)).unwrap())
            .collect();
        assert!(
            slots.len() > 1,
            "the streams share a slot: the test shows nothing"
        );
        // Interleaved, as a relay's batch is: each stream gets 0, 1, 2 in order.
        let events: Vec<sd_outbox::Event> = (0..3)
            .flat_map(|n| {
                types.iter().map(move |ty| {
                    sd_outbox::Event::from_message(Message::json(
                        *ty,
                        "a0",
                        "changed",
                        serde_json::json!({ "n": n }),
                    ))
                })
            })
            .collect();
        sd_outbox::Publisher::publish(&publisher, &events)
            .await
            .unwrap();
        for ty in types {
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(publisher.stream(ty))
                .arg("-")
                .arg("+")
                .query_async(&mut conn.clone())
                .await
                .unwrap();
            let ns: Vec<u64> = reply
                .ids
                .iter()
                .map(|e| {
                    let payload: String = e.get("payload").unwrap();
                    serde_json::from_str::<serde_json::Value>(&payload).unwrap()["n"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
            assert_eq!(ns, [0, 1, 2], "stream of {ty}");
        }
    });
}
