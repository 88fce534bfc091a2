//! Counters a user can export.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::observe::{Count, Labels, LoadTime, handles};
use sd_core::tally::Tally;

/// A snapshot of a cache's counters since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads answered from a fresh entry (negative entries included).
    pub hits: u64,
    /// Reads that found no fresh entry.
    pub misses: u64,
    /// Loader calls (misses that led a load, plus early refreshes).
    pub loads: u64,
    /// Loader calls that returned an error.
    pub load_errors: u64,
    /// Total time spent in loader calls.
    pub load_time: Duration,
    /// Loads started early by XFetch, in the background, while readers got the current value.
    pub early_refreshes: u64,
    /// Early refreshes that did not load because the entry had changed under them: another
    /// process was refreshing it or had replaced it, or it was gone (Redis only; the
    /// memory cache's refresh always loads).
    pub skipped_refreshes: u64,
    /// Callers that waited on another caller's load instead of running their own.
    pub coalesced_waiters: u64,
    /// Entries the engine evicted to stay within capacity.
    pub evictions: u64,
    /// Reads answered with an expired value because the load failed (serve-stale-on-error).
    pub stale_served: u64,
    /// Reads the loader answered around a failed Redis (`fallback_to_loader`).
    pub fallback_loads: u64,
}

/// A cache's counts; each (but the load time's sum) is also a metric with feature
/// `metrics` (see [`crate::observe`]), a no-op when built with `Default`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// The cache's name: the `sd.name` of its metrics and spans.
    pub(crate) name: Arc<str>,
    pub(crate) hits: Hits,
    pub(crate) misses: Count,
    pub(crate) loads: Count,
    pub(crate) load_errors: Count,
    pub(crate) load_nanos: AtomicU64,
    pub(crate) load_time: LoadTime,
    pub(crate) early_refreshes: Count,
    pub(crate) skipped_refreshes: Count,
    pub(crate) coalesced: Count,
    pub(crate) evictions: Count,
    pub(crate) stale_served: Count,
    pub(crate) fallbacks: Count,
}

/// Hits: a [`Tally`] (a read pays no atomic add), published to its metric in steps.
#[derive(Debug, Default)]
pub(crate) struct Hits(pub(crate) Tally<1>);

impl Hits {
    #[inline]
    pub(crate) fn bump(&self) {
        self.0.bump::<0>();
    }

    pub(crate) fn sum(&self) -> u64 {
        self.0.sum::<0>()
    }
}

impl Counters {
    /// Counts whose metrics are registered with the recorder installed now, labelled
    /// with the cache's `name` and `backend`.
    pub(crate) fn observed(name: &str, backend: &'static str) -> Self {
        let (hit, counts, load_time) = handles(&Labels::new(name, backend));
        let [
            misses,
            loads,
            load_errors,
            early_refreshes,
            skipped_refreshes,
            coalesced,
            evictions,
            stale_served,
            fallbacks,
        ] = counts;
        Counters {
            name: name.into(),
            hits: Hits(hit),
            misses,
            loads,
            load_errors,
            load_nanos: AtomicU64::new(0),
            load_time,
            early_refreshes,
            skipped_refreshes,
            coalesced,
            evictions,
            stale_served,
            fallbacks,
        }
    }

    pub(crate) fn bump(counter: &Count) {
        counter.add(1);
    }

    /// Counts a caller that waited on another caller's load.
    pub(crate) fn note(&self, role: crate::singleflight::Role) {
        if role == crate::singleflight::Role::Waiter {
            self.coalesced.add(1);
        }
    }

    pub(crate) fn record_load(&self, took: Duration, ok: bool) {
        self.loads.add(1);
        self.load_nanos
            .fetch_add(crate::clock::saturating_nanos(took), Relaxed);
        self.load_time.record(took);
        if !ok {
            self.load_errors.add(1);
        }
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.sum(),
            misses: self.misses.load(Relaxed),
            loads: self.loads.load(Relaxed),
            load_errors: self.load_errors.load(Relaxed),
            load_time: Duration::from_nanos(self.load_nanos.load(Relaxed)),
            early_refreshes: self.early_refreshes.load(Relaxed),
            skipped_refreshes: self.skipped_refreshes.load(Relaxed),
            coalesced_waiters: self.coalesced.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            fallback_loads: self.fallbacks.load(Relaxed),
        }
    }
}
