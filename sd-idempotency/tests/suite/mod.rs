//! The one behaviour suite every backend runs: the store contract, then the middleware
//! over real HTTP on loopback.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod app;
pub mod http;
pub mod model;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use sd_idempotency::{
    Claim, ClaimOutcome, Error, Fingerprint, Outcome, RunError, RunOnce, Store, StoredResponse,
};
use tokio::sync::watch;

/// A test server shared by the test and its pause and resume closures.
pub type Shared<T> = Arc<std::sync::Mutex<T>>;

/// A fault to inject (pause or resume the store's server), called once.
pub type Fault = Box<dyn FnOnce()>;

/// Pause and resume for the fault tests (`http_store_paused`, `run_once_store_paused`):
/// two closures over one test server, `pause` and `resume` being its methods. Keep the
/// returned server until the test ends: the closures alone do not keep it running.
pub fn pause_controls<T: 'static>(
    server: T,
    pause: fn(&mut T) -> sd_testkit::Result<()>,
    resume: fn(&mut T) -> sd_testkit::Result<()>,
) -> (Shared<T>, Fault, Fault) {
    let server = Arc::new(std::sync::Mutex::new(server));
    let (a, b) = (server.clone(), server.clone());
    (
        server,
        Box::new(move || pause(&mut a.lock().unwrap()).unwrap()),
        Box::new(move || resume(&mut b.lock().unwrap()).unwrap()),
    )
}

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
    /// True when the backend forgets a record the moment it expires (Redis), so the next
    /// claim starts again at epoch 1; elsewhere the next claim takes the epoch after it.
    pub expiry_forgets: bool,
    pub pass: Pass,
    /// Servers kept alive for the test.
    pub guard: Box<dyn std::any::Any + Send>,
}

impl<S> Harness<S> {
    pub async fn pass(&self, d: Duration) {
        (self.pass)(d).await
    }
}

/// The store under test, counting the lock renewals it accepted so a test can await the
/// next one. Every call goes to the real store.
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    extends: Arc<watch::Sender<u64>>,
}

impl<S> Observed<S> {
    pub fn new(inner: S) -> Self {
        Observed {
            inner,
            extends: Arc::new(watch::channel(0).0),
        }
    }

    /// The count of accepted renewals.
    pub fn extends(&self) -> watch::Receiver<u64> {
        self.extends.subscribe()
    }
}

impl<S: Store> Store for Observed<S> {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<ClaimOutcome, Error> {
        self.inner.claim(scope, key, fingerprint, lock_ttl).await
    }

    async fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), Error> {
        self.inner.complete(claim, response, retention).await
    }

    async fn release(&self, claim: &Claim) -> Result<(), Error> {
        self.inner.release(claim).await
    }

    async fn extend(&self, claim: &Claim, lock_ttl: Duration) -> Result<(), Error> {
        let done = self.inner.extend(claim, lock_ttl).await;
        if done.is_ok() {
            self.extends.send_modify(|n| *n += 1);
        }
        done
    }

    async fn sweep(&self) -> Result<u64, Error> {
        self.inner.sweep().await
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
            http_bad_keys_are_400,
            http_long_handler_keeps_its_lock,
            http_retryable_outcomes_are_not_stored,
            http_oversized_response_is_not_replayed,
            http_methods_and_routes,
            http_key_is_bound_to_method_and_path,
            http_fingerprint_over_chosen_fields,
            run_once_runs_once_and_replays,
            run_once_failed_work_releases_the_key,
            run_once_duplicate_in_flight,
            run_once_long_work_keeps_its_lock
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

/// After the retention the key is free again, for any request. The epoch goes on from
/// the expired record's (or starts at 1 again where expiry forgets the record, Redis),
/// and each re-claim after a lapsed lock adds exactly one and locks the previous holder
/// out.
pub async fn retention_ends_the_replay<S: Store>(h: &Harness<S>) {
    let scope = scope();
    let claim = must_claim(&h.store, &scope, "k", "a", Duration::from_secs(60)).await;
    h.store
        .complete(&claim, &StoredResponse::new(200, "done"), h.retention)
        .await
        .unwrap();
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

pub use http::{
    http_bad_keys_are_400, http_concurrent_duplicates_run_once,
    http_crash_after_claim_then_retry_after_ttl, http_fingerprint_over_chosen_fields,
    http_key_is_bound_to_method_and_path, http_long_handler_keeps_its_lock,
    http_methods_and_routes, http_mismatch_is_422_and_does_not_run,
    http_other_caller_is_independent, http_oversized_response_is_not_replayed,
    http_retention_runs_again, http_retryable_outcomes_are_not_stored,
};

type Work = Result<String, std::io::Error>;

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

/// Work that runs three lock TTLs keeps its claim through the heartbeat: duplicates after
/// one, two and three TTLs are in flight, the work runs once and its result is stored.
pub async fn run_once_long_work_keeps_its_lock<S: Store + Clone + 'static>(h: &Harness<S>) {
    let scope = scope();
    let observed = Observed::new(h.store.clone());
    let runner = RunOnce::builder(observed.clone())
        .lock_ttl(h.lock_ttl)
        .build()
        .unwrap();
    let (long, mut steps) = http::LongWork::new(h, &observed);
    let first = {
        let (runner, scope, long) = (runner.clone(), scope.clone(), long.clone());
        tokio::spawn(async move {
            runner
                .run(&scope, "k", &fp("long"), async move {
                    Ok::<_, std::io::Error>(long.run().await)
                })
                .await
                .unwrap()
        })
    };
    for _ in 0..http::LONG_STEPS {
        let step = steps.steps.recv().await.unwrap();
        if step % 2 == 0 {
            let long = long.clone();
            let dup = runner
                .run(&scope, "k", &fp("long"), async move {
                    Ok::<_, std::io::Error>(long.run().await)
                })
                .await;
            assert!(
                matches!(dup, Err(RunError::Idempotency(Error::InFlight { .. }))),
                "after {} lock TTLs the claim still holds: {dup:?}",
                step / 2
            );
        }
        steps.go.add_permits(1);
    }
    assert_eq!(first.await.unwrap(), Outcome::Executed(1));
    assert_eq!(
        long.missed.load(Ordering::SeqCst),
        0,
        "a renewal every half TTL"
    );
    let replay = runner
        .run(&scope, "k", &fp("long"), async {
            Ok::<_, std::io::Error>(99)
        })
        .await
        .unwrap();
    assert_eq!(replay, Outcome::Replayed(1), "its result was stored");
    assert_eq!(long.runs.load(Ordering::SeqCst), 1);
}

/// `run_once` on a frozen store: the store's timeout answers, the work does not run.
pub async fn run_once_store_paused<S: Store + Clone>(
    store: S,
    pause: impl FnOnce(),
    resume: impl FnOnce(),
) {
    let runner = RunOnce::new(store);
    let scope = scope();
    let ran = AtomicUsize::new(0);
    let work = || async {
        ran.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(1u8)
    };
    assert!(runner.run(&scope, "before", &fp("a"), work()).await.is_ok());
    pause();
    let guard = Duration::from_secs(30);
    let down = tokio::time::timeout(guard, runner.run(&scope, "during", &fp("a"), work()))
        .await
        .expect("an answer while the store is frozen");
    assert!(
        matches!(&down, Err(RunError::Idempotency(e)) if e.is_store_failure()),
        "{down:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 1, "the work did not run");
    resume();
    let after = runner.run(&scope, "after", &fp("a"), work()).await.unwrap();
    assert_eq!(after, Outcome::Executed(1));
    assert_eq!(ran.load(Ordering::SeqCst), 2);
}
