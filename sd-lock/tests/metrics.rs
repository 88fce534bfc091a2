//! Feature `metrics`: each acquisition is counted once under its outcome (acquired,
//! contended, timeout) with its time, each retry of a wait once, a renewal that finds
//! the lease gone once, and each stale token a fence refuses once, with the documented
//! names and labels, on memory, Redis, PostgreSQL and etcd.
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
use sd_lock::etcd::EtcdLock;
use sd_lock::fence::FencedRegister;
use sd_lock::fence::postgres::PostgresFence;
use sd_lock::fence::redis::RedisFence;
use sd_lock::memory::MemoryLock;
use sd_lock::postgres::PostgresLock;
use sd_lock::redis::RedisLock;
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
