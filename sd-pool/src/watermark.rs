//! Completion watermarks: per partition, the highest offset below which every job is done.
//!
//! Pure and synchronous; the pool drives it under its lock, and it can be used on its
//! own. Offsets of a partition are tracked in increasing order (the order a stream hands
//! them out); they may complete in any order. The watermark of a partition is the highest
//! tracked offset `w` such that every tracked offset `<= w` has completed, so a consumer
//! may commit `w` (Kafka-style "next offset to read" is `w + 1`) and a crash replays only
//! what comes after.
//!
//! The *window* of a partition is the number of completed offsets that are not yet
//! committable because an earlier one is still running. [`Watermarks::has_room`] turns
//! false once it reaches `max_window`, which is how the pool stops taking more work for a
//! partition whose head is stuck, the way Parallel Consumer pauses a partition when its
//! offset map fills up. The tracked entries of a partition stay below
//! `max_window + unfinished`, where `unfinished` is the number of offsets tracked but not
//! completed (bounded by the pool's queue and concurrency).
//!
//! ```
//! use sd_pool::watermark::Watermarks;
//!
//! let mut w = Watermarks::new(16)?;
//! for offset in [10, 11, 12] {
//!     w.track(0, offset)?;
//! }
//! w.complete(0, 12);
//! assert_eq!(w.committed(0), None); // 10 and 11 are still running
//! w.complete(0, 10);
//! assert_eq!(w.committed(0), Some(10));
//! w.complete(0, 11);
//! assert_eq!(w.committed(0), Some(12));
//! # Ok::<(), sd_pool::Error>(())
//! ```

use std::collections::VecDeque;

use crate::fasthash::FastMap;

use crate::error::{Error, Result};

/// Watermarks of every partition seen so far.
#[derive(Debug, Clone)]
pub struct Watermarks {
    partitions: FastMap<u32, Partition>,
    max_window: usize,
}

#[derive(Debug, Clone, Default)]
struct Partition {
    /// Tracked offsets not yet below the watermark, in increasing order, with a done flag.
    pending: VecDeque<(u64, bool)>,
    /// How many entries of `pending` are done.
    done: usize,
    /// The watermark.
    committed: Option<u64>,
    /// The highest offset ever tracked.
    last: Option<u64>,
}

impl Watermarks {
    /// An empty tracker whose partitions take no more work once `max_window` completed
    /// offsets wait behind an unfinished one. A `max_window` of 0 is refused with
    /// [`Error::InvalidConfig`] naming `max_window`.
    pub fn new(max_window: usize) -> Result<Self> {
        if max_window == 0 {
            return Err(Error::config(
                "max_window",
                "must be at least 1 (a partition with no window could never take a job)",
            ));
        }
        Ok(Self {
            partitions: FastMap::default(),
            max_window,
        })
    }

    /// The bound on the window given at construction.
    pub fn max_window(&self) -> usize {
        self.max_window
    }

    /// Starts tracking `offset` of `partition`. Offsets of a partition must increase.
    pub fn track(&mut self, partition: u32, offset: u64) -> Result<()> {
        let p = self.partitions.entry(partition).or_default();
        if let Some(last) = p.last
            && offset <= last
        {
            return Err(Error::OffsetNotIncreasing {
                partition,
                offset,
                last,
            });
        }
        p.last = Some(offset);
        p.pending.push_back((offset, false));
        Ok(())
    }

    /// Whether `offset` would be accepted by [`track`](Self::track) for `partition`.
    pub fn check_increasing(&self, partition: u32, offset: u64) -> Result<()> {
        match self.partitions.get(&partition).and_then(|p| p.last) {
            Some(last) if offset <= last => Err(Error::OffsetNotIncreasing {
                partition,
                offset,
                last,
            }),
            _ => Ok(()),
        }
    }

    /// Marks `offset` of `partition` done. Returns the new watermark when it moved.
    /// Completing an offset that is not tracked, or twice, changes nothing.
    pub fn complete(&mut self, partition: u32, offset: u64) -> Option<u64> {
        let p = self.partitions.get_mut(&partition)?;
        let i = p.pending.binary_search_by_key(&offset, |e| e.0).ok()?;
        let entry = p.pending.get_mut(i)?;
        if entry.1 {
            return None;
        }
        entry.1 = true;
        p.done += 1;
        let before = p.committed;
        while let Some(&(o, true)) = p.pending.front() {
            p.pending.pop_front();
            p.done -= 1;
            p.committed = Some(o);
        }
        (p.committed != before).then_some(p.committed).flatten()
    }

    /// The watermark of `partition`: the highest tracked offset at or below which every
    /// tracked offset is done; `None` before the first one completes in order.
    pub fn committed(&self, partition: u32) -> Option<u64> {
        self.partitions.get(&partition).and_then(|p| p.committed)
    }

    /// Every partition's watermark, in partition order.
    pub fn all_committed(&self) -> Vec<(u32, u64)> {
        let mut all: Vec<_> = self
            .partitions
            .iter()
            .filter_map(|(k, p)| p.committed.map(|c| (*k, c)))
            .collect();
        all.sort_unstable();
        all
    }

    /// Completed offsets of `partition` waiting behind an unfinished one.
    pub fn window(&self, partition: u32) -> usize {
        self.partitions.get(&partition).map_or(0, |p| p.done)
    }

    /// Tracked offsets of `partition` not yet below the watermark (done or not).
    pub fn tracked(&self, partition: u32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.pending.len())
    }

    /// Whether `partition` may take more work: its window is below `max_window`.
    pub fn has_room(&self, partition: u32) -> bool {
        self.window(partition) < self.max_window
    }

    /// The completed offsets of `partition` above its watermark (waiting behind an
    /// unfinished one), in increasing order.
    pub fn completed_above(&self, partition: u32) -> impl Iterator<Item = u64> + '_ {
        self.partitions
            .get(&partition)
            .into_iter()
            .flat_map(|p| p.pending.iter().filter(|e| e.1).map(|e| e.0))
    }

    /// Stops tracking `partition` (after a rebalance, say) and returns its watermark.
    pub fn remove(&mut self, partition: u32) -> Option<u64> {
        self.partitions.remove(&partition).and_then(|p| p.committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_zero_window_is_refused_by_name() {
        assert!(matches!(
            Watermarks::new(0),
            Err(Error::InvalidConfig {
                field: "max_window",
                ..
            })
        ));
        assert_eq!(Watermarks::new(1).unwrap().max_window(), 1);
    }

    #[test]
    fn refuses_offsets_that_do_not_increase() {
        let mut w = Watermarks::new(4).unwrap();
        w.track(1, 5).unwrap();
        assert!(matches!(
            w.track(1, 5),
            Err(Error::OffsetNotIncreasing {
                partition: 1,
                offset: 5,
                last: 5
            })
        ));
        assert!(w.check_increasing(1, 4).is_err());
        assert!(w.check_increasing(1, 6).is_ok());
        assert!(w.check_increasing(2, 0).is_ok());
    }

    #[test]
    fn unknown_and_repeated_completions_change_nothing() {
        let mut w = Watermarks::new(4).unwrap();
        assert_eq!(w.complete(0, 3), None);
        w.track(0, 3).unwrap();
        w.track(0, 7).unwrap();
        assert_eq!(w.complete(0, 5), None);
        assert_eq!(w.complete(0, 7), None);
        assert_eq!(w.complete(0, 7), None);
        assert_eq!(w.window(0), 1);
        assert_eq!(w.complete(0, 3), Some(7));
        assert_eq!(w.window(0), 0);
        assert_eq!(w.all_committed(), vec![(0, 7)]);
        assert_eq!(w.remove(0), Some(7));
        assert_eq!(w.committed(0), None);
    }

    #[test]
    fn window_closes_the_partition_and_reopens_it() {
        let mut w = Watermarks::new(2).unwrap();
        for o in 0..4 {
            w.track(0, o).unwrap();
        }
        w.complete(0, 1);
        assert!(w.has_room(0));
        w.complete(0, 2);
        assert!(!w.has_room(0));
        assert!(w.has_room(1), "other partitions are not held back");
        w.complete(0, 0);
        assert!(w.has_room(0));
        assert_eq!(w.committed(0), Some(2));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Track { partition: u32, gap: u64 },
        Complete { partition: u32, pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..3, 1u64..4).prop_map(|(partition, gap)| Op::Track { partition, gap }),
            (0u32..3, any::<usize>())
                .prop_map(|(partition, pick)| Op::Complete { partition, pick }),
        ]
    }

    proptest! {
        /// The watermark never passes an unfinished offset, always equals the model's
        /// answer, and with admission gated by `has_room` the tracked entries of a
        /// partition stay below `max_window + in_flight`.
        #[test]
        fn watermark_never_passes_an_unfinished_offset(
            ops in proptest::collection::vec(op(), 1..400),
            max_window in 1usize..8,
            in_flight in 1usize..8,
        ) {
            let mut w = Watermarks::new(max_window).unwrap();
            // Model: per partition, every tracked offset and the set of unfinished ones.
            let mut tracked: [Vec<u64>; 3] = Default::default();
            let mut unfinished: [BTreeSet<u64>; 3] = Default::default();
            let mut next = [0u64; 3];
            for op in ops {
                match op {
                    Op::Track { partition, gap } => {
                        let p = partition as usize;
                        if !w.has_room(partition) || unfinished[p].len() >= in_flight {
                            continue;
                        }
                        next[p] += gap;
                        w.track(partition, next[p]).unwrap();
                        tracked[p].push(next[p]);
                        unfinished[p].insert(next[p]);
                    }
                    Op::Complete { partition, pick } => {
                        let p = partition as usize;
                        if unfinished[p].is_empty() {
                            continue;
                        }
                        let offset = *unfinished[p].iter().nth(pick % unfinished[p].len()).unwrap();
                        unfinished[p].remove(&offset);
                        w.complete(partition, offset);
                    }
                }
                for p in 0..3u32 {
                    let pi = p as usize;
                    let expected = tracked[pi]
                        .iter()
                        .take_while(|o| !unfinished[pi].contains(o))
                        .last()
                        .copied();
                    let got = w.committed(p);
                    if let (Some(c), Some(first_unfinished)) = (got, unfinished[pi].first()) {
                        prop_assert!(c < *first_unfinished, "watermark {c} passed unfinished {first_unfinished}");
                    }
                    prop_assert_eq!(got, expected);
                    prop_assert!(w.tracked(p) < max_window + in_flight);
                    prop_assert_eq!(w.tracked(p) - w.window(p), unfinished[pi].len());
                }
            }
        }
    }
}
