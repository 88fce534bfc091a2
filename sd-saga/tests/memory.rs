//! The behaviour suite on the memory log, and the property test: random failures at
//! random steps, with a crash at a random write, keep the saga invariant.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sd_saga::{Direction, ManualClock, MemoryStore, SagaState, SagaStore};
use suite::{
    Faults, Faulty, KINDS, Ledger, apply, expected, faults, orchestrator, random_shape, saga,
};

async fn memory() -> (MemoryStore, ()) {
    (MemoryStore::new(), ())
}

sd_saga::saga_suite!(memory);

fn run_case(plan: &[Faults], crash: Option<(usize, bool)>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ledger = Arc::new(Ledger::default());
        let def = saga(&ledger, &random_shape());
        let id = "p";
        apply(&ledger, id, plan);
        let clock = ManualClock::starting_at(Duration::from_secs(1_000));
        let store = MemoryStore::with_clock(clock.clone());
        match crash {
            None => {
                orchestrator(&def, store.clone(), "a")
                    .run(id, vec![])
                    .await
                    .unwrap();
            }
            Some((n, after)) => {
                let faulty = Faulty::crash_at(store.clone(), n, after);
                let orch = orchestrator(&def, faulty.clone(), "a");
                tokio::select! {
                    _ = orch.run(id, vec![]) => {}
                    () = faulty.crashed() => {}
                }
                drop(orch);
                clock.advance(Duration::from_secs(5));
                let rescuer = orchestrator(&def, store.clone(), "b");
                let before = store.events(id).await.unwrap();
                let mark = ledger.mark();
                rescuer.recover().await.unwrap();
                ledger.assert_repeats_nothing(id, &before, mark);
            }
        }
        // The first step before or at the pivot that gives up decides the outcome.
        let gives_up = plan[..4].iter().position(|f| f.refuse || f.forward >= 3);
        let record = orchestrator(&def, store, "c").get(id).await.unwrap();
        let Some(record) = record else {
            // Only a crash before the saga was created leaves no saga, and no effect.
            prop_assert_eq!(crash, Some((1, false)));
            prop_assert!(ledger.effects(id).is_empty());
            return Ok(());
        };
        let effects = ledger.effects(id);
        let forward = effects
            .iter()
            .filter(|(_, d)| *d == Direction::Forward)
            .count();
        match record.state {
            SagaState::Completed => prop_assert_eq!(&effects, &expected(KINDS.len(), 0)),
            SagaState::Compensated => {
                // Only steps before the pivot are undone, all of them, in reverse.
                prop_assert!(forward <= 3);
                prop_assert_eq!(&effects, &expected(forward, forward));
            }
            other => prop_assert!(false, "saga left {}", other),
        }
        if crash.is_none() {
            // Without a crash the retry budgets are exact, so the outcome is predictable.
            // (A recovered step starts a fresh budget, so after a crash it may succeed.)
            let want = gives_up.map_or(expected(KINDS.len(), 0), |k| expected(k, k));
            prop_assert_eq!(effects, want);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Invariant: all forward effects, or exactly the compensations of the completed
    /// compensatable steps in reverse; past the pivot, all forward. Each effect once.
    #[test]
    fn random_failures_at_random_steps(plan in prop::collection::vec(faults(), KINDS.len())) {
        run_case(&plan, None)?;
    }

    /// The same, with the orchestrator dropped at a random write and a new one recovering.
    #[test]
    fn random_failures_and_a_crash(
        plan in prop::collection::vec(faults(), KINDS.len()),
        n in 1usize..30,
        after in any::<bool>(),
    ) {
        run_case(&plan, Some((n, after)))?;
    }
}

#[tokio::test]
async fn prune_deletes_only_finished_sagas_older_than_asked() {
    let clock = ManualClock::starting_at(Duration::from_secs(1_000));
    let store = MemoryStore::with_clock(clock.clone());
    let orch = suite::done_and_stuck(store.clone()).await;
    clock.advance(Duration::from_secs(10));
    assert_eq!(store.prune_finished(Duration::from_secs(60)), 0);
    assert_eq!(store.prune_finished(Duration::from_secs(5)), 1);
    assert!(store.load("done").await.unwrap().is_none());
    assert!(store.events("done").await.unwrap().is_empty());
    assert_eq!(
        store.load("stuck").await.unwrap().unwrap().state,
        SagaState::Stuck
    );
    let m = orch.metrics().await.unwrap();
    assert_eq!(m.count(SagaState::Stuck), 1);
    assert_eq!(m.oldest_unfinished_age, Some(Duration::from_secs(10)));
}
