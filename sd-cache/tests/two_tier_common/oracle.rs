//! The staleness checker's load and oracle, shared by the single-server and the Cluster
//! runs: writers and readers on independent instances, a raw event log, and the judge.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::ConnectionLike;
use sd_cache::{Error, TwoTier};

use super::until_serving;
use crate::common::eventually;

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

/// One operation, the fault phase when it started and when it ended, and when it ended
/// (milliseconds since the load began; [`Probe::mark`] prints the disturbance's steps on the
/// same clock).
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // `at_ms` is printed (Debug) when the oracle fails.
struct Event {
    outcome: Outcome,
    started: u8,
    ended: u8,
    at_ms: u128,
}

/// No fault yet; the fault is on (server killed or frozen, until every instance serves
/// from memory again); the fault is over.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

/// The load's shared state: the oracle's event log, and the fault phase that the
/// disturbance sets.
pub(crate) struct Probe {
    began: std::time::Instant,
    phase: AtomicU8,
    events: std::sync::Mutex<Vec<Event>>,
    read_failures: AtomicUsize,
    write_failures: AtomicUsize,
    /// The fault may pass without failing any operation (a connection that waits for the
    /// new master instead of failing): the judge does not require failures then.
    failures_optional: AtomicBool,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            began: std::time::Instant::now(),
            phase: AtomicU8::default(),
            events: std::sync::Mutex::default(),
            read_failures: AtomicUsize::default(),
            write_failures: AtomicUsize::default(),
            failures_optional: AtomicBool::default(),
        }
    }
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
            at_ms: self.began.elapsed().as_millis(),
        });
    }

    /// Prints a step of the disturbance on the events' clock.
    pub(crate) fn mark(&self, step: &str) {
        eprintln!("at {} ms: {step}", self.began.elapsed().as_millis());
    }

    /// Failures during the fault are allowed but not required (see the field).
    pub(crate) fn failures_optional(&self) {
        self.failures_optional.store(true, Ordering::SeqCst);
    }

    /// Operations that failed so far: (reads, writes).
    pub(crate) fn failures(&self) -> (usize, usize) {
        (
            self.read_failures.load(Ordering::SeqCst),
            self.write_failures.load(Ordering::SeqCst),
        )
    }

    /// The fault begins now (call before killing or freezing the server).
    pub(crate) fn fault_begins(&self) {
        self.phase.store(DURING, Ordering::SeqCst);
    }

    /// The fault is over (call once the server is back and the instances recovered).
    pub(crate) fn fault_ends(&self) {
        self.phase.store(AFTER, Ordering::SeqCst);
    }

    /// Waits until reads and writes have failed since the fault began and no instance
    /// serves from memory: the fault provably hit the load.
    pub(crate) async fn until_the_fault_hits<C>(&self, instances: &[TwoTier<u64, C>])
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
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
pub(crate) async fn check_no_stale_reads<C, D, Fut, T>(
    instances: Vec<TwoTier<u64, C>>,
    writes_per_key: u64,
    disturb: D,
) -> T
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    D: FnOnce(Arc<Probe>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let keys = std::array::from_fn(|k| format!("k{k}"));
    check_no_stale_reads_of(keys, instances, writes_per_key, disturb).await
}

/// [`check_no_stale_reads`] on the keys named (the cache's keys, three of them).
pub(crate) async fn check_no_stale_reads_of<C, D, Fut, T>(
    names: [String; 3],
    instances: Vec<TwoTier<u64, C>>,
    writes_per_key: u64,
    disturb: D,
) -> T
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
    D: FnOnce(Arc<Probe>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    const KEYS: usize = 3;
    let names = Arc::new(names);
    let db = Arc::new(Db {
        rows: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
        committed: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
    });
    let probe = Arc::new(Probe::default());
    let done = Arc::new(AtomicBool::new(false));
    let stop_writing = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..32 {
        let (cache, db, done, probe, names) = (
            instances[r % instances.len()].clone(),
            db.clone(),
            done.clone(),
            probe.clone(),
            names.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !done.load(Ordering::SeqCst) {
                let k = i % KEYS;
                i += 1;
                let started = probe.phase();
                let floor = db.committed[k].load(Ordering::SeqCst);
                let key = &names[k];
                let seen = if i % 3 == 0 {
                    cache.get(key).await
                } else {
                    let db = db.clone();
                    cache
                        .get_or_load(
                            key,
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
        let key = names[k].clone();
        writers.push(tokio::spawn(async move {
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
    judge(
        &probe.events.lock().unwrap(),
        !probe.failures_optional.load(Ordering::SeqCst),
    );
    disturbed
}

/// The oracle over the raw events (see [`check_no_stale_reads`]).
fn judge(events: &[Event], require_failures: bool) {
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
        !require_failures || (read_failures > 0 && write_failures > 0),
        "the fault overlapped the load: {read_failures} reads and {write_failures} writes failed during it"
    );
    let reads_after = count(&|e| e.started == AFTER && matches!(e.outcome, Outcome::Read { .. }));
    let writes_after = count(&|e| e.started == AFTER && matches!(e.outcome, Outcome::Wrote { .. }));
    assert!(
        reads_after > 0 && writes_after > 0,
        "the load went on after the fault: {reads_after} reads, {writes_after} writes"
    );
    eprintln!(
        "{} events, 0 stale reads; during the fault {read_failures} reads and {write_failures} writes failed; after it {reads_after} reads and {writes_after} writes",
        events.len()
    );
}
