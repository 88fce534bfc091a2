//! What a lock, a semaphore, an election and a fence report: acquisitions by outcome
//! and their time, contention retries, leases lost and fencing refusals (feature
//! `metrics`), under the names and labels of `sd_core::observe`, and the spans every
//! call runs in.
//!
//! Handles are registered when the instance is built; without the feature the meters
//! keep only the name and backend the spans carry, and their methods count nothing.

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
use crate::lease::{Release, RetryPolicy};

mod after;
#[cfg(any(feature = "redis", feature = "postgres", feature = "etcd"))]
mod election;

use after::after;

#[cfg(any(feature = "redis", feature = "postgres", feature = "etcd"))]
pub(crate) use election::ElectionMeters;

/// The counter of stale tokens a fence refused (`sd.lock.fencing.refusals`).
#[cfg(feature = "metrics")]
pub(crate) const FENCING_REFUSALS: &str = "sd.lock.fencing.refusals";

/// What an instance is: the names of its series, the operations of its spans and the
/// span itself. One static per kind ([`LOCK`], [`SEMAPHORE`], [`ELECTION`]).
#[derive(Debug)]
pub(crate) struct Kind {
    /// The span of one call: `(name, backend, operation)`.
    span: fn(&str, &'static str, &'static str) -> tracing::Span,
    /// The operation of a grant (`acquire`, `campaign`) and of a give-back (`release`,
    /// `resign`).
    acquire_op: &'static str,
    release_op: &'static str,
    #[cfg(feature = "metrics")]
    series: Series,
}

/// Names and descriptions of one kind's series.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Series {
    /// Grants by outcome (counter) and their time (histogram), with the outcome of a
    /// grant first: `acquired` or `elected`.
    acquisitions: (&'static str, &'static str),
    duration: (&'static str, &'static str),
    outcomes: [&'static str; 4],
    retries: (&'static str, &'static str),
    lost: (&'static str, &'static str),
}

/// The outcomes of a lease's or a permit's acquisition, in the order of
/// [`Handles::acquisitions`].
#[cfg(feature = "metrics")]
const GRANTED: [&str; 4] = [
    outcome::ACQUIRED,
    outcome::CONTENDED,
    outcome::TIMEOUT,
    outcome::BACKEND_ERROR,
];

/// Leases of a [`crate::Lock`] (and the PostgreSQL advisory locks): `lock.call` spans,
/// `sd.lock.*` series.
pub(crate) static LOCK: Kind = Kind {
    span: |name, backend, op| tracing::debug_span!("lock.call", sd.name = %name, sd.backend = backend, sd.operation = op),
    acquire_op: operation::ACQUIRE,
    release_op: operation::RELEASE,
    #[cfg(feature = "metrics")]
    series: Series {
        acquisitions: ("sd.lock.acquisitions", "lock acquisitions by outcome"),
        duration: (
            "sd.lock.acquire.duration",
            "time of one lock acquisition, waits included",
        ),
        outcomes: GRANTED,
        retries: (
            "sd.lock.contention.retries",
            "lock attempts retried after contention",
        ),
        lost: (
            "sd.lock.leases.lost",
            "lease renewals that found the lease gone",
        ),
    },
};

/// Permits of a [`crate::Semaphore`]: `semaphore.call` spans, `sd.lock.semaphore.*`
/// series.
pub(crate) static SEMAPHORE: Kind = Kind {
    span: |name, backend, op| tracing::debug_span!("semaphore.call", sd.name = %name, sd.backend = backend, sd.operation = op),
    acquire_op: operation::ACQUIRE,
    release_op: operation::RELEASE,
    #[cfg(feature = "metrics")]
    series: Series {
        acquisitions: (
            "sd.lock.semaphore.acquisitions",
            "semaphore acquisitions by outcome",
        ),
        duration: (
            "sd.lock.semaphore.acquire.duration",
            "time of one permit acquisition, waits included",
        ),
        outcomes: GRANTED,
        retries: (
            "sd.lock.semaphore.contention.retries",
            "permit attempts retried while the resource was full",
        ),
        lost: (
            "sd.lock.semaphore.permits.lost",
            "permit renewals that found the permit gone",
        ),
    },
};

/// Terms of an [`crate::election::Election`]: `election.call` spans,
/// `sd.lock.election.*` series.
#[cfg_attr(
    not(any(feature = "redis", feature = "postgres", feature = "etcd")),
    allow(dead_code)
)]
pub(crate) static ELECTION: Kind = Kind {
    span: |name, backend, op| tracing::debug_span!("election.call", sd.name = %name, sd.backend = backend, sd.operation = op),
    acquire_op: operation::CAMPAIGN,
    release_op: operation::RESIGN,
    #[cfg(feature = "metrics")]
    series: Series {
        acquisitions: ("sd.lock.election.campaigns", "campaigns by outcome"),
        duration: (
            "sd.lock.election.campaign.duration",
            "time of one campaign, waits included",
        ),
        outcomes: [
            outcome::ELECTED,
            outcome::CONTENDED,
            outcome::TIMEOUT,
            outcome::BACKEND_ERROR,
        ],
        retries: (
            "sd.lock.election.contention.retries",
            "campaign attempts retried while another leader held the term",
        ),
        lost: (
            "sd.lock.election.terms.lost",
            "term renewals that found the term gone",
        ),
    },
};

/// The index in [`Series::outcomes`] of how a grant ended; `None` for bad input, which
/// never reached the backend.
#[cfg(feature = "metrics")]
fn outcome_of<T>(result: &Result<T>) -> Option<usize> {
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
pub(crate) type Start = std::time::Instant;
/// When a timed call started (nothing without the feature).
#[cfg(not(feature = "metrics"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start;

#[cfg(feature = "metrics")]
#[inline]
pub(crate) fn start() -> Start {
    std::time::Instant::now()
}
#[cfg(not(feature = "metrics"))]
#[inline]
pub(crate) fn start() -> Start {
    Start
}

/// An instance's kind, name, backend and metric handles. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Meters {
    kind: &'static Kind,
    name: Arc<str>,
    backend: &'static str,
    #[cfg(feature = "metrics")]
    handles: Arc<Handles>,
}

impl Meters {
    /// The handles of the lock `name` on `backend`, registered with the recorder
    /// installed now.
    pub(crate) fn new(name: &str, backend: &'static str) -> Self {
        Self::of(&LOCK, name, backend)
    }

    /// The handles of the instance `name` of `kind` on `backend`, registered with the
    /// recorder installed now.
    pub(crate) fn of(kind: &'static Kind, name: &str, backend: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        let handles = {
            let s = &kind.series;
            let labels = Labels::instance(name, backend);
            let by = |o: &&str| labels.clone().with(label::OUTCOME, *o);
            Arc::new(Handles {
                acquisitions: s
                    .outcomes
                    .each_ref()
                    .map(|o| observe::counter(s.acquisitions.0, s.acquisitions.1, &by(o))),
                durations: s
                    .outcomes
                    .each_ref()
                    .map(|o| observe::histogram(s.duration.0, s.duration.1, &by(o))),
                retries: observe::counter(s.retries.0, s.retries.1, &labels),
                lost: observe::counter(s.lost.0, s.lost.1, &labels),
            })
        };
        Meters {
            kind,
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
        Self::placeholder_of(&LOCK, backend)
    }

    /// [`Meters::placeholder`] of an instance of `kind`.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn placeholder_of(kind: &'static Kind, backend: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            metrics::with_local_recorder(&metrics::NoopRecorder, || {
                Self::of(kind, DEFAULT_NAME, backend)
            })
        }
        #[cfg(not(feature = "metrics"))]
        Self::of(kind, DEFAULT_NAME, backend)
    }

    /// The span of one call performing `op`.
    pub(crate) fn span(&self, op: &'static str) -> tracing::Span {
        (self.kind.span)(&self.name, self.backend, op)
    }

    /// Counts a grant that started at `start` and ended in `result`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn acquired<T>(&self, result: &Result<T>, start: Start) {
        #[cfg(feature = "metrics")]
        if let Some(i) = outcome_of(result) {
            self.handles.acquisitions[i].increment(1);
            observe::record_since(&self.handles.durations[i], start);
        }
    }

    /// One attempt (`try_acquire`, `try_campaign`; or a call that waits in the backend,
    /// etcd's `campaign`), in a span, counted.
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "etcd")),
        allow(dead_code)
    )]
    pub(crate) fn try_acquire<'a, T>(
        &'a self,
        attempt: impl Future<Output = Result<T>> + 'a,
    ) -> impl Future<Output = Result<T>> + 'a {
        let attempt = attempt.instrument(self.span(self.kind.acquire_op));
        after(attempt, move |result, start| self.acquired(result, start))
    }

    /// [`Meters::try_acquire`] of a synchronous attempt (the memory backends').
    pub(crate) fn try_acquire_now<T>(&self, attempt: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = start();
        let result = self.span(self.kind.acquire_op).in_scope(attempt);
        self.acquired(&result, start);
        result
    }

    /// A wait (`acquire`, `campaign`): `attempt` (uncounted) retried on contention as
    /// `policy` says for at most `max_wait`, in one span, counted once, each retry
    /// counted.
    pub(crate) fn acquire<'a, T, F, Fut>(
        &'a self,
        policy: RetryPolicy,
        resource: &'a str,
        max_wait: Duration,
        attempt: F,
    ) -> impl Future<Output = Result<T>> + 'a
    where
        T: 'a,
        F: FnMut() -> Fut + 'a,
        Fut: Future<Output = Result<T>> + 'a,
    {
        let wait = crate::retry_contention_counted(policy, resource, max_wait, attempt, || {
            #[cfg(feature = "metrics")]
            self.handles.retries.increment(1);
        })
        .instrument(self.span(self.kind.acquire_op));
        after(wait, move |result, start| self.acquired(result, start))
    }

    /// Counts a renewal that found the lease (permit, term) gone
    /// ([`Error::LeaseExpired`]).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn extended(&self, result: &Result<()>) {
        #[cfg(feature = "metrics")]
        if matches!(result, Err(Error::LeaseExpired { .. })) {
            self.handles.lost.increment(1);
        }
    }

    /// A renewal (`extend`, `renew`), in a span, a lost lease counted.
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "etcd")),
        allow(dead_code)
    )]
    pub(crate) fn extend<'a>(
        &'a self,
        renewal: impl Future<Output = Result<()>> + 'a,
    ) -> impl Future<Output = Result<()>> + 'a {
        let renewal = renewal.instrument(self.span(operation::EXTEND));
        after(renewal, move |result, _| self.extended(result))
    }

    /// A give-back (`release`, `resign`), in a span.
    #[cfg_attr(
        not(any(feature = "redis", feature = "postgres", feature = "etcd")),
        allow(dead_code)
    )]
    pub(crate) fn release<F: Future<Output = Result<Release>>>(
        &self,
        release: F,
    ) -> tracing::instrument::Instrumented<F> {
        release.instrument(self.span(self.kind.release_op))
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
