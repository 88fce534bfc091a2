//! The memory backend: the shared suite, a holder paused past its TTL, the watchdog.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use sd_lock::conformance;
use sd_lock::fence::FencedRegister;
use sd_lock::memory::MemoryLock;
use sd_lock::{Error, Lock, Lost, Release, RetryPolicy, Watchdog};

fn fast_retry() -> RetryPolicy {
    common::backoff(Duration::from_micros(100), Duration::from_millis(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_32_tasks_200_sections() {
    let lock = MemoryLock::new().with_retry(fast_retry());
    common::every_section_lands(lock, 32, 200).await;
}

/// On tokio's paused clock (the memory backend reads `tokio::time::Instant`): the steps
/// that must land inside the 100 ms lease do, however loaded the machine, and waiting
/// the lease out costs no real time.
#[tokio::test(start_paused = true)]
async fn contract() {
    conformance::contract(&MemoryLock::new(), "contract", Duration::from_millis(100)).await;
}

/// On the paused clock too: the 20 ms lease outlives the 5 ms wait however long the
/// scheduler takes between the two.
#[tokio::test(start_paused = true)]
async fn cancelled_acquire_leaves_nothing() {
    // Memory acquisitions are synchronous: a cancelled one never started. The suite
    // still checks the resource is free after every cancellation.
    let lock = MemoryLock::new();
    let held = lock
        .try_acquire("busy", Duration::from_millis(20))
        .await
        .unwrap();
    // Cancel while `acquire` is sleeping between attempts.
    let r = tokio::time::timeout(
        Duration::from_millis(5),
        lock.acquire("busy", Duration::from_secs(60), Duration::from_secs(5)),
    )
    .await;
    assert!(r.is_err());
    drop(held);
    tokio::time::sleep(Duration::from_millis(30)).await;
    conformance::cancelled_acquire_leaves_nothing(&lock, "busy", false).await;
}

/// A holder paused past its TTL (GC, page fault): tokio's clock is paused and advanced,
/// so nothing sleeps for real. What the fenced store promises: the late write of the
/// old holder is refused by the store itself, and the stored value stays the new
/// holder's (a store that ignored the token would keep A's stale `0 + 1`).
#[tokio::test(start_paused = true)]
async fn paused_holder_is_fenced_off() {
    let lock = MemoryLock::new();
    let ttl = Duration::from_millis(100);
    let fenced = FencedRegister::new(0_u64);

    let a = lock.try_acquire("account", ttl).await.unwrap();
    let a_read = fenced.read(a.token()).unwrap();

    // A pauses past its TTL.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!a.is_valid());

    // B takes over, reads what A left and writes.
    let b = lock.try_acquire("account", ttl).await.unwrap();
    assert!(b.token() > a.token());
    let b_read = fenced.read(b.token()).unwrap();
    fenced.write(b.token(), b_read + 10).unwrap();

    // A wakes up, still believes its read and writes back over B's update: refused by
    // the store, which names both tokens.
    match fenced.write(a.token(), a_read + 1) {
        Err(Error::StaleToken { token, current }) => {
            assert_eq!(token, a.token());
            assert_eq!(current, b.token());
        }
        other => panic!("stale write accepted: {other:?}"),
    }
    assert!(matches!(
        fenced.update(a.token(), |v| *v = 0),
        Err(Error::StaleToken { .. })
    ));
    // The stored value is B's, and B still reads and writes it.
    assert_eq!(fenced.peek(), 10);
    assert_eq!(fenced.last_token(), Some(b.token()));
    assert_eq!(fenced.read(b.token()).unwrap(), 10);
    assert_eq!(lock.release(a).await.unwrap(), Release::Expired);
    assert_eq!(lock.release(b).await.unwrap(), Release::Released);
}

#[tokio::test(start_paused = true)]
async fn watchdog_renews_past_the_ttl_and_releases() {
    let lock = MemoryLock::new();
    let ttl = Duration::from_millis(300);
    let lease = lock.try_acquire("w", ttl).await.unwrap();
    let token = lease.token();
    let dog = Watchdog::start(lock.clone(), lease).unwrap();
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(3)) => {}
        lost = dog.lost() => panic!("lost: {lost}"),
    }
    assert!(matches!(
        lock.try_acquire("w", ttl).await,
        Err(Error::Held { .. })
    ));
    assert_eq!(dog.token(), token);
    assert_eq!(dog.release().await.unwrap(), Release::Released);
    lock.try_acquire("w", ttl).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn watchdog_reports_a_lease_taken_over() {
    let lock = MemoryLock::new();
    let ttl = Duration::from_millis(300);
    let lease = lock.try_acquire("w", ttl).await.unwrap();
    // Somebody deletes our entry behind our back (an operator, a failover): renewal
    // finds the lease is not ours any more.
    let mut stolen = lease.clone();
    let dog = Watchdog::start(lock.clone(), lease).unwrap();
    assert_eq!(
        lock.release(stolen.clone()).await.unwrap(),
        Release::Released
    );
    let _other = lock.try_acquire("w", ttl).await.unwrap();
    assert_eq!(dog.lost().await, Lost::NotHeld);
    assert!(dog.is_lost());
    assert!(matches!(
        lock.extend(&mut stolen, ttl).await,
        Err(Error::LeaseExpired { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_watchdog_releases_without_blocking() {
    let lock = MemoryLock::new();
    let lease = lock
        .try_acquire("d", Duration::from_secs(30))
        .await
        .unwrap();
    drop(Watchdog::start(lock.clone(), lease).unwrap());
    tokio::task::yield_now().await;
    assert_eq!(lock.held(), 0);
}

#[test]
fn watchdog_outside_a_runtime_is_an_error() {
    let lock = MemoryLock::new();
    let lease = lock.try_acquire_now("x", Duration::from_secs(1)).unwrap();
    assert!(matches!(
        Watchdog::start(lock, lease),
        Err(Error::NoRuntime)
    ));
}

#[tokio::test]
async fn many_resources_do_not_interfere() {
    let lock = Arc::new(MemoryLock::new());
    let ttl = Duration::from_secs(5);
    let leases: Vec<_> = (0..100)
        .map(|i| lock.try_acquire_now(&format!("r{i}"), ttl).unwrap())
        .collect();
    assert_eq!(lock.held(), 100);
    for l in leases {
        assert_eq!(lock.release_now(&l), Release::Released);
    }
}
