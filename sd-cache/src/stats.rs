//! Counters a user can export.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

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

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) load_nanos: AtomicU64,
    pub(crate) early_refreshes: AtomicU64,
    pub(crate) skipped_refreshes: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts a caller that waited on another caller's load.
    pub(crate) fn note(&self, role: crate::singleflight::Role) {
        if role == crate::singleflight::Role::Waiter {
            self.coalesced.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn record_load(&self, took: Duration, ok: bool) {
        self.loads.fetch_add(1, Relaxed);
        self.load_nanos
            .fetch_add(crate::clock::saturating_nanos(took), Relaxed);
        if !ok {
            self.load_errors.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Relaxed),
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
