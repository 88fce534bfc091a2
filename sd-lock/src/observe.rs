//! What a lock and a fence report: acquisitions by outcome and their time, contention
//! retries, leases lost and fencing refusals (feature `metrics`), under the names and
//! labels of `sd_core::observe`, and the spans every lock call runs in.
//!
//! Handles are registered when the lock (or fence) is built; without the feature the
//! meters keep only the name and backend the spans carry, and their methods count
//! nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "metrics")]
use sd_core::observe::{self, Labels, label, outcome};
use sd_core::observe::{DEFAULT_NAME, operation};
use tracing::Instrument as _;

#[cfg(feature = "metrics")]
use crate::error::Error;
use crate::error::Result;
use crate::lease::{Lease, Release, RetryPolicy};

/// The counter of acquisitions by outcome (`sd.lock.acquisitions`).
#[cfg(feature = "metrics")]
pub(crate) const ACQUISITIONS: &str = "sd.lock.acquisitions";
/// The histogram of acquisition times by outcome (`sd.lock.acquire.duration`).
#[cfg(feature = "metrics")]
pub(crate) const ACQUIRE_DURATION: &str = "sd.lock.acquire.duration";
/// The counter of retries after contention in `acquire` (`sd.lock.contention.retries`).
#[cfg(feature = "metrics")]
pub(crate) const RETRIES: &str = "sd.lock.contention.retries";
/// The counter of renewals that found the lease gone (`sd.lock.leases.lost`).
#[cfg(feature = "metrics")]
pub(crate) const LEASES_LOST: &str = "sd.lock.leases.lost";
/// The counter of stale tokens a fence refused (`sd.lock.fencing.refusals`).
#[cfg(feature = "metrics")]
pub(crate) const FENCING_REFUSALS: &str = "sd.lock.fencing.refusals";

/// The outcomes of an acquisition, in the order of [`Handles::acquisitions`].
#[cfg(feature = "metrics")]
const OUTCOMES: [&str; 4] = [
    outcome::ACQUIRED,
    outcome::CONTENDED,
    outcome::TIMEOUT,
    outcome::BACKEND_ERROR,
];

/// The index in [`OUTCOMES`] of how an acquisition ended; `None` for bad input, which
/// never reached the backend.
#[cfg(feature = "metrics")]
fn outcome_of(result: &Result<Lease>) -> Option<usize> {
    match result {
        Ok(_) => Some(0),
        Err(Error::Held { .. } | Error::NoPermit { .. } | Error::ValidityExhausted { .. }) => {
            Some(1)
        }
        #[cfg(feature = "redis")]
        Err(Error::NoQuorum { .. }) => Some(1),
        Err(Error::WaitTimeout { .. }) => Some(2),
        Err(
            Error::EmptyResource
            | Error::ResourceTooLong { .. }
            | Error::TtlTooShort { .. }
            | Error::TtlBelowDrift { .. }
            | Error::TtlTooLong { .. }
            | Error::InvalidConfig { .. },
        ) => None,
        Err(_) => Some(3),
    }
}

#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Handles {
    acquisitions: [metrics::Counter; 4],
    durations: [metrics::Histogram; 4],
    retries: metrics::Counter,
    lost: metrics::Counter,
}

/// When a timed call started.
#[cfg(feature = "metrics")]
type Start = std::time::Instant;
/// When a timed call started (nothing without the feature).
#[cfg(not(feature = "metrics"))]
#[derive(Debug, Clone, Copy)]
struct Start;

#[cfg(feature = "metrics")]
#[inline]
fn start() -> Start {
    std::time::Instant::now()
}
#[cfg(not(feature = "metrics"))]
#[inline]
fn start() -> Start {
    Start
}

/// A lock's name, backend and metric handles. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Meters {
    name: Arc<str>,
    backend: &'static str,
    #[cfg(feature = "metrics")]
    handles: Arc<Handles>,
}

impl Meters {
    /// The handles of the lock `name` on `backend`, registered with the recorder
    /// installed now.
    pub(crate) fn new(name: &str, backend: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        let handles = {
            let labels = Labels::instance(name, backend);
            let by = |o: &&str| labels.clone().with(label::OUTCOME, *o);
            Arc::new(Handles {
                acquisitions: OUTCOMES.each_ref().map(|o| {
                    observe::counter(ACQUISITIONS, "lock acquisitions by outcome", &by(o))
                }),
                durations: OUTCOMES.each_ref().map(|o| {
                    observe::histogram(
                        ACQUIRE_DURATION,
                        "time of one lock acquisition, waits included",
                        &by(o),
                    )
                }),
                retries: observe::counter(
                    RETRIES,
                    "lock attempts retried after contention",
                    &labels,
                ),
                lost: observe::counter(
                    LEASES_LOST,
                    "lease renewals that found the lease gone",
                    &labels,
                ),
            })
        };
        Meters {
            name: name.into(),
            backend,
            #[cfg(feature = "metrics")]
            handles,
        }
    }

    /// The unnamed lock's handles on `backend`.
    pub(crate) fn unnamed(backend: &'static str) -> Self {
        Self::new(DEFAULT_NAME, backend)
    }

    /// Handles that report nowhere, for a builder's lock until `build` registers the
    /// named ones (so no `"default"` series appears for it).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn placeholder(backend: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            metrics::with_local_recorder(&metrics::NoopRecorder, || Self::unnamed(backend))
        }
        #[cfg(not(feature = "metrics"))]
        Self::unnamed(backend)
    }

    fn span(&self, op: &'static str) -> tracing::Span {
        tracing::debug_span!(
            "lock.call",
            sd.name = %self.name,
            sd.backend = self.backend,
            sd.operation = op,
        )
    }

    /// Counts an acquisition that started at `start` and ended in `result`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn acquired(&self, result: &Result<Lease>, start: Start) {
        #[cfg(feature = "metrics")]
        if let Some(i) = outcome_of(result) {
            self.handles.acquisitions[i].increment(1);
            observe::record_since(&self.handles.durations[i], start);
        }
    }

    /// One attempt ([`crate::Lock::try_acquire`]), in a span, counted.
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "etcd")),
        allow(dead_code)
    )]
    pub(crate) async fn try_acquire(
        &self,
        attempt: impl Future<Output = Result<Lease>>,
    ) -> Result<Lease> {
        let start = start();
        let result = attempt.instrument(self.span(operation::ACQUIRE)).await;
        self.acquired(&result, start);
        result
    }

    /// [`Meters::try_acquire`] of a synchronous attempt (the memory backend's).
    pub(crate) fn try_acquire_now(&self, attempt: impl FnOnce() -> Result<Lease>) -> Result<Lease> {
        let start = start();
        let result = self.span(operation::ACQUIRE).in_scope(attempt);
        self.acquired(&result, start);
        result
    }

    /// [`crate::Lock::acquire`]: `attempt` (uncounted) retried on contention as `policy`
    /// says for at most `max_wait`, in one span, counted once, each retry counted.
    pub(crate) async fn acquire<F, Fut>(
        &self,
        policy: RetryPolicy,
        resource: &str,
        max_wait: Duration,
        attempt: F,
    ) -> Result<Lease>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Lease>>,
    {
        let start = start();
        let result = crate::retry_contention_counted(policy, resource, max_wait, attempt, || {
            #[cfg(feature = "metrics")]
            self.handles.retries.increment(1);
        })
        .instrument(self.span(operation::ACQUIRE))
        .await;
        self.acquired(&result, start);
        result
    }

    /// Counts a renewal that found the lease gone ([`Error::LeaseExpired`]).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn extended(&self, result: &Result<()>) {
        #[cfg(feature = "metrics")]
        if matches!(result, Err(Error::LeaseExpired { .. })) {
            self.handles.lost.increment(1);
        }
    }

    /// [`crate::Lock::extend`], in a span, a lost lease counted.
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "etcd")),
        allow(dead_code)
    )]
    pub(crate) async fn extend(&self, renewal: impl Future<Output = Result<()>>) -> Result<()> {
        let result = renewal.instrument(self.span(operation::EXTEND)).await;
        self.extended(&result);
        result
    }

    /// [`crate::Lock::release`], in a span.
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "etcd")),
        allow(dead_code)
    )]
    pub(crate) async fn release(
        &self,
        release: impl Future<Output = Result<Release>>,
    ) -> Result<Release> {
        release.instrument(self.span(operation::RELEASE)).await
    }
}

/// A fence's name, backend and refusal counter. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct FenceMeters {
    name: Arc<str>,
    backend: &'static str,
    #[cfg(feature = "metrics")]
    refusals: metrics::Counter,
}

impl FenceMeters {
    /// The counter of the fence `name` on `backend`, registered with the recorder
    /// installed now.
    pub(crate) fn new(name: &str, backend: &'static str) -> Self {
        FenceMeters {
            name: name.into(),
            backend,
            #[cfg(feature = "metrics")]
            refusals: observe::counter(
                FENCING_REFUSALS,
                "operations a fence refused for a stale token",
                &Labels::instance(name, backend),
            ),
        }
    }

    /// The span of one fence call (a round trip on Redis or PostgreSQL).
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::debug_span!("lock.fence", sd.name = %self.name, sd.backend = self.backend)
    }

    /// Counts `result` when it is a refusal ([`Error::StaleToken`]) and hands it back.
    #[inline]
    pub(crate) fn checked<T>(&self, result: Result<T>) -> Result<T> {
        #[cfg(feature = "metrics")]
        if matches!(result, Err(Error::StaleToken { .. })) {
            self.refusals.increment(1);
        }
        result
    }
}
