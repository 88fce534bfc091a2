//! What a limiter reports: decisions by outcome and the backend's latency (feature
//! `metrics`), under the names and labels of `sd_core::observe`.
//!
//! Handles are registered when the limiter is built; without the feature this is a
//! zero-sized type whose methods do nothing.

#[cfg(feature = "metrics")]
use sd_core::observe::{self, Labels, label, outcome};

/// The counter of decisions (`sd.ratelimit.decisions`).
#[cfg(feature = "metrics")]
pub(crate) const DECISIONS: &str = "sd.ratelimit.decisions";
/// The histogram of backend round trips (`sd.ratelimit.backend.duration`).
#[cfg(feature = "metrics")]
pub(crate) const BACKEND_DURATION: &str = "sd.ratelimit.backend.duration";

/// A limiter's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct Meters {
    /// Decisions the limit made: allowed, denied, shadow-denied.
    #[cfg(feature = "metrics")]
    decided: Decided,
    #[cfg(feature = "metrics")]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    failures: [metrics::Counter; 3],
    #[cfg(feature = "metrics")]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    backend: metrics::Histogram,
}

/// The counters of the limit's decisions (allowed, denied, shadow-denied).
#[cfg(feature = "metrics")]
#[derive(Debug, Clone)]
enum Decided {
    /// Added to as each decision is made (a Redis decision's round trip dwarfs the add).
    Exact([metrics::Counter; 3]),
    /// A tally published in steps, so a memory decision (tens of nanoseconds, about the
    /// cost of one atomic add) pays no atomic add.
    Stepped(sd_core::tally::Tally<3>),
}

#[cfg(feature = "metrics")]
impl Decided {
    #[inline(always)]
    fn bump<const I: usize>(&self) {
        match self {
            Decided::Exact(counters) => counters[I].increment(1),
            Decided::Stepped(tally) => tally.bump::<I>(),
        }
    }
}

/// How the failure policy answered a decision the backend could not make.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum Failure {
    Open = 0,
    Closed = 1,
    Fallback = 2,
}

impl Meters {
    /// The handles of the limiter `name` on `backend`, registered with the recorder
    /// installed now. A memory limiter's decisions are published in steps (see
    /// `sd_core::tally`); every other count as it happens.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: &str, backend: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = Labels::instance(name, backend);
            let decisions = |o: &'static str| {
                observe::counter(
                    DECISIONS,
                    "rate-limit decisions by outcome",
                    &labels.clone().with(label::OUTCOME, o),
                )
            };
            Meters {
                decided: {
                    let counters = [
                        decisions(outcome::ALLOWED),
                        decisions(outcome::DENIED),
                        decisions(outcome::SHADOW_DENIED),
                    ];
                    if backend == sd_core::observe::backend::MEMORY {
                        Decided::Stepped(sd_core::tally::Tally::metered(counters))
                    } else {
                        Decided::Exact(counters)
                    }
                },
                failures: [
                    decisions(outcome::FAIL_OPEN),
                    decisions(outcome::FAIL_CLOSED),
                    decisions(outcome::FALLBACK),
                ],
                backend: observe::histogram(
                    BACKEND_DURATION,
                    "time of one rate-limit backend round trip",
                    &labels,
                ),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Meters {}
    }

    /// Counts a decision the limit made: `allowed` as the limit decided it, before shadow
    /// mode admits it anyway.
    #[inline(always)]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn decided(&self, allowed: bool, shadow: bool) {
        #[cfg(feature = "metrics")]
        if allowed {
            self.decided.bump::<0>();
        } else if shadow {
            self.decided.bump::<2>();
        } else {
            self.decided.bump::<1>();
        }
    }

    /// Counts a decision the failure policy made.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn failed(&self, how: Failure) {
        #[cfg(feature = "metrics")]
        self.failures[how as usize].increment(1);
    }

    /// Records a backend round trip that started at `start`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn backend_since(&self, start: std::time::Instant) {
        #[cfg(feature = "metrics")]
        observe::record_since(&self.backend, start);
    }
}
