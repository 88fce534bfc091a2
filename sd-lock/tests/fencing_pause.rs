//! Fencing under a real pause of the HOLDER: a child process (this test binary run
//! again with `SD_LOCK_PAUSED_HOLDER` set) takes the lock, prints its token and writes
//! through the fenced store in a loop, logging every attempt as a raw event. The test
//! SIGSTOPs it past its lease while tasks of this process take the lock and write
//! through the same fence, then SIGCONTs it so its late writes reach the store. The
//! checker judges the whole history (`history::check_fencing`), and asserts the paused
//! holder did try late writes, that all were refused, and that the others made progress
//! while it was stopped.
//!
//! Backends: Redis single node and Redlock over 3 masters fence through `RedisFence`;
//! PostgreSQL through `PostgresFence` in the writing transaction; etcd (no fence store
//! of its own) through `RedisFence` with the etcd lock's token.
#![cfg(any(feature = "redis", feature = "postgres"))]
#![allow(clippy::unwrap_used, unsafe_code)]

mod common;
mod history;

use std::sync::atomic::Ordering;
use std::time::Duration;

use history::child::{Holder, emit, stop_on_stdin_close};
use history::fence::Fence;
#[cfg(feature = "redis")]
use history::fence::patient_manager;
#[cfg(feature = "postgres")]
use history::fence::pg_pool;
use history::{Event, Outcome, now_ns, record};
use sd_lock::{BoxLock, Lock, Release};

const CHILD_ENV: &str = "SD_LOCK_PAUSED_HOLDER";
const RESOURCE: &str = "acct";

/// Where the lock and the fence live; passed to the child as one line.
#[derive(Debug, Clone)]
struct Spec {
    /// `redis`, `redlock`, `postgres` or `etcd`.
    backend: String,
    /// The lock server(s), comma-separated for Redlock.
    lock_urls: String,
    /// The fence's server: Redis URL, or the PostgreSQL database.
    fence_url: String,
    /// Key prefix (Redis, etcd) unique to the run.
    prefix: String,
    ttl_ms: u64,
}

impl Spec {
    /// The scenario on `backend`, under a key prefix unique to the run.
    fn new(backend: &str, lock_urls: String, fence_url: &str, ttl_ms: u64) -> Spec {
        Spec {
            backend: backend.to_owned(),
            lock_urls,
            fence_url: fence_url.to_owned(),
            prefix: sd_testkit::unique_name("pause"),
            ttl_ms,
        }
    }

    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.backend, self.lock_urls, self.fence_url, self.prefix, self.ttl_ms
        )
    }

    fn decode(s: &str) -> Spec {
        let f: Vec<&str> = s.split(' ').collect();
        Spec {
            backend: f[0].to_owned(),
            lock_urls: f[1].to_owned(),
            fence_url: f[2].to_owned(),
            prefix: f[3].to_owned(),
            ttl_ms: f[4].parse().unwrap(),
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

/// The lock of `spec`, boxed: the backend is chosen from the spec at run time.
async fn open_lock(spec: &Spec, patient: bool) -> BoxLock {
    let _ = patient;
    match spec.backend.as_str() {
        #[cfg(feature = "redis")]
        "redis" => {
            let conn = if patient {
                patient_manager(&spec.lock_urls).await
            } else {
                common::manager(&spec.lock_urls).await
            };
            let lock = sd_lock::redis::RedisLock::builder(conn)
                .prefix(&spec.prefix)
                .build()
                .unwrap();
            BoxLock::new(lock)
        }
        #[cfg(feature = "redis")]
        "redlock" => {
            let mut masters = Vec::new();
            for url in spec.lock_urls.split(',') {
                masters.push((url.to_owned(), common::manager(url).await));
            }
            let lock = sd_lock::redlock::Redlock::builder(masters)
                .prefix(&spec.prefix)
                .build()
                .unwrap();
            BoxLock::new(lock)
        }
        #[cfg(feature = "postgres")]
        "postgres" => {
            let lock = sd_lock::postgres::PostgresLock::new(pg_pool(&spec.lock_urls).await);
            BoxLock::new(lock)
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let client = etcd_client::Client::connect([spec.lock_urls.as_str()], None)
                .await
                .unwrap();
            let lock = sd_lock::etcd::EtcdLock::builder(client)
                .prefix(format!("{}/", spec.prefix))
                .build()
                .unwrap();
            BoxLock::new(lock)
        }
        other => panic!("no lock backend `{other}` in this build"),
    }
}

/// The child's side: take the lock once, print the token, then write every 20 ms until
/// three writes were refused or stdin closes. Never renews: it is the holder that
/// pauses past its lease.
fn run_holder(spec: &Spec) {
    let stop = stop_on_stdin_close();
    common::runtime().block_on(async {
        let lock = open_lock(spec, true).await;
        let fence = Fence::open(&spec.backend, &spec.fence_url, &spec.prefix).await;
        let lease = lock
            .acquire(RESOURCE, spec.ttl(), Duration::from_secs(30))
            .await
            .unwrap();
        let token = lease.token().0;
        emit(format_args!("SDLOCK-TOKEN {token}"));
        let mut refused = 0;
        let mut i = 0;
        while refused < 3 && !stop.load(Ordering::SeqCst) {
            let value = format!("paused-{i}");
            let event = record(
                "paused",
                token,
                &value,
                fence.write(RESOURCE, token, &value),
            )
            .await;
            if matches!(event.outcome, Outcome::Refused { .. }) {
                refused += 1;
            }
            emit(format_args!("{event}"));
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Never released: it expired while the holder was stopped.
        drop(lease);
    });
}

/// The fault test, run by the test named `test` (the child re-runs it, and runs the
/// holder instead): `start` starts the servers and returns the scenario's spec with
/// what keeps them running until the end.
fn paused_holder_is_fenced<S>(test: &str, start: impl FnOnce() -> (Spec, S)) {
    if holder_child() {
        return;
    }
    let (spec, _servers) = start();
    let rt = common::runtime();
    let (lock, fence) = rt.block_on(async {
        let fence = Fence::open(&spec.backend, &spec.fence_url, &spec.prefix).await;
        fence.prepare().await;
        (open_lock(&spec, false).await, fence)
    });
    let mut holder = Holder::spawn(test, CHILD_ENV, &spec.encode());
    sd_testkit::eventually_blocking("the holder wrote twice", || {
        assert!(!holder.exited(), "the holder process ended before writing");
        holder.events().iter().filter(|e| e.accepted()).count() >= 2
    });
    let child_token = holder.token.lock().unwrap().unwrap();

    // Stop the holder and keep it stopped until others took the lock after its lease
    // ran out and wrote: that is "past its lease" whatever the machine's speed.
    holder.signal(libc::SIGSTOP);
    let pid = holder.child.id();
    sd_testkit::eventually_blocking("the holder is stopped", || sd_testkit::is_stopped(pid));
    let stopped_at = now_ns();
    let ours: Vec<Event> = rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..2 {
            let (lock, fence, ttl) = (lock.clone(), fence.clone(), spec.ttl());
            tasks.push(tokio::spawn(async move {
                let who = format!("holder{n}");
                let lease = lock
                    .acquire(RESOURCE, ttl * 10, Duration::from_secs(60))
                    .await
                    .unwrap();
                let token = lease.token().0;
                let mut events = Vec::new();
                for i in 0..3 {
                    let value = format!("{who}-{i}");
                    events.push(
                        record(&who, token, &value, fence.write(RESOURCE, token, &value)).await,
                    );
                }
                assert_eq!(lock.release(lease).await.unwrap(), Release::Released);
                events
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let resumed_at = now_ns();
    holder.signal(libc::SIGCONT);
    sd_testkit::eventually_blocking("the resumed holder tried three late writes", || {
        holder
            .events()
            .iter()
            .filter(|e| e.start > resumed_at)
            .count()
            >= 3
            || holder.exited()
    });
    let theirs = holder.finish();

    let mut all = theirs.clone();
    all.extend(ours.iter().cloned());
    let newest = all.iter().map(|e| e.token).max().unwrap();
    let final_value = rt.block_on(fence.final_value(RESOURCE, newest));
    let dump = || {
        all.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    // (a), (b) and the final value, over every event of every holder.
    history::check_fencing(&all, final_value.as_deref());
    // The new holders got newer tokens than the paused one.
    assert!(
        ours.iter().all(|e| e.token > child_token),
        "a new holder got a token not newer than {child_token}:\n{}",
        dump()
    );
    // (c) the paused holder tried late writes after SIGCONT, and all were refused.
    let late: Vec<&Event> = theirs.iter().filter(|e| e.start > resumed_at).collect();
    assert!(
        !late.is_empty(),
        "the paused holder never wrote after resuming:\n{}",
        dump()
    );
    assert!(
        late.iter().all(|e| !e.accepted()),
        "(c) a late write of the paused holder was accepted:\n{}",
        dump()
    );
    assert!(
        late.iter()
            .any(|e| matches!(e.outcome, Outcome::Refused { .. })),
        "(c) no late write was refused as stale:\n{}",
        dump()
    );
    // (d) the others made progress while it was stopped.
    let during = ours
        .iter()
        .filter(|e| e.accepted() && e.start > stopped_at && e.end < resumed_at)
        .count();
    assert!(during > 0, "(d) nobody wrote during the pause:\n{}", dump());
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

#[cfg(feature = "redis")]
#[test]
fn paused_holder_is_fenced_on_redis() {
    paused_holder_is_fenced("paused_holder_is_fenced_on_redis", || {
        let server = sd_testkit::redis().expect("redis-server");
        (
            Spec::new("redis", server.url().to_owned(), server.url(), 1000),
            server,
        )
    });
}

#[cfg(feature = "redis")]
#[test]
fn paused_holder_is_fenced_on_redlock_3_masters() {
    paused_holder_is_fenced("paused_holder_is_fenced_on_redlock_3_masters", || {
        let masters = sd_testkit::RedisServer::start_many(3).expect("redis-server");
        let data = sd_testkit::redis().expect("redis-server");
        (
            Spec::new(
                "redlock",
                masters
                    .iter()
                    .map(|m| m.url())
                    .collect::<Vec<_>>()
                    .join(","),
                data.url(),
                2000,
            ),
            (masters, data),
        )
    });
}

#[cfg(feature = "postgres")]
#[test]
fn paused_holder_is_fenced_on_postgres() {
    paused_holder_is_fenced("paused_holder_is_fenced_on_postgres", || {
        let db = sd_testkit::database().expect("postgres");
        (
            Spec::new("postgres", db.url().to_owned(), db.url(), 1000),
            db,
        )
    });
}

/// etcd has no fence store in sd-lock: the writes go through `RedisFence` with the
/// etcd lock's token (its key's create revision).
#[cfg(all(feature = "etcd", feature = "redis"))]
#[test]
fn paused_holder_is_fenced_on_etcd() {
    paused_holder_is_fenced("paused_holder_is_fenced_on_etcd", || {
        let server = sd_testkit::etcd().expect("etcd");
        let data = sd_testkit::redis().expect("redis-server");
        (
            Spec::new("etcd", server.url().to_owned(), data.url(), 2000),
            (server, data),
        )
    });
}
