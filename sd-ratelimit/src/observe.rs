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
    #[cfg(feature = "metrics")]
    allowed: metrics::Counter,
    #[cfg(feature = "metrics")]
    denied: metrics::Counter,
    #[cfg(feature = "metrics")]
    shadow_denied: metrics::Counter,
    #[cfg(feature = "metrics")]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    failures: [metrics::Counter; 3],
    #[cfg(feature = "metrics")]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    backend: metrics::Histogram,
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
    /// installed now.
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
                allowed: decisions(outcome::ALLOWED),
                denied: decisions(outcome::DENIED),
                shadow_denied: decisions(outcome::SHADOW_DENIED),
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
            self.allowed.increment(1);
        } else if shadow {
            self.shadow_denied.increment(1);
        } else {
            self.denied.increment(1);
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
