//! `run_once` on the memory store: once per key, replays, mismatches, failures release.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use sd_idempotency::{Error, Fingerprint, MemoryStore, RunError, RunOnce, run_once};

#[tokio::test]
async fn work_runs_once_and_replays() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let fp = Fingerprint::of("order 42");
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(format!("shipped #{}", runs.load(Ordering::SeqCst)))
    };
    let first = run_once(&store, "shop", "msg-1", &fp, work())
        .await
        .unwrap();
    assert!(!first.is_replay());
    let second = run_once(&store, "shop", "msg-1", &fp, work())
        .await
        .unwrap();
    assert!(second.is_replay());
    assert_eq!(first.into_inner(), second.into_inner());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let other = run_once(
        &store,
        "shop",
        "msg-1",
        &Fingerprint::of("order 43"),
        work(),
    )
    .await;
    assert!(matches!(
        other,
        Err(RunError::Idempotency(Error::Mismatch { .. }))
    ));
    let bad = run_once(&store, "shop", "", &fp, work()).await;
    assert!(matches!(
        bad,
        Err(RunError::Idempotency(Error::InvalidKey { .. }))
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn failed_work_releases_the_key() {
    let store = MemoryStore::new();
    let runner = RunOnce::new(store.clone());
    let fp = Fingerprint::of("x");
    let failed = runner
        .run("s", "k", &fp, async {
            Err::<u32, _>("downstream timed out")
        })
        .await;
    assert!(matches!(
        failed,
        Err(RunError::Work("downstream timed out"))
    ));
    let ok = runner
        .run("s", "k", &fp, async { Ok::<_, &str>(7u32) })
        .await
        .unwrap();
    assert_eq!(ok, sd_idempotency::Outcome::Executed(7));
}

#[tokio::test]
async fn concurrent_duplicate_is_in_flight() {
    let store = MemoryStore::new();
    let fp = Fingerprint::of("x");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let slow = {
        let store = store.clone();
        tokio::spawn(async move {
            run_once(&store, "s", "k", &fp, async {
                rx.await.unwrap();
                Ok::<_, std::io::Error>(1u8)
            })
            .await
            .unwrap()
        })
    };
    tokio::task::yield_now().await;
    let duplicate = run_once(&store, "s", "k", &fp, async {
        Ok::<_, std::io::Error>(2u8)
    })
    .await;
    assert!(
        matches!(
            duplicate,
            Err(RunError::Idempotency(Error::InFlight { .. }))
        ),
        "{duplicate:?}"
    );
    tx.send(()).unwrap();
    assert_eq!(slow.await.unwrap().into_inner(), 1);
}

#[test]
fn config_errors_name_the_field() {
    let runner = RunOnce::new(MemoryStore::new());
    let err = runner
        .clone()
        .lock_ttl(std::time::Duration::ZERO)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Config {
            field: "lock_ttl",
            ..
        }
    ));
    let err = runner.retention(std::time::Duration::ZERO).unwrap_err();
    assert!(matches!(
        err,
        Error::Config {
            field: "retention",
            ..
        }
    ));
}
