//! The property test of parallel groups on the memory log: random failures at random
//! steps of a saga with two groups, with a crash at a random write and a cancel at
//! another, keep the saga invariant.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sd_saga::{Direction, ManualClock, MemoryStore, SagaState, SagaStore};
use suite::{Fault, Faults, Faulty, GROUPED, Ledger, Shape, assert_effects, fast, faults, saga};

/// Steps 5 and 6 (the second group) are retriable.
fn retriable(step: usize) -> bool {
    step >= 5
}

fn apply(ledger: &Ledger, id: &str, plan: &[Faults]) {
    for (step, f) in plan.iter().enumerate() {
        if f.refuse && !retriable(step) {
            ledger.fault_for(id, step, Direction::Forward, Fault::Permanent);
        } else if f.forward > 0 {
            ledger.fault_for(id, step, Direction::Forward, Fault::Transient(f.forward));
        }
        if f.compensate > 0 {
            let fault = Fault::Transient(f.compensate);
            ledger.fault_for(id, step, Direction::Compensate, fault);
        }
    }
}

/// What a run without crash or cancel does forward: the steps that succeed.
fn forward_without_faults(plan: &[Faults]) -> Option<BTreeSet<usize>> {
    let gives_up = |s: usize| plan[s].refuse || plan[s].forward >= 3;
    if gives_up(0) {
        return Some(BTreeSet::new());
    }
    if (1..=3).any(gives_up) {
        return Some(
            [0, 1, 2, 3]
                .into_iter()
                .filter(|s| *s == 0 || !gives_up(*s))
                .collect(),
        );
    }
    if gives_up(4) {
        return Some((0..4).collect());
    }
    None
}

fn run_case(
    plan: &[Faults],
    crash: Option<(usize, bool)>,
    cancel_at: Option<usize>,
) -> Result<(), TestCaseError> {
    let rt = sd_testkit::runtime();
    rt.block_on(async {
        let ledger = Arc::new(Ledger::default());
        let shape = Shape {
            kinds: GROUPED,
            forward: fast(3),
            retriable: fast(6),
            compensation: fast(6),
            ..Shape::default()
        };
        let def = saga(&ledger, &shape);
        let id = "g";
        apply(&ledger, id, plan);
        let clock = ManualClock::starting_at(Duration::from_secs(1_000));
        let store = MemoryStore::with_clock(clock.clone());
        let cancels = store.clone();
        let hooked = match cancel_at {
            Some(n) => Faulty::hook_at(
                store.clone(),
                n,
                Arc::new(move || {
                    let store = cancels.clone();
                    Box::pin(async move {
                        let _ = store.cancel("g", "asked").await;
                    })
                }),
            ),
            None => Faulty::new(store.clone()),
        };
        let first = match crash {
            None => Faulty::new(hooked.clone()),
            Some((n, after)) => Faulty::crash_at(hooked.clone(), n, after),
        };
        let orch = suite::orchestrator(&def, first.clone(), "a");
        tokio::select! {
            _ = orch.run(id, vec![]) => {}
            () = first.crashed() => {}
        }
        drop(orch);
        if crash.is_some() {
            clock.advance(Duration::from_secs(5));
            let before = store.events(id).await.unwrap();
            let mark = ledger.mark();
            suite::orchestrator(&def, store.clone(), "b")
                .recover()
                .await
                .unwrap();
            ledger.assert_repeats_nothing(id, &before, mark);
        }
        let Some(record) = store.load(id).await.unwrap() else {
            prop_assert_eq!(crash, Some((1, false)));
            prop_assert!(ledger.effects(id).is_empty());
            return Ok(());
        };
        let forward = ledger.forward_effects(id);
        match record.state {
            SagaState::Completed => {
                assert_effects(&ledger, id, GROUPED, &[0, 1, 2, 3, 4, 5, 6], &[])
            }
            SagaState::Compensated => {
                // Exactly the branches and steps that happened before the pivot are
                // undone, each once, stage by stage in reverse.
                prop_assert!(forward.iter().all(|s| *s < 4), "{:?}", forward);
                assert_effects(&ledger, id, GROUPED, &forward, &forward);
            }
            other => prop_assert!(false, "saga left {}", other),
        }
        if crash.is_none() && cancel_at.is_none() {
            // Without a crash or a cancel the retry budgets are exact: the outcome is
            // predictable.
            let want = forward_without_faults(plan);
            let got: BTreeSet<usize> = forward.iter().copied().collect();
            match want {
                None => prop_assert_eq!(record.state, SagaState::Completed),
                Some(set) => {
                    prop_assert_eq!(record.state, SagaState::Compensated);
                    prop_assert_eq!(got, set);
                }
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Invariant: all forward effects, or exactly the compensations of the completed
    /// branches and steps before the pivot, groups in any order inside and in reverse
    /// between stages. Each effect once.
    #[test]
    fn random_failures_in_groups(plan in prop::collection::vec(faults(), 7)) {
        run_case(&plan, None, None)?;
    }

    /// The same with the orchestrator dropped at a random write (a new one recovers) and
    /// a cancel requested before another.
    #[test]
    fn random_failures_in_groups_a_crash_and_a_cancel(
        plan in prop::collection::vec(faults(), 7),
        crash in prop::option::of((1usize..40, any::<bool>())),
        cancel_at in prop::option::of(1usize..40),
    ) {
        run_case(&plan, crash, cancel_at)?;
    }
}
