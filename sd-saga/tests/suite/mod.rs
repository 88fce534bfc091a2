//! The behaviour suite every log runs: execution, compensation, retries, stuck and
//! resume, crash injection at every write boundary, fencing, concurrent recovery, and a
//! thousand sagas at once.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_saga::{
    Direction, Error, EventKind, Lease, NewSaga, Orchestrator, RetryPolicy, Saga, SagaOutcome,
    SagaRecord, SagaState, SagaStore, Step, StepContext, StepError, StoreStats, StoredEvent, Write,
    idempotency_key,
};
use tokio::sync::watch;

pub type Data = Vec<String>;

/// Generates one `#[tokio::test]` per suite case; `$make` is an async fn returning
/// `(store, guard)`.
#[macro_export]
macro_rules! saga_suite {
    ($make:path) => {
        $crate::saga_suite!(@cases $make;
            happy_path_runs_every_step_in_order_and_threads_the_data,
            failure_before_the_pivot_compensates_in_exact_reverse,
            non_retryable_error_fails_at_once,
            compensation_failing_three_times_then_succeeding,
            compensation_always_failing_is_stuck_then_resumed,
            retriable_step_past_the_pivot_is_stuck_then_resumed_forward,
            timed_out_step_is_retried_then_compensated_itself,
            crash_at_every_boundary_then_recover_finishes_every_saga,
            stale_owner_is_fenced_and_exactly_one_progresses,
            heartbeats_keep_a_long_step_owned,
            concurrent_recovers_claim_each_saga_once,
            thousand_sagas_concurrently,
            ids_are_checked_and_unique
        );
    };
    (@cases $make:path; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $make().await;
                suite::$name(store).await;
            }
        )*
    };
}

/// How a participant call misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails (retryably) this many times per key, then works.
    Transient(u32),
    /// Refuses for good (non-retryable).
    Permanent,
    /// Fails retryably every time, until the fault is cleared.
    Always,
}

#[derive(Default)]
struct LedgerState {
    calls: HashMap<String, u32>,
    applied: HashSet<String>,
    effects: Vec<(String, usize, Direction)>,
    faults: HashMap<(usize, Direction), Fault>,
    key_faults: HashMap<String, Fault>,
    left: HashMap<String, u32>,
    delays: HashMap<usize, Duration>,
    entered: HashMap<usize, Arc<tokio::sync::Notify>>,
}

/// The participants of every test saga: each call is deduped by its idempotency key, as a
/// real participant would (effects happen at most once per key), and counted.
#[derive(Default)]
pub struct Ledger {
    state: Mutex<LedgerState>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap()
    }

    /// Sets (or clears) the fault of (step, direction) for every saga.
    pub fn fault(&self, step: usize, direction: Direction, fault: Option<Fault>) {
        let mut st = self.lock();
        match fault {
            Some(f) => st.faults.insert((step, direction), f),
            None => st.faults.remove(&(step, direction)),
        };
    }

    /// Sets the fault of one saga's (step, direction).
    pub fn fault_for(&self, id: &str, step: usize, direction: Direction, fault: Fault) {
        self.lock()
            .key_faults
            .insert(idempotency_key(id, step, direction), fault);
    }

    /// Every forward call of `step` first sleeps `delay` (before its effect).
    pub fn delay(&self, step: usize, delay: Duration) {
        self.lock().delays.insert(step, delay);
    }

    /// Notified whenever a forward call of `step` starts.
    pub fn entered(&self, step: usize) -> Arc<tokio::sync::Notify> {
        self.lock().entered.entry(step).or_default().clone()
    }

    pub async fn call(&self, ctx: &StepContext) -> Result<(), StepError> {
        let key = ctx.idempotency_key();
        let (delay, entered) = {
            let st = self.lock();
            let forward = ctx.direction() == Direction::Forward;
            (
                st.delays.get(&ctx.step()).filter(|_| forward).copied(),
                st.entered.get(&ctx.step()).filter(|_| forward).cloned(),
            )
        };
        if let Some(entered) = entered {
            entered.notify_one();
        }
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut st = self.lock();
        *st.calls.entry(key.clone()).or_default() += 1;
        let fault = st
            .key_faults
            .get(&key)
            .or_else(|| st.faults.get(&(ctx.step(), ctx.direction())))
            .copied();
        match fault {
            Some(Fault::Permanent) => return Err(StepError::permanent("refused")),
            Some(Fault::Always) => return Err(StepError::retryable("participant down")),
            Some(Fault::Transient(n)) => {
                let left = st.left.entry(key.clone()).or_insert(n);
                if *left > 0 {
                    *left -= 1;
                    return Err(StepError::retryable("flaky"));
                }
            }
            None => {}
        }
        if st.applied.insert(key) {
            st.effects
                .push((ctx.saga_id().to_owned(), ctx.step(), ctx.direction()));
        }
        Ok(())
    }

    /// The effects of saga `id`, in the order they happened (once per key).
    pub fn effects(&self, id: &str) -> Vec<(usize, Direction)> {
        self.lock()
            .effects
            .iter()
            .filter(|(s, _, _)| s == id)
            .map(|(_, step, d)| (*step, *d))
            .collect()
    }

    pub fn calls(&self, id: &str, step: usize, direction: Direction) -> u32 {
        let key = idempotency_key(id, step, direction);
        self.lock().calls.get(&key).copied().unwrap_or(0)
    }

    /// Calls that reached a participant again with a key it had already served.
    pub fn duplicate_calls(&self) -> u32 {
        self.lock()
            .calls
            .values()
            .map(|n| n.saturating_sub(1))
            .sum()
    }
}

/// Forward effects of steps `0..done`, then, if `compensated`, the compensations of
/// `undo` steps in reverse.
pub fn expected(done: usize, undo: usize) -> Vec<(usize, Direction)> {
    let mut v: Vec<_> = (0..done).map(|s| (s, Direction::Forward)).collect();
    v.extend((0..undo).rev().map(|s| (s, Direction::Compensate)));
    v
}

/// A fast policy: 1 ms backoff, `attempts` attempts.
pub fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(1))
        .max_interval(Duration::from_millis(4))
        .max_attempts(attempts)
        .build()
        .unwrap()
}

/// Options of [`saga`].
#[derive(Clone)]
pub struct Shape {
    /// `C` compensatable, `P` pivot, `R` retriable, one letter per step.
    pub kinds: &'static str,
    pub forward: RetryPolicy,
    pub retriable: RetryPolicy,
    pub compensation: RetryPolicy,
    pub timeout: Duration,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            kinds: "CCCPR",
            forward: fast(3),
            retriable: fast(3),
            compensation: fast(5),
            timeout: Duration::from_secs(20),
        }
    }
}

/// A saga of steps `s0..sN` that each call the ledger and append their name to the data.
pub fn saga(ledger: &Arc<Ledger>, shape: &Shape) -> Saga<Data> {
    let mut builder = Saga::builder("order")
        .compensation_retry(shape.compensation)
        .timeout(shape.timeout);
    for (i, kind) in shape.kinds.chars().enumerate() {
        let name = format!("s{i}");
        let l = ledger.clone();
        let action = move |ctx: StepContext, mut data: Data| {
            let l = l.clone();
            async move {
                l.call(&ctx).await?;
                data.push(ctx.step_name().to_owned());
                Ok(data)
            }
        };
        let step = match kind {
            'C' => {
                let l = ledger.clone();
                let undo = move |ctx: StepContext, _data: Data| {
                    let l = l.clone();
                    async move { l.call(&ctx).await }
                };
                Step::compensatable(name, action, undo).retry(shape.forward)
            }
            'P' => Step::pivot(name, action).retry(shape.forward),
            'R' => Step::retriable(name, action).retry(shape.retriable),
            other => panic!("unknown step kind {other}"),
        };
        builder = builder.step(step);
    }
    builder.build().unwrap()
}

/// One step's faults in a random plan: transient forward failures, a permanent refusal,
/// transient compensation failures.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub forward: u32,
    pub refuse: bool,
    pub compensate: u32,
}

pub fn faults() -> impl proptest::strategy::Strategy<Value = Faults> {
    use proptest::prelude::*;
    (0u32..5, prop::bool::weighted(0.15), 0u32..5).prop_map(|(forward, refuse, compensate)| {
        Faults {
            forward,
            refuse,
            compensate,
        }
    })
}

/// The saga of the random plans: 3 compensatable steps, the pivot, 2 retriable steps.
pub const KINDS: &str = "CCCPRR";

/// 3 forward attempts before the pivot, 6 after it and for compensations (so the at
/// most 4 transient failures of a plan give up only before the pivot).
pub fn random_shape() -> Shape {
    Shape {
        kinds: KINDS,
        forward: fast(3),
        retriable: fast(6),
        compensation: fast(6),
        ..Shape::default()
    }
}

/// Installs a random plan's faults for saga `id`.
pub fn apply(ledger: &Ledger, id: &str, plan: &[Faults]) {
    for (step, f) in plan.iter().enumerate() {
        let retriable = KINDS.as_bytes()[step] == b'R';
        if f.refuse && !retriable {
            ledger.fault_for(id, step, Direction::Forward, Fault::Permanent);
        } else if f.forward > 0 {
            ledger.fault_for(id, step, Direction::Forward, Fault::Transient(f.forward));
        }
        if f.compensate > 0 {
            ledger.fault_for(
                id,
                step,
                Direction::Compensate,
                Fault::Transient(f.compensate),
            );
        }
    }
}

pub const LEASE: Duration = Duration::from_millis(300);

pub fn orchestrator<S: SagaStore>(
    saga: &Saga<Data>,
    store: S,
    owner: &str,
) -> Orchestrator<Data, S> {
    Orchestrator::builder(saga.clone(), store)
        .owner(owner)
        .lease_ttl(LEASE)
        .build()
        .unwrap()
}

/// Calls `recover` until every saga in `ids` is final or stuck (a hang guard of 60 s);
/// returns the number of sagas claimed.
pub async fn recover_all<S: SagaStore>(orch: &Orchestrator<Data, S>, ids: &[String]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut claimed = 0;
    loop {
        let report = orch.recover().await.unwrap();
        claimed += report.claimed;
        let mut open = 0;
        for id in ids {
            if orch
                .get(id)
                .await
                .unwrap()
                .is_some_and(|r| r.state.is_live())
            {
                open += 1;
            }
        }
        if open == 0 {
            return claimed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} sagas still live after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn state<S: SagaStore>(orch: &Orchestrator<Data, S>, id: &str) -> SagaRecord {
    orch.get(id).await.unwrap().expect("the saga is in the log")
}

fn kinds(events: &[StoredEvent], step: u32, direction: Direction) -> Vec<EventKind> {
    events
        .iter()
        .filter(|e| e.event.step == step && e.event.direction == direction)
        .map(|e| e.event.kind)
        .collect()
}

// ---- a store wrapper that crashes or freezes the orchestrator using it ------------------

struct FaultyState {
    writes: AtomicUsize,
    crash: Option<(usize, bool)>,
    crashed: watch::Sender<bool>,
    frozen: watch::Sender<bool>,
}

/// Wraps a store: counts `create` and `write` calls and, at an injected one, never
/// returns (before or after performing it), as an orchestrator that dies there; or
/// freezes every call until thawed, as a stalled process.
#[derive(Clone)]
pub struct Faulty<S> {
    inner: S,
    state: Arc<FaultyState>,
}

impl<S: SagaStore + Clone> Faulty<S> {
    pub fn new(inner: S) -> Self {
        Self::build(inner, None)
    }

    /// Dies at the `n`-th create/write (1-based), before performing it or just after.
    pub fn crash_at(inner: S, n: usize, after: bool) -> Self {
        Self::build(inner, Some((n, after)))
    }

    fn build(inner: S, crash: Option<(usize, bool)>) -> Self {
        Faulty {
            inner,
            state: Arc::new(FaultyState {
                writes: AtomicUsize::new(0),
                crash,
                crashed: watch::channel(false).0,
                frozen: watch::channel(false).0,
            }),
        }
    }

    pub fn writes(&self) -> usize {
        self.state.writes.load(Ordering::SeqCst)
    }

    /// Resolves once the injected crash point is reached.
    pub async fn crashed(&self) {
        let mut rx = self.state.crashed.subscribe();
        rx.wait_for(|c| *c).await.unwrap();
    }

    pub fn freeze(&self, frozen: bool) {
        self.state.frozen.send_replace(frozen);
    }

    async fn gate(&self) {
        let mut rx = self.state.frozen.subscribe();
        rx.wait_for(|f| !*f).await.unwrap();
    }

    async fn counted<T>(&self, op: impl Future<Output = T>) -> T {
        self.gate().await;
        let n = self.state.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.state.crash == Some((n, false)) {
            self.state.crashed.send_replace(true);
            std::future::pending::<()>().await;
        }
        let out = op.await;
        if self.state.crash == Some((n, true)) {
            self.state.crashed.send_replace(true);
            std::future::pending::<()>().await;
        }
        out
    }
}

impl<S: SagaStore + Clone> SagaStore for Faulty<S> {
    async fn create(&self, saga: &NewSaga<'_>) -> sd_saga::Result<Lease> {
        self.counted(self.inner.create(saga)).await
    }
    async fn write(&self, lease: &Lease, write: &Write<'_>) -> sd_saga::Result<Lease> {
        self.counted(self.inner.write(lease, write)).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> sd_saga::Result<()> {
        // A stalled orchestrator's heartbeats do not arrive: its lease runs out.
        if *self.state.frozen.borrow() {
            return Err(Error::Timeout { after: ttl });
        }
        self.inner.renew(lease, ttl).await
    }
    async fn claim_expired(
        &self,
        saga_type: &str,
        owner: &str,
        ttl: Duration,
        limit: usize,
    ) -> sd_saga::Result<Vec<SagaRecord>> {
        self.gate().await;
        self.inner.claim_expired(saga_type, owner, ttl, limit).await
    }
    async fn claim_stuck(
        &self,
        saga_type: &str,
        id: &str,
        owner: &str,
        ttl: Duration,
    ) -> sd_saga::Result<SagaRecord> {
        self.gate().await;
        self.inner.claim_stuck(saga_type, id, owner, ttl).await
    }
    async fn load(&self, id: &str) -> sd_saga::Result<Option<SagaRecord>> {
        self.inner.load(id).await
    }
    async fn events(&self, id: &str) -> sd_saga::Result<Vec<StoredEvent>> {
        self.inner.events(id).await
    }
    async fn stats(&self, saga_type: &str) -> sd_saga::Result<StoreStats> {
        self.inner.stats(saga_type).await
    }
}

// ---- the cases -----------------------------------------------------------------------

pub async fn happy_path_runs_every_step_in_order_and_threads_the_data<S: SagaStore + Clone>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-1", vec!["start".into()]).await.unwrap();
    let data: Data = ["start", "s0", "s1", "s2", "s3", "s4"]
        .map(String::from)
        .to_vec();
    assert_eq!(outcome, SagaOutcome::Completed(data.clone()));
    assert_eq!(ledger.effects("o-1"), expected(5, 0));
    let r = state(&orch, "o-1").await;
    assert_eq!(r.state, SagaState::Completed);
    assert_eq!(serde_json::from_str::<Data>(&r.data).unwrap(), data);
    assert_eq!(r.owner, None, "a finished saga releases its lease");
    // Intent before and outcome after every step, nothing else.
    let events = orch.events("o-1").await.unwrap();
    let got: Vec<_> = events
        .iter()
        .map(|e| (e.event.step, e.event.kind))
        .collect();
    let want: Vec<_> = (0..5)
        .flat_map(|s| [(s, EventKind::Intent), (s, EventKind::Done)])
        .collect();
    assert_eq!(got, want);
    assert!(events.windows(2).all(|w| w[0].version < w[1].version));
    let m = orch.metrics().await.unwrap();
    assert_eq!(m.count(SagaState::Completed), 1);
    assert_eq!(m.oldest_unfinished_age, None);
    assert_eq!(m.local.attempts, 5);
    assert_eq!(m.local.step_latency.count, 5);
    assert_eq!(m.local.step_latency.buckets.iter().sum::<u64>(), 5);
}

pub async fn failure_before_the_pivot_compensates_in_exact_reverse<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    // The pivot (s3) refuses after three transient failures exhaust its 3 attempts.
    ledger.fault(3, Direction::Forward, Some(Fault::Always));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-2", vec![]).await.unwrap();
    let SagaOutcome::Compensated { reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("step `s3` failed"), "{reason}");
    assert_eq!(ledger.calls("o-2", 3, Direction::Forward), 3);
    assert_eq!(ledger.effects("o-2"), expected(3, 3));
    let r = state(&orch, "o-2").await;
    assert_eq!(r.state, SagaState::Compensated);
    assert_eq!(r.reason.as_deref(), Some(reason.as_str()));
    let events = orch.events("o-2").await.unwrap();
    let comps: Vec<_> = events
        .iter()
        .filter(|e| e.event.direction == Direction::Compensate && e.event.kind == EventKind::Done)
        .map(|e| e.event.step)
        .collect();
    assert_eq!(comps, [2, 1, 0]);
    let m = orch.metrics().await.unwrap();
    assert_eq!(m.count(SagaState::Compensated), 1);
    assert_eq!(m.local.compensations_run, 3);
}

pub async fn non_retryable_error_fails_at_once<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    ledger.fault(1, Direction::Forward, Some(Fault::Permanent));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-3", vec![]).await.unwrap();
    assert_eq!(outcome.state(), SagaState::Compensated);
    assert_eq!(ledger.calls("o-3", 1, Direction::Forward), 1, "no retry");
    assert_eq!(ledger.effects("o-3"), expected(1, 1));
}

pub async fn compensation_failing_three_times_then_succeeding<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    ledger.fault(3, Direction::Forward, Some(Fault::Permanent));
    ledger.fault(1, Direction::Compensate, Some(Fault::Transient(3)));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-4", vec![]).await.unwrap();
    assert_eq!(outcome.state(), SagaState::Compensated);
    assert_eq!(ledger.calls("o-4", 1, Direction::Compensate), 4);
    assert_eq!(ledger.effects("o-4"), expected(3, 3));
    let events = orch.events("o-4").await.unwrap();
    use EventKind::{Done, Failed, Intent};
    assert_eq!(
        kinds(&events, 1, Direction::Compensate),
        [Intent, Failed, Intent, Failed, Intent, Failed, Intent, Done]
    );
}

pub async fn compensation_always_failing_is_stuck_then_resumed<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    ledger.fault(3, Direction::Forward, Some(Fault::Permanent));
    ledger.fault(1, Direction::Compensate, Some(Fault::Always));
    let shape = Shape {
        compensation: fast(3),
        ..Shape::default()
    };
    let orch = orchestrator(&saga(&ledger, &shape), store, "a");
    let outcome = orch.run("o-5", vec![]).await.unwrap();
    let SagaOutcome::Stuck { reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.contains("compensation of step `s1` failed"),
        "{reason}"
    );
    assert!(reason.contains("step `s3` failed"), "{reason}");
    assert_eq!(ledger.calls("o-5", 1, Direction::Compensate), 3);
    assert_eq!(
        ledger.effects("o-5"),
        [
            (0, Direction::Forward),
            (1, Direction::Forward),
            (2, Direction::Forward),
            (2, Direction::Compensate)
        ]
    );
    let r = state(&orch, "o-5").await;
    assert_eq!((r.state, r.owner.as_deref()), (SagaState::Stuck, None));
    assert_eq!(r.reason.as_deref(), Some(reason.as_str()));
    let m = orch.metrics().await.unwrap();
    assert_eq!(m.count(SagaState::Stuck), 1);
    assert!(m.oldest_unfinished_age.is_some());
    // Nobody picks a stuck saga up by themselves.
    let other = orchestrator(&saga(&ledger, &shape), orch.store().clone(), "b");
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(other.recover().await.unwrap().claimed, 0);
    // Resumed while the fault persists: stuck again, after a fresh retry budget.
    let again = other.resume("o-5").await.unwrap();
    assert_eq!(again.state(), SagaState::Stuck);
    assert_eq!(ledger.calls("o-5", 1, Direction::Compensate), 6);
    // The operator fixes the participant and resumes: the unwinding finishes in order.
    ledger.fault(1, Direction::Compensate, None);
    let done = other.resume("o-5").await.unwrap();
    assert_eq!(done.state(), SagaState::Compensated);
    assert_eq!(ledger.effects("o-5"), expected(3, 3));
    assert!(matches!(
        other.resume("o-5").await,
        Err(Error::NotStuck {
            state: SagaState::Compensated,
            ..
        })
    ));
    assert!(matches!(
        other.resume("nope").await,
        Err(Error::NotFound { .. })
    ));
    let events = other.events("o-5").await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event.kind == EventKind::Resumed)
            .count(),
        2
    );
}

pub async fn retriable_step_past_the_pivot_is_stuck_then_resumed_forward<S: SagaStore + Clone>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    ledger.fault(4, Direction::Forward, Some(Fault::Always));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-6", vec![]).await.unwrap();
    let SagaOutcome::Stuck { reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("step `s4` failed"), "{reason}");
    // Past the pivot nothing is compensated.
    assert_eq!(ledger.effects("o-6"), expected(4, 0));
    ledger.fault(4, Direction::Forward, None);
    let done = orch.resume("o-6").await.unwrap();
    let SagaOutcome::Completed(data) = done else {
        panic!("{done:?}")
    };
    assert_eq!(data.last().map(String::as_str), Some("s4"));
    assert_eq!(ledger.effects("o-6"), expected(5, 0));
}

pub async fn timed_out_step_is_retried_then_compensated_itself<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    ledger.delay(1, Duration::from_secs(30));
    let shape = Shape {
        timeout: Duration::from_millis(50),
        ..Shape::default()
    };
    let orch = orchestrator(&saga(&ledger, &shape), store, "a");
    let outcome = orch.run("o-7", vec![]).await.unwrap();
    let SagaOutcome::Compensated { reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("timed out"), "{reason}");
    let events = orch.events("o-7").await.unwrap();
    assert_eq!(
        kinds(&events, 1, Direction::Forward)
            .iter()
            .filter(|k| **k == EventKind::Intent)
            .count(),
        3,
        "three attempts"
    );
    // The timed-out step may have landed late, so its compensation runs too.
    assert_eq!(
        ledger.effects("o-7"),
        [
            (0, Direction::Forward),
            (1, Direction::Compensate),
            (0, Direction::Compensate)
        ]
    );
}

pub async fn crash_at_every_boundary_then_recover_finishes_every_saga<S: SagaStore + Clone>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    let def = saga(&ledger, &Shape::default());
    // Two scenarios: all forward, and a pivot that refuses (so the saga compensates).
    let scenarios = [("ok", false), ("fail", true)];
    let mut runs = Vec::new();
    for (name, fail) in scenarios {
        let dry = format!("{name}-dry");
        if fail {
            ledger.fault_for(&dry, 3, Direction::Forward, Fault::Permanent);
        }
        let counting = Faulty::new(store.clone());
        orchestrator(&def, counting.clone(), "dry")
            .run(dry, vec![])
            .await
            .unwrap();
        for n in 1..=counting.writes() {
            for after in [false, true] {
                let id = format!("{name}-{n}-{after}");
                if fail {
                    ledger.fault_for(&id, 3, Direction::Forward, Fault::Permanent);
                }
                runs.push((id, fail, n, after));
            }
        }
    }
    assert!(runs.len() >= 40, "{} crash points", runs.len());
    let tasks: Vec<_> = runs
        .iter()
        .map(|(id, _, n, after)| {
            let faulty = Faulty::crash_at(store.clone(), *n, *after);
            let orch = orchestrator(&def, faulty.clone(), &format!("dead-{id}"));
            let id = id.clone();
            tokio::spawn(async move {
                tokio::select! {
                    outcome = orch.run(id.clone(), vec![]) => panic!("{id} ran past its crash point: {outcome:?}"),
                    () = faulty.crashed() => {}
                }
                // The orchestrator (and the step it was in) is dropped here.
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let ids: Vec<String> = runs.iter().map(|r| r.0.clone()).collect();
    let rescuer = orchestrator(&def, store.clone(), "rescuer");
    recover_all(&rescuer, &ids).await;
    for (id, fail, n, after) in &runs {
        let record = rescuer.get(id).await.unwrap();
        if *n == 1 && !after {
            // Died before the saga was created: nothing happened, nothing to recover.
            assert!(record.is_none(), "{id}");
            assert!(ledger.effects(id).is_empty(), "{id}");
            continue;
        }
        let record = record.unwrap();
        let (state, effects) = if *fail {
            (SagaState::Compensated, expected(3, 3))
        } else {
            (SagaState::Completed, expected(5, 0))
        };
        assert_eq!(record.state, state, "{id}");
        assert_eq!(
            ledger.effects(id),
            effects,
            "{id}: effects once each, compensations in reverse"
        );
    }
    assert!(
        ledger.duplicate_calls() > 0,
        "some crashes fell between an effect and its outcome record, so participants saw repeats"
    );
}

pub async fn stale_owner_is_fenced_and_exactly_one_progresses<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    ledger.delay(1, Duration::from_millis(200));
    let entered = ledger.entered(1);
    let def = saga(&ledger, &Shape::default());
    let frozen = Faulty::new(store.clone());
    let a = orchestrator(&def, frozen.clone(), "a");
    let b = orchestrator(&def, store.clone(), "b");
    let run_a = tokio::spawn(async move { a.run("race", vec![]).await });
    // A is inside step 1 when its process stalls: its heartbeats stop and its next
    // write (the outcome of s1) hangs until it wakes up.
    entered.notified().await;
    frozen.freeze(true);
    let ids = ["race".to_owned()];
    let claimed = recover_all(&b, &ids).await;
    assert_eq!(claimed, 1);
    assert_eq!(state(&b, "race").await.state, SagaState::Completed);
    // A wakes up and tries to record its step: refused, and it stops.
    frozen.freeze(false);
    let a_result = tokio::time::timeout(Duration::from_secs(30), run_a)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(a_result, Err(Error::Fenced { epoch: 1, .. })),
        "{a_result:?}"
    );
    assert_eq!(ledger.effects("race"), expected(5, 0));
    assert_eq!(
        ledger.calls("race", 1, Direction::Forward),
        2,
        "both ran s1; the key deduped it"
    );
    let record = state(&b, "race").await;
    assert_eq!(record.epoch, 2);
    // Once B's epoch appears in the log, no event of A's follows.
    let events = b.events("race").await.unwrap();
    let first_b = events.iter().position(|e| e.epoch == 2).unwrap();
    assert!(events[first_b..].iter().all(|e| e.epoch == 2), "{events:?}");
}

pub async fn heartbeats_keep_a_long_step_owned<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    // A step of three lease lengths: only the heartbeats keep it owned. (A generous lease,
    // so a loaded machine does not miss one by a whole lease.)
    let lease = Duration::from_secs(1);
    ledger.delay(1, lease * 3);
    let entered = ledger.entered(1);
    let def = saga(&ledger, &Shape::default());
    let build = |owner: &str| {
        Orchestrator::builder(def.clone(), store.clone())
            .owner(owner)
            .lease_ttl(lease)
            .build()
            .unwrap()
    };
    let a = build("a");
    let b = build("b");
    let run_a = tokio::spawn(async move { a.run("long", vec![]).await });
    entered.notified().await;
    let mut claimed = 0;
    while !run_a.is_finished() {
        claimed += b.recover().await.unwrap().claimed;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(claimed, 0, "nobody claims a saga whose owner is alive");
    let outcome = run_a.await.unwrap().unwrap();
    assert_eq!(outcome.state(), SagaState::Completed);
    assert_eq!(ledger.calls("long", 1, Direction::Forward), 1);
    assert_eq!(ledger.effects("long"), expected(5, 0));
}

pub async fn concurrent_recovers_claim_each_saga_once<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let def = saga(&ledger, &Shape::default());
    let ids: Vec<String> = (0..40).map(|i| format!("abandoned-{i}")).collect();
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            // Die at various points: before/after the 2nd to 7th write.
            let faulty = Faulty::crash_at(store.clone(), 2 + i % 6, i % 2 == 0);
            let orch = orchestrator(&def, faulty.clone(), &format!("dead-{i}"));
            let id = id.clone();
            tokio::spawn(async move {
                tokio::select! {
                    outcome = orch.run(id, vec![]) => panic!("ran past the crash: {outcome:?}"),
                    () = faulty.crashed() => {}
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let b = orchestrator(&def, store.clone(), "b");
    let c = orchestrator(&def, store.clone(), "c");
    let (claimed_b, claimed_c) = tokio::join!(recover_all(&b, &ids), recover_all(&c, &ids));
    assert_eq!(
        claimed_b + claimed_c,
        ids.len(),
        "each saga claimed exactly once"
    );
    for id in &ids {
        assert_eq!(state(&b, id).await.state, SagaState::Completed, "{id}");
        assert_eq!(state(&b, id).await.epoch, 2, "{id}");
        assert_eq!(ledger.effects(id), expected(5, 0), "{id}");
    }
}

pub async fn thousand_sagas_concurrently<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let def = saga(&ledger, &Shape::default());
    let orch = orchestrator(&def, store, "a");
    let n = 1000;
    for i in (0..n).step_by(10) {
        ledger.fault_for(
            &format!("many-{i}"),
            3,
            Direction::Forward,
            Fault::Permanent,
        );
    }
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let orch = orch.clone();
            tokio::spawn(async move { orch.run(format!("many-{i}"), vec![]).await.unwrap() })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let outcome = t.await.unwrap();
        let id = format!("many-{i}");
        if i % 10 == 0 {
            assert_eq!(outcome.state(), SagaState::Compensated, "{id}");
            assert_eq!(ledger.effects(&id), expected(3, 3), "{id}");
        } else {
            assert_eq!(outcome.state(), SagaState::Completed, "{id}");
            assert_eq!(ledger.effects(&id), expected(5, 0), "{id}");
        }
    }
    let m = orch.metrics().await.unwrap();
    assert_eq!(m.count(SagaState::Completed), 900);
    assert_eq!(m.count(SagaState::Compensated), 100);
    assert_eq!(m.oldest_unfinished_age, None);
    assert_eq!(m.local.started, 1000);
    assert_eq!(m.local.compensations_run, 300);
}

pub async fn ids_are_checked_and_unique<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    orch.run("dup", vec![]).await.unwrap();
    assert!(matches!(
        orch.run("dup", vec![]).await,
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        orch.run("", vec![]).await,
        Err(Error::InvalidId { .. })
    ));
    assert!(matches!(
        orch.run("a\nb", vec![]).await,
        Err(Error::InvalidId { .. })
    ));
    assert!(matches!(
        orch.run("x".repeat(201), vec![]).await,
        Err(Error::InvalidId { .. })
    ));
    assert_eq!(ledger.effects("dup"), expected(5, 0));
    let bad = Orchestrator::builder(saga(&ledger, &Shape::default()), orch.store().clone())
        .lease_ttl(Duration::from_millis(1))
        .build();
    assert!(matches!(
        bad,
        Err(Error::InvalidConfig {
            field: "lease_ttl",
            ..
        })
    ));
}
