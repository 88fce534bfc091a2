//! The cases of the contract suite.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::{Error, Orchestrator, SagaOutcome, SagaState};

/// The contract: happy path runs every step in order and threads the data.
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

/// The contract: failure before the pivot compensates in exact reverse.
pub async fn failure_before_the_pivot_compensates_in_exact_reverse<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    // The pivot (s3) refuses after three transient failures exhaust its 3 attempts.
    ledger.fault(3, Direction::Forward, Some(Fault::Always));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-2", vec![]).await.unwrap();
    let reason = reason_of(outcome, SagaState::Compensated, "step `s3` failed");
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

/// The contract: non retryable error fails at once.
pub async fn non_retryable_error_fails_at_once<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    ledger.fault(1, Direction::Forward, Some(Fault::Permanent));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-3", vec![]).await.unwrap();
    assert_eq!(outcome.state(), SagaState::Compensated);
    assert_eq!(ledger.calls("o-3", 1, Direction::Forward), 1, "no retry");
    assert_eq!(ledger.effects("o-3"), expected(1, 1));
}

/// The contract: compensation failing three times then succeeding.
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

/// The contract: compensation always failing is stuck then resumed.
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
    let reason = reason_of(
        outcome,
        SagaState::Stuck,
        "compensation of step `s1` failed",
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

/// The contract: retriable step past the pivot is stuck then resumed forward.
pub async fn retriable_step_past_the_pivot_is_stuck_then_resumed_forward<S: SagaStore + Clone>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    ledger.fault(4, Direction::Forward, Some(Fault::Always));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    let outcome = orch.run("o-6", vec![]).await.unwrap();
    reason_of(outcome, SagaState::Stuck, "step `s4` failed");
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

/// The contract: timed out step is retried then compensated itself.
pub async fn timed_out_step_is_retried_then_compensated_itself<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    ledger.delay(1, Duration::from_secs(30));
    let shape = Shape {
        timeout: Duration::from_millis(50),
        ..Shape::default()
    };
    let orch = orchestrator(&saga(&ledger, &shape), store, "a");
    let outcome = orch.run("o-7", vec![]).await.unwrap();
    reason_of(outcome, SagaState::Compensated, "timed out");
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

/// The contract: crash at every boundary then recover finishes every saga.
pub async fn crash_at_every_boundary_then_recover_finishes_every_saga<S: SagaStore + Clone>(
    store: S,
) {
    let ledger = Arc::new(Ledger::default());
    let def = saga(&ledger, &Shape::default());
    // Two scenarios: all forward, and a pivot that refuses (so the saga compensates).
    let runs = crash_points(&store, &ledger, &def, "", 3).await;
    assert!(runs.len() >= 40, "{} crash points", runs.len());
    for (id, fail, record) in rescue(&store, &ledger, &def, &runs).await {
        let (state, effects) = if fail {
            (SagaState::Compensated, expected(3, 3))
        } else {
            (SagaState::Completed, expected(5, 0))
        };
        assert_eq!(record.state, state, "{id}");
        assert_eq!(
            ledger.effects(&id),
            effects,
            "{id}: effects once each, compensations in reverse"
        );
    }
    assert!(
        ledger.duplicate_calls() > 0,
        "some crashes fell between an effect and its outcome record, so participants saw repeats"
    );
}

/// The contract: stale owner is fenced and exactly one progresses.
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

/// The contract: heartbeats keep a long step owned.
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

/// The contract: concurrent recovers claim each saga once.
pub async fn concurrent_recovers_claim_each_saga_once<S: SagaStore + Clone>(store: S) {
    let ledger = Arc::new(Ledger::default());
    let def = saga(&ledger, &Shape::default());
    // Die at various points: before/after the 2nd to 7th write.
    let (b, ids) = crash_then_two_recover(&store, &ledger, &def, "abandoned", 40, 6).await;
    for id in &ids {
        assert_eq!(state(&b, id).await.state, SagaState::Completed, "{id}");
        assert_eq!(state(&b, id).await.epoch, 2, "{id}");
        assert_eq!(ledger.effects(id), expected(5, 0), "{id}");
    }
}

/// The contract: thousand sagas concurrently.
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

/// The contract: ids are checked and unique.
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
