//! Move plans: which hash ranges change owner between two rings, and which a node owns.

use crate::error::{Error, Result};
use crate::hash::HashKind;
use crate::key::RingKey;
use crate::node::NodeId;
use crate::ring::HashRing;

/// An inclusive range of positions, `start..=end`, that never wraps.
///
/// A ring's arc that wraps past the top is reported as two ranges, one ending at the
/// hash's largest position and one starting at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRange {
    start: u64,
    end: u64,
}

impl KeyRange {
    /// The range `start..=end`, or `None` when `start > end`.
    pub fn new(start: u64, end: u64) -> Option<Self> {
        (start <= end).then_some(KeyRange { start, end })
    }

    /// First position in the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Last position in the range (inclusive).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether `position` lies in the range.
    pub fn contains(&self, position: u64) -> bool {
        self.start <= position && position <= self.end
    }

    /// Number of positions in the range (up to 2^64, hence `u128`).
    pub fn width(&self) -> u128 {
        u128::from(self.end - self.start) + 1
    }
}

/// One range of positions whose keys change owner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Move {
    /// Positions that move.
    pub range: KeyRange,
    /// Owner in the old ring.
    pub from: NodeId,
    /// Owner in the new ring.
    pub to: NodeId,
}

/// The ranges that change owner between two rings, from [`diff`].
///
/// To migrate, scan the keys each `from` node holds, and move those whose
/// [`position`](HashRing::position) falls in a range to that range's `to`:
/// [`MovePlan::destination`] answers for one key in `O(log moves)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovePlan {
    hash: HashKind,
    moves: Vec<Move>,
}

impl MovePlan {
    /// The moves, ordered by position, adjacent ranges of the same `(from, to)` merged.
    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    /// Whether no key changes owner.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// The move that covers `position`, if keys there change owner.
    pub fn move_at(&self, position: u64) -> Option<&Move> {
        let i = self.moves.partition_point(|m| m.range.end < position);
        self.moves.get(i).filter(|m| m.range.contains(position))
    }

    /// The move that covers `key`, if it changes owner.
    pub fn destination(&self, key: impl RingKey) -> Option<&Move> {
        let hash = self.hash;
        self.move_at(key.with_key_bytes(|b| hash.position(b)))
    }

    /// The moves whose keys leave `id`.
    pub fn moves_from<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Move> + 'a {
        self.moves.iter().filter(move |m| m.from.as_str() == id)
    }

    /// The share of hash space that changes owner, between 0 and 1: the expected
    /// fraction of (uniformly hashed) keys to move.
    pub fn moved_fraction(&self) -> f64 {
        let moved: u128 = self.moves.iter().map(|m| m.range.width()).sum();
        moved as f64 / (u128::from(self.hash.max_position()) + 1) as f64
    }
}

/// The ranges whose owner differs between `old` and `new`.
///
/// Positions are cut at every point of either ring; within a cut, both rings have a
/// single owner, found by the same lookup keys use. Runs `O((P + Q) log)` for rings of
/// `P` and `Q` points.
///
/// # Errors
/// [`Error::HashMismatch`] when the rings hash keys differently;
/// [`Error::EmptyRing`] when `new` is empty and `old` is not (keys would have nowhere to
/// go). An empty `old` holds no keys, so its plan is empty.
pub fn diff(old: &HashRing, new: &HashRing) -> Result<MovePlan> {
    if old.hash_kind() != new.hash_kind() {
        return Err(Error::HashMismatch {
            old: old.hash_kind(),
            new: new.hash_kind(),
        });
    }
    let hash = old.hash_kind();
    let mut moves: Vec<Move> = Vec::new();
    if old.is_empty() {
        return Ok(MovePlan { hash, moves });
    }
    if new.is_empty() {
        return Err(Error::EmptyRing);
    }
    let mut start = 0u64;
    for end in cuts(old.raw_points(), new.raw_points(), hash.max_position()) {
        let (from, to) = (owner_at(old, end), owner_at(new, end));
        if from != to {
            push_range(
                &mut moves,
                start,
                end,
                |m| m.from == *from && m.to == *to,
                || Move {
                    range: KeyRange { start, end },
                    from: from.clone(),
                    to: to.clone(),
                },
            );
        }
        start = end.wrapping_add(1);
    }
    Ok(MovePlan { hash, moves })
}

/// The ranges of positions that `id` owns in `ring`, ascending, adjacent ones merged.
///
/// # Errors
/// [`Error::UnknownNode`] when `id` is not a member.
pub fn ranges(ring: &HashRing, id: &str) -> Result<Vec<KeyRange>> {
    let Some(index) = ring.index_of(id) else {
        return Err(Error::UnknownNode { id: id.to_string() });
    };
    let mut out: Vec<KeyRange> = Vec::new();
    let mut start = 0u64;
    let max = ring.hash_kind().max_position();
    for end in cuts(ring.raw_points(), &[], max) {
        let at = ring.point_at(end).unwrap_or(0);
        if ring.raw_owners()[at] as usize == index {
            let range = KeyRange { start, end };
            match out.last_mut() {
                Some(last) if last.end.wrapping_add(1) == start => last.end = end,
                _ => out.push(range),
            }
        }
        start = end.wrapping_add(1);
    }
    Ok(out)
}

fn owner_at(ring: &HashRing, position: u64) -> &NodeId {
    let at = ring.point_at(position).unwrap_or(0);
    ring.nodes()[ring.raw_owners()[at] as usize].id()
}

/// Extends the last move when it is adjacent and `same`, otherwise pushes a new one.
fn push_range(
    moves: &mut Vec<Move>,
    start: u64,
    end: u64,
    same: impl Fn(&Move) -> bool,
    new: impl FnOnce() -> Move,
) {
    match moves.last_mut() {
        Some(last) if last.range.end.wrapping_add(1) == start && same(last) => last.range.end = end,
        _ => moves.push(new()),
    }
}

/// The distinct ends of the cuts: every point of `a` and `b`, then `max`, ascending.
fn cuts<'a>(a: &'a [u64], b: &'a [u64], max: u64) -> impl Iterator<Item = u64> + 'a {
    let (mut i, mut j) = (0, 0);
    let mut last: Option<u64> = None;
    std::iter::from_fn(move || {
        loop {
            let next = match (a.get(i), b.get(j)) {
                (Some(&x), Some(&y)) if x <= y => {
                    i += 1;
                    x
                }
                (_, Some(&y)) => {
                    j += 1;
                    y
                }
                (Some(&x), None) => {
                    i += 1;
                    x
                }
                (None, None) => {
                    if last.is_some_and(|l| l >= max) {
                        return None;
                    }
                    max
                }
            };
            if last != Some(next) {
                last = Some(next);
                return Some(next);
            }
        }
    })
}

impl HashRing {
    /// [`diff`] from this ring to `new`.
    ///
    /// # Errors
    /// As [`diff`].
    pub fn diff(&self, new: &HashRing) -> Result<MovePlan> {
        diff(self, new)
    }

    /// [`ranges`] of node `id` in this ring.
    ///
    /// # Errors
    /// As [`ranges`].
    pub fn ranges(&self, id: &str) -> Result<Vec<KeyRange>> {
        ranges(self, id)
    }
}
