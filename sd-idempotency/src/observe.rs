//! What a store reports: claims by outcome and the latency of each store call (feature
//! `metrics`), under the names and labels of `sd_core::observe`.
//!
//! Handles are registered when the store is built; without the feature this is a
//! zero-sized type whose methods do nothing.

use std::time::Instant;

use sd_core::observe::operation;
#[cfg(feature = "metrics")]
use sd_core::observe::{self, Labels, label, outcome};

use crate::error::Result;
use crate::store::ClaimOutcome;

/// The counter of claims (`sd.idempotency.claims`).
#[cfg(feature = "metrics")]
pub(crate) const CLAIMS: &str = "sd.idempotency.claims";
/// The histogram of store calls (`sd.idempotency.store.duration`).
#[cfg(feature = "metrics")]
pub(crate) const STORE_DURATION: &str = "sd.idempotency.store.duration";

/// One kind of store call: the `sd.operation` label and span field.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) enum Op {
    Claim = 0,
    Complete = 1,
    Release = 2,
    Extend = 3,
    Sweep = 4,
}

impl Op {
    /// The operation's name.
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    pub(crate) fn name(self) -> &'static str {
        [
            operation::CLAIM,
            operation::COMPLETE,
            operation::RELEASE,
            operation::EXTEND,
            operation::SWEEP,
        ][self as usize]
    }
}

/// A store's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct Meters {
    #[cfg(feature = "metrics")]
    claims: [metrics::Counter; 4],
    #[cfg(feature = "metrics")]
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    calls: [metrics::Histogram; 5],
}

impl Meters {
    /// The handles of the store `name` on `backend`, registered with the recorder
    /// installed now.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: &str, backend: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = Labels::instance(name, backend);
            let claims = [
                outcome::FIRST,
                outcome::REPLAY,
                outcome::IN_FLIGHT,
                outcome::MISMATCH,
            ]
            .map(|o| {
                observe::counter(
                    CLAIMS,
                    "idempotency-key claims by outcome",
                    &labels.clone().with(label::OUTCOME, o),
                )
            });
            let calls = [Op::Claim, Op::Complete, Op::Release, Op::Extend, Op::Sweep].map(|op| {
                observe::histogram(
                    STORE_DURATION,
                    "time of one idempotency store call",
                    &labels.clone().with(label::OPERATION, op.name()),
                )
            });
            Meters { claims, calls }
        }
        #[cfg(not(feature = "metrics"))]
        Meters {}
    }

    /// Counts the outcome of a claim (an error is no outcome).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn claimed(&self, answer: &Result<ClaimOutcome>) {
        #[cfg(feature = "metrics")]
        if let Ok(outcome) = answer {
            let i = match outcome {
                ClaimOutcome::Claimed(_) => 0,
                ClaimOutcome::Completed(_) => 1,
                ClaimOutcome::InFlight { .. } => 2,
                ClaimOutcome::Mismatch => 3,
            };
            self.claims[i].increment(1);
        }
    }

    /// Records a store call of `op` that started at `start`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    pub(crate) fn called(&self, op: Op, start: Instant) {
        #[cfg(feature = "metrics")]
        observe::record_since(&self.calls[op as usize], start);
    }
}
