//! [`Tally`]: counts bumped on hot paths (a cache hit, a rate-limit decision) without an
//! atomic read-modify-write each, optionally published to `metrics` counters in steps.
//!
//! An atomic add on a shared counter costs about as much as a memory limiter's whole
//! decision. A tally gives each of the first [`STRIPES`] live threads a stripe of its
//! own, on its own cache line, where a count is a plain load and store: the thread is the
//! stripe's only writer while it holds the slot, so nothing is lost. Reading sums the
//! stripes. Threads beyond those (and a thread whose slot is already gone while it ends)
//! add to one shared atomic.
//!
//! With feature `metrics` a tally can be *metered*: each count feeds a `metrics`
//! counter, which a thread brings up to date each time its stripe's count reaches a
//! multiple of [`STEP`]. A scrape can therefore lag by less than [`STEP`] per thread and
//! count; [`Tally::publish`], `observe::publish` (every metered tally alive) and dropping
//! the tally's last handle publish the rest. Every count reaches the counter exactly once,
//! whoever publishes it.
//!
//! ```
//! use sd_core::tally::Tally;
//!
//! let hits: Tally<2> = Tally::new();
//! let threads: Vec<_> = (0..4)
//!     .map(|_| {
//!         let hits = hits.clone();
//!         std::thread::spawn(move || {
//!             for _ in 0..1_000 {
//!                 hits.bump::<0>();
//!             }
//!             hits.bump::<1>();
//!         })
//!     })
//!     .collect();
//! for t in threads {
//!     t.join().unwrap();
//! }
//! assert_eq!((hits.sum::<0>(), hits.sum::<1>()), (4_000, 4));
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

/// Threads that own a stripe of every tally (more threads share one atomic).
pub const STRIPES: usize = 64;

/// A thread brings a metered count's counter up to date each time its stripe's count
/// reaches a multiple of this.
pub const STEP: u64 = 64;

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

/// One thread's stripe of `N` counts on its own cache line (two lines from `N = 5`), and
/// how much of each its counter has been given.
#[derive(Debug)]
#[repr(align(64))]
struct Line<const N: usize> {
    count: [AtomicU64; N],
    #[cfg(feature = "metrics")]
    published: [AtomicU64; N],
}

impl<const N: usize> Default for Line<N> {
    fn default() -> Self {
        Line {
            count: std::array::from_fn(|_| AtomicU64::new(0)),
            #[cfg(feature = "metrics")]
            published: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

#[derive(Debug)]
struct Inner<const N: usize> {
    lines: Box<[Line<N>]>,
    shared: [AtomicU64; N],
    #[cfg(feature = "metrics")]
    counters: Option<[metrics::Counter; N]>,
}

/// `N` counts, each bumped at the cost of a load and a store of a line the thread owns;
/// clones share the counts. See the [module](self) docs.
#[derive(Debug, Clone)]
pub struct Tally<const N: usize> {
    inner: Arc<Inner<N>>,
}

impl<const N: usize> Default for Tally<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Tally<N> {
    /// `N` counts at zero, published nowhere.
    pub fn new() -> Self {
        Tally {
            inner: Arc::new(Inner::new()),
        }
    }

    /// `N` counts at zero, count `i` published to `counters[i]` in steps of [`STEP`] per
    /// thread; `observe::publish` reaches it until its last handle is dropped.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metered(counters: [metrics::Counter; N]) -> Self {
        let mut inner = Inner::new();
        inner.counters = Some(counters);
        let inner = Arc::new(inner);
        registry::register(Arc::clone(&inner) as Arc<dyn registry::Publish>);
        Tally { inner }
    }

    /// Adds one to count `I`.
    #[inline]
    pub fn bump<const I: usize>(&self) {
        const { assert!(I < N, "a tally's count index is below N") };
        let inner = &*self.inner;
        match SLOT.try_with(|slot| inner.lines.get(slot.0)) {
            Ok(Some(line)) => {
                // Only this thread writes this stripe's counts while it holds the slot.
                let own = &line.count[I];
                let count = own.load(Relaxed).wrapping_add(1);
                own.store(count, Relaxed);
                #[cfg(feature = "metrics")]
                if count % STEP == 0 {
                    inner.publish_line(line, I);
                }
            }
            _ => {
                inner.shared[I].fetch_add(1, Relaxed);
                #[cfg(feature = "metrics")]
                if let Some(counters) = &inner.counters {
                    counters[I].increment(1);
                }
            }
        }
    }

    /// Count `I`: every bump that happened before this call (on any thread).
    pub fn sum<const I: usize>(&self) -> u64 {
        const { assert!(I < N, "a tally's count index is below N") };
        let inner = &*self.inner;
        inner
            .lines
            .iter()
            .fold(inner.shared[I].load(Relaxed), |sum, line| {
                sum.wrapping_add(line.count[I].load(Relaxed))
            })
    }

    /// Brings every count's counter up to date (a no-op when not metered).
    pub fn publish(&self) {
        self.inner.publish();
    }
}

impl<const N: usize> Inner<N> {
    fn new() -> Self {
        Inner {
            lines: (0..STRIPES).map(|_| Line::default()).collect(),
            shared: std::array::from_fn(|_| AtomicU64::new(0)),
            #[cfg(feature = "metrics")]
            counters: None,
        }
    }

    /// Gives count `i`'s counter what `line` counted since it was last published: the
    /// `fetch_max` hands each range of counts to exactly one publisher.
    #[cfg(feature = "metrics")]
    fn publish_line(&self, line: &Line<N>, i: usize) {
        let (Some(counters), Some(count), Some(published)) =
            (&self.counters, line.count.get(i), line.published.get(i))
        else {
            return;
        };
        let now = count.load(Relaxed);
        let before = published.fetch_max(now, Relaxed);
        if now > before
            && let Some(counter) = counters.get(i)
        {
            counter.increment(now - before);
        }
    }

    fn publish(&self) {
        #[cfg(feature = "metrics")]
        if self.counters.is_some() {
            for line in self.lines.iter() {
                for i in 0..N {
                    self.publish_line(line, i);
                }
            }
        }
    }
}

impl<const N: usize> Drop for Inner<N> {
    fn drop(&mut self) {
        self.publish();
    }
}

/// Every metered tally alive, for `observe::publish`.
#[cfg(feature = "metrics")]
pub(crate) mod registry {
    use std::sync::{Mutex, PoisonError, Weak};

    /// What the registry needs of a tally: to publish it.
    pub(crate) trait Publish: Send + Sync {
        fn publish(&self);
    }

    impl<const N: usize> Publish for super::Inner<N> {
        fn publish(&self) {
            super::Inner::publish(self);
        }
    }

    static LIVE: Mutex<Vec<Weak<dyn Publish>>> = Mutex::new(Vec::new());

    pub(crate) fn register(tally: std::sync::Arc<dyn Publish>) {
        let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|t| t.strong_count() > 0);
        live.push(std::sync::Arc::downgrade(&tally));
    }

    /// Publishes every metered tally alive.
    pub(crate) fn publish_all() {
        let live: Vec<_> = LIVE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for tally in live {
            tally.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many threads, more than there are stripes, some ending while others start and take
    /// their slots: every bump is counted once.
    #[test]
    fn counts_every_bump_across_threads_that_come_and_go() {
        let tally: Tally<2> = Tally::new();
        for _wave in 0..3 {
            let threads: Vec<_> = (0..STRIPES + 16)
                .map(|t| {
                    let tally = tally.clone();
                    std::thread::spawn(move || {
                        for _ in 0..1_000 + t {
                            tally.bump::<0>();
                        }
                        tally.bump::<1>();
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("counting thread");
            }
        }
        let per_wave: usize = (0..STRIPES + 16).map(|t| 1_000 + t).sum();
        assert_eq!(tally.sum::<0>(), 3 * per_wave as u64);
        assert_eq!(tally.sum::<1>(), 3 * (STRIPES + 16) as u64);
    }

    /// Metered: while threads count, a scrape never runs ahead of the counts and lags by
    /// less than a step per thread; publishers racing the counting threads (and each
    /// other) give every count to the counter exactly once; `observe::publish` and the
    /// last handle's drop publish the rest.
    #[cfg(feature = "test-util")]
    #[test]
    fn a_metered_tally_publishes_every_count_exactly_once() {
        use crate::observe::{Capture, Labels, counter};
        const THREADS: usize = 8;
        let capture = Capture::new();
        let tally: Tally<2> = capture.build(|| {
            Tally::metered([
                counter("t.a", "a", &Labels::new()),
                counter("t.b", "b", &Labels::new()),
            ])
        });
        let seen = |name| capture.counter(name, &[]);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racers: Vec<_> = (0..3)
            .map(|_| {
                let (tally, done) = (tally.clone(), std::sync::Arc::clone(&done));
                std::thread::spawn(move || {
                    while !done.load(Relaxed) {
                        tally.publish();
                        crate::observe::publish();
                    }
                })
            })
            .collect();
        let counters: Vec<_> = (0..THREADS)
            .map(|t| {
                let tally = tally.clone();
                std::thread::spawn(move || {
                    for i in 0..200_000 + 37 * t {
                        tally.bump::<0>();
                        if i % 3 == 0 {
                            tally.bump::<1>();
                        }
                    }
                })
            })
            .collect();
        for t in counters {
            t.join().expect("counting thread");
        }
        done.store(true, Relaxed);
        for t in racers {
            t.join().expect("publishing thread");
        }
        let (a, b) = (tally.sum::<0>(), tally.sum::<1>());
        assert_eq!(
            a,
            (0..THREADS).map(|t| 200_000 + 37 * t as u64).sum::<u64>()
        );
        assert!(
            seen("t.a") <= a && seen("t.b") <= b,
            "never ahead of the counts"
        );

        // Without racing publishers, a thread publishes at each step it reaches.
        let quiet: Tally<1> =
            capture.build(|| Tally::metered([counter("t.c", "c", &Labels::new())]));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let quiet = quiet.clone();
                std::thread::spawn(move || (0..1_000).for_each(|_| quiet.bump::<0>()))
            })
            .collect();
        threads
            .into_iter()
            .for_each(|t| t.join().expect("counting thread"));
        // A thread that ends leaves its stripe's count to the next thread taking its slot,
        // so the lag is less than a step per stripe used (at most one per thread).
        let (total, published) = (THREADS as u64 * 1_000, seen("t.c"));
        assert!(
            published <= total && total - published < THREADS as u64 * STEP,
            "each stripe published its steps: {published} of {total}"
        );

        crate::observe::publish();
        assert_eq!((seen("t.a"), seen("t.b")), (a, b), "published once each");
        tally.bump::<1>();
        drop(tally);
        assert_eq!(seen("t.b"), b + 1, "the last handle's drop publishes");
        assert_eq!(seen("t.c"), THREADS as u64 * 1_000);
    }
}
