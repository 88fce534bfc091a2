//! The history checker while the lock's servers fail: tasks take the lock and do a
//! fenced read-modify-write in a loop, every write recorded as a raw event, while one
//! Redlock master of 3 (and of 5) is paused and then killed, and while the single Redis,
//! PostgreSQL or etcd server is paused and resumed. Acquires and releases may fail with
//! typed errors during the fault: they are counted, not violations. The history must
//! still pass `history::check_fencing`, with no lost update, no two holders inside at
//! once, no token handed out older than one already used, and progress during (Redlock)
//! or after (single server) the fault.
#![cfg(any(feature = "redis", feature = "postgres", feature = "etcd"))]
#![allow(clippy::unwrap_used)]

mod common;
mod history;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use history::{Event, Outcome, now_ns};
use sd_lock::fence::FencedRegister;
use sd_lock::{BoxLock, Error, Lock, Release};

const TASKS: usize = 4;
const TTL: Duration = Duration::from_secs(2);

/// The workload running on a runtime, and what it saw.
struct Run {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    overlaps: Arc<AtomicU64>,
    events: Arc<Mutex<Vec<Event>>>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    register: Arc<FencedRegister<u64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The error's variant name, for counting.
fn kind(e: &Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl Run {
    fn start(rt: &tokio::runtime::Runtime, lock: BoxLock) -> Run {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let inside = Arc::new(AtomicU64::new(0));
        let overlaps = Arc::new(AtomicU64::new(0));
        let events = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(BTreeMap::new()));
        let register = Arc::new(FencedRegister::new(0_u64));
        let mut tasks = Vec::new();
        for n in 0..TASKS {
            let (lock, stop, accepted, inside, overlaps) = (
                lock.clone(),
                stop.clone(),
                accepted.clone(),
                inside.clone(),
                overlaps.clone(),
            );
            let (events, errors, register) = (events.clone(), errors.clone(), register.clone());
            tasks.push(rt.spawn(async move {
                let who = format!("task{n}");
                let count = |what: String| *errors.lock().unwrap().entry(what).or_insert(0) += 1;
                while !stop.load(Ordering::SeqCst) {
                    let lease = match lock.acquire("job", TTL, Duration::from_secs(2)).await {
                        Ok(lease) => lease,
                        Err(e) => {
                            count(format!("acquire: {}", kind(&e)));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    let token = lease.token();
                    let start = now_ns();
                    // Read, yield, write back (both fenced): a second holder inside at
                    // the same time shows up as an overlap or a refused write.
                    let written = match register.read(token) {
                        Ok(v) => {
                            tokio::task::yield_now().await;
                            register.write(token, v + 1).map(|()| v + 1)
                        }
                        Err(e) => Err(e),
                    };
                    let end = now_ns();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    let (value, outcome) = match written {
                        Ok(v) => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            (v.to_string(), Outcome::Accepted)
                        }
                        Err(Error::StaleToken { current, .. }) => {
                            ("-".into(), Outcome::Refused { current: current.0 })
                        }
                        Err(e) => panic!("the register failed: {e}"),
                    };
                    events.lock().unwrap().push(Event {
                        who: who.clone(),
                        token: token.0,
                        value,
                        outcome,
                        start,
                        end,
                    });
                    match lock.release(lease).await {
                        Ok(Release::Released) => {}
                        Ok(other) => count(format!("release: {other:?}")),
                        Err(e) => count(format!("release: {}", kind(&e))),
                    }
                }
            }));
        }
        Run {
            stop,
            accepted,
            overlaps,
            events,
            errors,
            register,
            tasks,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until `n` more writes were accepted; returns how many there were before.
    fn wait_for_writes(&self, n: u64, when: &str) -> u64 {
        let before = self.accepted();
        sd_testkit::eventually_blocking(&format!("{n} writes accepted {when}"), || {
            self.accepted() >= before + n
        });
        before
    }

    /// Stops the tasks and judges the whole history.
    fn finish(self, rt: &tokio::runtime::Runtime) {
        self.stop.store(true, Ordering::SeqCst);
        rt.block_on(async {
            for t in self.tasks {
                t.await.unwrap();
            }
        });
        let events = self.events.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        let final_value = self.register.peek();
        let accepted = events.iter().filter(|e| e.accepted()).count() as u64;
        let refused = events.len() as u64 - accepted;
        eprintln!(
            "{} writes ({accepted} accepted, {refused} refused); errors counted: {errors:?}",
            events.len()
        );
        history::check_fencing(&events, Some(&final_value.to_string()));
        assert_eq!(final_value, accepted, "lost update");
        assert_eq!(
            self.overlaps.load(Ordering::SeqCst),
            0,
            "two holders inside at once"
        );
        assert_eq!(
            refused, 0,
            "the lock handed out a token older than one already used"
        );
    }
}

/// Redlock over `n` masters: one master paused, then killed, while the workload runs;
/// the quorum keeps granting throughout.
#[cfg(feature = "redis")]
fn redlock_with_a_master_paused_then_killed(n: usize) {
    let mut servers = sd_testkit::RedisServer::start_many(n).expect("redis-server");
    let rt = common::runtime();
    let lock = rt.block_on(async {
        let mut masters = Vec::new();
        for s in &servers {
            masters.push((s.url(), common::manager(&s.url()).await));
        }
        let lock = sd_lock::redlock::Redlock::new(masters).unwrap();
        BoxLock::new(lock.with_retry(fast_retry()))
    });
    let run = Run::start(&rt, lock);
    run.wait_for_writes(20, "before the fault");
    servers[0].pause().unwrap();
    run.wait_for_writes(20, "with a master paused");
    servers[0].kill().unwrap();
    run.wait_for_writes(20, "with a master killed");
    run.finish(&rt);
}

#[cfg(feature = "redis")]
#[test]
fn redlock_3_masters_one_paused_then_killed() {
    redlock_with_a_master_paused_then_killed(3);
}

#[cfg(feature = "redis")]
#[test]
fn redlock_5_masters_one_paused_then_killed() {
    redlock_with_a_master_paused_then_killed(5);
}

/// A single server paused for a second and resumed under the workload:
/// `pause_briefly` pauses it, waits until it is stopped, sleeps, resumes it and returns
/// when the server was stopped and when it was resumed. Acquires and releases fail or
/// wait meanwhile; afterwards the workload goes on.
fn single_server_paused(
    rt: &tokio::runtime::Runtime,
    lock: BoxLock,
    pause_briefly: impl FnOnce() -> (u64, u64),
) {
    let run = Run::start(rt, lock);
    run.wait_for_writes(20, "before the pause");
    let (paused_at, resumed_at) = pause_briefly();
    run.wait_for_writes(20, "after the pause");
    // A stopped server grants nothing: a write inside the pause comes from a reply sent
    // before it, at most one per task (each task waits for each call).
    let during = run
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.start > paused_at && e.end < resumed_at)
        .count();
    assert!(
        during <= TASKS,
        "{during} writes while the only server was stopped"
    );
    run.finish(rt);
}

fn fast_retry() -> sd_lock::RetryPolicy {
    common::backoff(Duration::from_micros(500), Duration::from_millis(5))
}

macro_rules! pause_for_a_second {
    ($server:expr) => {
        || {
            $server.pause().unwrap();
            let pid = $server.pid().unwrap();
            sd_testkit::eventually_blocking("the server is stopped", || {
                sd_testkit::is_stopped(pid)
            });
            let paused_at = now_ns();
            std::thread::sleep(Duration::from_secs(1));
            let resumed_at = now_ns();
            $server.resume().unwrap();
            (paused_at, resumed_at)
        }
    };
}

#[cfg(feature = "redis")]
#[test]
fn redis_paused_and_resumed() {
    let mut server = sd_testkit::RedisServer::start().expect("redis-server");
    let rt = common::runtime();
    let lock = rt.block_on(async {
        let lock = sd_lock::redis::RedisLock::new(common::manager(&server.url()).await);
        BoxLock::new(lock.with_retry(fast_retry()))
    });
    single_server_paused(&rt, lock, pause_for_a_second!(server));
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_paused_and_resumed() {
    let mut server = sd_testkit::PostgresServer::start().expect("postgres");
    let db = server.create_database().expect("a database");
    let rt = common::runtime();
    let lock = rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(db.url())
            .await
            .unwrap();
        let lock = sd_lock::postgres::PostgresLock::new(pool);
        lock.migrate().await.unwrap();
        BoxLock::new(lock.with_retry(fast_retry()))
    });
    single_server_paused(&rt, lock, pause_for_a_second!(server));
    drop(db);
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_paused_and_resumed() {
    let mut server = sd_testkit::EtcdServer::start().expect("etcd");
    let rt = common::runtime();
    let lock = rt.block_on(async {
        let client = etcd_client::Client::connect([server.url()], None)
            .await
            .unwrap();
        let lock = sd_lock::etcd::EtcdLock::new(client);
        BoxLock::new(lock.with_retry(fast_retry()))
    });
    single_server_paused(&rt, lock, pause_for_a_second!(server));
}
