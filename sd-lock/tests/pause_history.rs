//! The semaphore and the election under the history checker, with holders in child
//! processes: four holders (this test binary run again with `SD_LOCK_SEMAPHORE_HOLDER`
//! set) share two permits of a semaphore, or campaign for one election, each writing
//! through its slot's fence (the election: one fence, with the term's token) every 20 ms
//! and giving the permit back or resigning, every write logged as a raw event. The test
//! SIGSTOPs the holders caught mid-permit (two, or the leader) past their leases while
//! the others go on, SIGCONTs them so their late writes reach the fences, then kills the
//! lock's server (SIGKILL) and starts it again while all four keep going. The whole
//! history must pass the checker: never more than two holders (one leader) whose writes
//! were accepted at once (`history::check_at_most`), never two leaders accepted with one
//! term's token (`history::check_one_writer_per_token`), and each slot's fence history
//! passes `history::check_fencing`.
//!
//! Backends: Redis (the fence on a second Redis, so the fences outlive the lock
//! server's restart without persistence), PostgreSQL (lock and fence in one database;
//! the server restarts on its data directory) and etcd (the fence on Redis; etcd
//! restarts on its data directory).
#![cfg(any(feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used)]

mod common;
mod history;

use std::sync::atomic::Ordering;
use std::time::Duration;

use history::child::{Holder, emit, stop_on_stdin_close};
use history::fence::Fence;
use history::{Event, Outcome, now_ns, record};
use sd_lock::election::{BoxElection, Election, Term};
use sd_lock::semaphore::{BoxSemaphore, Permit, Semaphore};

const CHILD_ENV: &str = "SD_LOCK_SEMAPHORE_HOLDER";
const RESOURCE: &str = "psp";
const PERMITS: u32 = 2;
const HOLDERS: usize = 4;

/// Where the semaphore and the fences live, and which holder a child is.
#[derive(Debug, Clone)]
struct Spec {
    backend: String,
    lock_url: String,
    fence_url: String,
    prefix: String,
    ttl_ms: u64,
    who: String,
    /// `semaphore` (two permits) or `election` (one leader).
    kind: String,
}

impl Spec {
    /// How many holders may write at once: the semaphore's permits, or one leader.
    fn bound(&self) -> u32 {
        if self.kind == "election" { 1 } else { PERMITS }
    }

    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.backend,
            self.lock_url,
            self.fence_url,
            self.prefix,
            self.ttl_ms,
            self.who,
            self.kind
        )
    }

    fn decode(s: &str) -> Spec {
        let f: Vec<&str> = s.split(' ').collect();
        Spec {
            backend: f[0].to_owned(),
            lock_url: f[1].to_owned(),
            fence_url: f[2].to_owned(),
            prefix: f[3].to_owned(),
            ttl_ms: f[4].parse().unwrap(),
            who: f[5].to_owned(),
            kind: f[6].to_owned(),
        }
    }
}

/// What a holder takes: a permit of the semaphore, or a term of the election.
enum Grantor {
    Semaphore(BoxSemaphore),
    Election(BoxElection),
}

/// A permit or a term held.
enum Grant {
    Permit(Permit),
    Term(Term),
}

impl Grant {
    /// The token, the slot (0 for a term) and the fence to write through.
    fn parts(&self) -> (u64, u32, String) {
        match self {
            Grant::Permit(p) => (p.token().0, p.slot(), p.fence_resource()),
            Grant::Term(t) => (t.token().0, 0, format!("{RESOURCE}#0")),
        }
    }
}

impl Grantor {
    /// The semaphore or election of `spec`, chosen at run time.
    async fn open(spec: &Spec) -> Grantor {
        let retry = common::backoff(Duration::from_millis(2), Duration::from_millis(20));
        let ttl = Duration::from_millis(spec.ttl_ms);
        let semaphore = spec.kind == "semaphore";
        match spec.backend.as_str() {
            #[cfg(feature = "redis")]
            "redis" => {
                let conn = common::manager(&spec.lock_url).await;
                if semaphore {
                    Grantor::Semaphore(BoxSemaphore::new(
                        sd_lock::semaphore::redis::RedisSemaphore::builder(conn)
                            .permits(PERMITS)
                            .prefix(&spec.prefix)
                            .retry(retry)
                            .build()
                            .unwrap(),
                    ))
                } else {
                    Grantor::Election(BoxElection::new(
                        sd_lock::election::redis::RedisElection::builder(conn)
                            .prefix(&spec.prefix)
                            .ttl(ttl)
                            .retry(retry)
                            .build()
                            .unwrap(),
                    ))
                }
            }
            #[cfg(feature = "postgres")]
            "postgres" => {
                let pool = history::fence::pg_pool(&spec.lock_url).await;
                if semaphore {
                    Grantor::Semaphore(BoxSemaphore::new(
                        sd_lock::semaphore::postgres::PostgresSemaphore::builder(pool)
                            .permits(PERMITS)
                            .retry(retry)
                            .build()
                            .unwrap(),
                    ))
                } else {
                    Grantor::Election(BoxElection::new(
                        sd_lock::election::postgres::PostgresElection::builder(pool)
                            .ttl(ttl)
                            .retry(retry)
                            .build()
                            .unwrap(),
                    ))
                }
            }
            #[cfg(feature = "etcd")]
            "etcd" => {
                let client = etcd_client::Client::connect([spec.lock_url.as_str()], None)
                    .await
                    .unwrap();
                let prefix = format!("{}/", spec.prefix);
                if semaphore {
                    Grantor::Semaphore(BoxSemaphore::new(
                        sd_lock::semaphore::etcd::EtcdSemaphore::builder(client)
                            .permits(PERMITS)
                            .prefix(prefix)
                            .retry(retry)
                            .build()
                            .unwrap(),
                    ))
                } else {
                    Grantor::Election(BoxElection::new(
                        sd_lock::election::etcd::EtcdElection::builder(client)
                            .prefix(prefix)
                            .ttl(ttl)
                            .build()
                            .unwrap(),
                    ))
                }
            }
            other => panic!("no backend `{other}` in this build"),
        }
    }

    /// Takes a permit or wins a term, waiting a second at most.
    async fn take(&self, who: &str, ttl: Duration) -> sd_lock::Result<Grant> {
        let wait = Duration::from_secs(1);
        Ok(match self {
            Grantor::Semaphore(s) => Grant::Permit(s.acquire(RESOURCE, ttl, wait).await?),
            Grantor::Election(e) => Grant::Term(e.campaign(RESOURCE, who, wait).await?),
        })
    }

    /// Gives a permit back or resigns a term (errors ignored: the server may be down).
    async fn give_back(&self, grant: Grant) {
        match (self, grant) {
            (Grantor::Semaphore(s), Grant::Permit(p)) => drop(s.release(p).await),
            (Grantor::Election(e), Grant::Term(t)) => drop(e.resign(t).await),
            _ => unreachable!("a grant goes back where it came from"),
        }
    }
}

/// The child's side: until stdin closes, take a permit, write through its slot's fence
/// up to eight times 20 ms apart (stopping at a refusal), give it back. Errors while a
/// server is down are events (`failed`) or a retry, never the end.
fn run_holder(spec: &Spec) {
    let stop = stop_on_stdin_close();
    common::runtime().block_on(async {
        let grantor = Grantor::open(spec).await;
        let fence = Fence::open(&spec.backend, &spec.fence_url, &spec.prefix).await;
        let ttl = Duration::from_millis(spec.ttl_ms);
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let grant = match grantor.take(&spec.who, ttl).await {
                Ok(grant) => grant,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (token, slot, fenced) = grant.parts();
            let who = format!("{}@{slot}", spec.who);
            for _ in 0..8 {
                let value = format!("{who}-{i}");
                i += 1;
                let write = fence.write(&fenced, token, &value);
                let event = record(&who, token, &value, write).await;
                emit(format_args!("{event}"));
                if event.outcome != Outcome::Accepted || stop.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            grantor.give_back(grant).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

/// In the child process, runs the holder and returns true.
fn holder_child() -> bool {
    match std::env::var(CHILD_ENV) {
        Ok(spec) => {
            run_holder(&Spec::decode(&spec));
            true
        }
        Err(_) => false,
    }
}

/// The slot an event's writer held: `who` is `holder@slot`.
fn slot_of(e: &Event) -> &str {
    e.who.rsplit('@').next().unwrap_or_default()
}

/// Whether `holder` is in the middle of a permit: its last write was accepted less than
/// 40 ms ago, and it has writes left on that permit.
fn holding(holder: &Holder) -> bool {
    let events = holder.events();
    let Some(last) = events.last() else {
        return false;
    };
    let used = events.iter().filter(|e| e.token == last.token).count();
    last.accepted() && now_ns().saturating_sub(last.end) < 40_000_000 && used < 7
}

/// Every event the holders logged so far.
fn all_events(holders: &[Holder]) -> Vec<Event> {
    holders.iter().flat_map(Holder::events).collect()
}

/// The scenario, run by the test named `test`: `start` starts the servers and returns
/// the spec (`who` left empty) and a function that kills the lock server and starts it
/// again.
fn at_most_permits_writers<S: Send + 'static>(
    test: &str,
    start: impl FnOnce() -> (Spec, S),
    kill_and_restart: impl FnOnce(&mut S),
) {
    if holder_child() {
        return;
    }
    let (spec, mut servers) = start();
    let rt = common::runtime();
    let fence = rt.block_on(async {
        let fence = Fence::open(&spec.backend, &spec.fence_url, &spec.prefix).await;
        fence.prepare().await;
        #[cfg(feature = "postgres")]
        if spec.backend == "postgres" {
            let pool = history::fence::pg_pool(&spec.lock_url).await;
            sd_lock::semaphore::postgres::PostgresSemaphore::builder(pool.clone())
                .build()
                .unwrap()
                .migrate()
                .await
                .unwrap();
            sd_lock::election::postgres::PostgresElection::builder(pool)
                .build()
                .unwrap()
                .migrate()
                .await
                .unwrap();
        }
        fence
    });
    let mut holders: Vec<Holder> = (0..HOLDERS)
        .map(|n| {
            let spec = Spec {
                who: format!("h{n}"),
                ..spec.clone()
            };
            Holder::spawn(test, CHILD_ENV, &spec.encode())
        })
        .collect();
    let accepted_since = |holders: &[Holder], since: u64, who: &str| {
        all_events(holders)
            .iter()
            .filter(|e| e.accepted() && e.start > since && e.who.starts_with(who))
            .count()
    };
    sd_testkit::eventually_blocking("every holder wrote", || {
        (0..HOLDERS).all(|n| accepted_since(&holders, 0, &format!("h{n}@")) > 0)
    });

    // Pause two holders in the middle of a permit; keep them stopped until both slots
    // were written by the other two after a full lease went by, so the permits the
    // paused ones held have expired and were taken over.
    let bound = spec.bound() as usize;
    let paused: Vec<usize> = loop {
        let busy: Vec<usize> = (0..HOLDERS).filter(|&n| holding(&holders[n])).collect();
        if busy.len() >= bound {
            break busy[..bound].to_vec();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    for &n in &paused {
        holders[n].signal(libc::SIGSTOP);
    }
    for &n in &paused {
        let pid = holders[n].child.id();
        sd_testkit::eventually_blocking("the holder is stopped", || sd_testkit::is_stopped(pid));
    }
    let others: Vec<usize> = (0..HOLDERS).filter(|n| !paused.contains(n)).collect();
    let stopped_at = now_ns();
    let lease_ns = spec.ttl_ms * 1_000_000;
    sd_testkit::eventually_blocking("the others wrote on both slots after a lease", || {
        let after = stopped_at + lease_ns;
        (0..spec.bound()).all(|slot| {
            others.iter().flat_map(|&n| holders[n].events()).any(|e| {
                e.accepted() && e.start > after && slot_of(&e) == slot.to_string().as_str()
            })
        })
    });
    let resumed_at = now_ns();
    for &n in &paused {
        holders[n].signal(libc::SIGCONT);
    }
    sd_testkit::eventually_blocking("the resumed holders wrote again", || {
        paused
            .iter()
            .all(|&n| holders[n].events().iter().any(|e| e.start > resumed_at))
    });

    // Kill the lock's server and start it again; every holder keeps going.
    kill_and_restart(&mut servers);
    let restarted_at = now_ns();
    sd_testkit::eventually_blocking("every holder wrote after the restart", || {
        (0..HOLDERS).all(|n| accepted_since(&holders, restarted_at, &format!("h{n}@")) >= 3)
    });

    let mut all = Vec::new();
    for h in holders.drain(..) {
        all.extend(h.finish());
    }
    let dump = || {
        all.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    history::check_at_most(&all, bound);
    history::check_one_writer_per_token(&all);
    for slot in 0..spec.bound() {
        let resource = format!("{RESOURCE}#{slot}");
        let ours: Vec<Event> = all
            .iter()
            .filter(|e| slot_of(e) == slot.to_string().as_str())
            .cloned()
            .collect();
        let newest = ours.iter().map(|e| e.token).max().unwrap();
        let final_value = rt.block_on(fence.final_value(&resource, newest));
        history::check_fencing(&ours, final_value.as_deref());
    }
    // The paused holders tried writes after SIGCONT with the permit they held when
    // stopped, and none was accepted: their slots had newer holders (PostgreSQL ends a
    // stopped holder's open transaction, so its late write may fail instead of being
    // refused).
    let mut late = Vec::new();
    for paused in paused.iter().map(|n| format!("h{n}@")) {
        let before = all
            .iter()
            .filter(|e| e.who.starts_with(&paused) && e.end < stopped_at)
            .max_by_key(|e| e.end)
            .map(|e| e.token);
        late.extend(all.iter().filter(|e| {
            e.who.starts_with(&paused) && e.start > resumed_at && Some(e.token) == before
        }));
    }
    assert!(
        !late.is_empty(),
        "the paused holders never wrote with their old permits:\n{}",
        dump()
    );
    assert!(
        late.iter().all(|e| !e.accepted()),
        "a late write with a lapsed permit was accepted:\n{}",
        dump()
    );
    // Permits changed hands many times.
    let terms: std::collections::BTreeSet<u64> = all
        .iter()
        .filter(|e| e.accepted())
        .map(|e| e.token)
        .collect();
    assert!(
        terms.len() > 2 * HOLDERS,
        "too few permits granted:\n{}",
        dump()
    );
}

/// The scenario on Redis: the lock on one server, killed and restarted empty (no
/// persistence: every lease and term is lost); the fences on a second one.
#[cfg(feature = "redis")]
fn on_redis(test: &str, kind: &str) {
    at_most_permits_writers(
        test,
        || {
            let lock = sd_testkit::RedisServer::start().expect("redis-server");
            let fence = sd_testkit::redis().expect("redis-server");
            let spec = Spec {
                backend: "redis".into(),
                lock_url: lock.url(),
                fence_url: fence.url().to_owned(),
                prefix: sd_testkit::unique_name("pause"),
                ttl_ms: 1000,
                who: String::new(),
                kind: kind.into(),
            };
            (spec, (lock, fence))
        },
        |(lock, _)| lock.restart_clean().expect("restart redis"),
    );
}

/// The scenario on PostgreSQL: lock and fence in one database, the server killed and
/// started again on its data directory.
#[cfg(feature = "postgres")]
fn on_postgres(test: &str, kind: &str) {
    at_most_permits_writers(
        test,
        || {
            let server = sd_testkit::PostgresServer::start().expect("postgres");
            let db = server.create_database().expect("a database");
            let spec = Spec {
                backend: "postgres".into(),
                lock_url: db.url().to_owned(),
                fence_url: db.url().to_owned(),
                prefix: sd_testkit::unique_name("pause"),
                ttl_ms: 1000,
                who: String::new(),
                kind: kind.into(),
            };
            // The database goes first when the test ends, while the server still runs.
            (spec, (db, server))
        },
        |(_, server)| {
            server.kill().expect("kill postgres");
            server.start_again().expect("start postgres again");
        },
    );
}

#[cfg(feature = "redis")]
#[test]
fn at_most_permits_writers_on_redis() {
    on_redis("at_most_permits_writers_on_redis", "semaphore");
}

#[cfg(feature = "postgres")]
#[test]
fn at_most_permits_writers_on_postgres() {
    on_postgres("at_most_permits_writers_on_postgres", "semaphore");
}

#[cfg(feature = "redis")]
#[test]
fn one_leader_writes_per_term_on_redis() {
    on_redis("one_leader_writes_per_term_on_redis", "election");
}

#[cfg(feature = "postgres")]
#[test]
fn one_leader_writes_per_term_on_postgres() {
    on_postgres("one_leader_writes_per_term_on_postgres", "election");
}

/// The scenario on etcd: the lock on an etcd server, killed and started again on its
/// data; the fences on a Redis server (etcd has no fence store in sd-lock).
#[cfg(all(feature = "etcd", feature = "redis"))]
fn on_etcd(test: &str, kind: &str) {
    at_most_permits_writers(
        test,
        || {
            let lock = sd_testkit::EtcdServer::start().expect("etcd");
            let fence = sd_testkit::redis().expect("redis-server");
            let spec = Spec {
                backend: "etcd".into(),
                lock_url: lock.url(),
                fence_url: fence.url().to_owned(),
                prefix: sd_testkit::unique_name("pause"),
                ttl_ms: 2000,
                who: String::new(),
                kind: kind.into(),
            };
            (spec, (lock, fence))
        },
        |(lock, _)| {
            lock.kill().expect("kill etcd");
            lock.start_again().expect("start etcd again");
        },
    );
}

#[cfg(all(feature = "etcd", feature = "redis"))]
#[test]
fn at_most_permits_writers_on_etcd() {
    on_etcd("at_most_permits_writers_on_etcd", "semaphore");
}

#[cfg(all(feature = "etcd", feature = "redis"))]
#[test]
fn one_leader_writes_per_term_on_etcd() {
    on_etcd("one_leader_writes_per_term_on_etcd", "election");
}
