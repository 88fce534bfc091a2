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

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// `common::manager` with a response timeout that outlasts the pause: a request in
/// flight when the holder is stopped gets its reply after SIGCONT instead of a timeout.
#[cfg(feature = "redis")]
async fn patient_manager(url: &str) -> redis::aio::ConnectionManager {
    common::manager_with(url, Duration::from_secs(3), Duration::from_secs(60)).await
}

#[cfg(feature = "postgres")]
async fn pg_pool(url: &str) -> sqlx::PgPool {
    use std::str::FromStr;
    // A holder stopped inside its transaction keeps the fence row locked; the server
    // ends such a session after a second, as production settings do.
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .unwrap()
        .options([("idle_in_transaction_session_timeout", "1000")]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap()
}

/// The fenced store every holder writes through.
#[derive(Clone)]
enum Fence {
    #[cfg(feature = "redis")]
    Redis(sd_lock::fence::redis::RedisFence<redis::aio::ConnectionManager>),
    #[cfg(feature = "postgres")]
    Postgres(sd_lock::fence::postgres::PostgresFence, sqlx::PgPool),
}

impl Fence {
    async fn open(spec: &Spec) -> Fence {
        match spec.backend.as_str() {
            #[cfg(feature = "postgres")]
            "postgres" => {
                let fence = sd_lock::fence::postgres::PostgresFence::new();
                Fence::Postgres(fence, pg_pool(&spec.fence_url).await)
            }
            #[cfg(feature = "redis")]
            _ => Fence::Redis(
                sd_lock::fence::redis::RedisFence::builder(patient_manager(&spec.fence_url).await)
                    .prefix(format!("{}-fence", spec.prefix))
                    .build()
                    .unwrap(),
            ),
            #[cfg(not(feature = "redis"))]
            other => panic!("no fence for `{other}` without the redis feature"),
        }
    }

    /// Creates what the store needs (the parent, before the child starts).
    #[allow(irrefutable_let_patterns)] // with `postgres` alone, the only variant
    async fn prepare(&self) {
        #[cfg(feature = "postgres")]
        if let Fence::Postgres(fence, pool) = self {
            fence.migrate(pool).await.unwrap();
            sd_lock::postgres::PostgresLock::new(pool.clone())
                .migrate()
                .await
                .unwrap();
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS fenced_data (resource text PRIMARY KEY, value text NOT NULL)",
            )
            .execute(pool)
            .await
            .unwrap();
        }
    }

    async fn write(&self, token: u64, value: &str) -> Result<(), sd_lock::Error> {
        let token = sd_lock::FencingToken(token);
        match self {
            #[cfg(feature = "redis")]
            Fence::Redis(fence) => fence.write(RESOURCE, token, value.as_bytes()).await,
            #[cfg(feature = "postgres")]
            Fence::Postgres(fence, pool) => {
                let mut tx = pool.begin().await?;
                fence.check(&mut tx, RESOURCE, token).await?;
                sqlx::query(
                    "INSERT INTO fenced_data (resource, value) VALUES ($1, $2) \
                     ON CONFLICT (resource) DO UPDATE SET value = EXCLUDED.value",
                )
                .bind(RESOURCE)
                .bind(value)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// The value the store holds at the end (`newest` raises nothing it has not seen).
    async fn final_value(&self, newest: u64) -> Option<String> {
        match self {
            #[cfg(feature = "redis")]
            Fence::Redis(fence) => fence
                .read(RESOURCE, sd_lock::FencingToken(newest))
                .await
                .unwrap()
                .map(|v| String::from_utf8(v).unwrap()),
            #[cfg(feature = "postgres")]
            Fence::Postgres(_, pool) => {
                let _ = newest;
                sqlx::query_scalar("SELECT value FROM fenced_data WHERE resource = $1")
                    .bind(RESOURCE)
                    .fetch_optional(pool)
                    .await
                    .unwrap()
            }
        }
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

/// One line to the parent, at once.
fn emit(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// The child's side: take the lock once, print the token, then write every 20 ms until
/// three writes were refused or stdin closes. Never renews: it is the holder that
/// pauses past its lease.
fn run_holder(spec: &Spec) {
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        stop_reader.store(true, Ordering::SeqCst);
    });
    common::runtime().block_on(async {
        let lock = open_lock(spec, true).await;
        let fence = Fence::open(spec).await;
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
            let event = record("paused", token, &value, fence.write(token, &value)).await;
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

/// The child process; killed (after SIGCONT) if the test ends early.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    token: Arc<Mutex<Option<u64>>>,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Holder {
    fn spawn(test: &str, spec: &Spec) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec.encode())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let token = Arc::new(Mutex::new(None));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (t, e) = (token.clone(), events.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prints `test NAME ... ` without a newline before the test's own
                // output: look for the marker anywhere in the line.
                if let Some(at) = line.find("SDLOCK-TOKEN ") {
                    let rest = &line[at + "SDLOCK-TOKEN ".len()..];
                    *t.lock().unwrap() =
                        rest.split_whitespace().next().and_then(|t| t.parse().ok());
                } else if let Some(event) = Event::parse(&line) {
                    e.lock().unwrap().push(event);
                }
            }
        });
        Holder {
            child,
            stdin,
            token,
            events,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Closes its stdin (it stops writing) and waits for it to exit successfully.
    fn finish(mut self) -> Vec<Event> {
        drop(self.stdin.take());
        sd_testkit::eventually_blocking("the paused holder exits", || self.exited());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the holder process failed: {status}");
        // The reader thread has the last lines once the pipe closed.
        sd_testkit::eventually_blocking("the holder's output is read", || {
            Arc::strong_count(&self.events) == 1
        });
        self.events()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: as in `signal`.
            unsafe {
                libc::kill(self.pid(), libc::SIGCONT);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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
        let fence = Fence::open(&spec).await;
        fence.prepare().await;
        (open_lock(&spec, false).await, fence)
    });
    let mut holder = Holder::spawn(test, &spec);
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
                    events.push(record(&who, token, &value, fence.write(token, &value)).await);
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
    let final_value = rt.block_on(fence.final_value(newest));
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
