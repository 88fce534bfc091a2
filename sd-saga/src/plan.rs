//! What a saga does next, given its definition's layout and where its log says it is:
//! pure and synchronous. The orchestrator only executes what these functions return
//! and writes the positions they compute.
//!
//! A definition is a line of **stages**; a stage is one step, or a parallel group of
//! consecutive steps (its branches). The log row holds the state, the first step of the
//! current stage and the stage's [`Progress`]: which branches started, finished, failed
//! or are in doubt going forward, and which compensations are owed and done going back.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::store::SagaState;

/// One stage: a step, or a parallel group of consecutive steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stage {
    /// Index of its first step.
    pub(crate) first: usize,
    /// Which of its branches have a compensation, by offset from `first`.
    pub(crate) undoable: Vec<bool>,
    /// After the pivot: only forward. A failure leaves the saga stuck and a stop (cancel,
    /// deadline) no longer applies.
    pub(crate) forward_only: bool,
}

impl Stage {
    fn steps(&self) -> impl Iterator<Item = usize> + '_ {
        self.first..self.first + self.undoable.len()
    }

    fn undoable(&self, step: usize) -> bool {
        step.checked_sub(self.first)
            .and_then(|i| self.undoable.get(i))
            .copied()
            .unwrap_or(false)
    }
}

/// A definition's stages, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) stages: Vec<Stage>,
}

impl Layout {
    /// How many steps in all.
    pub(crate) fn steps(&self) -> usize {
        self.stages.last().map_or(0, |s| s.first + s.undoable.len())
    }

    /// The stage that starts at `step`, by index.
    fn stage_at(&self, step: usize) -> Option<usize> {
        self.stages.iter().position(|s| s.first == step)
    }
}

/// The current stage's progress, as the log keeps it (JSON in the saga row).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// Branches whose intent is in the log (they may have run).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(crate) started: BTreeSet<usize>,
    /// Branches that succeeded.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(crate) done: BTreeSet<usize>,
    /// Branches that gave up (they did not happen).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(crate) failed: BTreeSet<usize>,
    /// Branches given up whose effect may still land (timed out, or dropped when a
    /// sibling failed): compensated as if done.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(crate) doubt: BTreeSet<usize>,
    /// Compensating: the branches owed a compensation (`None`: every branch that has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) undo: Option<BTreeSet<usize>>,
    /// Compensating: the branches compensated.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub(crate) undone: BTreeSet<usize>,
    /// Read from a row of the previous schema, which kept no progress: every branch of
    /// the stage counts as started.
    #[serde(skip)]
    pub(crate) legacy: bool,
}

impl Progress {
    /// The progress of a row's JSON (`None`: a row of the previous schema).
    pub(crate) fn parse(json: Option<&str>) -> Result<Progress, String> {
        match json {
            None => Ok(Progress {
                legacy: true,
                ..Progress::default()
            }),
            Some(text) => serde_json::from_str(text).map_err(|e| format!("progress: {e}")),
        }
    }

    /// The JSON kept in the row (written by hand: it is written at every step).
    pub(crate) fn to_json(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from("{");
        let mut field = |name: &str, set: &BTreeSet<usize>| {
            if out.len() > 1 {
                out.push(',');
            }
            let _ = write!(out, "\"{name}\":[");
            for (i, step) in set.iter().enumerate() {
                let _ = write!(out, "{}{step}", if i == 0 { "" } else { "," });
            }
            out.push(']');
        };
        for (name, set) in [
            ("started", &self.started),
            ("done", &self.done),
            ("failed", &self.failed),
            ("doubt", &self.doubt),
        ] {
            if !set.is_empty() {
                field(name, set);
            }
        }
        if let Some(undo) = &self.undo {
            field("undo", undo);
        }
        if !self.undone.is_empty() {
            field("undone", &self.undone);
        }
        out.push('}');
        out
    }

    fn settled(&self, step: usize) -> bool {
        self.done.contains(&step) || self.failed.contains(&step) || self.doubt.contains(&step)
    }
}

/// Where a saga is: what its log row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) state: SagaState,
    /// The first step of the current stage (the step count once completed).
    pub(crate) step: usize,
    /// True from the first compensation on (what a stuck saga resumes).
    pub(crate) compensating: bool,
    pub(crate) progress: Progress,
}

impl Position {
    /// A new saga: running stage 0, whose first step's intent `create` writes.
    pub(crate) fn start() -> Position {
        Position {
            state: SagaState::Running,
            step: 0,
            compensating: false,
            progress: Progress {
                started: BTreeSet::from([0]),
                ..Progress::default()
            },
        }
    }
}

/// Why a saga stops going forward before its pivot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// `cancel` was requested.
    Cancelled,
    /// The saga's deadline passed.
    Deadline,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Run these forward actions of the current stage, concurrently.
    Forward(Vec<usize>),
    /// Run these compensations of the current stage, concurrently.
    Compensate(Vec<usize>),
    /// A stop takes effect: write this position (no participant is called).
    Stop(Position),
    /// The saga is completed, compensated or stuck: nothing to drive.
    Finished,
}

/// What to do from `pos`. `stop` applies only before the pivot has committed: branches
/// that may have started are awaited, nothing new starts, and the saga compensates.
/// An `Err` says why the position does not fit the layout.
pub(crate) fn next(layout: &Layout, pos: &Position, stop: Option<Stop>) -> Result<Plan, String> {
    if !pos.state.is_live() {
        return Ok(Plan::Finished);
    }
    let si = layout
        .stage_at(pos.step)
        .ok_or_else(|| format!("step {} starts no stage of this definition", pos.step))?;
    let stage = &layout.stages[si];
    let p = &pos.progress;
    if pos.state == SagaState::Compensating {
        let pending: Vec<usize> = owed(stage, p).filter(|s| !p.undone.contains(s)).collect();
        if pending.is_empty() {
            return Err(format!(
                "stage at step {} is compensating with nothing left to undo",
                pos.step
            ));
        }
        return Ok(Plan::Compensate(pending));
    }
    // Retriable branches that failed are tried again (a resumed saga); others are final.
    let unsettled: Vec<usize> = stage
        .steps()
        .filter(|s| {
            !(p.done.contains(s)
                || p.doubt.contains(s)
                || (p.failed.contains(s) && !stage.forward_only))
        })
        .collect();
    if stop.is_some() && !stage.forward_only {
        let awaited: Vec<usize> = unsettled
            .into_iter()
            .filter(|s| p.legacy || p.started.contains(s))
            .collect();
        if awaited.is_empty() {
            return Ok(Plan::Stop(unwind(layout, si, pos)));
        }
        return Ok(Plan::Forward(awaited));
    }
    if unsettled.is_empty() {
        return Err(format!(
            "stage at step {} is running with every branch settled",
            pos.step
        ));
    }
    Ok(Plan::Forward(unsettled))
}

/// The branches of a compensating stage that are owed a compensation.
fn owed<'a>(stage: &'a Stage, p: &'a Progress) -> impl Iterator<Item = usize> + 'a {
    stage
        .steps()
        .filter(move |s| stage.undoable(*s) && p.undo.as_ref().is_none_or(|undo| undo.contains(s)))
}

/// Before running `steps` forward: they are no longer failed (a resumed retriable
/// branch), so the stage does not settle while they run.
pub(crate) fn begin_forward(pos: &Position, steps: &[usize]) -> Position {
    let mut next = pos.clone();
    for s in steps {
        next.progress.failed.remove(s);
    }
    next
}

/// The intent of `step` goes into the log.
pub(crate) fn started(pos: &Position, step: usize) -> Position {
    let mut next = pos.clone();
    next.progress.started.insert(step);
    next
}

/// `step` succeeded going forward.
pub(crate) fn forward_done(layout: &Layout, pos: &Position, step: usize) -> Position {
    let mut next = pos.clone();
    next.progress.failed.remove(&step);
    next.progress.doubt.remove(&step);
    next.progress.done.insert(step);
    settle(layout, next)
}

/// `step` gave up going forward; `in_doubt` when its effect may still land (timed out,
/// or dropped), so it is compensated if it can be.
pub(crate) fn forward_failed(
    layout: &Layout,
    pos: &Position,
    step: usize,
    in_doubt: bool,
) -> Position {
    let mut next = pos.clone();
    let undoable = layout
        .stage_at(pos.step)
        .is_some_and(|si| layout.stages[si].undoable(step));
    if in_doubt && undoable {
        next.progress.doubt.insert(step);
    } else {
        next.progress.failed.insert(step);
    }
    settle(layout, next)
}

/// The compensation of `step` succeeded.
pub(crate) fn compensated(layout: &Layout, pos: &Position, step: usize) -> Position {
    let mut next = pos.clone();
    next.progress.undone.insert(step);
    // A sibling's compensation left the saga stuck: it stays so.
    if pos.state != SagaState::Compensating {
        return next;
    }
    let Some(si) = layout.stage_at(pos.step) else {
        return next;
    };
    if owed(&layout.stages[si], &next.progress).all(|s| next.progress.undone.contains(&s)) {
        return previous(layout, si);
    }
    next
}

/// A compensation (or a retriable step) gave up for good: stuck where it is.
pub(crate) fn stuck(pos: &Position) -> Position {
    Position {
        state: SagaState::Stuck,
        ..pos.clone()
    }
}

/// Once every branch of the running stage settled: on to the next stage (or completed);
/// with a failure, stuck past the pivot or compensating before it.
fn settle(layout: &Layout, pos: Position) -> Position {
    let Some(si) = layout.stage_at(pos.step) else {
        return pos;
    };
    let stage = &layout.stages[si];
    if !stage.steps().all(|s| pos.progress.settled(s)) {
        return pos;
    }
    let p = &pos.progress;
    if p.failed.is_empty() && p.doubt.is_empty() {
        return match layout.stages.get(si + 1) {
            Some(next) => Position {
                state: SagaState::Running,
                step: next.first,
                compensating: false,
                progress: Progress::default(),
            },
            None => Position {
                state: SagaState::Completed,
                step: layout.steps(),
                compensating: false,
                progress: Progress::default(),
            },
        };
    }
    if stage.forward_only {
        return stuck(&pos);
    }
    unwind(layout, si, &pos)
}

/// Stage `si` stops going forward: its finished (or doubtful) branches that can be
/// undone are compensated, then the stages before it in reverse.
fn unwind(layout: &Layout, si: usize, pos: &Position) -> Position {
    let stage = &layout.stages[si];
    let p = &pos.progress;
    let undo: BTreeSet<usize> = p
        .done
        .iter()
        .chain(&p.doubt)
        .copied()
        .filter(|s| stage.undoable(*s))
        .collect();
    if undo.is_empty() {
        return previous(layout, si);
    }
    Position {
        state: SagaState::Compensating,
        step: stage.first,
        compensating: true,
        progress: Progress {
            undo: Some(undo),
            ..Progress::default()
        },
    }
}

/// Compensation moves on to the stage before `si` that has something to undo, or the
/// saga is compensated.
fn previous(layout: &Layout, si: usize) -> Position {
    let before = layout.stages[..si]
        .iter()
        .rev()
        .find(|s| s.undoable.iter().any(|u| *u));
    match before {
        Some(stage) => Position {
            state: SagaState::Compensating,
            step: stage.first,
            compensating: true,
            progress: Progress::default(),
        },
        None => Position {
            state: SagaState::Compensated,
            step: 0,
            compensating: true,
            progress: Progress::default(),
        },
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
