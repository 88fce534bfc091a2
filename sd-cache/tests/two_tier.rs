//! The two-tier cache against a real Redis, with independent instances (each its own
//! connections, subscription and lease): a write that returned is never read stale from
//! another instance's memory tier, under concurrent writes and reads, across dropped
//! subscriptions, with an instance that never acknowledges, and across Redis killed,
//! restarted and frozen.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use sd_cache::{Error, RedisCache, TwoTier};

mod common;
use common::{eventually, manager_with_timeout, runtime};

type Tier = TwoTier<u64, ConnectionManager>;

/// An independent instance ("process"): its own command connection, subscription and lease.
async fn instance(url: &str, prefix: &str, fallback: bool) -> Tier {
    TwoTier::builder(
        RedisCache::builder(prefix)
            .ttl(Duration::from_secs(30))
            .fallback_to_loader(fallback),
    )
    .local_ttl(Duration::from_secs(10))
    .lease(Duration::from_millis(600))
    .build(
        manager_with_timeout(url, Duration::from_secs(2)).await,
        redis::Client::open(url).unwrap(),
    )
    .await
    .unwrap()
}

/// The system of record: one version number per key, written before the cache.
struct Db {
    rows: Vec<AtomicU64>,
    /// The highest version whose cache write (insert or invalidate) has returned.
    committed: Vec<AtomicU64>,
}

/// What one read or write did, as it happened: the checker judges these raw events, not
/// counts kept by the load itself.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // The keys and versions are printed (Debug) when the oracle fails.
enum Outcome {
    /// A read of `key` that started after version `floor` was committed and returned
    /// `seen` (`None`: a miss).
    Read {
        key: usize,
        floor: u64,
        seen: Option<u64>,
    },
    /// A read that failed with [`Error::Backend`].
    ReadFailed { key: usize },
    /// A write of `version` that returned `Ok`.
    Wrote { key: usize, version: u64 },
    /// A write of `version` that failed with [`Error::Backend`] (retried until it returns).
    WriteFailed { key: usize, version: u64 },
}

/// One operation and the fault phase when it started and when it ended.
#[derive(Debug, Clone, Copy)]
struct Event {
    outcome: Outcome,
    started: u8,
    ended: u8,
}

/// No fault yet; the fault is on (server killed or frozen, until every instance serves
/// from memory again); the fault is over.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

/// The load's shared state: the oracle's event log, and the fault phase that the
/// disturbance sets.
#[derive(Default)]
struct Probe {
    phase: AtomicU8,
    events: std::sync::Mutex<Vec<Event>>,
    read_failures: AtomicUsize,
    write_failures: AtomicUsize,
}

impl Probe {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    fn record(&self, outcome: Outcome, started: u8) {
        match outcome {
            Outcome::ReadFailed { .. } => self.read_failures.fetch_add(1, Ordering::SeqCst),
            Outcome::WriteFailed { .. } => self.write_failures.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
        let ended = self.phase();
        self.events.lock().unwrap().push(Event {
            outcome,
            started,
            ended,
        });
    }

    /// The fault begins now (call before killing or freezing the server).
    fn fault_begins(&self) {
        self.phase.store(DURING, Ordering::SeqCst);
    }

    /// The fault is over (call once the server is back and the instances recovered).
    fn fault_ends(&self) {
        self.phase.store(AFTER, Ordering::SeqCst);
    }

    /// Waits until reads and writes have failed since the fault began and no instance
    /// serves from memory: the fault provably hit the load.
    async fn until_the_fault_hits(&self, instances: &[Tier]) {
        let (reads, writes) = (
            self.read_failures.load(Ordering::SeqCst),
            self.write_failures.load(Ordering::SeqCst),
        );
        eventually("reads and writes fail during the fault", || {
            std::future::ready(
                self.read_failures.load(Ordering::SeqCst) > reads
                    && self.write_failures.load(Ordering::SeqCst) > writes,
            )
        })
        .await;
        until_serving(instances, false).await;
    }
}

/// Waits until every instance serves from memory (`true`) or none does (`false`).
async fn until_serving(instances: &[Tier], serving: bool) {
    for i in instances {
        let i = i.clone();
        eventually(
            if serving {
                "serving from memory"
            } else {
                "not serving from memory"
            },
            move || std::future::ready(i.is_serving_local() == serving),
        )
        .await;
    }
}

/// Whether `result` is an operation's failure the fault allows (a backend error), or else
/// the value; any other error fails the test at once.
fn allowed_failure<T>(result: Result<T, Error>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(Error::Backend { .. }) => None,
        Err(other) => panic!("only backend errors are allowed during a fault: {other}"),
    }
}

/// The checker: writers bump each key's version (store first, then the cache: `insert` or
/// `invalidate` in turn, retried until it returns `Ok`) through rotating instances; readers
/// on every instance note the committed version *before* each read. The load runs before,
/// during and after `disturb` (which gets the probe to mark the fault) and for at least
/// `writes_per_key` versions per key; then the oracle reads the raw events: no read returned
/// a version older than one committed before it started; failures only where the fault
/// overlapped the operation; and, if there was a fault, failures while it lasted and
/// successful reads and writes after it.
async fn check_no_stale_reads<D, Fut, T>(instances: Vec<Tier>, writes_per_key: u64, disturb: D) -> T
where
    D: FnOnce(Arc<Probe>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    const KEYS: usize = 3;
    let db = Arc::new(Db {
        rows: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
        committed: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
    });
    let probe = Arc::new(Probe::default());
    let done = Arc::new(AtomicBool::new(false));
    let stop_writing = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..32 {
        let (cache, db, done, probe) = (
            instances[r % instances.len()].clone(),
            db.clone(),
            done.clone(),
            probe.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !done.load(Ordering::SeqCst) {
                let k = i % KEYS;
                i += 1;
                let started = probe.phase();
                let floor = db.committed[k].load(Ordering::SeqCst);
                let key = format!("k{k}");
                let seen = if i % 3 == 0 {
                    cache.get(&key).await
                } else {
                    let db = db.clone();
                    cache
                        .get_or_load(
                            &key,
                            move || async move { db.rows[k].load(Ordering::SeqCst) },
                        )
                        .await
                        .map(Some)
                };
                let outcome = match allowed_failure(seen) {
                    Some(seen) => Outcome::Read {
                        key: k,
                        floor,
                        seen,
                    },
                    None => Outcome::ReadFailed { key: k },
                };
                probe.record(outcome, started);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let mut writers = Vec::new();
    for k in 0..KEYS {
        let (instances, db, probe, stop) = (
            instances.clone(),
            db.clone(),
            probe.clone(),
            stop_writing.clone(),
        );
        writers.push(tokio::spawn(async move {
            let key = format!("k{k}");
            let mut version = 0;
            while !stop.load(Ordering::SeqCst) {
                version += 1;
                db.rows[k].store(version, Ordering::SeqCst);
                let mut attempt = 0;
                loop {
                    let cache = &instances[(version as usize + k + attempt) % instances.len()];
                    attempt += 1;
                    let started = probe.phase();
                    let written = if version % 2 == 0 {
                        cache.insert(&key, &version).await
                    } else {
                        cache.invalidate(&key).await
                    };
                    if allowed_failure(written).is_some() {
                        probe.record(Outcome::Wrote { key: k, version }, started);
                        break;
                    }
                    probe.record(Outcome::WriteFailed { key: k, version }, started);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                db.committed[k].store(version, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let committed = |db: &Db| -> Vec<u64> {
        db.committed
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    };
    eventually("the load runs before the disturbance", || {
        std::future::ready(committed(&db).iter().all(|&c| c >= 10))
    })
    .await;
    let disturbed = disturb(probe.clone()).await;
    let after = committed(&db);
    eventually("the writes go on after the disturbance", || {
        let now = committed(&db);
        std::future::ready(
            now.iter()
                .zip(&after)
                .all(|(&n, &a)| n >= a + 10 && n >= writes_per_key),
        )
    })
    .await;
    stop_writing.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    judge(&probe.events.lock().unwrap());
    disturbed
}

/// The oracle over the raw events (see [`check_no_stale_reads`]).
fn judge(events: &[Event]) {
    let stale: Vec<_> = events
        .iter()
        .filter(
            |e| matches!(e.outcome, Outcome::Read { floor, seen: Some(seen), .. } if seen < floor),
        )
        .collect();
    assert!(
        stale.is_empty(),
        "{} stale reads (a version older than one committed before the read started): {:?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );
    let failed = |e: &&Event| {
        matches!(
            e.outcome,
            Outcome::ReadFailed { .. } | Outcome::WriteFailed { .. }
        )
    };
    let outside: Vec<_> = events
        .iter()
        .filter(failed)
        .filter(|e| e.ended == BEFORE || e.started == AFTER)
        .collect();
    assert!(
        outside.is_empty(),
        "operations failed outside the fault: {:?}",
        &outside[..outside.len().min(10)]
    );
    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    let reads = count(&|e| matches!(e.outcome, Outcome::Read { .. }));
    assert!(reads > 0, "reads went through");
    let faulted = events.iter().any(|e| e.ended != BEFORE);
    if !faulted {
        return;
    }
    let overlapped = |e: &Event| e.started == DURING || e.ended == DURING || e.started != e.ended;
    let read_failures =
        count(&|e| overlapped(e) && matches!(e.outcome, Outcome::ReadFailed { .. }));
    let write_failures =
        count(&|e| overlapped(e) && matches!(e.outcome, Outcome::WriteFailed { .. }));
    assert!(
        read_failures > 0 && write_failures > 0,
        "the fault overlapped the load: {read_failures} reads and {write_failures} writes failed during it"
    );
    let reads_after = count(&|e| e.started == AFTER && matches!(e.outcome, Outcome::Read { .. }));
    let writes_after = count(&|e| e.started == AFTER && matches!(e.outcome, Outcome::Wrote { .. }));
    assert!(
        reads_after > 0 && writes_after > 0,
        "the load went on after the fault: {reads_after} reads, {writes_after} writes"
    );
    eprintln!(
        "{} events; during the fault {read_failures} reads and {write_failures} writes failed; after it {reads_after} reads and {writes_after} writes",
        events.len()
    );
}

#[test]
fn a_write_that_returned_is_never_read_stale_from_another_instance() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let mut instances = Vec::new();
        for _ in 0..4 {
            instances.push(instance(server.url(), &prefix, false).await);
        }
        for i in &instances {
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
        check_no_stale_reads(instances.clone(), 150, |_| async {}).await;
        let local_hits: u64 = instances.iter().map(|i| i.stats().hits).sum();
        assert!(local_hits > 0, "the memory tier answered reads");
    });
}

/// Every subscription is killed by the server, repeatedly, while writes and reads go on:
/// each instance resyncs (clears its memory tier) and no stale read gets through.
#[test]
fn dropped_subscriptions_resync_and_no_stale_read_gets_through() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let mut instances = Vec::new();
        for _ in 0..3 {
            instances.push(instance(server.url(), &prefix, false).await);
        }
        let url = server.url().to_owned();
        check_no_stale_reads(instances.clone(), 120, move |_| async move {
            let mut admin = manager_with_timeout(&url, Duration::from_secs(2)).await;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(80)).await;
                let _: i64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
            }
        })
        .await;
        for i in &instances {
            assert!(
                i.resyncs() >= 2,
                "first lease plus at least one lost subscription"
            );
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
    });
}

/// Independent instances on their own server, half strict and half reading around a dead
/// server with the loader.
async fn instances_on(url: &str, n: usize) -> Vec<Tier> {
    let prefix = sd_testkit::unique_name("two-tier");
    let mut instances = Vec::new();
    for i in 0..n {
        instances.push(instance(url, &prefix, i % 2 == 1).await);
    }
    until_serving(&instances, true).await;
    instances
}

/// Runs a blocking testkit call on `server` off the runtime's workers.
async fn with_server(
    server: sd_testkit::RedisServer,
    call: fn(&mut sd_testkit::RedisServer) -> sd_testkit::Result<()>,
) -> sd_testkit::RedisServer {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        call(&mut server).unwrap();
        server
    })
    .await
    .unwrap()
}

/// Runs the staleness checker on four instances of a server of their own while `fault`
/// hits that server mid-load and `recover` undoes it: reads and writes fail during the
/// fault, every instance stops serving from memory, then serves again after `recover`.
fn no_stale_read_across(
    fault: fn(&mut sd_testkit::RedisServer) -> sd_testkit::Result<()>,
    recover: fn(&mut sd_testkit::RedisServer) -> sd_testkit::Result<()>,
) {
    let server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let url = server.url();
    runtime().block_on(async {
        let instances = instances_on(&url, 4).await;
        let load = instances.clone();
        // The server lives until the load is over.
        let _server = check_no_stale_reads(load, 150, move |probe| async move {
            probe.fault_begins();
            let server = with_server(server, fault).await;
            probe.until_the_fault_hits(&instances).await;
            let server = with_server(server, recover).await;
            until_serving(&instances, true).await;
            probe.fault_ends();
            server
        })
        .await;
    });
}

/// Redis killed mid-load (its data gone) and started again: no read after a write that
/// returned sees the older value (instances that missed invalidations while unsubscribed
/// resync before serving from memory again).
#[test]
fn no_stale_read_across_redis_killed_and_restarted() {
    no_stale_read_across(
        sd_testkit::RedisServer::kill,
        sd_testkit::RedisServer::start_again,
    );
}

/// Redis frozen (SIGSTOP) mid-load until calls time out and every instance stopped serving
/// from memory, then resumed: no read after a write that returned sees the older value.
#[test]
fn no_stale_read_across_redis_frozen_and_resumed() {
    no_stale_read_across(
        sd_testkit::RedisServer::pause,
        sd_testkit::RedisServer::resume,
    );
}

/// The server's clock, in milliseconds (the clock leases are written in).
async fn server_ms(admin: &mut ConnectionManager) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(admin).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Registers `ghost` with a lease that runs `lease_ms` past the server's clock, as a live
/// instance would; returns the lease's expiry (server ms).
async fn register_ghost(
    admin: &mut ConnectionManager,
    prefix: &str,
    ghost: &str,
    lease_ms: u64,
) -> u64 {
    let expiry = server_ms(admin).await + lease_ms;
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{prefix}:two-tier:instances"))
        .arg(ghost)
        .arg(expiry)
        .query_async(admin)
        .await
        .unwrap();
    expiry
}

/// An instance registered with a live lease that never acknowledges (a frozen process):
/// the write waits until that lease has run out on the server's clock (the ghost has
/// provably stopped serving from memory by then), then returns; it does not fail or hang.
/// A writer that ignored unacknowledged instances returns at once and fails here.
#[test]
fn a_write_waits_out_an_instance_that_never_acknowledges() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let a = instance(server.url(), &prefix, false).await;
        let b = instance(server.url(), &prefix, false).await;
        until_serving(&[a.clone(), b.clone()], true).await;
        let mut admin = manager_with_timeout(server.url(), Duration::from_secs(2)).await;
        let expiry = register_ghost(&mut admin, &prefix, "ghost", 3_000).await;
        assert_eq!(b.get_or_load("k", || async { 1 }).await.unwrap(), 1);
        let started = server_ms(&mut admin).await;
        assert!(
            started < expiry,
            "the ghost's lease is live when the write starts ({started} >= {expiry})"
        );
        tokio::time::timeout(Duration::from_secs(20), a.insert("k", &2))
            .await
            .expect("bounded by the ghost's lease")
            .unwrap();
        let returned = server_ms(&mut admin).await;
        assert!(
            returned >= expiry,
            "the write returned at server time {returned}, before the silent instance's lease ran out at {expiry}"
        );
        assert_eq!(b.get("k").await.unwrap(), Some(2));
    });
}

/// An instance whose lease outlives the test's hang guard acknowledges the write only
/// after it received the announcement: the write returns on that acknowledgement (not on
/// the lease), and not before it was sent.
#[test]
fn a_write_returns_once_a_slow_instance_acknowledges() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let a = instance(server.url(), &prefix, false).await;
        until_serving(std::slice::from_ref(&a), true).await;
        let mut admin = manager_with_timeout(server.url(), Duration::from_secs(2)).await;
        // The ghost listens on the invalidation channel as an instance does.
        let client = redis::Client::open(server.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub
            .subscribe(format!("{prefix}:two-tier"))
            .await
            .unwrap();
        register_ghost(&mut admin, &prefix, "ghost", 120_000).await;
        let acked = Arc::new(AtomicBool::new(false));
        let write = {
            let (a, acked) = (a.clone(), acked.clone());
            tokio::spawn(async move {
                a.insert("k", &2).await.unwrap();
                acked.load(Ordering::SeqCst)
            })
        };
        let mut messages = pubsub.on_message();
        let announcement = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let msg = messages.next().await.expect("the subscription stays up");
                let payload: String = msg.get_payload().unwrap();
                if payload.starts_with("i|") {
                    break payload;
                }
            }
        })
        .await
        .expect("the write is announced");
        // i|writer|seq|key
        let mut parts = announcement.splitn(4, '|').skip(1);
        let (writer, seq, key) = (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        );
        assert_eq!((writer.as_str(), key.as_str()), (a.instance_id(), "k"));
        assert!(!write.is_finished(), "the write waits for the ghost");
        acked.store(true, Ordering::SeqCst);
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{prefix}:two-tier:ack:{writer}"))
            .arg(format!("{seq}|ghost"))
            .query_async(&mut admin)
            .await
            .unwrap();
        let returned_after_ack = tokio::time::timeout(Duration::from_secs(20), write)
            .await
            .expect("the acknowledgement releases the write, long before the ghost's lease")
            .unwrap();
        assert!(
            returned_after_ack,
            "the write returned before the ghost acknowledged"
        );
    });
}

/// Redis killed: typed errors, and reads go to the loader where configured; restarted
/// empty: the memory tier was cleared, so the old value is not served from memory; frozen
/// (SIGSTOP): the memory tier stops serving once the lease lapses, then resumes, cleared.
#[test]
fn redis_killed_restarted_or_frozen_typed_errors_fallback_and_a_cleared_memory_tier() {
    let mut server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let url = server.url();
    let rt = runtime();
    let (strict, lenient) = rt.block_on(async {
        let strict = instance(&url, "tt-fault", false).await;
        let lenient = instance(&url, "tt-fault", true).await;
        for i in [&strict, &lenient] {
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
        strict.insert("k", &1).await.unwrap();
        assert_eq!(lenient.get_or_load("k", || async { 0 }).await.unwrap(), 1);
        assert_eq!(lenient.get("k").await.unwrap(), Some(1));
        (strict, lenient)
    });
    let resyncs = lenient.resyncs();

    server.kill().unwrap();
    rt.block_on(async {
        let l = lenient.clone();
        eventually("not serving from memory", move || {
            std::future::ready(!l.is_serving_local())
        })
        .await;
        assert!(matches!(strict.get("k").await, Err(Error::Backend { .. })));
        let err = strict.insert("k", &3).await.unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        assert_eq!(
            lenient.get_or_load("k", || async { 2 }).await.unwrap(),
            2,
            "the loader answers around the dead server"
        );
    });

    server.start_again().unwrap();
    rt.block_on(async {
        let l = lenient.clone();
        eventually("serving from memory again", move || {
            std::future::ready(l.is_serving_local())
        })
        .await;
        assert!(lenient.resyncs() > resyncs, "the memory tier was cleared");
        // The restarted server is empty: the loader's value, not the 1 held in memory before.
        assert_eq!(lenient.get_or_load("k", || async { 4 }).await.unwrap(), 4);
        assert_eq!(lenient.get("k").await.unwrap(), Some(4));
    });

    let resyncs = lenient.resyncs();
    server.pause().unwrap();
    rt.block_on(async {
        let l = lenient.clone();
        eventually("not serving from memory", move || {
            std::future::ready(!l.is_serving_local())
        })
        .await;
        assert!(matches!(strict.get("k").await, Err(Error::Backend { .. })));
        assert_eq!(lenient.get_or_load("k", || async { 5 }).await.unwrap(), 5);
    });
    server.resume().unwrap();
    rt.block_on(async {
        let l = lenient.clone();
        eventually("serving from memory again", move || {
            std::future::ready(l.is_serving_local())
        })
        .await;
        assert!(
            lenient.resyncs() > resyncs,
            "cleared again after the freeze"
        );
        assert_eq!(
            lenient.get("k").await.unwrap(),
            Some(4),
            "Redis kept its value"
        );
    });
}

#[test]
fn invalid_settings_fail_at_build_naming_the_field() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    runtime().block_on(async {
        let conn = manager_with_timeout(server.url(), Duration::from_secs(2)).await;
        let client = redis::Client::open(server.url()).unwrap();
        let b = || TwoTier::builder(RedisCache::<u64>::builder("p").ttl(Duration::from_secs(10)));
        for (builder, field) in [
            (b().lease(Duration::from_millis(5)), "lease"),
            (b().local_ttl(Duration::ZERO), "local_ttl"),
            (b().local_ttl(Duration::from_secs(11)), "local_ttl"),
        ] {
            match builder.build(conn.clone(), client.clone()).await {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    });
}

/// A dropped instance leaves the registry, so writers stop waiting for it.
#[test]
fn a_dropped_instance_leaves_the_registry() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let a = instance(server.url(), &prefix, false).await;
        let b = instance(server.url(), &prefix, false).await;
        let id = b.instance_id().to_owned();
        let mut admin = manager_with_timeout(server.url(), Duration::from_secs(2)).await;
        let registry = format!("{prefix}:two-tier:instances");
        let registered = |admin: &mut ConnectionManager| {
            let mut admin = admin.clone();
            let (registry, id) = (registry.clone(), id.clone());
            async move {
                redis::cmd("HEXISTS")
                    .arg(registry)
                    .arg(id)
                    .query_async::<bool>(&mut admin)
                    .await
                    .unwrap()
            }
        };
        assert!(registered(&mut admin).await);
        drop(b);
        eventually("the registry drops the dropped instance", || {
            let held = registered(&mut admin);
            async move { !held.await }
        })
        .await;
        a.insert("k", &1).await.unwrap();
    });
}

/// A store that records what it was given.
#[derive(Default)]
struct Rows(std::sync::Mutex<std::collections::HashMap<String, u64>>);

#[derive(Debug, thiserror::Error)]
#[error("never fails")]
struct Never;

impl sd_cache::Store<String, u64> for Rows {
    type Error = Never;

    async fn write(&self, key: &String, op: &sd_cache::WriteOp<u64>) -> Result<(), Never> {
        let mut rows = self.0.lock().unwrap();
        match op {
            sd_cache::WriteOp::Put(v) => rows.insert(key.clone(), *v),
            sd_cache::WriteOp::Delete => rows.remove(key),
        };
        Ok(())
    }
}

/// Write-through over the two-tier cache: once `write` returns, another instance that held
/// the old value in memory reads the new one.
#[test]
fn write_through_over_two_tier_is_read_fresh_by_another_instance() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let a = instance(server.url(), &prefix, false).await;
        let b = instance(server.url(), &prefix, false).await;
        for i in [&a, &b] {
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
        let through = sd_cache::WriteThrough::new(a.clone(), Rows::default());
        through.write("k".to_owned(), 1).await.unwrap();
        assert_eq!(b.get("k").await.unwrap(), Some(1));
        let hits = b.stats().hits;
        assert_eq!(b.get("k").await.unwrap(), Some(1));
        assert_eq!(b.stats().hits, hits + 1, "b holds it in memory");
        through.write("k".to_owned(), 2).await.unwrap();
        assert_eq!(b.get("k").await.unwrap(), Some(2), "not the copy b held");
        through.delete("k".to_owned()).await.unwrap();
        assert_eq!(b.get("k").await.unwrap(), None);
    });
}
