//! The one behaviour suite every backend runs: the store contract, then the middleware
//! over real HTTP on loopback.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod http;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sd_idempotency::{Claim, ClaimOutcome, Error, Fingerprint, Store, StoredResponse};

/// Lets time pass for the store: a manual clock moves, or the test sleeps (real servers
/// read their own clocks).
pub type Pass = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A store under test and how to age it.
pub struct Harness<S> {
    pub store: S,
    /// A short lock for expiry tests.
    pub lock_ttl: Duration,
    /// A short retention for expiry tests.
    pub retention: Duration,
    pub pass: Pass,
    /// Servers kept alive for the test.
    pub guard: Box<dyn std::any::Any + Send>,
}

impl<S> Harness<S> {
    pub async fn pass(&self, d: Duration) {
        (self.pass)(d).await
    }
}

/// Generates one `#[test]` per suite case; `$make` returns `(Runtime, Harness<S>)`.
#[macro_export]
macro_rules! behaviour_suite {
    ($make:expr) => {
        $crate::behaviour_suite!(@cases $make;
            claim_in_flight_complete_replay,
            mismatch_is_checked_first,
            concurrent_claims_have_one_winner,
            release_frees_the_key_once,
            takeover_bumps_the_epoch_and_refuses_the_late_holder,
            extend_keeps_the_lock,
            retention_ends_the_replay,
            sweep_spares_live_claims,
            bad_ttls_are_config_errors,
            http_concurrent_duplicates_run_once,
            http_mismatch_is_422_and_does_not_run,
            http_other_caller_is_independent,
            http_crash_after_claim_then_retry_after_ttl,
            http_retention_runs_again,
            http_bad_keys_are_400
        );
    };
    (@cases $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let (runtime, harness) = $make;
                runtime.block_on($crate::suite::$name(&harness));
            }
        )*
    };
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s)
}

fn scope() -> String {
    sd_testkit::unique_name("scope")
}

async fn must_claim<S: Store>(s: &S, scope: &str, key: &str, f: &str, ttl: Duration) -> Claim {
    match s.claim(scope, key, &fp(f), ttl).await.unwrap() {
        ClaimOutcome::Claimed(c) => c,
        other => panic!("expected a claim, got {other:?}"),
    }
}

fn lost(r: Result<(), Error>) -> bool {
    matches!(r, Err(Error::ClaimLost { .. }))
}

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

pub async fn mismatch_is_checked_first<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let long = Duration::from_secs(60);
    let claim = must_claim(&h.store, &scope, "k", "a", long).await;
    assert_eq!(
        h.store.claim(&scope, "k", &fp("b"), long).await.unwrap(),
        ClaimOutcome::Mismatch
    );
    h.store
        .complete(&claim, &StoredResponse::new(200, "x"), long)
        .await
        .unwrap();
    assert_eq!(
        h.store.claim(&scope, "k", &fp("b"), long).await.unwrap(),
        ClaimOutcome::Mismatch
    );
}

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

pub async fn extend_keeps_the_lock<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let claim = must_claim(&h.store, &scope, "k", "a", h.lock_ttl).await;
    h.store
        .extend(&claim, Duration::from_secs(60))
        .await
        .unwrap();
    h.pass(h.lock_ttl + h.lock_ttl / 4).await;
    assert!(matches!(
        h.store
            .claim(&scope, "k", &fp("a"), h.lock_ttl)
            .await
            .unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    h.store
        .complete(
            &claim,
            &StoredResponse::new(200, "done"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
}

pub async fn retention_ends_the_replay<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let claim = must_claim(&h.store, &scope, "k", "a", Duration::from_secs(60)).await;
    h.store
        .complete(&claim, &StoredResponse::new(200, "done"), h.retention)
        .await
        .unwrap();
    h.pass(h.retention + h.retention / 4).await;
    let again = must_claim(&h.store, &scope, "k", "b", Duration::from_secs(60)).await;
    assert!(again.epoch() >= 1);
}

pub async fn sweep_spares_live_claims<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let live = must_claim(&h.store, &scope, "live", "a", h.retention * 4).await;
    let done = must_claim(&h.store, &scope, "done", "a", Duration::from_secs(60)).await;
    h.store
        .complete(&done, &StoredResponse::new(200, "x"), h.retention)
        .await
        .unwrap();
    h.pass(h.retention + h.retention / 4).await;
    h.store.sweep().await.unwrap();
    assert!(matches!(
        h.store
            .claim(&scope, "live", &fp("a"), h.lock_ttl)
            .await
            .unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    h.store
        .complete(&live, &StoredResponse::new(200, "y"), h.retention)
        .await
        .unwrap();
    must_claim(&h.store, &scope, "done", "other", h.lock_ttl).await;
}

pub async fn bad_ttls_are_config_errors<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let err = h.store.claim(&scope, "k", &fp("a"), Duration::ZERO).await;
    assert!(
        matches!(
            err,
            Err(Error::Config {
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
            Err(Error::Config {
                field: "retention",
                ..
            })
        ),
        "{err:?}"
    );
}

pub use http::{
    http_bad_keys_are_400, http_concurrent_duplicates_run_once,
    http_crash_after_claim_then_retry_after_ttl, http_mismatch_is_422_and_does_not_run,
    http_other_caller_is_independent, http_retention_runs_again,
};
