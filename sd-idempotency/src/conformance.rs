//! The contract every [`Store`] honours, as functions that take a [`Harness`] around any
//! backend and assert it (feature `test-util`). sd-idempotency's own backends run them;
//! a new backend, or a [`BoxStore`](crate::BoxStore) chosen from configuration, runs the
//! same. [`all`] runs every case in turn.
//!
//! They panic on a broken contract, like any test, and need a multi-threaded tokio
//! runtime with time enabled. Each case works in a scope of its own, so a store can be
//! shared with other tests.
//!
//! ```no_run
//! # async fn run() {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use sd_idempotency::{ManualClock, MemoryStore, conformance::Harness};
//!
//! let clock = ManualClock::new();
//! let store = MemoryStore::with_clock(clock.clone());
//! let harness = Harness {
//!     store,
//!     lock_ttl: Duration::from_millis(300),
//!     retention: Duration::from_secs(3600),
//!     expiry_forgets: false,
//!     pass: Arc::new(move |d| {
//!         clock.advance(d);
//!         Box::pin(std::future::ready(()))
//!     }),
//!     guard: Box::new(()),
//! };
//! sd_idempotency::conformance::all(&harness).await;
//! # }
//! ```
// A test suite: a failed expectation is a panic with the reason.
#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    missing_debug_implementations
)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::{
    Claim, ClaimOutcome, Error, Fingerprint, Outcome, RunError, RunOnce, Store, StoredResponse,
};

/// Lets time pass for the store: a manual clock moves, or the test sleeps (real servers
/// read their own clocks).
pub type Pass = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A store under test and how to age it.
pub struct Harness<S> {
    /// The store.
    pub store: S,
    /// A short lock for expiry tests.
    pub lock_ttl: Duration,
    /// A short retention for expiry tests.
    pub retention: Duration,
    /// True when the backend forgets a record the moment it expires (Redis), so the next
    /// claim starts again at epoch 1; elsewhere the next claim takes the epoch after it.
    pub expiry_forgets: bool,
    /// Lets time pass for the store.
    pub pass: Pass,
    /// What must live as long as the suite runs (the servers it talks to);
    /// `Box::new(())` when nothing.
    pub guard: Box<dyn std::any::Any + Send>,
}

impl<S> Harness<S> {
    /// Lets `d` pass for the store.
    pub async fn pass(&self, d: Duration) {
        (self.pass)(d).await
    }
}

/// Every case of the suite, one after the other.
pub async fn all<S: Store + Clone + 'static>(h: &Harness<S>) {
    claim_in_flight_complete_replay(h).await;
    mismatch_is_checked_first(h).await;
    concurrent_claims_have_one_winner(h).await;
    release_frees_the_key_once(h).await;
    takeover_bumps_the_epoch_and_refuses_the_late_holder(h).await;
    extend_keeps_the_lock(h).await;
    retention_ends_the_replay(h).await;
    sweep_spares_live_claims(h).await;
    bad_ttls_are_config_errors(h).await;
    poll_claim_answers_as_claim(h).await;
    run_once_runs_once_and_replays(h).await;
    run_once_failed_work_releases_the_key(h).await;
    run_once_duplicate_in_flight(h).await;
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s)
}

/// A scope no other run uses, so the suite can share a store with other tests.
fn scope() -> String {
    format!("conformance-{:016x}", rand::random::<u64>())
}

async fn must_claim<S: Store>(s: &S, scope: &str, key: &str, f: &str, ttl: Duration) -> Claim {
    match s.claim(scope, key, &fp(f), ttl).await.unwrap() {
        ClaimOutcome::Claimed(c) => c,
        other => panic!("expected a claim, got {other:?}"),
    }
}

async fn must_complete<S: Store>(s: &S, claim: &Claim, body: &str, retention: Duration) {
    s.complete(claim, &StoredResponse::new(200, body), retention)
        .await
        .unwrap();
}

/// Whether a claim of `key` with fingerprint `f` finds it in flight under another claim.
async fn held_by_another<S: Store>(h: &Harness<S>, scope: &str, key: &str, f: &str) -> bool {
    matches!(
        h.store.claim(scope, key, &fp(f), h.lock_ttl).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    )
}

fn lost(r: Result<(), Error>) -> bool {
    matches!(r, Err(Error::ClaimLost { .. }))
}

/// A claim is in flight for its duplicates, and once completed its response is replayed.
pub async fn claim_in_flight_complete_replay<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let long = Duration::from_secs(60);
    let claim = must_claim(&h.store, &scope, "k", "body", long).await;
    assert_eq!(claim.epoch(), 1);
    assert_eq!(claim.key(), "k");
    assert_eq!(claim.scope(), scope);
    match h.store.claim(&scope, "k", &fp("body"), long).await.unwrap() {
        ClaimOutcome::InFlight { retry_after } => {
            assert!(retry_after <= long && retry_after > Duration::ZERO)
        }
        other => panic!("{other:?}"),
    }
    let response = StoredResponse::new(201, b"{\"id\":\"pay_1\"}\n\x00\xff".to_vec())
        .with_header("content-type", "application/json")
        .with_header("location", "/payments/pay_1");
    h.store.complete(&claim, &response, long).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            h.store.claim(&scope, "k", &fp("body"), long).await.unwrap(),
            ClaimOutcome::Completed(response.clone())
        );
    }
    assert!(lost(h.store.complete(&claim, &response, long).await));
    assert!(lost(h.store.release(&claim).await));
    // Another key of the same scope, and the same key in another scope, are independent.
    must_claim(&h.store, &scope, "k2", "body", long).await;
    must_claim(&h.store, &format!("{scope}-other"), "k", "other body", long).await;
}

/// Another fingerprint on a used key is a mismatch, whatever state the key is in.
pub async fn mismatch_is_checked_first<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let long = Duration::from_secs(60);
    let claim = must_claim(&h.store, &scope, "k", "a", long).await;
    assert_eq!(
        h.store.claim(&scope, "k", &fp("b"), long).await.unwrap(),
        ClaimOutcome::Mismatch
    );
    must_complete(&h.store, &claim, "x", long).await;
    assert_eq!(
        h.store.claim(&scope, "k", &fp("b"), long).await.unwrap(),
        ClaimOutcome::Mismatch
    );
}

/// Of many concurrent claims on one key, exactly one wins.
pub async fn concurrent_claims_have_one_winner<S: Store + Clone + 'static>(h: &Harness<S>) {
    let scope = scope();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = h.store.clone();
            let scope = scope.clone();
            tokio::spawn(async move {
                store
                    .claim(&scope, "k", &fp("same"), Duration::from_secs(60))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut claimed = 0;
    for t in tasks {
        match t.await.unwrap() {
            ClaimOutcome::Claimed(_) => claimed += 1,
            ClaimOutcome::InFlight { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(claimed, 1);
}

/// A released key is free for any request, and the old claim is lost.
pub async fn release_frees_the_key_once<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let long = Duration::from_secs(60);
    let first = must_claim(&h.store, &scope, "k", "a", long).await;
    h.store.release(&first).await.unwrap();
    assert!(lost(h.store.release(&first).await));
    // Released: even another fingerprint may use the key now.
    let second = must_claim(&h.store, &scope, "k", "b", long).await;
    assert!(lost(h.store.extend(&first, long).await));
    h.store.extend(&second, long).await.unwrap();
}

/// A key whose lock lapsed is taken over with the epoch + 1, and the late holder is refused.
pub async fn takeover_bumps_the_epoch_and_refuses_the_late_holder<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let first = must_claim(&h.store, &scope, "k", "a", h.lock_ttl).await;
    h.pass(h.lock_ttl + h.lock_ttl / 4).await;
    // The lock expired: the holder may no longer complete, even before a takeover.
    let response = StoredResponse::new(201, "first");
    assert!(lost(h.store.extend(&first, h.lock_ttl).await));
    // The abandoned record still guards against another request with the key.
    assert_eq!(
        h.store
            .claim(&scope, "k", &fp("b"), h.lock_ttl)
            .await
            .unwrap(),
        ClaimOutcome::Mismatch
    );
    let second = must_claim(&h.store, &scope, "k", "a", Duration::from_secs(60)).await;
    assert_eq!(second.epoch(), first.epoch() + 1);
    assert!(lost(
        h.store
            .complete(&first, &response, Duration::from_secs(60))
            .await
    ));
    assert!(lost(h.store.release(&first).await));
    let winner = StoredResponse::new(201, "second");
    h.store
        .complete(&second, &winner, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        h.store
            .claim(&scope, "k", &fp("a"), h.lock_ttl)
            .await
            .unwrap(),
        ClaimOutcome::Completed(winner)
    );
}

/// `poll_claim` answers as `claim`: in flight while the key is held, a mismatch for
/// another fingerprint, the stored response once completed, and the key itself once its
/// holder released it or its lock lapsed (a takeover, epoch + 1).
pub async fn poll_claim_answers_as_claim<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let long = Duration::from_secs(60);
    let poll = async |key: &str, f: &str, ttl: Duration| {
        h.store.poll_claim(&scope, key, &fp(f), ttl).await.unwrap()
    };
    let first = must_claim(&h.store, &scope, "k", "a", long).await;
    assert!(matches!(
        poll("k", "a", long).await,
        ClaimOutcome::InFlight { retry_after } if retry_after > Duration::ZERO && retry_after <= long
    ));
    assert_eq!(poll("k", "b", long).await, ClaimOutcome::Mismatch);
    must_complete(&h.store, &first, "done", long).await;
    assert_eq!(
        poll("k", "a", long).await,
        ClaimOutcome::Completed(StoredResponse::new(200, "done"))
    );
    assert_eq!(poll("k", "b", long).await, ClaimOutcome::Mismatch);

    let released = must_claim(&h.store, &scope, "r", "a", long).await;
    h.store.release(&released).await.unwrap();
    assert!(matches!(
        poll("r", "a", long).await,
        ClaimOutcome::Claimed(c) if c.key() == "r"
    ));

    let lapsed = must_claim(&h.store, &scope, "t", "a", h.lock_ttl).await;
    h.pass(h.lock_ttl + h.lock_ttl / 4).await;
    match poll("t", "a", long).await {
        ClaimOutcome::Claimed(c) => assert_eq!(c.epoch(), lapsed.epoch() + 1),
        other => panic!("a lapsed lock is taken over, got {other:?}"),
    }
}

/// `extend` keeps a claim past its first lock.
pub async fn extend_keeps_the_lock<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let claim = must_claim(&h.store, &scope, "k", "a", h.lock_ttl).await;
    h.store
        .extend(&claim, Duration::from_secs(60))
        .await
        .unwrap();
    h.pass(h.lock_ttl + h.lock_ttl / 4).await;
    assert!(held_by_another(h, &scope, "k", "a").await);
    must_complete(&h.store, &claim, "done", Duration::from_secs(60)).await;
}

/// After the retention the key is free again, for any request. The epoch goes on from
/// the expired record's (or starts at 1 again where expiry forgets the record, Redis),
/// and each re-claim after a lapsed lock adds exactly one and locks the previous holder
/// out.
pub async fn retention_ends_the_replay<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let claim = must_claim(&h.store, &scope, "k", "a", Duration::from_secs(60)).await;
    must_complete(&h.store, &claim, "done", h.retention).await;
    h.pass(h.retention + h.retention / 4).await;
    let again = must_claim(&h.store, &scope, "k", "b", h.lock_ttl).await;
    let expected = if h.expiry_forgets {
        1
    } else {
        claim.epoch() + 1
    };
    assert_eq!(again.epoch(), expected);
    let mut last = again;
    for _ in 0..2 {
        h.pass(h.lock_ttl + h.lock_ttl / 4).await;
        let next = must_claim(&h.store, &scope, "k", "b", h.lock_ttl).await;
        assert_eq!(next.epoch(), last.epoch() + 1);
        assert!(lost(h.store.extend(&last, h.lock_ttl).await));
        last = next;
    }
}

/// `sweep` deletes what expired and never a live claim.
pub async fn sweep_spares_live_claims<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let live = must_claim(&h.store, &scope, "live", "a", h.retention * 4).await;
    let done = must_claim(&h.store, &scope, "done", "a", Duration::from_secs(60)).await;
    must_complete(&h.store, &done, "x", h.retention).await;
    h.pass(h.retention + h.retention / 4).await;
    h.store.sweep().await.unwrap();
    assert!(held_by_another(h, &scope, "live", "a").await);
    must_complete(&h.store, &live, "y", h.retention).await;
    must_claim(&h.store, &scope, "done", "other", h.lock_ttl).await;
}

/// A zero lock TTL or retention is refused, naming the argument.
pub async fn bad_ttls_are_config_errors<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let err = h.store.claim(&scope, "k", &fp("a"), Duration::ZERO).await;
    assert!(
        matches!(
            err,
            Err(Error::InvalidConfig {
                field: "lock_ttl",
                ..
            })
        ),
        "{err:?}"
    );
    let claim = must_claim(&h.store, &scope, "k", "a", Duration::from_secs(60)).await;
    let err = h
        .store
        .complete(&claim, &StoredResponse::new(200, ""), Duration::ZERO)
        .await;
    assert!(
        matches!(
            err,
            Err(Error::InvalidConfig {
                field: "retention",
                ..
            })
        ),
        "{err:?}"
    );
}

type Work = Result<String, std::io::Error>;

/// `run_once` runs the work once per key and scope, and replays its result.
pub async fn run_once_runs_once_and_replays<S: Store + Clone>(h: &Harness<S>) {
    let scope = scope();
    let runner = RunOnce::new(h.store.clone());
    let runs = AtomicUsize::new(0);
    let fp = fp("order 42");
    let work = || async {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        Work::Ok(format!("shipped #{n}"))
    };
    let first = runner.run(&scope, "msg-1", &fp, work()).await.unwrap();
    assert_eq!(first, Outcome::Executed("shipped #1".to_owned()));
    let second = runner.run(&scope, "msg-1", &fp, work()).await.unwrap();
    assert_eq!(second, Outcome::Replayed("shipped #1".to_owned()));
    let other = runner
        .run(&scope, "msg-1", &self::fp("order 43"), work())
        .await;
    assert!(
        matches!(other, Err(RunError::Idempotency(Error::Mismatch { .. }))),
        "{other:?}"
    );
    let bad = runner.run(&scope, "", &fp, work()).await;
    assert!(
        matches!(bad, Err(RunError::Idempotency(Error::InvalidKey { .. }))),
        "{bad:?}"
    );
    // Another scope runs its own.
    let elsewhere = runner
        .run(&format!("{scope}-b"), "msg-1", &fp, work())
        .await
        .unwrap();
    assert_eq!(elsewhere, Outcome::Executed("shipped #2".to_owned()));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Failed work releases the key: a retry runs again, and its result is stored.
pub async fn run_once_failed_work_releases_the_key<S: Store + Clone>(h: &Harness<S>) {
    let scope = scope();
    let runner = RunOnce::new(h.store.clone());
    let fp = fp("x");
    let failed = runner
        .run(&scope, "k", &fp, async {
            Err::<u32, _>("downstream timed out")
        })
        .await;
    assert!(
        matches!(failed, Err(RunError::Work("downstream timed out"))),
        "{failed:?}"
    );
    let ok = runner
        .run(&scope, "k", &fp, async { Ok::<_, &str>(7u32) })
        .await
        .unwrap();
    assert_eq!(ok, Outcome::Executed(7));
    let replay = runner
        .run(&scope, "k", &fp, async { Ok::<_, &str>(8u32) })
        .await
        .unwrap();
    assert_eq!(replay, Outcome::Replayed(7));
}

/// A duplicate while the work runs is told it is in flight and does not run.
pub async fn run_once_duplicate_in_flight<S: Store + Clone + 'static>(h: &Harness<S>) {
    let scope = scope();
    let runner = RunOnce::new(h.store.clone());
    let fp = fp("x");
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = {
        let (runner, scope) = (runner.clone(), scope.clone());
        tokio::spawn(async move {
            runner
                .run(&scope, "k", &fp, async {
                    started_tx.send(()).unwrap();
                    finish_rx.await.unwrap();
                    Ok::<_, std::io::Error>(1u8)
                })
                .await
                .unwrap()
        })
    };
    started.await.unwrap();
    let ran = AtomicUsize::new(0);
    let duplicate = runner
        .run(&scope, "k", &fp, async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(2u8)
        })
        .await;
    assert!(
        matches!(duplicate, Err(RunError::Idempotency(Error::InFlight { retry_after }))
            if retry_after > Duration::ZERO),
        "{duplicate:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    finish.send(()).unwrap();
    assert_eq!(slow.await.unwrap(), Outcome::Executed(1));
    let replay = runner
        .run(&scope, "k", &fp, async { Ok::<_, std::io::Error>(3u8) })
        .await
        .unwrap();
    assert_eq!(replay, Outcome::Replayed(1));
}
