//! What an election reports beyond its campaigns: resignations and whether this
//! instance leads (feature `metrics`).
//!
//! The `leader` gauge is the number of terms this instance holds now: 1 while it leads
//! its election (0 or 1 for an instance that runs for one election). A term counts from
//! the campaign that won it until a renewal finds it gone, a resign ends it, or its
//! validity runs out without a renewal (a task of the runtime's wakes then).

use std::future::Future;
#[cfg(feature = "metrics")]
use std::sync::{Arc, Mutex, MutexGuard, Weak};

#[cfg(feature = "metrics")]
use std::collections::HashMap;

use sd_core::observe::operation;
#[cfg(feature = "metrics")]
use sd_core::observe::{self, Labels};
#[cfg(feature = "metrics")]
use tokio::time::Instant;
use tracing::Instrument as _;
use tracing::instrument::Instrumented;

use super::after::after;
use super::{ELECTION, Meters};
use crate::election::{Leader, Term};
use crate::error::Result;
use crate::lease::{Release, RetryPolicy};

/// The gauge of terms this instance holds (`sd.lock.election.leader`).
#[cfg(feature = "metrics")]
const LEADER: &str = "sd.lock.election.leader";
/// The counter of terms ended by `resign` (`sd.lock.election.resignations`).
#[cfg(feature = "metrics")]
const RESIGNATIONS: &str = "sd.lock.election.resignations";

/// The terms an instance holds, by holder, with their validity; and the gauge that
/// shows how many.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Terms {
    held: Mutex<HashMap<String, Instant>>,
    leader: metrics::Gauge,
    resignations: metrics::Counter,
}

#[cfg(feature = "metrics")]
impl Terms {
    fn held(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        // Every critical section is one map operation and a gauge set.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `holder`'s term until `until`: true when it was not held before.
    fn hold(&self, holder: &str, until: Instant) -> bool {
        let mut held = self.held();
        let new = held.insert(holder.to_owned(), until).is_none();
        self.leader.set(held.len() as f64);
        new
    }

    /// No longer holds `holder`'s term.
    fn forget(&self, holder: &str) {
        let mut held = self.held();
        if held.remove(holder).is_some() {
            self.leader.set(held.len() as f64);
        }
    }

    /// Forgets `holder`'s term once its validity has run out without a renewal.
    fn watch(this: Weak<Terms>, holder: String) {
        crate::lease::spawn_detached(async move {
            loop {
                let Some(terms) = this.upgrade() else { return };
                let Some(until) = terms.held().get(&holder).copied() else {
                    return;
                };
                if until <= Instant::now() {
                    terms.forget(&holder);
                    return;
                }
                drop(terms);
                tokio::time::sleep_until(until).await;
            }
        });
    }
}

/// An election's meters: campaigns, their time, retries and terms lost ([`Meters`] of
/// kind [`ELECTION`]), resignations and the `leader` gauge. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ElectionMeters {
    meters: Meters,
    #[cfg(feature = "metrics")]
    terms: Arc<Terms>,
}

impl ElectionMeters {
    /// The handles of the election instance `name` on `backend`, registered with the
    /// recorder installed now.
    pub(crate) fn new(name: &str, backend: &'static str) -> Self {
        ElectionMeters {
            meters: Meters::of(&ELECTION, name, backend),
            #[cfg(feature = "metrics")]
            terms: {
                let labels = Labels::instance(name, backend);
                Arc::new(Terms {
                    held: Mutex::default(),
                    leader: observe::gauge(
                        LEADER,
                        None,
                        "terms this instance holds: 1 while it leads its election",
                        &labels,
                    ),
                    resignations: observe::counter(
                        RESIGNATIONS,
                        "terms ended by their leader's resign",
                        &labels,
                    ),
                })
            },
        }
    }

    /// Handles that report nowhere, for a builder's election until `build` registers
    /// the named ones.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn placeholder(backend: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            metrics::with_local_recorder(&metrics::NoopRecorder, || {
                Self::new(sd_core::observe::DEFAULT_NAME, backend)
            })
        }
        #[cfg(not(feature = "metrics"))]
        Self::new(sd_core::observe::DEFAULT_NAME, backend)
    }

    /// Counts `result`'s term as held.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables, clippy::unused_self))]
    fn elected(&self, result: &Result<Term>) {
        #[cfg(feature = "metrics")]
        if let Ok(term) = result {
            self.hold(term);
        }
    }

    #[cfg(feature = "metrics")]
    fn hold(&self, term: &Term) {
        if self.terms.hold(&term.lease.holder, term.valid_until()) {
            Terms::watch(Arc::downgrade(&self.terms), term.lease.holder.clone());
        }
    }

    /// One campaign attempt (or one call that waits in the backend), in a span,
    /// counted.
    pub(crate) fn try_campaign<'a>(
        &'a self,
        attempt: impl Future<Output = Result<Term>> + 'a,
    ) -> impl Future<Output = Result<Term>> + 'a {
        after(self.meters.try_acquire(attempt), move |result, _| {
            self.elected(result);
        })
    }

    /// [`crate::election::Election::campaign`]: `attempt` (uncounted) retried as
    /// `policy` says for at most `max_wait`, in one span, counted once.
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    pub(crate) fn campaign<'a, F, Fut>(
        &'a self,
        policy: RetryPolicy,
        name: &'a str,
        max_wait: std::time::Duration,
        attempt: F,
    ) -> impl Future<Output = Result<Term>> + 'a
    where
        F: FnMut() -> Fut + 'a,
        Fut: Future<Output = Result<Term>> + 'a,
    {
        let wait = self.meters.acquire(policy, name, max_wait, attempt);
        after(wait, move |result, _| self.elected(result))
    }

    /// [`crate::election::Election::observe`], in a span.
    pub(crate) fn observe<F: Future<Output = Result<Option<Leader>>>>(
        &self,
        observe: F,
    ) -> Instrumented<F> {
        observe.instrument(self.meters.span(operation::OBSERVE))
    }

    /// A renewal of a term, in a span; call [`ElectionMeters::renewed`] with its result.
    pub(crate) fn renew<F: Future<Output = Result<()>>>(&self, renewal: F) -> Instrumented<F> {
        renewal.instrument(self.meters.span(operation::EXTEND))
    }

    /// Counts `term`'s renewal: a term lost when it found the term gone, else the term
    /// held until its new validity.
    pub(crate) fn renewed(&self, term: &Term, result: &Result<()>) {
        self.meters.extended(result);
        #[cfg(feature = "metrics")]
        match result {
            Ok(()) => self.hold(term),
            Err(crate::Error::LeaseExpired { .. }) => self.terms.forget(&term.lease.holder),
            // The backend did not answer: the term is held until its validity ends.
            Err(_) => {}
        }
        #[cfg(not(feature = "metrics"))]
        let _ = term;
    }

    /// `resign` of `term`, in a span: a resignation counted when it ended a live term,
    /// and the term no longer held once the backend answered.
    pub(crate) fn resign<'a, F, Fut>(
        &'a self,
        term: Term,
        resign: F,
    ) -> impl Future<Output = Result<Release>> + 'a
    where
        F: FnOnce(Term) -> Fut,
        Fut: Future<Output = Result<Release>> + 'a,
    {
        #[cfg(feature = "metrics")]
        let holder = term.lease.holder.clone();
        after(self.meters.release(resign(term)), move |result, _| {
            #[cfg(feature = "metrics")]
            if let Ok(ended) = result {
                if *ended == Release::Released {
                    self.terms.resignations.increment(1);
                }
                self.terms.forget(&holder);
            }
            #[cfg(not(feature = "metrics"))]
            let _ = (self, result);
        })
    }
}
