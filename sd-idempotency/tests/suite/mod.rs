//! The one behaviour suite every backend runs: the store contract, then the middleware
//! over real HTTP on loopback.
#![allow(dead_code, unused_imports, unreachable_pub, clippy::unwrap_used)]

pub mod app;
pub mod http;
pub mod model;
pub mod wait;

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

pub use sd_idempotency::conformance::{
    Harness, Pass, bad_ttls_are_config_errors, claim_in_flight_complete_replay,
    concurrent_claims_have_one_winner, extend_keeps_the_lock, mismatch_is_checked_first,
    poll_claim_answers_as_claim, release_frees_the_key_once, retention_ends_the_replay,
    run_once_duplicate_in_flight, run_once_failed_work_releases_the_key,
    run_once_runs_once_and_replays, sweep_spares_live_claims,
    takeover_bumps_the_epoch_and_refuses_the_late_holder,
};
use sd_idempotency::{
    Claim, ClaimOutcome, Error, Fingerprint, Outcome, RunError, RunOnce, Store, StoredResponse,
};
use tokio::sync::watch;

/// A harness on real time for a store on a real server (or the wall clock): lock TTL and
/// retention 3 s, time passed by sleeping; `guard` keeps the server up.
///
/// The store's time is the server's here, so no clock can be injected. Sleeping past an
/// expiry is exact (a sleep never ends early); what flakes is the other side, the steps a
/// case must finish *inside* a lease (claim, then a retry that must still see it held),
/// so the leases are long enough for those on a loaded two-core machine.
pub fn real_time<S>(
    store: S,
    expiry_forgets: bool,
    guard: Box<dyn std::any::Any + Send>,
) -> Harness<S> {
    Harness {
        store,
        lock_ttl: Duration::from_secs(3),
        retention: Duration::from_secs(3),
        expiry_forgets,
        pass: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        guard,
    }
}

/// A harness for a store on `clock`, a manual clock that only `pass` moves: every time
/// in the suite is exact. The lock TTL is short because the middleware's heartbeat runs
/// on real time (every third of it) while the store's time moves only with `pass`.
pub fn manual_time<S>(store: S, clock: sd_idempotency::ManualClock) -> Harness<S> {
    Harness {
        store,
        lock_ttl: Duration::from_millis(300),
        retention: Duration::from_secs(3600),
        expiry_forgets: false,
        pass: Arc::new(move |d| {
            clock.advance(d);
            Box::pin(std::future::ready(()))
        }),
        guard: Box::new(()),
    }
}

/// A fault to inject (pause or resume the store's server), called once.
pub type Fault = Box<dyn FnOnce()>;

/// Runs a fault test (`http_store_paused`, `run_once_store_paused`) on a runtime of its
/// own: `test` gets the store `store` builds and two closures over `server`, `pause` and
/// `resume` being its methods. The server lives until the test ends.
pub fn on_a_pausable_server<T: 'static, S, F: Future<Output = ()>>(
    server: T,
    pause: fn(&mut T) -> sd_testkit::Result<()>,
    resume: fn(&mut T) -> sd_testkit::Result<()>,
    store: impl Future<Output = S>,
    test: impl FnOnce(S, Fault, Fault) -> F,
) {
    let runtime = sd_testkit::runtime();
    let store = runtime.block_on(store);
    let server = Arc::new(std::sync::Mutex::new(server));
    let (a, b) = (server.clone(), server.clone());
    let pause: Fault = Box::new(move || pause(&mut a.lock().unwrap()).unwrap());
    let resume: Fault = Box::new(move || resume(&mut b.lock().unwrap()).unwrap());
    runtime.block_on(test(store, pause, resume));
}

/// The store under test, counting the lock renewals it accepted so a test can await the
/// next one. Every call goes to the real store.
#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    extends: Arc<watch::Sender<u64>>,
    /// Calls of `claim`, `complete` and `release`, answered or not.
    pub calls: Arc<Calls>,
}

/// Calls a [`Observed`] store received.
#[derive(Default)]
pub struct Calls {
    pub claims: watch::Sender<u64>,
    pub completes: AtomicUsize,
    pub releases: AtomicUsize,
    /// Every `extend`, accepted or refused.
    pub extend_calls: AtomicUsize,
}

impl Calls {
    /// Waits until `n` claims were made (a minute at most, then the test fails).
    pub async fn claimed(&self, n: u64) {
        let mut rx = self.claims.subscribe();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|c| *c >= n))
            .await
            .expect("the claims never came")
            .unwrap();
    }

    pub fn completes(&self) -> usize {
        self.completes.load(Ordering::SeqCst)
    }

    pub fn releases(&self) -> usize {
        self.releases.load(Ordering::SeqCst)
    }
}

impl<S> Observed<S> {
    pub fn new(inner: S) -> Self {
        Observed {
            inner,
            extends: Arc::new(watch::channel(0).0),
            calls: Arc::default(),
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
        self.calls.claims.send_modify(|n| *n += 1);
        self.inner.claim(scope, key, fingerprint, lock_ttl).await
    }

    async fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), Error> {
        self.calls.completes.fetch_add(1, Ordering::SeqCst);
        self.inner.complete(claim, response, retention).await
    }

    async fn release(&self, claim: &Claim) -> Result<(), Error> {
        self.calls.releases.fetch_add(1, Ordering::SeqCst);
        self.inner.release(claim).await
    }

    async fn extend(&self, claim: &Claim, lock_ttl: Duration) -> Result<(), Error> {
        self.calls.extend_calls.fetch_add(1, Ordering::SeqCst);
        let done = self.inner.extend(claim, lock_ttl).await;
        if done.is_ok() {
            self.extends.send_modify(|n| *n += 1);
        }
        done
    }

    async fn sweep(&self) -> Result<u64, Error> {
        self.inner.sweep().await
    }

    async fn poll_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<ClaimOutcome, Error> {
        self.calls.claims.send_modify(|n| *n += 1);
        self.inner
            .poll_claim(scope, key, fingerprint, lock_ttl)
            .await
    }
}

/// Generates one `#[test]` per suite case; `$make` returns `(Runtime, Harness<S>)`. The
/// store cases are the crate's public conformance suite; the HTTP ones live here.
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
            poll_claim_answers_as_claim,
            run_once_runs_once_and_replays,
            run_once_failed_work_releases_the_key,
            run_once_duplicate_in_flight,
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
            http_handler_completes_through_its_claim,
            http_waiting_duplicates_get_the_first_response,
            http_wait_that_runs_out_is_409,
            http_waiting_duplicate_runs_when_the_first_is_not_stored,
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

/// Generates the two fault tests of a backend whose server can be frozen:
/// `$on_a_pausable_server` runs a test with a store on a server of its own, and the
/// server's pause and resume.
#[macro_export]
macro_rules! fault_suite {
    ($on_a_pausable_server:path) => {
        #[test]
        fn store_paused_is_503_and_fail_open_runs() {
            $on_a_pausable_server($crate::suite::http::http_store_paused);
        }

        #[test]
        fn run_once_on_a_paused_store_does_not_run() {
            $on_a_pausable_server($crate::suite::run_once_store_paused);
        }
    };
}

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of(s)
}

fn scope() -> String {
    sd_testkit::unique_name("scope")
}

pub use wait::{
    http_handler_completes_through_its_claim, http_wait_that_runs_out_is_409,
    http_waiting_duplicate_runs_when_the_first_is_not_stored,
    http_waiting_duplicates_get_the_first_response,
};

pub use http::{
    http_bad_keys_are_400, http_concurrent_duplicates_run_once,
    http_crash_after_claim_then_retry_after_ttl, http_fingerprint_over_chosen_fields,
    http_key_is_bound_to_method_and_path, http_long_handler_keeps_its_lock,
    http_methods_and_routes, http_mismatch_is_422_and_does_not_run,
    http_other_caller_is_independent, http_oversized_response_is_not_replayed,
    http_retention_runs_again, http_retryable_outcomes_are_not_stored,
};

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
