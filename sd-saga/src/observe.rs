//! What an orchestrator reports through the `metrics` facade (feature `metrics`): step
//! and compensation calls by outcome, their attempts' time, and sagas by how they ended,
//! under the names and labels of `sd_core::observe`; and the span each attempt runs in.
//!
//! Handles are registered when the orchestrator is built, one set per step of the
//! definition; without the feature this is a zero-sized type whose methods do nothing.

use sd_core::observe::operation;
#[cfg(feature = "metrics")]
use sd_core::observe::{self, Labels, label, outcome};

use crate::definition::{Direction, Saga};
use crate::store::SagaState;

/// The counter of forward step calls by outcome (`sd.saga.steps`).
#[cfg(feature = "metrics")]
pub(crate) const STEPS: &str = "sd.saga.steps";
/// The counter of compensation calls by outcome (`sd.saga.compensations`).
#[cfg(feature = "metrics")]
pub(crate) const COMPENSATIONS: &str = "sd.saga.compensations";
/// The histogram of attempt times (`sd.saga.step.duration`).
#[cfg(feature = "metrics")]
pub(crate) const STEP_DURATION: &str = "sd.saga.step.duration";
/// The counter of sagas by how they ended (`sd.saga.sagas`).
#[cfg(feature = "metrics")]
pub(crate) const SAGAS: &str = "sd.saga.sagas";

/// How one call (a step's action or its compensation) ended, or one of its attempts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Call {
    /// The call succeeded.
    Ok = 0,
    /// An attempt failed and another follows.
    Retried = 1,
    /// The call gave up.
    Failed = 2,
}

/// The `sd.operation` of a call in `direction`: a step's action or its compensation.
pub(crate) fn operation_of(direction: Direction) -> &'static str {
    match direction {
        Direction::Forward => operation::STEP,
        Direction::Compensate => operation::COMPENSATE,
    }
}

/// The index of `direction` in [`StepHandles`]' arrays.
#[cfg(feature = "metrics")]
fn index(direction: Direction) -> usize {
    match direction {
        Direction::Forward => 0,
        Direction::Compensate => 1,
    }
}

#[cfg(feature = "metrics")]
#[derive(Debug)]
struct StepHandles {
    /// By [`Call`], forward then compensation.
    calls: [[metrics::Counter; 3]; 2],
    /// Attempt time, forward then compensation.
    durations: [metrics::Histogram; 2],
}

/// An orchestrator's metric handles.
#[derive(Debug)]
pub(crate) struct Meters {
    #[cfg(feature = "metrics")]
    steps: Vec<StepHandles>,
    /// Completed, compensated, stuck.
    #[cfg(feature = "metrics")]
    sagas: [metrics::Counter; 3],
}

impl Meters {
    /// The handles of the orchestrator of `saga`, registered with the recorder installed
    /// now: `sd.name` is the saga's name, `sd.step` each step's.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new<D>(saga: &Saga<D>) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = Labels::new().with(label::NAME, saga.name.as_ref());
            let outcomes = [outcome::OK, outcome::RETRIED, outcome::FAILED];
            let steps = saga
                .steps
                .iter()
                .map(|def| {
                    let step = labels.clone().with(label::STEP, def.name.as_ref());
                    let calls = [
                        (STEPS, "saga step calls by outcome"),
                        (COMPENSATIONS, "saga compensation calls by outcome"),
                    ]
                    .map(|(name, description)| {
                        outcomes.map(|o| {
                            observe::counter(
                                name,
                                description,
                                &step.clone().with(label::OUTCOME, o),
                            )
                        })
                    });
                    let durations = [operation::STEP, operation::COMPENSATE].map(|op| {
                        observe::histogram(
                            STEP_DURATION,
                            "time of one attempt of a saga step or compensation",
                            &step.clone().with(label::OPERATION, op),
                        )
                    });
                    StepHandles { calls, durations }
                })
                .collect();
            let sagas = [outcome::COMPLETED, outcome::COMPENSATED, outcome::STUCK].map(|o| {
                observe::counter(
                    SAGAS,
                    "sagas this orchestrator drove to an end, by how they ended",
                    &labels.clone().with(label::OUTCOME, o),
                )
            });
            Meters { steps, sagas }
        }
        #[cfg(not(feature = "metrics"))]
        Meters {}
    }

    /// Counts a call (or an attempt) of `step` in `direction` that ended `how`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(crate) fn called(&self, step: usize, direction: Direction, how: Call) {
        #[cfg(feature = "metrics")]
        if let Some(h) = self.steps.get(step) {
            h.calls[index(direction)][how as usize].increment(1);
        }
    }

    /// Records an attempt of `step` in `direction` that took `took`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(crate) fn attempted(&self, step: usize, direction: Direction, took: std::time::Duration) {
        #[cfg(feature = "metrics")]
        if let Some(h) = self.steps.get(step) {
            h.durations[index(direction)].record(took.as_secs_f64());
        }
    }

    /// Counts a saga this orchestrator drove to `state` (completed, compensated, stuck).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(crate) fn ended(&self, state: SagaState) {
        #[cfg(feature = "metrics")]
        {
            let i = match state {
                SagaState::Completed => 0,
                SagaState::Compensated => 1,
                _ => 2,
            };
            self.sagas[i].increment(1);
        }
    }
}
