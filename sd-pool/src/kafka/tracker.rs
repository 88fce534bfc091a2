//! What the poll thread knows about each assigned partition, pure and synchronous: which
//! offsets are in flight and done, which records wait for room, what to commit.
//!
//! The consumer drives it: [`Tracker::offer`] for each record polled,
//! [`Tracker::dispatched`] once the pool took one, [`Tracker::finished`] for each job's
//! report, [`Tracker::commits`] on the interval. Each assignment of a partition gets a new
//! slot, so a job of an earlier assignment that reports late changes nothing.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::skipset;
use crate::fasthash::FastMap;
use crate::watermark::Watermarks;

/// A topic and a partition.
pub(crate) type Tp = (Arc<str>, i32);

/// A held record to dispatch again: its partition, offset, the record, its slot and its
/// revoked flag.
pub(crate) type Held<R> = (Tp, i64, R, u32, RevokedFlag);

/// What to do with an offered record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offer<R> {
    /// Submit it to the pool, then call [`Tracker::dispatched`] (or [`Tracker::hold`]
    /// when the pool is full). The slot and the flag that tells its job the partition
    /// was revoked go with it.
    Dispatch {
        slot: u32,
        revoked: RevokedFlag,
        record: R,
    },
    /// Its offset is listed as done in the commit metadata: nothing to run.
    Skipped,
    /// Kept until the partition has room; pause the partition if `pause`.
    Held { pause: bool },
    /// Not ours (a partition no longer assigned) or not above the offsets seen: dropped.
    Ignored,
}

/// Set when a partition is revoked or the consumer stops; a job that has not started
/// by then does not run.
#[derive(Debug, Clone, Default)]
pub(crate) struct RevokedFlag(Arc<AtomicBool>);

impl PartialEq for RevokedFlag {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for RevokedFlag {}

impl RevokedFlag {
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One commit to send: the next offset to read and the metadata listing the offsets
/// done above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Commit {
    pub(crate) tp: Tp,
    pub(crate) next: i64,
    pub(crate) metadata: String,
}

impl<R> Part<R> {
    /// Marks the partition paused when it holds `limit` records and was not paused;
    /// true when it must be paused now.
    fn must_pause(&mut self, limit: usize) -> bool {
        if self.paused || self.held.len() < limit {
            return false;
        }
        self.paused = true;
        true
    }
}

struct Part<R> {
    slot: u32,
    revoked: RevokedFlag,
    /// Jobs submitted whose report has not come back.
    outstanding: usize,
    /// Records waiting for room, in offset order.
    held: VecDeque<(i64, R)>,
    paused: bool,
    /// Revoked or stopping: nothing more is dispatched.
    stopped: bool,
    /// Offsets the commit metadata listed as done, not yet polled.
    skip: BTreeSet<i64>,
    /// What the group holds for this partition, as far as this member knows.
    committed: Option<Commit>,
    /// The offset after the last record polled (dispatched, skipped or held).
    next: Option<i64>,
}

/// Every partition this member owns.
pub(crate) struct Tracker<R> {
    parts: FastMap<Tp, Part<R>>,
    slots: FastMap<u32, Tp>,
    marks: Watermarks,
    next_slot: u32,
    metadata_limit: usize,
    /// Records a partition may hold (fetched, waiting for the pool) before it is paused.
    hold_limit: usize,
}

impl<R> Tracker<R> {
    /// No partition yet; each takes no more records once `max_window` completed offsets
    /// wait behind an unfinished one, and is paused once it holds `max_held` records the
    /// pool had no room for. Commit metadata stays within `metadata_limit` bytes (0 turns
    /// it off).
    pub(crate) fn new(
        max_window: usize,
        max_held: usize,
        metadata_limit: usize,
    ) -> crate::Result<Self> {
        Ok(Self {
            parts: FastMap::default(),
            slots: FastMap::default(),
            marks: Watermarks::new(max_window)?,
            next_slot: 0,
            metadata_limit,
            hold_limit: max_held,
        })
    }

    /// Takes `tp` on; `committed` is the group's offset for it (the next to read) with
    /// its metadata, whose listed offsets are skipped when polled.
    pub(crate) fn assign(&mut self, tp: Tp, committed: Option<(i64, &str)>) {
        self.revoke(Some(std::slice::from_ref(&tp)));
        let slot = self.next_slot;
        self.next_slot = self.next_slot.wrapping_add(1);
        let skip = committed.map_or_else(BTreeSet::new, |(next, metadata)| {
            skipset::decode(next, metadata)
        });
        self.slots.insert(slot, tp.clone());
        self.parts.insert(
            tp,
            Part {
                slot,
                revoked: RevokedFlag::default(),
                outstanding: 0,
                held: VecDeque::new(),
                paused: false,
                stopped: false,
                skip,
                committed: None,
                next: None,
            },
        );
    }

    /// Stops dispatching `tp` (or every partition): drops its held records and takes no
    /// more; the jobs already in the pool still run and report. Returns how many of the
    /// partitions it owns.
    pub(crate) fn stop(&mut self, tps: Option<&[Tp]>) -> usize {
        let mut owned = 0;
        for (tp, part) in &mut self.parts {
            if tps.is_none_or(|tps| tps.contains(tp)) {
                part.stopped = true;
                part.held.clear();
                owned += 1;
            }
        }
        owned
    }

    /// After [`stop`](Self::stop) and the drain: tells the jobs of `tp` (or of every
    /// partition) that have not started not to run. The partitions stay tracked (their
    /// jobs still report) until [`forget`](Self::forget).
    pub(crate) fn revoke(&mut self, tps: Option<&[Tp]>) {
        for (tp, part) in &mut self.parts {
            if tps.is_none_or(|tps| tps.contains(tp)) {
                part.stopped = true;
                part.held.clear();
                part.revoked.set();
            }
        }
    }

    /// Forgets `tp` after its last commit.
    pub(crate) fn forget(&mut self, tp: &Tp) {
        if let Some(part) = self.parts.remove(tp) {
            self.slots.remove(&part.slot);
            self.marks.remove(part.slot);
        }
    }

    /// The partitions owned.
    pub(crate) fn assigned(&self) -> impl Iterator<Item = &Tp> {
        self.parts.keys()
    }

    /// Jobs of `tp` (or of every partition) whose report has not come back.
    pub(crate) fn outstanding(&self, tp: Option<&Tp>) -> usize {
        match tp {
            Some(tp) => self.parts.get(tp).map_or(0, |p| p.outstanding),
            None => self.parts.values().map(|p| p.outstanding).sum(),
        }
    }

    /// Decides what happens to a polled record.
    pub(crate) fn offer(&mut self, tp: &Tp, offset: i64, record: R) -> Offer<R> {
        let Some(part) = self.parts.get_mut(tp) else {
            return Offer::Ignored;
        };
        if part.stopped || offset < 0 {
            return Offer::Ignored;
        }
        let Ok(position) = u64::try_from(offset) else {
            return Offer::Ignored;
        };
        if part.next.is_some_and(|next| offset < next) {
            return Offer::Ignored;
        }
        part.next = offset.checked_add(1);
        if !part.held.is_empty() {
            if part.held.back().is_some_and(|(last, _)| *last >= offset) {
                return Offer::Ignored;
            }
            part.held.push_back((offset, record));
            let pause = part.must_pause(self.hold_limit);
            return Offer::Held { pause };
        }
        if self.marks.check_increasing(part.slot, position).is_err() {
            return Offer::Ignored;
        }
        if part.skip.remove(&offset) {
            // Tracked and done at once, so the watermark passes it.
            let _ = self.marks.track(part.slot, position);
            self.marks.complete(part.slot, position);
            return Offer::Skipped;
        }
        if !self.marks.has_room(part.slot) {
            // The head is stuck: fetching more only fills memory.
            part.held.push_back((offset, record));
            let pause = !part.paused;
            part.paused = true;
            return Offer::Held { pause };
        }
        Offer::Dispatch {
            slot: part.slot,
            revoked: part.revoked.clone(),
            record,
        }
    }

    /// The pool took the record at `offset` of `tp`.
    pub(crate) fn dispatched(&mut self, tp: &Tp, offset: i64) {
        if let Some(part) = self.parts.get_mut(tp)
            && let Ok(position) = u64::try_from(offset)
            && self.marks.track(part.slot, position).is_ok()
        {
            part.outstanding += 1;
        }
    }

    /// The pool was full: keeps the record first in line. Returns true when the
    /// partition must be paused now (it holds `hold_limit` records).
    pub(crate) fn hold(&mut self, tp: &Tp, offset: i64, record: R) -> bool {
        let Some(part) = self.parts.get_mut(tp) else {
            return false;
        };
        if part.stopped {
            return false;
        }
        part.held.push_front((offset, record));
        part.must_pause(self.hold_limit)
    }

    /// A job reported: `done` when its offset may be committed (handled, dead-lettered or
    /// given up), false when it did not run to an end (revoked, stopped) and must be
    /// delivered again. A report of a forgotten assignment changes nothing.
    pub(crate) fn finished(&mut self, slot: u32, offset: i64, done: bool) {
        let Some(part) = self.slots.get(&slot).and_then(|tp| self.parts.get_mut(tp)) else {
            return;
        };
        part.outstanding = part.outstanding.saturating_sub(1);
        if done && let Ok(position) = u64::try_from(offset) {
            self.marks.complete(slot, position);
        }
    }

    /// The next held record of a partition that has room, to dispatch again.
    pub(crate) fn take_held(&mut self) -> Option<Held<R>> {
        let marks = &self.marks;
        let (tp, part) = self
            .parts
            .iter_mut()
            .find(|(_, p)| !p.held.is_empty() && marks.has_room(p.slot))?;
        let (offset, record) = part.held.pop_front()?;
        Some((tp.clone(), offset, record, part.slot, part.revoked.clone()))
    }

    /// Paused partitions that have room again (their window is open and they hold at
    /// most half of `hold_limit`): resume them (they are marked resumed).
    pub(crate) fn take_resumable(&mut self) -> Vec<Tp> {
        let mut resume = Vec::new();
        for (tp, part) in &mut self.parts {
            if part.paused
                && part.held.len() <= self.hold_limit / 2
                && self.marks.has_room(part.slot)
                && !part.stopped
            {
                part.paused = false;
                resume.push(tp.clone());
            }
        }
        resume
    }

    /// Whether any partition holds records.
    pub(crate) fn holding(&self) -> bool {
        self.parts.values().any(|p| !p.held.is_empty())
    }

    /// The commits that would move the group's offsets (of `only`, or of every
    /// partition): the watermark + 1 with the offsets done above it as metadata.
    pub(crate) fn commits(&self, only: Option<&[Tp]>) -> Vec<Commit> {
        let mut out = Vec::new();
        for (tp, part) in &self.parts {
            if only.is_some_and(|only| !only.contains(tp)) {
                continue;
            }
            let Some(mark) = self.marks.committed(part.slot) else {
                continue;
            };
            let Some(next) = i64::try_from(mark).ok().and_then(|m| m.checked_add(1)) else {
                continue;
            };
            let done = self
                .marks
                .completed_above(part.slot)
                .filter_map(|o| i64::try_from(o).ok())
                .chain(part.skip.iter().copied())
                .collect::<BTreeSet<_>>();
            let metadata = if self.metadata_limit == 0 {
                String::new()
            } else {
                skipset::encode(next, done, self.metadata_limit)
            };
            let commit = Commit {
                tp: tp.clone(),
                next,
                metadata,
            };
            if part.committed.as_ref() != Some(&commit) {
                out.push(commit);
            }
        }
        out.sort_by(|a, b| a.tp.cmp(&b.tp));
        out
    }

    /// The group now holds `commit` (or, after a failed commit, may not: `None` makes the
    /// next [`commits`](Self::commits) send it again).
    pub(crate) fn committed(&mut self, tp: &Tp, commit: Option<Commit>) {
        if let Some(part) = self.parts.get_mut(tp) {
            part.committed = commit;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tp(p: i32) -> Tp {
        (Arc::from("t"), p)
    }

    fn slot_of<R: std::fmt::Debug>(offer: Offer<R>) -> u32 {
        match offer {
            Offer::Dispatch { slot, .. } => slot,
            other => panic!("expected a dispatch, got {other:?}"),
        }
    }

    #[test]
    fn commits_the_watermark_plus_one_with_what_is_done_above() {
        let mut t = Tracker::new(16, 16, 4096).unwrap();
        t.assign(tp(0), None);
        let mut slot = 0;
        for o in 10..14 {
            slot = slot_of(t.offer(&tp(0), o, ()));
            t.dispatched(&tp(0), o);
        }
        assert!(t.commits(None).is_empty(), "nothing done yet");
        t.finished(slot, 12, true);
        t.finished(slot, 10, true);
        let c = t.commits(None);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].next, c[0].metadata.as_str()), (11, "sd1:1"));
        t.committed(&tp(0), Some(c[0].clone()));
        assert!(t.commits(None).is_empty(), "already committed");
        t.finished(slot, 11, false);
        assert!(
            t.commits(None).is_empty(),
            "an abandoned offset holds the mark"
        );
        assert_eq!(t.outstanding(None), 1);
    }

    #[test]
    fn a_full_window_holds_and_pauses_then_resumes() {
        let mut t = Tracker::new(2, 2, 4096).unwrap();
        t.assign(tp(1), None);
        let slot = slot_of(t.offer(&tp(1), 0, "a"));
        t.dispatched(&tp(1), 0);
        for o in 1..3 {
            t.offer(&tp(1), o, "b");
            t.dispatched(&tp(1), o);
            t.finished(slot, o, true);
        }
        assert_eq!(t.offer(&tp(1), 3, "c"), Offer::Held { pause: true });
        assert_eq!(t.offer(&tp(1), 4, "d"), Offer::Held { pause: false });
        assert_eq!(t.offer(&tp(1), 4, "dup"), Offer::Ignored);
        assert!(t.take_held().is_none(), "no room yet");
        assert!(t.take_resumable().is_empty());
        t.finished(slot, 0, true);
        assert_eq!(t.take_held().map(|h| h.1), Some(3));
        t.dispatched(&tp(1), 3);
        assert_eq!(t.take_held().map(|h| h.1), Some(4));
        t.dispatched(&tp(1), 4);
        assert_eq!(t.take_resumable(), vec![tp(1)]);
        assert_eq!(t.commits(None)[0].next, 3);
    }

    #[test]
    fn the_pool_refusing_keeps_the_record_first() {
        let mut t = Tracker::new(8, 8, 4096).unwrap();
        t.assign(tp(0), None);
        t.offer(&tp(0), 5, "five");
        assert!(!t.hold(&tp(0), 5, "five"), "one record held: no pause yet");
        for o in 6..12 {
            assert_eq!(t.offer(&tp(0), o, "more"), Offer::Held { pause: false });
        }
        assert_eq!(t.offer(&tp(0), 12, "8th"), Offer::Held { pause: true });
        assert_eq!(t.offer(&tp(0), 13, "9th"), Offer::Held { pause: false });
        assert!(t.take_resumable().is_empty(), "9 held");
        for _ in 0..5 {
            let (tp, o, ..) = t.take_held().unwrap();
            t.dispatched(&tp, o);
        }
        assert_eq!(t.take_resumable(), vec![tp(0)], "4 held: half the limit");
        let mut t = Tracker::new(8, 8, 4096).unwrap();
        t.assign(tp(0), None);
        t.hold(&tp(0), 5, "five");
        t.offer(&tp(0), 6, "six");
        assert_eq!(t.take_held().map(|h| h.2), Some("five"));
        t.dispatched(&tp(0), 5);
        assert_eq!(t.take_held().map(|h| h.2), Some("six"));
    }

    #[test]
    fn listed_offsets_are_skipped_and_kept_in_the_next_metadata() {
        let mut t = Tracker::new(8, 8, 4096).unwrap();
        t.assign(tp(0), Some((100, "sd1:2,4")));
        let slot = slot_of(t.offer(&tp(0), 100, ()));
        t.dispatched(&tp(0), 100);
        let c = t.commits(None);
        assert!(c.is_empty(), "100 not done: {c:?}");
        t.finished(slot, 100, true);
        // 101 not polled yet: the commit is 101 and still lists 102 and 104.
        assert_eq!(t.commits(None)[0].metadata, "sd1:1,3");
        t.offer(&tp(0), 101, ());
        t.dispatched(&tp(0), 101);
        assert_eq!(t.offer(&tp(0), 102, ()), Offer::Skipped);
        t.finished(slot, 101, true);
        assert_eq!(t.commits(None)[0].next, 103);
        assert_eq!(t.commits(None)[0].metadata, "sd1:1");
    }

    #[test]
    fn empty_metadata_falls_back_to_the_watermark() {
        let mut t = Tracker::new(8, 8, 4096).unwrap();
        t.assign(tp(0), Some((100, "")));
        assert!(matches!(t.offer(&tp(0), 101, ()), Offer::Dispatch { .. }));
    }

    #[test]
    fn a_revoked_partition_drops_what_it_held_and_ignores_late_reports() {
        let mut t = Tracker::new(1, 1, 4096).unwrap();
        t.assign(tp(0), None);
        let Offer::Dispatch { slot, revoked, .. } = t.offer(&tp(0), 0, ()) else {
            panic!()
        };
        t.dispatched(&tp(0), 0);
        t.offer(&tp(0), 1, ());
        t.dispatched(&tp(0), 1);
        t.finished(slot, 1, true);
        assert!(matches!(t.offer(&tp(0), 2, ()), Offer::Held { .. }));
        t.stop(Some(&[tp(0)]));
        assert!(!revoked.is_set(), "stopped: the jobs in the pool still run");
        t.revoke(Some(&[tp(0)]));
        assert!(revoked.is_set());
        assert!(!t.holding());
        assert_eq!(t.offer(&tp(0), 3, ()), Offer::Ignored);
        t.forget(&tp(0));
        t.assign(tp(0), Some((0, "")));
        t.finished(slot, 0, true);
        assert!(
            t.commits(None).is_empty(),
            "the old slot's report is ignored"
        );
        assert_eq!(t.offer(&tp(7), 0, ()), Offer::Ignored, "not assigned");
    }

    proptest! {
        /// Whatever order jobs finish in, a commit never passes an offset that is not
        /// done, and the metadata lists only done offsets.
        #[test]
        fn commits_never_pass_an_unfinished_offset(
            gaps in proptest::collection::vec(1i64..4, 1..60),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..80),
            abandon in proptest::collection::vec(any::<bool>(), 60),
        ) {
            let mut t = Tracker::new(1_000, 1_000, 4096).unwrap();
            t.assign(tp(0), None);
            let mut offsets = Vec::new();
            let mut at = 0;
            let mut slot = 0;
            for gap in gaps {
                at += gap;
                slot = slot_of(t.offer(&tp(0), at, ()));
                t.dispatched(&tp(0), at);
                offsets.push(at);
            }
            let mut done = BTreeSet::new();
            let mut open = offsets.clone();
            for (i, pick) in order.into_iter().enumerate() {
                if open.is_empty() {
                    break;
                }
                let o = open.remove(pick.index(open.len()));
                let ok = !abandon[i % abandon.len()];
                t.finished(slot, o, ok);
                if ok {
                    done.insert(o);
                }
                for c in t.commits(None) {
                    prop_assert!(offsets.iter().filter(|o| **o < c.next).all(|o| done.contains(o)));
                    for listed in skipset::decode(c.next, &c.metadata) {
                        prop_assert!(done.contains(&listed));
                    }
                }
            }
        }
    }
}
