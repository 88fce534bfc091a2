//! The etcd backend against a real server: the shared suite, and lease expiry frees
//! the lock.
#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::runtime;
use sd_lock::conformance;
use sd_lock::etcd::EtcdLock;
use sd_lock::{Error, Lock, Release};

/// Runs `f` with a lock on a fresh server (or `SD_ETCD_URL` under a unique prefix).
fn with_lock<F, Fut>(f: F)
where
    F: FnOnce(EtcdLock) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let server = sd_testkit::etcd().expect("etcd");
    let prefix = format!("{}/", sd_testkit::unique_name("lock"));
    runtime().block_on(async {
        let client = etcd_client::Client::connect([server.url()], None)
            .await
            .unwrap();
        f(EtcdLock::builder(client).prefix(prefix).build().unwrap()).await;
    });
}

/// 32 tasks × 50 sections: every etcd attempt is three round trips (grant, txn,
/// revoke), and 32 × 200 takes minutes on a two-core machine.
#[test]
fn mutual_exclusion_32_tasks_50_sections() {
    with_lock(|lock| async move {
        let lock = lock.with_retry(common::backoff(
            Duration::from_millis(1),
            Duration::from_millis(10),
        ));
        common::every_section_lands(lock, 32, 50).await;
    });
}

#[test]
fn contract() {
    with_lock(|lock| async move {
        // A lease long enough for the contract's steps on a loaded machine.
        conformance::contract(&lock, "contract", Duration::from_secs(2)).await;
        assert!(matches!(
            lock.try_acquire("r", Duration::from_millis(500)).await,
            Err(Error::TtlTooShort { .. })
        ));
    });
}

#[test]
fn cancelled_acquire_leaves_nothing() {
    with_lock(|lock| async move {
        conformance::cancelled_acquire_leaves_nothing(&lock, "cancel", true).await;
    });
}

/// A holder that stops renewing (crashed, partitioned): the server expires its lease,
/// which deletes the key, and the next holder gets a larger token.
#[test]
fn lease_expiry_frees_the_lock() {
    with_lock(|lock| async move {
        let a = lock
            .try_acquire("job", Duration::from_secs(1))
            .await
            .unwrap();
        assert!(matches!(
            lock.try_acquire("job", Duration::from_secs(1)).await,
            Err(Error::Held { .. })
        ));
        let b = lock
            .acquire("job", Duration::from_secs(1), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(b.token() > a.token());
        let mut stale = a.clone();
        assert!(matches!(
            lock.extend(&mut stale, Duration::from_secs(1)).await,
            Err(Error::LeaseExpired { .. })
        ));
        assert_eq!(lock.release(a).await.unwrap(), Release::Expired);
        assert_eq!(lock.release(b).await.unwrap(), Release::Released);
    });
}
