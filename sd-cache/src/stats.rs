//! Counters a user can export.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::observe::{Count, HitMetric, Labels, LoadTime, handles};

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

/// Hits: a [`Striped`] count, and its metric.
#[derive(Debug, Default)]
pub(crate) struct Hits {
    count: Striped,
    metric: HitMetric,
}

impl Hits {
    #[inline]
    pub(crate) fn bump(&self) {
        self.count.bump();
        self.metric.add();
    }

    pub(crate) fn sum(&self) -> u64 {
        self.count.sum()
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
            hits: Hits {
                count: Striped::default(),
                metric: hit,
            },
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

/// Threads that own a stripe of every [`Striped`] counter (more threads share one atomic).
const STRIPES: usize = 64;

/// Slots given back by threads that ended, lowest first, for the next threads to own.
static FREE_SLOTS: Mutex<BinaryHeap<Reverse<usize>>> = Mutex::new(BinaryHeap::new());
/// The next slot never owned yet.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

/// A thread's slot: while the thread runs, no other thread has it. Given back (through
/// [`FREE_SLOTS`], whose lock orders the last writes of the thread that ends before the
/// first writes of the thread that takes it) when the thread ends.
struct Slot(usize);

impl Slot {
    fn take() -> Self {
        let free = FREE_SLOTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        Slot(free.map_or_else(|| NEXT_SLOT.fetch_add(1, Relaxed), |Reverse(slot)| slot))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        FREE_SLOTS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Reverse(self.0));
    }
}

thread_local! {
    static SLOT: Slot = Slot::take();
}

/// One stripe on its own cache line, so threads counting do not share a line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line(AtomicU64);

/// A counter bumped on every read (hits), at the cost of a load and a store of a line the
/// thread owns: each of the first [`STRIPES`] live threads owns one stripe and is its only
/// writer, so a count needs no atomic read-modify-write and is never lost; other threads
/// (and a thread whose slot is already gone, while it ends) add to one shared atomic.
/// Reading sums the stripes.
#[derive(Debug)]
pub(crate) struct Striped {
    stripes: Box<[Line]>,
    shared: AtomicU64,
}

impl Default for Striped {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Line::default()).collect(),
            shared: AtomicU64::new(0),
        }
    }
}

impl Striped {
    #[inline]
    pub(crate) fn bump(&self) {
        match SLOT.try_with(|slot| self.stripes.get(slot.0)) {
            // Only this thread writes this stripe while it holds the slot.
            Ok(Some(Line(own))) => own.store(own.load(Relaxed).wrapping_add(1), Relaxed),
            _ => {
                self.shared.fetch_add(1, Relaxed);
            }
        }
    }

    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .fold(self.shared.load(Relaxed), |sum, line| {
                sum.wrapping_add(line.0.load(Relaxed))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many threads, more than there are stripes, some ending while others start and take
    /// their slots: every bump is counted once.
    #[test]
    fn striped_counts_every_bump_across_threads_that_come_and_go() {
        let counter = std::sync::Arc::new(Striped::default());
        for _wave in 0..3 {
            let threads: Vec<_> = (0..STRIPES + 16)
                .map(|t| {
                    let counter = std::sync::Arc::clone(&counter);
                    std::thread::spawn(move || {
                        for _ in 0..1_000 + t {
                            counter.bump();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("counting thread");
            }
        }
        let per_wave: usize = (0..STRIPES + 16).map(|t| 1_000 + t).sum();
        assert_eq!(counter.sum(), 3 * per_wave as u64);
    }
}
