//! Unit and property tests of the pure saga plan.
#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

/// `c` compensatable, `p` pivot, `r` retriable; a group is several letters, e.g.
/// `["c", "cc", "p", "rr"]`.
fn layout(stages: &[&str]) -> Layout {
    let mut first = 0;
    let mut pivot_seen = false;
    let stages = stages
        .iter()
        .map(|kinds| {
            let stage = Stage {
                first,
                undoable: kinds.chars().map(|k| k == 'c').collect(),
                forward_only: pivot_seen,
            };
            pivot_seen |= kinds.contains('p');
            first += kinds.len();
            stage
        })
        .collect();
    Layout { stages }
}

fn set(steps: &[usize]) -> BTreeSet<usize> {
    steps.iter().copied().collect()
}

#[test]
fn progress_json_is_what_serde_reads_back() {
    let full = Progress {
        started: set(&[0, 1, 2]),
        done: set(&[1]),
        failed: set(&[2]),
        doubt: set(&[0]),
        undo: Some(set(&[0, 1])),
        undone: set(&[1]),
        legacy: false,
    };
    for p in [Progress::default(), Position::start().progress, full] {
        let json = p.to_json();
        assert_eq!(serde_json::to_string(&p).unwrap(), json);
        assert_eq!(Progress::parse(Some(&json)).unwrap(), p);
    }
    assert_eq!(Progress::default().to_json(), "{}");
}

#[test]
fn a_straight_line_compensates_the_steps_before_a_failure_in_reverse() {
    let l = layout(&["c", "c", "p", "r"]);
    let mut pos = Position::start();
    assert_eq!(next(&l, &pos, None), Ok(Plan::Forward(vec![0])));
    pos = forward_done(&l, &pos, 0);
    assert_eq!((pos.state, pos.step), (SagaState::Running, 1));
    pos = forward_done(&l, &started(&pos, 1), 1);
    // The pivot refuses: nothing of its own to undo, so compensation starts at step 1.
    pos = forward_failed(&l, &started(&pos, 2), 2, false);
    assert_eq!((pos.state, pos.step), (SagaState::Compensating, 1));
    assert_eq!(next(&l, &pos, None), Ok(Plan::Compensate(vec![1])));
    pos = compensated(&l, &pos, 1);
    assert_eq!((pos.state, pos.step), (SagaState::Compensating, 0));
    pos = compensated(&l, &pos, 0);
    assert_eq!(
        (pos.state, pos.compensating),
        (SagaState::Compensated, true)
    );
    assert_eq!(next(&l, &pos, None), Ok(Plan::Finished));
}

#[test]
fn a_failed_branch_waits_for_its_siblings_then_undoes_those_that_completed() {
    let l = layout(&["c", "ccc", "p"]);
    let mut pos = forward_done(&l, &Position::start(), 0);
    assert_eq!(next(&l, &pos, None), Ok(Plan::Forward(vec![1, 2, 3])));
    for s in 1..=3 {
        pos = started(&pos, s);
    }
    pos = forward_done(&l, &pos, 1);
    pos = forward_failed(&l, &pos, 2, false);
    assert_eq!(pos.state, SagaState::Running, "branch 3 is still running");
    // A timed-out branch may have landed: it is undone too.
    pos = forward_failed(&l, &pos, 3, true);
    assert_eq!((pos.state, pos.step), (SagaState::Compensating, 1));
    assert_eq!(pos.progress.undo, Some(set(&[1, 3])));
    assert_eq!(next(&l, &pos, None), Ok(Plan::Compensate(vec![1, 3])));
    pos = compensated(&l, &pos, 3);
    assert_eq!(next(&l, &pos, None), Ok(Plan::Compensate(vec![1])));
    pos = compensated(&l, &pos, 1);
    assert_eq!((pos.state, pos.step), (SagaState::Compensating, 0));
    assert_eq!(next(&l, &pos, None), Ok(Plan::Compensate(vec![0])));
}

#[test]
fn a_completed_group_is_undone_whole_when_a_later_step_fails() {
    let l = layout(&["cc", "p"]);
    let mut pos = Position::start();
    pos = forward_done(&l, &started(&pos, 1), 1);
    pos = forward_done(&l, &pos, 0);
    assert_eq!((pos.state, pos.step), (SagaState::Running, 2));
    pos = forward_failed(&l, &pos, 2, false);
    assert_eq!((pos.state, pos.step), (SagaState::Compensating, 0));
    assert_eq!(next(&l, &pos, None), Ok(Plan::Compensate(vec![0, 1])));
}

#[test]
fn a_stop_starts_nothing_new_awaits_what_started_and_ends_at_the_pivot() {
    let l = layout(&["c", "cc", "p", "r"]);
    let stop = Some(Stop::Cancelled);
    let mut pos = forward_done(&l, &Position::start(), 0);
    // Nothing of stage 1 started: straight to compensating step 0.
    let Ok(Plan::Stop(to)) = next(&l, &pos, stop) else {
        panic!()
    };
    assert_eq!((to.state, to.step), (SagaState::Compensating, 0));
    // One branch started (its intent is in the log): it is awaited, the other is not
    // started; then the finished one is undone.
    pos = started(&pos, 2);
    assert_eq!(next(&l, &pos, stop), Ok(Plan::Forward(vec![2])));
    pos = forward_done(&l, &pos, 2);
    let Ok(Plan::Stop(to)) = next(&l, &pos, stop) else {
        panic!()
    };
    assert_eq!((to.state, to.step), (SagaState::Compensating, 1));
    assert_eq!(to.progress.undo, Some(set(&[2])));
    // Past the pivot a stop changes nothing.
    let mut past = forward_done(&l, &pos, 1);
    past = forward_done(&l, &past, 3);
    assert_eq!(next(&l, &past, stop), Ok(Plan::Forward(vec![4])));
}

#[test]
fn rows_of_the_previous_schema_count_every_branch_as_started() {
    let l = layout(&["c", "c", "p"]);
    let legacy = Position {
        state: SagaState::Running,
        step: 1,
        compensating: false,
        progress: Progress::parse(None).unwrap(),
    };
    // Step 1 may have run before the crash: a stop awaits it rather than skip it.
    assert_eq!(
        next(&l, &legacy, Some(Stop::Deadline)),
        Ok(Plan::Forward(vec![1]))
    );
    let compensating = Position {
        state: SagaState::Compensating,
        ..legacy
    };
    assert_eq!(next(&l, &compensating, None), Ok(Plan::Compensate(vec![1])));
    assert!(
        next(
            &l,
            &Position {
                step: 7,
                ..compensating
            },
            None
        )
        .is_err()
    );
}

#[test]
fn a_stuck_sibling_keeps_the_saga_stuck() {
    let l = layout(&["cc", "p"]);
    let pos = Position {
        state: SagaState::Compensating,
        step: 0,
        compensating: true,
        progress: Progress::default(),
    };
    let pos = stuck(&pos);
    let pos = compensated(&l, &pos, 1);
    assert_eq!(pos.state, SagaState::Stuck);
    assert_eq!(pos.progress.undone, set(&[1]));
}

#[test]
fn a_resumed_retriable_group_retries_only_the_failed_branch() {
    let l = layout(&["p", "rr"]);
    let mut pos = forward_done(&l, &Position::start(), 0);
    pos = forward_done(&l, &pos, 1);
    pos = forward_failed(&l, &pos, 2, false);
    assert_eq!(pos.state, SagaState::Stuck);
    let resumed = Position {
        state: SagaState::Running,
        ..pos
    };
    assert_eq!(next(&l, &resumed, None), Ok(Plan::Forward(vec![2])));
    let pos = forward_done(&l, &begin_forward(&resumed, &[2]), 2);
    assert_eq!(pos.state, SagaState::Completed);
}

/// How a forward branch ends in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ok,
    Fails,
    Doubt,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![8 => Just(Fate::Ok), 1 => Just(Fate::Fails), 1 => Just(Fate::Doubt)]
}

/// Compensatable stages of 1 to 3 branches, maybe a pivot, then retriable stages.
fn stages() -> impl Strategy<Value = Vec<String>> {
    (
        prop::collection::vec(1usize..4, 0..4),
        any::<bool>(),
        prop::collection::vec(1usize..3, 0..3),
    )
        .prop_map(|(before, pivot, after)| {
            let mut stages: Vec<String> = before.iter().map(|n| "c".repeat(*n)).collect();
            if pivot {
                stages.push("p".into());
                stages.extend(after.iter().map(|n| "r".repeat(*n)));
            }
            if stages.is_empty() {
                stages.push("c".into());
            }
            stages
        })
}

proptest! {
    /// Driving the plan with random branch outcomes, random completion orders and a
    /// stop at a random moment (the progress round-tripping through its JSON at every
    /// write, as through the log): it ends; completed means every branch succeeded;
    /// compensated means exactly the branches that completed (or may have) before the
    /// pivot were undone, stage by stage in reverse; nothing new starts before the pivot
    /// once a stop is seen.
    #[test]
    fn the_plan_ends_and_undoes_exactly_what_happened(
        stages in stages(),
        fates in prop::collection::vec(fate(), 16),
        order in prop::collection::vec(any::<prop::sample::Index>(), 64),
        stop_at in prop::option::of(0usize..12),
    ) {
        let kinds: Vec<&str> = stages.iter().map(String::as_str).collect();
        let l = layout(&kinds);
        let stage_of = |step: usize| l.stages.iter().rposition(|s| s.first <= step).unwrap();
        let pivot_stage = kinds.iter().position(|k| *k == "p");
        let mut pos = Position::start();
        let mut picks = order.iter().cycle();
        let (mut forward, mut undone) = (Vec::new(), Vec::new());
        let mut stop = None;
        let mut pivot_done = false;
        for round in 0.. {
            prop_assert!(round < 100, "the plan does not end: {pos:?}");
            if stop_at == Some(round) {
                stop = Some(Stop::Cancelled);
            }
            let roundtrip = |mut p: Position| {
                p.progress = Progress::parse(Some(&p.progress.to_json())).unwrap();
                p
            };
            match next(&l, &pos, stop).unwrap() {
                Plan::Finished => break,
                Plan::Stop(to) => pos = roundtrip(to),
                Plan::Forward(mut steps) => {
                    let st = stage_of(steps[0]);
                    // After a stop only branches whose intent is in the log run (awaited).
                    prop_assert!(
                        stop.is_none()
                            || l.stages[st].forward_only
                            || steps.iter().all(|s| pos.progress.started.contains(s)),
                        "stage {st} started after the stop"
                    );
                    pos = begin_forward(&pos, &steps);
                    for s in &steps {
                        pos = roundtrip(started(&pos, *s));
                    }
                    while !steps.is_empty() {
                        let s = steps.remove(picks.next().unwrap().index(steps.len()));
                        let f = if l.stages[st].forward_only && fates[s] == Fate::Doubt {
                            Fate::Fails
                        } else {
                            fates[s]
                        };
                        forward.push((s, f));
                        pos = roundtrip(match f {
                            Fate::Ok => forward_done(&l, &pos, s),
                            Fate::Fails => forward_failed(&l, &pos, s, false),
                            Fate::Doubt => forward_failed(&l, &pos, s, true),
                        });
                        pivot_done |= Some(st) == pivot_stage && f == Fate::Ok;
                    }
                }
                Plan::Compensate(mut steps) => {
                    while !steps.is_empty() {
                        let s = steps.remove(picks.next().unwrap().index(steps.len()));
                        undone.push(s);
                        pos = roundtrip(compensated(&l, &pos, s));
                    }
                }
            }
        }
        let happened: BTreeSet<usize> = forward
            .iter()
            .filter(|(s, f)| *f != Fate::Fails && l.stages[stage_of(*s)].undoable[*s - l.stages[stage_of(*s)].first])
            .map(|(s, _)| *s)
            .collect();
        match pos.state {
            SagaState::Completed => {
                prop_assert_eq!(forward.len(), l.steps());
                prop_assert!(forward.iter().all(|(_, f)| *f == Fate::Ok));
            }
            SagaState::Compensated => {
                prop_assert!(!pivot_done);
                prop_assert_eq!(undone.iter().copied().collect::<BTreeSet<_>>(), happened.clone());
                prop_assert_eq!(undone.len(), happened.len(), "each undone once");
                let order: Vec<usize> = undone.iter().map(|s| stage_of(*s)).collect();
                prop_assert!(order.windows(2).all(|w| w[0] >= w[1]), "stages in reverse: {order:?}");
            }
            SagaState::Stuck => {
                // Only a retriable branch gives up for good in this model.
                prop_assert!(pivot_done);
                prop_assert!(undone.is_empty());
            }
            other => prop_assert!(false, "ended {other}"),
        }
    }
}
