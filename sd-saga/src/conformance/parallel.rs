//! The contract suite's cases for parallel groups, deadlines, cancels and definition
//! versions.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::{Error, ManualClock, Orchestrator, SagaOutcome, SagaState};

/// The shape of the parallel cases: a step, a group of three, the pivot, a retriable
/// group of two.
pub const GROUPED: &str = "C(CCC)P(RR)";

/// Checks saga `id`'s effects: each once; forward effects exactly `forward`, stage by
/// stage in order; then compensations exactly `undone`, stage by stage in reverse
/// (branches of one stage in any order).
pub fn assert_effects(ledger: &Ledger, id: &str, kinds: &str, forward: &[usize], undone: &[usize]) {
    let stage_of = |step: usize| {
        stages_of(kinds)
            .iter()
            .position(|(steps, _)| steps.iter().any(|(i, _)| *i == step))
            .unwrap()
    };
    let effects = ledger.effects(id);
    let set = |d: Direction| -> BTreeSet<usize> {
        effects
            .iter()
            .filter(|(_, dir)| *dir == d)
            .map(|(s, _)| *s)
            .collect()
    };
    let want = |v: &[usize]| v.iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(
        set(Direction::Forward),
        want(forward),
        "{id}: forward effects {effects:?}"
    );
    assert_eq!(
        set(Direction::Compensate),
        want(undone),
        "{id}: compensations {effects:?}"
    );
    let forwards = effects.iter().filter(|e| e.1 == Direction::Forward);
    let f: Vec<usize> = forwards.map(|(s, _)| stage_of(*s)).collect();
    assert!(
        f.windows(2).all(|w| w[0] <= w[1]),
        "{id}: stages forward in order {effects:?}"
    );
    let first_undo = effects.iter().position(|e| e.1 == Direction::Compensate);
    if let Some(first) = first_undo {
        let c: Vec<usize> = effects[first..]
            .iter()
            .map(|(s, d)| {
                assert_eq!(
                    *d,
                    Direction::Compensate,
                    "{id}: forward after compensation"
                );
                stage_of(*s)
            })
            .collect();
        assert!(
            c.windows(2).all(|w| w[0] >= w[1]),
            "{id}: stages undone in reverse {effects:?}"
        );
    }
}

/// The contract: parallel branches run concurrently and merge their data.
pub async fn parallel_branches_run_concurrently_and_merge_their_data<S: SagaStore + Clone>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    // The three branches wait for each other: they finish only if they run at once.
    ledger.rendezvous(&[1, 2, 3]);
    let shape = Shape {
        kinds: GROUPED,
        ..Shape::default()
    };
    let orch = orchestrator(&saga(&ledger, &shape), store, "a");
    let outcome = tokio::time::timeout(Duration::from_secs(60), orch.run("g-1", vec![]))
        .await
        .expect("the branches of the group run concurrently")
        .unwrap();
    let SagaOutcome::Completed(data) = outcome else {
        panic!("{outcome:?}")
    };
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    assert_eq!(data[0], "s0");
    assert_eq!(sorted(&data[1..4]), ["s1", "s2", "s3"]);
    assert_eq!(data[4], "s4");
    assert_eq!(sorted(&data[5..]), ["s5", "s6"]);
    assert_effects(&ledger, "g-1", GROUPED, &[0, 1, 2, 3, 4, 5, 6], &[]);
    let events = orch.events("g-1").await.unwrap();
    for step in 0..7 {
        assert_eq!(
            kinds(&events, step, Direction::Forward),
            [EventKind::Intent, EventKind::Done],
            "step {step}"
        );
    }
    assert!(events.windows(2).all(|w| w[0].version < w[1].version));
    assert_eq!(state(&orch, "g-1").await.state, SagaState::Completed);
}

/// The contract: a failed branch undoes its completed siblings, then the steps before.
pub async fn a_failed_branch_undoes_its_completed_siblings_then_the_steps_before<
    S: SagaStore + Clone,
>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    ledger.fault_for("g-2", 2, Direction::Forward, Fault::Permanent);
    let shape = Shape {
        kinds: GROUPED,
        ..Shape::default()
    };
    let orch = orchestrator(&saga(&ledger, &shape), store.clone(), "a");
    let outcome = orch.run("g-2", vec![]).await.unwrap();
    reason_of(outcome, SagaState::Compensated, "step `s2` failed");
    assert_effects(&ledger, "g-2", GROUPED, &[0, 1, 3], &[0, 1, 3]);
    // A cancellable branch still running when its sibling fails is dropped, and undone
    // (it may have landed); the participant sees the compensation's key.
    let ledger = Arc::new(Ledger::default());
    ledger.fault_for("g-3", 2, Direction::Forward, Fault::Permanent);
    ledger.delay(3, Duration::from_secs(3600));
    let shape = Shape {
        kinds: GROUPED,
        cancellable: &[3],
        ..Shape::default()
    };
    let orch = orchestrator(&saga(&ledger, &shape), store, "a");
    let outcome = tokio::time::timeout(Duration::from_secs(60), orch.run("g-3", vec![]))
        .await
        .expect("the cancellable branch is dropped, not awaited")
        .unwrap();
    reason_of(outcome, SagaState::Compensated, "step `s2` failed");
    assert_effects(&ledger, "g-3", GROUPED, &[0, 1], &[0, 1, 3]);
    let events = orch.events("g-3").await.unwrap();
    let dropped = events
        .iter()
        .find(|e| e.event.step == 3 && e.event.kind == EventKind::Failed)
        .unwrap();
    assert!(dropped.event.error.as_deref().unwrap().contains("sibling"));
}

/// The contract: a crash at every write of a saga with parallel groups, then recovery:
/// every branch's effect once, compensations complete.
pub async fn crash_at_every_write_of_a_parallel_saga_then_recover<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let shape = Shape {
        kinds: GROUPED,
        ..Shape::default()
    };
    let def = saga(&ledger, &shape);
    // Two scenarios: all forward, and a branch of the group that refuses.
    let runs = crash_points(&store, &ledger, &def, "pc-", 2).await;
    assert!(runs.len() >= 50, "{} crash points", runs.len());
    for (id, fail, record) in rescue(&store, &ledger, &def, &runs).await {
        if fail {
            assert_eq!(record.state, SagaState::Compensated, "{id}");
            assert_effects(&ledger, &id, GROUPED, &[0, 1, 3], &[0, 1, 3]);
        } else {
            assert_eq!(record.state, SagaState::Completed, "{id}");
            assert_effects(&ledger, &id, GROUPED, &[0, 1, 2, 3, 4, 5, 6], &[]);
        }
    }
    assert!(
        ledger.duplicate_calls() > 0,
        "some crashes fell between an effect and its outcome record"
    );
}

/// Checks a saga that was asked to stop (cancel or deadline) at some point: completed
/// with every effect if the stop came after the pivot; otherwise compensated, with
/// exactly its compensatable forward effects undone, and no stage started after the
/// stop event.
async fn assert_stopped_consistently<S: SagaStore>(
    orch: &Orchestrator<Data, S>,
    ledger: &Ledger,
    id: &str,
    says: &str,
) -> SagaState {
    let record = state(orch, id).await;
    let events = orch.events(id).await.unwrap();
    let stop = events.iter().position(|e| {
        matches!(
            e.event.kind,
            EventKind::Cancelled | EventKind::DeadlinePassed
        )
    });
    match record.state {
        SagaState::Completed => {
            assert!(stop.is_none(), "{id}: a stop took effect yet it completed");
            assert_effects(ledger, id, GROUPED, &[0, 1, 2, 3, 4, 5, 6], &[]);
        }
        SagaState::Compensated => {
            let stop = stop.unwrap_or_else(|| panic!("{id}: compensated without a stop event"));
            assert!(
                record.reason.as_deref().unwrap().contains(says),
                "{record:?}"
            );
            let forward = ledger.forward_effects(id);
            assert!(
                forward.iter().all(|s| *s < 4),
                "{id}: past the pivot {forward:?}"
            );
            assert_effects(ledger, id, GROUPED, &forward, &forward);
            let before: BTreeSet<u32> = events[..stop]
                .iter()
                .filter(|e| e.event.kind == EventKind::Intent)
                .map(|e| e.event.step)
                .collect();
            for e in &events[stop..] {
                let new_start = e.event.kind == EventKind::Intent
                    && e.event.direction == Direction::Forward
                    && !before.contains(&e.event.step);
                assert!(
                    !new_start,
                    "{id}: step {} started after the stop",
                    e.event.step
                );
            }
        }
        other => panic!("{id}: left {other}"),
    }
    record.state
}

/// The contract: a cancel or a deadline at every write stops the saga before its pivot.
pub async fn cancel_or_deadline_at_every_write_stops_before_the_pivot<S: SagaStore + Clone>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    let shape = Shape {
        kinds: GROUPED,
        ..Shape::default()
    };
    let def = saga(&ledger, &shape);
    let counting = Faulty::new(store.clone());
    orchestrator(&def, counting.clone(), "dry")
        .run("cd-dry", vec![])
        .await
        .unwrap();
    let mut states = Vec::new();
    for n in 1..=counting.writes() {
        for cancel in [true, false] {
            let id = format!("cd-{n}-{cancel}");
            let clock = ManualClock::starting_at(Duration::from_secs(1_000_000));
            let hook: Hook = if cancel {
                let (store, id) = (store.clone(), id.clone());
                Arc::new(move || {
                    let (store, id) = (store.clone(), id.clone());
                    Box::pin(async move {
                        // Before the create (n = 1) there is no saga to cancel.
                        let _ = store.cancel(&id, "customer asked").await;
                    })
                })
            } else {
                let clock = clock.clone();
                Arc::new(move || {
                    clock.advance(Duration::from_secs(7200));
                    Box::pin(async {})
                })
            };
            let orch = Orchestrator::builder(def.clone(), Faulty::hook_at(store.clone(), n, hook))
                .owner("a")
                .lease_ttl(LEASE)
                .clock(clock)
                .build()
                .unwrap();
            let outcome = orch
                .run_within(id.clone(), vec![], Duration::from_secs(3600))
                .await
                .unwrap();
            let says = if cancel {
                "cancelled: customer asked"
            } else {
                "deadline"
            };
            let st = assert_stopped_consistently(&orch, &ledger, &id, says).await;
            assert_eq!(outcome.state(), st, "{id}");
            states.push(st);
        }
    }
    assert!(
        states.contains(&SagaState::Completed),
        "stops past the pivot"
    );
    assert!(
        states.contains(&SagaState::Compensated),
        "stops before the pivot"
    );
}

/// The contract: a cancel or a deadline is written to the log and honoured by the
/// orchestrator that recovers the saga after a crash.
pub async fn recovery_honours_a_cancel_or_deadline_written_before<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let shape = Shape {
        kinds: GROUPED,
        ..Shape::default()
    };
    let def = saga(&ledger, &shape);
    for cancel in [true, false] {
        let prefix = if cancel { "rc" } else { "rd" };
        let start = Duration::from_secs(1_000_000);
        let mut runs = Vec::new();
        let counting = Faulty::new(store.clone());
        orchestrator(&def, counting.clone(), "dry")
            .run(format!("{prefix}-dry"), vec![])
            .await
            .unwrap();
        for n in 2..=counting.writes() {
            let id = format!("{prefix}-{n}");
            let faulty = Faulty::crash_at(store.clone(), n, true);
            let orch = Orchestrator::builder(def.clone(), faulty.clone())
                .owner(format!("dead-{id}"))
                .lease_ttl(LEASE)
                .clock(ManualClock::starting_at(start))
                .build()
                .unwrap();
            tokio::select! {
                outcome = orch.run_within(id.clone(), vec![], Duration::from_secs(3600)) => panic!("{outcome:?}"),
                () = faulty.crashed() => {}
            }
            if cancel {
                let record = orch.cancel(&id, "customer asked").await.unwrap();
                assert!(
                    record.cancel_reason.is_some() || !record.state.is_live(),
                    "{id}"
                );
            }
            runs.push(id);
        }
        // The rescuer's clock: before the deadline for the cancels, past it otherwise.
        let now = if cancel {
            start
        } else {
            start + Duration::from_secs(7200)
        };
        let rescuer = Orchestrator::builder(def.clone(), store.clone())
            .owner("rescuer")
            .lease_ttl(LEASE)
            .clock(ManualClock::starting_at(now))
            .build()
            .unwrap();
        let (logs, mark) = logs_before_recovery(&rescuer, &ledger, &runs).await;
        recover_all(&rescuer, &runs).await;
        let says = if cancel { "cancelled" } else { "deadline" };
        let mut stopped = 0;
        for (id, before) in runs.iter().zip(&logs) {
            ledger.assert_repeats_nothing(id, before, mark);
            // Once the pivot's intent is in the log it is awaited, and may go through.
            let pivot_started = before
                .iter()
                .any(|e| e.event.step == 4 && e.event.direction == Direction::Forward);
            let st = assert_stopped_consistently(&rescuer, &ledger, id, says).await;
            if !pivot_started {
                assert_eq!(st, SagaState::Compensated, "{id}: stopped before its pivot");
                stopped += 1;
            }
        }
        assert!(stopped > 0, "{prefix}: some sagas were stopped by recovery");
    }
}

/// The contract: two orchestrators recovering parallel sagas claim each once.
pub async fn two_orchestrators_recover_parallel_sagas_each_once<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let shape = Shape {
        kinds: GROUPED,
        ..Shape::default()
    };
    let def = saga(&ledger, &shape);
    // Die before/after the 2nd to 13th of the 14 writes.
    let (b, ids) = crash_then_two_recover(&store, &ledger, &def, "pr", 30, 12).await;
    for id in &ids {
        let record = state(&b, id).await;
        assert_eq!(
            (record.state, record.epoch),
            (SagaState::Completed, 2),
            "{id}"
        );
        assert_effects(&ledger, id, GROUPED, &[0, 1, 2, 3, 4, 5, 6], &[]);
    }
}

/// The contract: a saga keeps its definition version; another version refuses to
/// recover or resume it unless a migration is registered.
pub async fn a_saga_is_recovered_only_under_its_definition_version<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let v1 = saga(&ledger, &Shape::default());
    // Dies at its fourth write (the outcome of step 1), and one saga is left stuck at step 4.
    let faulty = Faulty::crash_at(store.clone(), 4, false);
    let dead = orchestrator(&v1, faulty.clone(), "dead");
    tokio::select! {
        outcome = dead.run("v-1", vec![]) => panic!("{outcome:?}"),
        () = faulty.crashed() => {}
    }
    ledger.fault_for("v-2", 4, Direction::Forward, Fault::Permanent);
    let stuck = orchestrator(&v1, store.clone(), "a")
        .run("v-2", vec![])
        .await
        .unwrap();
    assert_eq!(stuck.state(), SagaState::Stuck);
    assert_eq!(state(&dead, "v-1").await.definition_version, 1);
    // Version 2 appends a retriable step.
    let v2_shape = Shape {
        kinds: "CCCPRR",
        version: 2,
        ..Shape::default()
    };
    let v2 = orchestrator(&saga(&ledger, &v2_shape), store.clone(), "v2");
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let report = v2.recover().await.unwrap();
        if let Some((id, e)) = report.errors.into_iter().next() {
            break (id, e);
        }
        assert!(tokio::time::Instant::now() < until, "v-1 never reached v2");
        tokio::time::sleep(LEASE / 2).await;
    };
    assert!(
        matches!(&refused, (id, Error::DefinitionVersion { found: 1, expected: 2, step: 1, .. }) if id == "v-1"),
        "{refused:?}"
    );
    assert!(
        refused.1.to_string().contains("migration(1"),
        "{}",
        refused.1
    );
    assert!(matches!(
        v2.resume("v-2").await,
        Err(Error::DefinitionVersion { found: 1, .. })
    ));
    assert_eq!(
        state(&v2, "v-1").await.state,
        SagaState::Running,
        "left as it was"
    );
    // With a migration from version 1 registered, version 2 takes both over.
    let migrating = Shape {
        migrate_from: Some(1),
        ..v2_shape
    };
    let v2m = orchestrator(&saga(&ledger, &migrating), store.clone(), "v2m");
    recover_all(&v2m, &["v-1".to_owned()]).await;
    let record = state(&v2m, "v-1").await;
    assert_eq!(
        (record.state, record.definition_version),
        (SagaState::Completed, 2)
    );
    assert_eq!(ledger.effects("v-1"), expected(6, 0));
    // The refused resume left v-2 stuck; fixed and resumed under version 2 it finishes.
    ledger.fault_for("v-2", 4, Direction::Forward, Fault::Transient(0));
    let SagaOutcome::Completed(data) = v2m.resume("v-2").await.unwrap() else {
        panic!("v-2 did not complete")
    };
    assert_eq!(data.len(), 6);
}

/// The contract: a branch that gives up for good leaves the saga stuck (a retriable one,
/// or a compensation), and resume retries only that branch.
pub async fn a_stuck_branch_is_resumed_alone<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let shape = Shape {
        kinds: GROUPED,
        ..Shape::default()
    };
    let orch = orchestrator(&saga(&ledger, &shape), store, "a");
    // Past the pivot: retriable branch 5 fails every time, its sibling 6 succeeds.
    ledger.fault(5, Direction::Forward, Some(Fault::Always));
    let outcome = orch.run("gs-1", vec![]).await.unwrap();
    reason_of(outcome, SagaState::Stuck, "step `s5` failed");
    assert_effects(&ledger, "gs-1", GROUPED, &[0, 1, 2, 3, 4, 6], &[]);
    ledger.fault(5, Direction::Forward, None);
    let done = orch.resume("gs-1").await.unwrap();
    assert_eq!(done.state(), SagaState::Completed);
    assert_eq!(
        ledger.calls("gs-1", 6, Direction::Forward),
        1,
        "6 is not run again"
    );
    assert_effects(&ledger, "gs-1", GROUPED, &[0, 1, 2, 3, 4, 5, 6], &[]);
    // Before the pivot: the pivot refuses, branch 2's compensation fails every time.
    ledger.fault_for("gs-2", 4, Direction::Forward, Fault::Permanent);
    ledger.fault(2, Direction::Compensate, Some(Fault::Always));
    let outcome = orch.run("gs-2", vec![]).await.unwrap();
    reason_of(
        outcome,
        SagaState::Stuck,
        "compensation of step `s2` failed",
    );
    assert_effects(&ledger, "gs-2", GROUPED, &[0, 1, 2, 3], &[1, 3]);
    ledger.fault(2, Direction::Compensate, None);
    let done = orch.resume("gs-2").await.unwrap();
    assert_eq!(done.state(), SagaState::Compensated);
    for step in [1, 3] {
        let calls = ledger.calls("gs-2", step, Direction::Compensate);
        assert_eq!(calls, 1, "compensation of {step} is not run again");
    }
    assert_effects(&ledger, "gs-2", GROUPED, &[0, 1, 2, 3], &[0, 1, 2, 3]);
}
