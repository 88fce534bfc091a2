//! The [`SagaStore`] contract as a suite of async checks, for any log: the crate's own
//! logs run it, and so can a new backend (feature `test-util`).
//!
//! Each case takes a fresh store (sagas with ids of its own, so one database may serve
//! several cases) and panics when the store breaks the contract: execution,
//! compensation, retries, stuck and resume, crash injection at every write boundary,
//! fencing, concurrent recovery and a thousand sagas at once; and for parallel groups,
//! deadlines, cancels and definition versions: concurrent branches, a failed branch's
//! compensation, a crash at every write of a grouped saga, a cancel or deadline at every
//! write and across a crash, two recovering orchestrators, a version refused then
//! migrated. The cases need a
//! multi-threaded tokio runtime (`#[tokio::test(flavor = "multi_thread")]`).
//!
//! ```
//! use sd_saga::{BoxStore, MemoryStore, conformance};
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async {
//! conformance::happy_path_runs_every_step_in_order_and_threads_the_data(
//!     BoxStore::new(MemoryStore::new()),
//! )
//! .await;
//! # });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![allow(clippy::unwrap_used)]

mod cases;
mod faulty;
mod ledger;
mod parallel;

use std::sync::Arc;
use std::time::Duration;

pub use self::cases::*;
pub use self::faulty::{Faulty, Hook};
pub use self::ledger::{Call, Fault, Ledger};
pub use self::parallel::*;
use crate::{
    Direction, EventKind, Orchestrator, RetryPolicy, Saga, SagaOutcome, SagaRecord, SagaState,
    SagaStore, Step, StepContext, StoredEvent,
};

/// Writes [`run_all`], [`CASES`] and [`saga_suite!`](crate::saga_suite) from one list of
/// the cases, in the order they run.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        /// Runs every case in [`CASES`] order, each on a fresh, empty log from `make`.
        pub async fn run_all<S, F, Fut>(mut make: F)
        where
            S: SagaStore + Clone,
            F: FnMut() -> Fut,
            Fut: Future<Output = S>,
        {
            $($case(make().await).await;)*
        }

        /// Every case, by name, in the order [`run_all`] runs them.
        pub const CASES: &[&str] = &[$(stringify!($case)),*];

        /// Writes one `#[tokio::test]` per case of the [`conformance`](crate::conformance)
        /// suite, named after the case, on a multi-threaded runtime: a backend's test file
        /// runs the whole suite with one line. `$make` is an async fn returning
        /// `(store, guard)`; the guard (a server, say) lives to the end of the test.
        ///
        /// ```no_run
        /// async fn memory() -> (sd_saga::MemoryStore, ()) {
        ///     (sd_saga::MemoryStore::new(), ())
        /// }
        /// sd_saga::saga_suite!(memory);
        /// ```
        #[macro_export]
        macro_rules! saga_suite {
            ($make:path) => {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let (store, _guard) = $make().await;
                        $crate::conformance::$case(store).await;
                    }
                )*
            };
        }
    };
}

cases! {
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
    ids_are_checked_and_unique,
    parallel_branches_run_concurrently_and_merge_their_data,
    a_failed_branch_undoes_its_completed_siblings_then_the_steps_before,
    crash_at_every_write_of_a_parallel_saga_then_recover,
    cancel_or_deadline_at_every_write_stops_before_the_pivot,
    recovery_honours_a_cancel_or_deadline_written_before,
    two_orchestrators_recover_parallel_sagas_each_once,
    a_saga_is_recovered_only_under_its_definition_version,
    a_stuck_branch_is_resumed_alone,
}

/// The data of every test saga: the names of the steps that ran.
pub type Data = Vec<String>;

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
#[derive(Debug, Clone)]
pub struct Shape {
    /// `C` compensatable, `P` pivot, `R` retriable, one letter per step; letters in
    /// parentheses form a parallel group, as in `C(CCC)P(RR)`.
    pub kinds: &'static str,
    /// The policy of the steps up to the pivot.
    pub forward: RetryPolicy,
    /// The policy of the retriable steps.
    pub retriable: RetryPolicy,
    /// The policy of the compensations.
    pub compensation: RetryPolicy,
    /// The per-attempt timeout.
    pub timeout: Duration,
    /// The steps made [`cancellable`](Step::cancellable).
    pub cancellable: &'static [usize],
    /// The definition version.
    pub version: u32,
    /// A version whose sagas this one takes over, steps in place.
    pub migrate_from: Option<u32>,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            kinds: "CCCPR",
            forward: fast(3),
            retriable: fast(3),
            compensation: fast(5),
            timeout: Duration::from_secs(20),
            cancellable: &[],
            version: 1,
            migrate_from: None,
        }
    }
}

/// The merge of the test sagas' parallel groups: the branch's new names, appended.
pub fn merge(mut data: Data, branch: Data) -> Data {
    for name in branch {
        if !data.contains(&name) {
            data.push(name);
        }
    }
    data
}

/// The stages of a [`Shape::kinds`]: each a list of (step index, kind) and whether it
/// is a parallel group.
pub fn stages_of(kinds: &str) -> Vec<(Vec<(usize, char)>, bool)> {
    let mut stages = Vec::new();
    let mut group: Option<Vec<(usize, char)>> = None;
    let mut i = 0;
    for kind in kinds.chars() {
        match (kind, group.as_mut()) {
            ('(', None) => group = Some(Vec::new()),
            (')', Some(_)) => stages.push((group.take().unwrap(), true)),
            (k, Some(g)) => {
                g.push((i, k));
                i += 1;
            }
            (k, None) => {
                stages.push((vec![(i, k)], false));
                i += 1;
            }
        }
    }
    stages
}

/// A saga of steps `s0..sN` that each call the ledger and append their name to the data.
pub fn saga(ledger: &Arc<Ledger>, shape: &Shape) -> Saga<Data> {
    let mut builder = Saga::builder("order")
        .compensation_retry(shape.compensation)
        .timeout(shape.timeout)
        .version(shape.version);
    if let Some(from) = shape.migrate_from {
        builder = builder.migration(from, Some);
    }
    for (stage, parallel) in stages_of(shape.kinds) {
        let steps = stage.into_iter().map(|(i, kind)| {
            let step = test_step(ledger, shape, i, kind);
            if shape.cancellable.contains(&i) {
                step.cancellable()
            } else {
                step
            }
        });
        builder = if parallel {
            builder.parallel(steps, merge)
        } else {
            steps.fold(builder, |b, step| b.step(step))
        };
    }
    builder.build().unwrap()
}

fn test_step(ledger: &Arc<Ledger>, shape: &Shape, i: usize, kind: char) -> Step<Data> {
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
    match kind {
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
    }
}

/// The lease of the suite's orchestrators: short, so recovery tests wait little.
pub const LEASE: Duration = Duration::from_millis(300);

/// An orchestrator of `saga` on `store`, named `owner`, with the [`LEASE`].
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

/// The log of every saga in `ids` and the ledger's [`mark`](Ledger::mark), taken after
/// the first orchestrators stopped and before recovery, for
/// [`Ledger::assert_repeats_nothing`].
pub async fn logs_before_recovery<S: SagaStore>(
    orch: &Orchestrator<Data, S>,
    ledger: &Ledger,
    ids: &[String],
) -> (Vec<Vec<StoredEvent>>, usize) {
    let mark = ledger.mark();
    let mut logs = Vec::with_capacity(ids.len());
    for id in ids {
        logs.push(orch.events(id).await.unwrap());
    }
    (logs, mark)
}

/// Starts `count` sagas `{prefix}-{i}` of `def`, each on an orchestrator that dies at its
/// write `2 + i % spread` (before it for odd `i`, after it for even), then has two
/// orchestrators recover them at the same time. Checks that each saga was claimed once
/// and that recovery repeated nothing it should not; returns one of the two and the ids.
pub(crate) async fn crash_then_two_recover<S: SagaStore + Clone>(
    store: &S,
    ledger: &Arc<Ledger>,
    def: &Saga<Data>,
    prefix: &str,
    count: usize,
    spread: usize,
) -> (Orchestrator<Data, S>, Vec<String>) {
    let ids: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let faulty = Faulty::crash_at(store.clone(), 2 + i % spread, i % 2 == 0);
            let orch = orchestrator(def, faulty.clone(), &format!("dead-{i}"));
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
    let b = orchestrator(def, store.clone(), "b");
    let c = orchestrator(def, store.clone(), "c");
    let (logs, mark) = logs_before_recovery(&b, ledger, &ids).await;
    let (claimed_b, claimed_c) = tokio::join!(recover_all(&b, &ids), recover_all(&c, &ids));
    assert_eq!(
        claimed_b + claimed_c,
        ids.len(),
        "each saga claimed exactly once"
    );
    for (id, before) in ids.iter().zip(&logs) {
        ledger.assert_repeats_nothing(id, before, mark);
    }
    (b, ids)
}

/// One orchestrator of `def` per crash point of a dry run (before and after each of its
/// creates and writes), in two scenarios: `ok`, and `fail` where step `refuse` refuses.
/// Each runs saga `{prefix}{scenario}-{n}-{after}` until it dies there. Returns (id,
/// fail, n, after) per run.
pub(crate) async fn crash_points<S: SagaStore + Clone>(
    store: &S,
    ledger: &Arc<Ledger>,
    def: &Saga<Data>,
    prefix: &str,
    refuse: usize,
) -> Vec<(String, bool, usize, bool)> {
    let mut runs = Vec::new();
    for (name, fail) in [("ok", false), ("fail", true)] {
        let dry = format!("{prefix}{name}-dry");
        if fail {
            ledger.fault_for(&dry, refuse, Direction::Forward, Fault::Permanent);
        }
        let counting = Faulty::new(store.clone());
        orchestrator(def, counting.clone(), "dry")
            .run(dry, vec![])
            .await
            .unwrap();
        for n in 1..=counting.writes() {
            for after in [false, true] {
                let id = format!("{prefix}{name}-{n}-{after}");
                if fail {
                    ledger.fault_for(&id, refuse, Direction::Forward, Fault::Permanent);
                }
                runs.push((id, fail, n, after));
            }
        }
    }
    let tasks: Vec<_> = runs
        .iter()
        .map(|(id, _, n, after)| {
            let faulty = Faulty::crash_at(store.clone(), *n, *after);
            let orch = orchestrator(def, faulty.clone(), &format!("dead-{id}"));
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
    runs
}

/// A new orchestrator recovers the sagas of `runs` to their end; checks that it repeated
/// no call the contract does not allow, and that a run that died before its create left
/// nothing. Returns (id, fail, record) of every saga created.
pub(crate) async fn rescue<S: SagaStore + Clone>(
    store: &S,
    ledger: &Ledger,
    def: &Saga<Data>,
    runs: &[(String, bool, usize, bool)],
) -> Vec<(String, bool, SagaRecord)> {
    let ids: Vec<String> = runs.iter().map(|r| r.0.clone()).collect();
    let rescuer = orchestrator(def, store.clone(), "rescuer");
    let (logs, mark) = logs_before_recovery(&rescuer, ledger, &ids).await;
    recover_all(&rescuer, &ids).await;
    let mut created = Vec::new();
    for ((id, fail, n, after), before) in runs.iter().zip(&logs) {
        ledger.assert_repeats_nothing(id, before, mark);
        match rescuer.get(id).await.unwrap() {
            Some(record) => created.push((id.clone(), *fail, record)),
            None => {
                // Died before the saga was created: nothing happened, nothing to recover.
                assert!(*n == 1 && !after, "{id} is missing");
                assert!(ledger.effects(id).is_empty(), "{id}");
            }
        }
    }
    created
}

pub(crate) async fn state<S: SagaStore>(orch: &Orchestrator<Data, S>, id: &str) -> SagaRecord {
    orch.get(id).await.unwrap().expect("the saga is in the log")
}

pub(crate) fn kinds(events: &[StoredEvent], step: u32, direction: Direction) -> Vec<EventKind> {
    events
        .iter()
        .filter(|e| e.event.step == step && e.event.direction == direction)
        .map(|e| e.event.kind)
        .collect()
}

/// The reason of `outcome`, after checking that it is `state` (compensated or stuck) and
/// that its reason contains `says`.
pub(crate) fn reason_of(outcome: SagaOutcome<Data>, state: SagaState, says: &str) -> String {
    assert_eq!(outcome.state(), state, "{outcome:?}");
    let (SagaOutcome::Compensated { reason } | SagaOutcome::Stuck { reason }) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains(says), "{reason}");
    reason
}
