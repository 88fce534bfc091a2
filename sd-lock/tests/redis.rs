//! The single-node Redis backend against a real server: the shared suite, the fence
//! script, tokens across an empty restart, and a SIGSTOPped server.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{manager, runtime};

use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_lock::conformance;
use sd_lock::fence::redis::RedisFence;
use sd_lock::redis::RedisLock;
use sd_lock::{Error, FencingToken, Lock, Lost, Release, RetryPolicy, Watchdog};

fn fast_retry() -> RetryPolicy {
    common::backoff(Duration::from_micros(200), Duration::from_millis(3))
}

/// Runs `f` with a lock on a fresh server (or `SD_REDIS_URL` under a unique prefix).
fn with_lock<F, Fut>(f: F)
where
    F: FnOnce(RedisLock<ConnectionManager>, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let server = sd_testkit::redis().expect("redis-server");
    let prefix = sd_testkit::unique_name("lock");
    runtime().block_on(async {
        let lock = RedisLock::builder(manager(server.url()).await)
            .prefix(&prefix)
            .build()
            .unwrap();
        f(lock, server.url().to_owned()).await;
    });
}

#[test]
fn mutual_exclusion_32_tasks_200_sections() {
    with_lock(|lock, _| async move {
        let lock = lock.with_retry(fast_retry());
        common::every_section_lands(lock, 32, 200).await;
    });
}

#[test]
fn contract() {
    with_lock(|lock, url| async move {
        conformance::contract(&lock, "contract", Duration::from_secs(2)).await;
        assert!(matches!(
            lock.try_acquire("r", Duration::from_millis(2)).await,
            Err(Error::TtlBelowDrift { .. })
        ));
        assert!(matches!(
            RedisLock::builder(manager(&url).await)
                .prefix("a{b")
                .build(),
            Err(Error::InvalidConfig {
                field: "prefix",
                ..
            })
        ));
        assert!(matches!(
            RedisLock::builder(manager(&url).await)
                .timeout(Duration::ZERO)
                .build(),
            Err(Error::InvalidConfig {
                field: "timeout",
                ..
            })
        ));
    });
}

#[test]
fn cancelled_acquire_leaves_nothing() {
    with_lock(|lock, _| async move {
        conformance::cancelled_acquire_leaves_nothing(&lock, "cancel", true).await;
    });
}

#[test]
fn fence_script_refuses_older_tokens() {
    let server = sd_testkit::redis().expect("redis-server");
    let prefix = sd_testkit::unique_name("fence");
    runtime().block_on(async {
        let fence = RedisFence::builder(manager(server.url()).await)
            .prefix(&prefix)
            .build()
            .unwrap();
        assert_eq!(fence.read("acct", FencingToken(33)).await.unwrap(), None);
        fence.write("acct", FencingToken(33), b"a").await.unwrap();
        fence.write("acct", FencingToken(33), b"b").await.unwrap();
        fence.check("acct", FencingToken(34)).await.unwrap();
        match fence.write("acct", FencingToken(33), b"late").await {
            Err(Error::StaleToken { token, current }) => {
                assert_eq!((token.0, current.0), (33, 34));
            }
            other => panic!("stale write accepted: {other:?}"),
        }
        assert_eq!(
            fence
                .read("acct", FencingToken(34))
                .await
                .unwrap()
                .as_deref(),
            Some(&b"b"[..])
        );
        // Exact for every u64, beyond Lua's 2^53.
        fence.check("big", FencingToken(u64::MAX)).await.unwrap();
        assert!(matches!(
            fence.check("big", FencingToken(u64::MAX - 1)).await,
            Err(Error::StaleToken { .. })
        ));
        fence
            .check("big2", FencingToken(9_999_999_999))
            .await
            .unwrap();
        fence
            .check("big2", FencingToken(10_000_000_000))
            .await
            .unwrap();
        assert!(
            fence
                .check("big2", FencingToken(9_999_999_999))
                .await
                .is_err()
        );
    });
}

/// The single-node token comes from a counter stored beside the lease: a counter ahead
/// of the server clock (as after the clock steps back) still gives the next holder the
/// counter plus one, never a smaller clock reading.
#[test]
fn tokens_follow_the_counter_when_the_clock_is_behind() {
    with_lock(|lock, url| async move {
        let first = lock
            .try_acquire("ctr", Duration::from_secs(10))
            .await
            .unwrap();
        let counter = format!("{}:token", lock.key("ctr"));
        let mut conn = manager(&url).await;
        let stored: u64 = redis::cmd("GET")
            .arg(&counter)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(stored, first.token().0);
        // An hour ahead of the clock: as if the server's clock had stepped back an hour.
        let ahead = first.token().0 + 3_600_000_000;
        let _: () = redis::cmd("SET")
            .arg(&counter)
            .arg(ahead)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(lock.release(first).await.unwrap(), Release::Released);
        let second = lock
            .try_acquire("ctr", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(second.token().0, ahead + 1);
        assert_eq!(lock.release(second).await.unwrap(), Release::Released);
    });
}

/// A server that restarts empty forgets the lease and the counter, but the next token
/// still exceeds the old one (it follows the server clock), so the fence holds.
#[test]
fn tokens_increase_across_an_empty_restart() {
    let mut server = sd_testkit::RedisServer::start().expect("redis-server");
    let url = server.url();
    let rt = runtime();
    let (lock, first) = rt.block_on(async {
        let lock = RedisLock::new(manager(&url).await);
        let lease = lock
            .try_acquire("r", Duration::from_secs(60))
            .await
            .unwrap();
        (lock, lease)
    });
    server.restart_clean().unwrap();
    rt.block_on(async {
        // The connection manager reconnects; the first call may see the dropped socket.
        let second = lock
            .acquire("r", Duration::from_secs(60), Duration::from_secs(10))
            .await;
        let second = match second {
            Ok(l) => l,
            Err(_) => lock
                .acquire("r", Duration::from_secs(60), Duration::from_secs(10))
                .await
                .unwrap(),
        };
        assert!(second.token() > first.token());
        assert_eq!(lock.release(first).await.unwrap(), Release::Expired);
    });
}

/// A real SIGSTOP of the lock server: the holder cannot renew, its watchdog reports the
/// lease lost, the key expires, another holder takes over with a newer token and the old
/// lease releases as expired. (What the fence does with a paused *holder*'s late writes
/// is in `fencing_pause.rs`, with the holder in a stopped child process.)
#[test]
fn sigstopped_server_loses_the_lease_to_a_newer_holder() {
    let mut lock_server = sd_testkit::RedisServer::start().expect("redis-server");
    let lock_url = lock_server.url();
    let rt = runtime();
    // Long enough that the first renewal is sent well inside it on a loaded machine, so
    // what the watchdog reports is the stopped server, not a lease that ran out first.
    let ttl = Duration::from_secs(2);
    let (lock, dog) = rt.block_on(async {
        let lock = RedisLock::builder(manager(&lock_url).await)
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let a = lock.try_acquire("acct", ttl).await.unwrap();
        let dog = Watchdog::start(lock.clone(), a).unwrap();
        (lock, dog)
    });
    lock_server.pause().unwrap();
    rt.block_on(async {
        let lost = dog.lost().await;
        assert!(matches!(lost, Lost::Unreachable { .. }), "{lost:?}");
    });
    // Keep it stopped past the TTL (Redis expires keys by its wall clock), then resume.
    std::thread::sleep(ttl);
    lock_server.resume().unwrap();
    rt.block_on(async {
        let a = dog.lease();
        let b = lock
            .acquire("acct", ttl, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(b.token() > a.token());
        assert_eq!(lock.release(a).await.unwrap(), Release::Expired);
        assert_eq!(lock.release(b).await.unwrap(), Release::Released);
        drop(dog);
    });
}
