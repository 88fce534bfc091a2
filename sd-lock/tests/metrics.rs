//! Feature `metrics`: each acquisition is counted once under its outcome (acquired,
//! contended, timeout) with its time, each retry of a wait once, a renewal that finds
//! the lease gone once, and each stale token a fence refuses once, with the documented
//! names and labels, on memory, Redis, PostgreSQL and etcd; the same for semaphores
//! (permits), elections (campaigns, terms lost, resignations, the leader gauge) and
//! PostgreSQL's advisory locks.
#![cfg(all(
    feature = "metrics",
    feature = "redis",
    feature = "postgres",
    feature = "etcd",
    feature = "test-util"
))]
#![allow(clippy::unwrap_used)] // Tests may unwrap.

mod common;

use std::time::Duration;

use sd_core::observe::{Capture, backend, label, outcome};
use sd_lock::election::Election;
use sd_lock::election::etcd::EtcdElection;
use sd_lock::election::postgres::PostgresElection;
use sd_lock::election::redis::RedisElection;
use sd_lock::etcd::EtcdLock;
use sd_lock::fence::FencedRegister;
use sd_lock::fence::postgres::PostgresFence;
use sd_lock::fence::redis::RedisFence;
use sd_lock::memory::MemoryLock;
use sd_lock::postgres::PostgresLock;
use sd_lock::redis::RedisLock;
use sd_lock::semaphore::Semaphore;
use sd_lock::semaphore::etcd::EtcdSemaphore;
use sd_lock::semaphore::memory::MemorySemaphore;
use sd_lock::semaphore::postgres::PostgresSemaphore;
use sd_lock::semaphore::redis::RedisSemaphore;
use sd_lock::{BoxLock, Error, FencingToken, Lock, Lost, Release, Watchdog};

const ACQUISITIONS: &str = "sd.lock.acquisitions";
const ACQUIRE_DURATION: &str = "sd.lock.acquire.duration";
const RETRIES: &str = "sd.lock.contention.retries";
const LEASES_LOST: &str = "sd.lock.leases.lost";
const FENCING_REFUSALS: &str = "sd.lock.fencing.refusals";

fn quick() -> sd_lock::RetryPolicy {
    common::backoff(Duration::from_millis(1), Duration::from_millis(4))
}

/// How long the wait that times out waits.
const WAIT: Duration = Duration::from_millis(40);

/// One lease taken, one attempt refused, one wait of `wait` timed out, one lease lost
/// under a watchdog, one wait that got its lease, one bad name: returns the timed-out
/// wait's attempts.
async fn drive<L: Lock + Clone + 'static>(lock: &L, wait: Duration) -> u32 {
    let ttl = Duration::from_secs(1);
    let held = lock.try_acquire("job", ttl).await.unwrap();
    assert!(matches!(
        lock.try_acquire("job", ttl).await,
        Err(Error::Held { .. })
    ));
    let attempts = match lock.acquire("job", ttl, wait).await {
        Err(Error::WaitTimeout { attempts, .. }) => attempts,
        other => panic!("the wait should time out, got {other:?}"),
    };
    assert!(attempts > 1, "the wait retried");
    // The lease is released behind the watchdog's back: its next renewal finds it gone.
    let dog = Watchdog::start(lock.clone(), held.clone()).unwrap();
    assert_eq!(lock.release(held).await.unwrap(), Release::Released);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), dog.lost())
            .await
            .unwrap(),
        Lost::NotHeld
    );
    drop(dog);
    let lease = lock
        .acquire("other", ttl, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(lock.release(lease).await.unwrap(), Release::Released);
    // Bad input never reaches the backend: no outcome.
    assert!(matches!(
        lock.try_acquire("", ttl).await,
        Err(Error::EmptyResource)
    ));
    attempts
}

fn assert_counted(capture: &Capture, name: &str, backend: &str, attempts: u32, wait: Duration) {
    let by = |o| {
        [
            (label::NAME, name),
            (label::BACKEND, backend),
            (label::OUTCOME, o),
        ]
    };
    let count = |o| capture.counter(ACQUISITIONS, &by(o));
    let samples = |o| capture.samples(ACQUIRE_DURATION, &by(o)).len();
    let instance = [(label::NAME, name), (label::BACKEND, backend)];
    assert_eq!(count(outcome::ACQUIRED), 2, "{backend} acquired");
    assert_eq!(count(outcome::CONTENDED), 1, "{backend} contended");
    assert_eq!(count(outcome::TIMEOUT), 1, "{backend} timeout");
    assert_eq!(count(outcome::BACKEND_ERROR), 0, "{backend} backend_error");
    assert_eq!(
        (
            samples(outcome::ACQUIRED),
            samples(outcome::CONTENDED),
            samples(outcome::TIMEOUT)
        ),
        (2, 1, 1),
        "{backend} acquire durations"
    );
    let waited = capture.samples(ACQUIRE_DURATION, &by(outcome::TIMEOUT))[0];
    assert!(
        waited >= wait.as_secs_f64(),
        "{backend}: the timed-out wait took {waited} s"
    );
    // Every attempt of the wait but the first was a retry; its attempts are not
    // acquisitions of their own.
    assert_eq!(
        capture.counter(RETRIES, &instance),
        u64::from(attempts - 1),
        "{backend} retries"
    );
    assert_eq!(capture.counter(LEASES_LOST, &instance), 1, "{backend} lost");
}

#[test]
fn memory_acquisitions_retries_lost_leases_and_refusals_are_counted() {
    let capture = Capture::new();
    let (lock, register) = capture.build(|| {
        (
            MemoryLock::new().with_retry(quick()).with_name("jobs"),
            FencedRegister::new(0_u64).with_name("account"),
        )
    });
    let attempts = common::runtime().block_on(drive(&lock, WAIT));
    assert_counted(&capture, "jobs", backend::MEMORY, attempts, WAIT);
    register.write(FencingToken(5), 1).unwrap();
    register.write(FencingToken(5), 2).unwrap();
    assert!(register.write(FencingToken(4), 3).is_err());
    assert!(register.read(FencingToken(3)).is_err());
    assert_eq!(register.read(FencingToken(6)).unwrap(), 2);
    let refusals = [(label::NAME, "account"), (label::BACKEND, backend::MEMORY)];
    assert_eq!(capture.counter(FENCING_REFUSALS, &refusals), 2);
}

#[test]
fn a_boxed_lock_is_counted_once_as_its_backend() {
    let capture = Capture::new();
    let lock = capture.build(|| MemoryLock::new().with_retry(quick()).with_name("boxed"));
    let boxed = BoxLock::new(lock);
    let ttl = Duration::from_secs(1);
    let attempts = common::runtime().block_on(async {
        let held = boxed.try_acquire("job", ttl).await.unwrap();
        let Err(Error::WaitTimeout { attempts, .. }) = boxed.acquire("job", ttl, WAIT).await else {
            panic!("the wait should time out");
        };
        assert_eq!(boxed.release(held).await.unwrap(), Release::Released);
        attempts
    });
    let instance = [(label::NAME, "boxed"), (label::BACKEND, backend::MEMORY)];
    let count = |o| {
        capture.counter(
            ACQUISITIONS,
            &[instance[0], instance[1], (label::OUTCOME, o)],
        )
    };
    // The wait is the backend's own: one timeout, its attempts retries, not acquisitions.
    assert_eq!(count(outcome::ACQUIRED), 1);
    assert_eq!(count(outcome::TIMEOUT), 1);
    assert_eq!(count(outcome::CONTENDED), 0);
    assert_eq!(capture.counter(RETRIES, &instance), u64::from(attempts - 1));
}

#[test]
fn redis_and_postgres_acquisitions_retries_lost_leases_and_refusals_are_counted() {
    let redis = sd_testkit::redis().expect("redis-server must be installed");
    let db = sd_testkit::database().expect("postgres must be installed");
    let capture = Capture::new();
    common::runtime().block_on(async {
        let conn = common::manager(redis.url()).await;
        let (on_redis, fence) = capture.build(|| {
            (
                RedisLock::builder(conn.clone())
                    .name("jobs")
                    .prefix("metrics-lock")
                    .retry(quick())
                    .build()
                    .unwrap(),
                RedisFence::builder(conn)
                    .name("account")
                    .prefix("metrics-fence")
                    .build()
                    .unwrap(),
            )
        });
        let attempts = drive(&on_redis, WAIT).await;
        assert_counted(&capture, "jobs", backend::REDIS, attempts, WAIT);
        fence.write("a", FencingToken(5), b"1").await.unwrap();
        assert!(matches!(
            fence.write("a", FencingToken(4), b"2").await,
            Err(Error::StaleToken { .. })
        ));
        fence.write("a", FencingToken(5), b"3").await.unwrap();

        let pool = common::pg_pool(db.url()).await;
        let (on_pg, pg_fence) = capture.build(|| {
            (
                PostgresLock::builder(pool.clone())
                    .name("jobs")
                    .table("metrics_leases")
                    .retry(quick())
                    .build()
                    .unwrap(),
                PostgresFence::builder()
                    .name("account")
                    .table("metrics_fence")
                    .build()
                    .unwrap(),
            )
        });
        on_pg.migrate().await.unwrap();
        pg_fence.migrate(&pool).await.unwrap();
        let attempts = drive(&on_pg, WAIT).await;
        assert_counted(&capture, "jobs", backend::POSTGRES, attempts, WAIT);
        let mut tx = pool.begin().await.unwrap();
        pg_fence.check(&mut tx, "a", FencingToken(5)).await.unwrap();
        assert!(matches!(
            pg_fence.check(&mut tx, "a", FencingToken(4)).await,
            Err(Error::StaleToken { .. })
        ));
        tx.commit().await.unwrap();
    });
    for b in [backend::REDIS, backend::POSTGRES] {
        let refusals = [(label::NAME, "account"), (label::BACKEND, b)];
        assert_eq!(capture.counter(FENCING_REFUSALS, &refusals), 1, "{b}");
    }
}

#[test]
fn etcd_acquisitions_retries_and_lost_leases_are_counted() {
    let server = sd_testkit::etcd().expect("etcd must be installed");
    let capture = Capture::new();
    // An etcd attempt is three round trips: a longer wait still sees several.
    let wait = Duration::from_millis(300);
    common::runtime().block_on(async {
        let client = etcd_client::Client::connect([server.url()], None)
            .await
            .unwrap();
        let lock = capture.build(|| {
            EtcdLock::builder(client)
                .name("jobs")
                .prefix("metrics-lock/")
                .retry(quick())
                .build()
                .unwrap()
        });
        let attempts = drive(&lock, wait).await;
        assert_counted(&capture, "jobs", backend::ETCD, attempts, wait);
    });
}

const PERMITS: &str = "sd.lock.semaphore.acquisitions";
const PERMIT_DURATION: &str = "sd.lock.semaphore.acquire.duration";
const PERMIT_RETRIES: &str = "sd.lock.semaphore.contention.retries";
const PERMITS_LOST: &str = "sd.lock.semaphore.permits.lost";
const CAMPAIGNS: &str = "sd.lock.election.campaigns";
const CAMPAIGN_DURATION: &str = "sd.lock.election.campaign.duration";
const CAMPAIGN_RETRIES: &str = "sd.lock.election.contention.retries";
const TERMS_LOST: &str = "sd.lock.election.terms.lost";
const RESIGNATIONS: &str = "sd.lock.election.resignations";
const LEADER: &str = "sd.lock.election.leader";

/// The counts of `counter` and the samples of `histogram` of the instance `name` on
/// `backend`, by outcome, in the order of `outcomes`.
fn by_outcome(
    capture: &Capture,
    (counter, histogram): (&str, &str),
    (name, backend): (&str, &str),
    outcomes: [&str; 4],
) -> ([u64; 4], [usize; 4]) {
    let labels = |o| {
        [
            (label::NAME, name),
            (label::BACKEND, backend),
            (label::OUTCOME, o),
        ]
    };
    (
        outcomes.map(|o| capture.counter(counter, &labels(o))),
        outcomes.map(|o| capture.samples(histogram, &labels(o)).len()),
    )
}

const GRANTS: [&str; 4] = [
    outcome::ACQUIRED,
    outcome::CONTENDED,
    outcome::TIMEOUT,
    outcome::BACKEND_ERROR,
];

/// How long a backend's permits and terms take to lapse, and its timed-out wait.
#[derive(Clone, Copy)]
struct Timing {
    /// The TTL of the permit left to lapse, and of every term.
    ttl: Duration,
    /// The wait that times out.
    wait: Duration,
}

/// On a one-permit semaphore: a permit taken, one attempt refused, one wait timed out,
/// a permit left past its TTL (its renewal finds it gone), a permit renewed, a bad
/// name. Returns the timed-out wait's attempts.
async fn drive_semaphore<S: Semaphore>(sem: &S, t: Timing) -> u32 {
    let ttl = Duration::from_secs(10);
    let held = sem.try_acquire("pool", ttl).await.unwrap();
    assert!(matches!(
        sem.try_acquire("pool", ttl).await,
        Err(Error::NoPermit { .. })
    ));
    let attempts = match sem.acquire("pool", ttl, t.wait).await {
        Err(Error::WaitTimeout { attempts, .. }) => attempts,
        other => panic!("the wait should time out, got {other:?}"),
    };
    assert_eq!(sem.release(held).await.unwrap(), Release::Released);
    // A permit left past its TTL: the renewal finds it gone.
    let mut lapsed = sem
        .acquire("lapse", t.ttl, Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(t.ttl + Duration::from_millis(100)).await;
    assert!(matches!(
        sem.renew(&mut lapsed, ttl).await,
        Err(Error::LeaseExpired { .. })
    ));
    // A renewal that finds the permit is no loss.
    let mut kept = sem.try_acquire("kept", ttl).await.unwrap();
    sem.renew(&mut kept, ttl).await.unwrap();
    assert_eq!(sem.release(kept).await.unwrap(), Release::Released);
    assert!(matches!(
        sem.try_acquire("", ttl).await,
        Err(Error::EmptyResource)
    ));
    attempts
}

fn assert_permits_counted(capture: &Capture, backend: &str, attempts: u32, wait: Duration) {
    let instance = [(label::NAME, "pool"), (label::BACKEND, backend)];
    let (counts, samples) = by_outcome(
        capture,
        (PERMITS, PERMIT_DURATION),
        ("pool", backend),
        GRANTS,
    );
    assert_eq!(counts, [3, 1, 1, 0], "{backend} permit acquisitions");
    assert_eq!(samples, [3, 1, 1, 0], "{backend} permit durations");
    let timeout = [instance[0], instance[1], (label::OUTCOME, outcome::TIMEOUT)];
    let waited = capture.samples(PERMIT_DURATION, &timeout)[0];
    assert!(waited >= wait.as_secs_f64(), "{backend}: waited {waited} s");
    assert_eq!(
        capture.counter(PERMIT_RETRIES, &instance),
        u64::from(attempts - 1),
        "{backend} permit retries"
    );
    assert_eq!(
        capture.counter(PERMITS_LOST, &instance),
        1,
        "{backend} lost"
    );
    // The lock's own series saw none of it.
    assert_eq!(capture.counter(ACQUISITIONS, &instance), 0, "{backend}");
}

/// The `leader` gauge of the instance `name` on `backend`.
fn leader(capture: &Capture, name: &str, backend: &str) -> f64 {
    let gauges = capture.gauges(LEADER, &[(label::NAME, name), (label::BACKEND, backend)]);
    assert_eq!(gauges.len(), 1, "one leader gauge for {name} on {backend}");
    gauges[0]
}

/// Two instances, `primary` and `standby`, of one election `billing` whose terms last
/// `t.ttl`: primary elected, standby's attempt refused and its wait timed out, primary
/// renews and resigns, standby elected, standby's term left to lapse (primary elected
/// again once it has; standby's renewal finds it gone, its resign ends nothing),
/// primary resigns, a bad name. Returns standby's timed-out campaign's attempts.
async fn drive_election<E: Election>(
    capture: &Capture,
    backend: &str,
    (primary, standby): (&E, &E),
    t: Timing,
) -> u32 {
    let gauge = |name| leader(capture, name, backend);
    assert_eq!((gauge("primary"), gauge("standby")), (0.0, 0.0));
    let mut term = primary.try_campaign("billing", "a").await.unwrap();
    assert_eq!(gauge("primary"), 1.0);
    assert!(matches!(
        standby.try_campaign("billing", "b").await,
        Err(Error::Held { .. })
    ));
    let attempts = match standby.campaign("billing", "b", t.wait).await {
        Err(Error::WaitTimeout { attempts, .. }) => attempts,
        other => panic!("the campaign should time out, got {other:?}"),
    };
    primary.renew(&mut term).await.unwrap();
    assert_eq!(primary.resign(term).await.unwrap(), Release::Released);
    assert_eq!(gauge("primary"), 0.0);

    let mut lapsed = standby
        .campaign("billing", "b", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!((gauge("primary"), gauge("standby")), (0.0, 1.0));
    // Standby stops renewing: primary wins once the term is over (a campaign that began
    // before would wait in etcd past its own term's TTL).
    tokio::time::sleep_until(lapsed.valid_until()).await;
    let mut term = primary.campaign("billing", "a", t.ttl * 4).await.unwrap();
    assert!(term.token() > lapsed.token());
    // The gauge drops when the lapsed term's validity ran out (a task wakes then).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while gauge("standby") != 0.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((gauge("primary"), gauge("standby")), (1.0, 0.0));
    assert!(matches!(
        standby.renew(&mut lapsed).await,
        Err(Error::LeaseExpired { .. })
    ));
    assert_eq!(standby.resign(lapsed).await.unwrap(), Release::Expired);
    primary.renew(&mut term).await.unwrap();
    assert_eq!(primary.resign(term).await.unwrap(), Release::Released);
    assert_eq!((gauge("primary"), gauge("standby")), (0.0, 0.0));
    assert!(matches!(
        primary.try_campaign("", "a").await,
        Err(Error::EmptyResource)
    ));
    attempts
}

fn assert_election_counted(capture: &Capture, backend: &str, attempts: u32) {
    let outcomes = [
        outcome::ELECTED,
        outcome::CONTENDED,
        outcome::TIMEOUT,
        outcome::BACKEND_ERROR,
    ];
    let series = (CAMPAIGNS, CAMPAIGN_DURATION);
    let primary = by_outcome(capture, series, ("primary", backend), outcomes);
    let standby = by_outcome(capture, series, ("standby", backend), outcomes);
    assert_eq!(primary, ([2, 0, 0, 0], [2, 0, 0, 0]), "{backend} primary");
    assert_eq!(standby, ([1, 1, 1, 0], [1, 1, 1, 0]), "{backend} standby");
    let instance = |name| [(label::NAME, name), (label::BACKEND, backend)];
    assert_eq!(
        capture.counter(CAMPAIGN_RETRIES, &instance("standby")),
        u64::from(attempts - 1),
        "{backend} standby retries"
    );
    for (name, lost, resigned) in [("primary", 0, 2), ("standby", 1, 0)] {
        assert_eq!(
            capture.counter(TERMS_LOST, &instance(name)),
            lost,
            "{backend} {name} lost"
        );
        assert_eq!(
            capture.counter(RESIGNATIONS, &instance(name)),
            resigned,
            "{backend} {name} resignations"
        );
    }
}

#[test]
fn memory_semaphore_permits_are_counted() {
    let capture = Capture::new();
    let sem = capture.build(|| {
        MemorySemaphore::builder()
            .name("pool")
            .retry(quick())
            .build()
            .unwrap()
    });
    let t = Timing {
        ttl: Duration::from_millis(50),
        wait: WAIT,
    };
    let attempts = common::runtime().block_on(drive_semaphore(&sem, t));
    assert_permits_counted(&capture, backend::MEMORY, attempts, WAIT);
}

#[test]
fn redis_semaphore_and_election_are_counted() {
    let redis = sd_testkit::redis().expect("redis-server must be installed");
    let capture = Capture::new();
    let t = Timing {
        ttl: Duration::from_secs(1),
        wait: WAIT,
    };
    common::runtime().block_on(async {
        let conn = common::manager(redis.url()).await;
        let sem = capture.build(|| {
            RedisSemaphore::builder(conn.clone())
                .name("pool")
                .prefix("metrics-sem")
                .retry(quick())
                .build()
                .unwrap()
        });
        let attempts = drive_semaphore(&sem, t).await;
        assert_permits_counted(&capture, backend::REDIS, attempts, WAIT);

        let election = |name| {
            capture.build(|| {
                RedisElection::builder(conn.clone())
                    .name(name)
                    .prefix("metrics-leader")
                    .ttl(t.ttl)
                    .retry(quick())
                    .build()
                    .unwrap()
            })
        };
        let (primary, standby) = (election("primary"), election("standby"));
        let attempts = drive_election(&capture, backend::REDIS, (&primary, &standby), t).await;
        assert_election_counted(&capture, backend::REDIS, attempts);
    });
}

#[test]
fn postgres_semaphore_election_and_advisory_locks_are_counted() {
    let db = sd_testkit::database().expect("postgres must be installed");
    let capture = Capture::new();
    let t = Timing {
        ttl: Duration::from_secs(1),
        wait: WAIT,
    };
    common::runtime().block_on(async {
        let pool = common::pg_pool(db.url()).await;
        let sem = capture.build(|| {
            PostgresSemaphore::builder(pool.clone())
                .name("pool")
                .table("metrics_permits")
                .retry(quick())
                .build()
                .unwrap()
        });
        sem.migrate().await.unwrap();
        let attempts = drive_semaphore(&sem, t).await;
        assert_permits_counted(&capture, backend::POSTGRES, attempts, WAIT);

        let election = |name| {
            capture.build(|| {
                PostgresElection::builder(pool.clone())
                    .name(name)
                    .table("metrics_leaders")
                    .ttl(t.ttl)
                    .retry(quick())
                    .build()
                    .unwrap()
            })
        };
        let (primary, standby) = (election("primary"), election("standby"));
        primary.migrate().await.unwrap();
        let attempts = drive_election(&capture, backend::POSTGRES, (&primary, &standby), t).await;
        assert_election_counted(&capture, backend::POSTGRES, attempts);

        // Advisory locks count as the lock's acquisitions.
        let lock = capture.build(|| {
            PostgresLock::builder(pool.clone())
                .name("advisory")
                .table("metrics_advisory")
                .build()
                .unwrap()
        });
        lock.migrate().await.unwrap();
        let (mut tx, mut other) = (pool.begin().await.unwrap(), pool.begin().await.unwrap());
        lock.try_lock_xact(&mut tx, "import").await.unwrap();
        assert!(matches!(
            lock.try_lock_xact(&mut other, "import").await,
            Err(Error::Held { .. })
        ));
        assert!(matches!(
            lock.try_lock_xact(&mut other, "").await,
            Err(Error::EmptyResource)
        ));
        tx.commit().await.unwrap();
        other.rollback().await.unwrap();
        let session = lock.try_lock_session("export").await.unwrap();
        assert!(matches!(
            lock.try_lock_session("export").await,
            Err(Error::Held { .. })
        ));
        assert_eq!(session.release().await.unwrap(), Release::Released);
    });
    let counted = by_outcome(
        &capture,
        (ACQUISITIONS, ACQUIRE_DURATION),
        ("advisory", backend::POSTGRES),
        GRANTS,
    );
    assert_eq!(counted, ([2, 2, 0, 0], [2, 2, 0, 0]), "advisory locks");
}

#[test]
fn etcd_semaphore_and_election_are_counted() {
    let server = sd_testkit::etcd().expect("etcd must be installed");
    let capture = Capture::new();
    // Whole seconds; an etcd attempt is several round trips, so a longer wait.
    let t = Timing {
        ttl: Duration::from_secs(1),
        wait: Duration::from_millis(300),
    };
    common::runtime().block_on(async {
        let client = etcd_client::Client::connect([server.url()], None)
            .await
            .unwrap();
        let sem = capture.build(|| {
            EtcdSemaphore::builder(client.clone())
                .name("pool")
                .prefix("metrics-sem/")
                .retry(quick())
                .build()
                .unwrap()
        });
        let attempts = drive_semaphore(&sem, t).await;
        assert_permits_counted(&capture, backend::ETCD, attempts, t.wait);

        let election = |name| {
            capture.build(|| {
                EtcdElection::builder(client.clone())
                    .name(name)
                    .prefix("metrics-election/")
                    // A term must outlast standby's two refused campaigns.
                    .ttl(Duration::from_secs(3))
                    .timeout(Duration::from_millis(200))
                    .build()
                    .unwrap()
            })
        };
        let (primary, standby) = (election("primary"), election("standby"));
        let t = Timing {
            ttl: Duration::from_secs(3),
            ..t
        };
        let attempts = drive_election(&capture, backend::ETCD, (&primary, &standby), t).await;
        // etcd waits inside one `Campaign` call: one attempt, no retries.
        assert_eq!(attempts, 1);
        assert_election_counted(&capture, backend::ETCD, attempts);
    });
}
