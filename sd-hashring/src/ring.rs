//! The consistent-hash ring: weighted virtual nodes in a sorted vector.

use std::collections::BTreeMap;
use std::fmt;
use std::iter::FusedIterator;

use crate::error::{Error, Result};
use crate::hash::{HashKind, Labels};
use crate::key::RingKey;
use crate::node::{Node, NodeId, check_node, sorted_members};
use crate::placement::Placement;

/// Points per unit of weight unless [`HashRingBuilder::vnodes`] says otherwise: 160, as in
/// libketama, for about 7.5 % relative standard deviation of load.
pub const DEFAULT_VNODES: u32 = 160;

/// The most points one ring may hold (2^24, about 200 MB of points and owners): enough
/// for 100 000 nodes of weight 1 at 160 vnodes.
pub const MAX_POINTS: u64 = 1 << 24;

/// Settings for a [`HashRing`]; start from [`HashRing::builder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRingBuilder {
    vnodes: u32,
    hash: HashKind,
}

impl Default for HashRingBuilder {
    fn default() -> Self {
        HashRingBuilder {
            vnodes: DEFAULT_VNODES,
            hash: HashKind::default(),
        }
    }
}

impl HashRingBuilder {
    /// Points per unit of weight (default [`DEFAULT_VNODES`]). More points even out the
    /// load (relative std-dev ≈ 1/√vnodes) at the cost of memory and build time. With
    /// [`HashKind::Ketama`](crate::HashKind) it must be a multiple of 4 (one MD5 digest
    /// makes 4 points); 160 gives libketama's continuum.
    pub fn vnodes(mut self, vnodes: u32) -> Self {
        self.vnodes = vnodes;
        self
    }

    /// How labels and keys are hashed (default [`HashKind::Crc32`]).
    pub fn hash(mut self, hash: HashKind) -> Self {
        self.hash = hash;
        self
    }

    /// Builds a ring over `nodes`, in any order.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `vnodes` out of range, [`Error::EmptyId`],
    /// [`Error::ZeroWeight`], [`Error::DuplicateNode`], or [`Error::TooManyPoints`].
    pub fn build(self, nodes: impl IntoIterator<Item = Node>) -> Result<HashRing> {
        self.validate()?;
        let nodes = sorted_members(nodes)?;
        HashRing::empty_with(self).rebuild(nodes)
    }

    fn validate(self) -> Result<()> {
        if self.vnodes == 0 {
            return Err(Error::config(
                "vnodes",
                "must be at least 1; 160 (the default) gives about 7.5 % load deviation",
            ));
        }
        #[cfg(feature = "ketama")]
        if self.hash == HashKind::Ketama && !self.vnodes.is_multiple_of(4) {
            return Err(Error::config(
                "vnodes",
                format!(
                    "ketama makes 4 points per MD5 digest, so use a multiple of 4 \
                     (160 for libketama), not {}",
                    self.vnodes
                ),
            ));
        }
        Ok(())
    }
}

/// One membership change; apply several at once with [`HashRing::apply`] or
/// [`HashRing::with_changes`], which rebuild the ring once per batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Adds a node; its id must not be in the ring yet.
    Add(Node),
    /// Removes the node with this id; it must be in the ring.
    Remove(NodeId),
    /// Gives the node with this id a new weight (at least 1).
    SetWeight(NodeId, u32),
}

impl Change {
    /// [`Change::Add`].
    pub fn add(node: Node) -> Self {
        Change::Add(node)
    }

    /// [`Change::Remove`].
    pub fn remove(id: impl Into<NodeId>) -> Self {
        Change::Remove(id.into())
    }

    /// [`Change::SetWeight`].
    pub fn set_weight(id: impl Into<NodeId>, weight: u32) -> Self {
        Change::SetWeight(id.into(), weight)
    }
}

/// A consistent-hash ring with weighted virtual nodes.
///
/// Each node of weight `w` owns `w × vnodes` points, the hashes of its labels
/// `"{id}-0"`, `"{id}-1"`, ... A key belongs to the node of the first point at or after
/// the key's position, wrapping past the top. Points live in one sorted vector, with a
/// small bucket index over their top bits, so a lookup hashes the key once, reads one
/// bucket and scans the two or so points in it, and never allocates.
///
/// The ring is an immutable value: membership changes build a new ring (once per batch)
/// and leave the old one intact, which is what [`diff`](crate::diff) and
/// [`SharedRing`](crate::SharedRing) need.
///
/// # Determinism
/// Nodes are kept sorted by id and points sorted by `(position, node)`, so the same
/// membership gives the same ring whatever the insertion order, on every platform and
/// release. When two nodes' points collide, both points stay; the node with the
/// smaller id owns the arc, and removing either never removes the other's point.
#[derive(Clone, PartialEq, Eq)]
pub struct HashRing {
    vnodes: u32,
    hash: HashKind,
    /// Members, sorted by id; `owners` index into it.
    nodes: Vec<Node>,
    /// Point positions, ascending.
    points: Vec<u64>,
    /// `owners[i]` is the index in `nodes` of the node that placed `points[i]`.
    owners: Vec<u32>,
    /// `buckets[b]` is the first point whose position is in bucket `b` or later; the
    /// last entry is `points.len()`.
    buckets: Vec<u32>,
    /// A position's bucket is `position >> shift`.
    shift: u32,
}

impl Default for HashRing {
    fn default() -> Self {
        HashRing::empty_with(HashRingBuilder::default())
    }
}

impl fmt::Debug for HashRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashRing")
            .field("hash", &self.hash)
            .field("vnodes", &self.vnodes)
            .field("nodes", &self.nodes)
            .field("points", &self.points.len())
            .finish()
    }
}

impl HashRing {
    /// A ring over `nodes` with the defaults: CRC32, 160 points per unit of weight.
    ///
    /// # Errors
    /// As [`HashRingBuilder::build`].
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Result<Self> {
        HashRingBuilder::default().build(nodes)
    }

    /// Starts a ring with non-default settings.
    pub fn builder() -> HashRingBuilder {
        HashRingBuilder::default()
    }

    fn empty_with(config: HashRingBuilder) -> Self {
        let (buckets, shift) = bucket_index(config.hash, &[]);
        HashRing {
            vnodes: config.vnodes,
            hash: config.hash,
            nodes: Vec::new(),
            points: Vec::new(),
            owners: Vec::new(),
            buckets,
            shift,
        }
    }

    /// The settings this ring was built with, to build an empty ring just like it.
    pub fn config(&self) -> HashRingBuilder {
        HashRingBuilder {
            vnodes: self.vnodes,
            hash: self.hash,
        }
    }

    /// Points per unit of weight.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// The hash that places labels and keys.
    pub fn hash_kind(&self) -> HashKind {
        self.hash
    }

    /// The members, sorted by id. Indices into this slice are the node indices used by
    /// [`HashRing::node_index`] and by the loads of [`HashRing::node_bounded`].
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the ring has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Number of points on the ring.
    pub fn point_count(&self) -> usize {
        self.points.len()
    }

    /// The points in ring order, as `(position, node)`.
    pub fn points(&self) -> impl ExactSizeIterator<Item = (u64, &Node)> + '_ {
        self.points
            .iter()
            .zip(&self.owners)
            .map(|(&p, &o)| (p, &self.nodes[o as usize]))
    }

    /// The index of the node with this id, if it is a member.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes
            .binary_search_by(|n| n.id().as_str().cmp(id))
            .ok()
    }

    /// Whether a node with this id is a member.
    pub fn contains(&self, id: &str) -> bool {
        self.index_of(id).is_some()
    }

    /// A key's position in hash space: what [`HashRing::node_at`] and
    /// [`MovePlan`](crate::MovePlan) ranges are expressed in.
    pub fn position(&self, key: impl RingKey) -> u64 {
        let hash = self.hash;
        key.with_key_bytes(|bytes| hash.position(bytes))
    }

    /// The node that owns `key`, or `None` when the ring is empty.
    pub fn node(&self, key: impl RingKey) -> Option<&Node> {
        self.node_at(self.position(key))
    }

    /// The index in [`HashRing::nodes`] of the node that owns `key`.
    pub fn node_index(&self, key: impl RingKey) -> Option<usize> {
        self.index_at(self.position(key))
    }

    /// The node that owns a position computed elsewhere: for instance a twemproxy key
    /// hash (`fnv1a_64`, `murmur`, ...) over a ketama continuum. Positions above the
    /// hash's range wrap to the first point, as in libketama.
    pub fn node_at(&self, position: u64) -> Option<&Node> {
        self.index_at(position).map(|i| &self.nodes[i])
    }

    fn index_at(&self, position: u64) -> Option<usize> {
        let at = self.point_at(position)?;
        Some(self.owners[at] as usize)
    }

    /// The index of the first point at or after `position`, wrapping; `None` when empty.
    pub(crate) fn point_at(&self, position: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let last_bucket = self.buckets.len() - 2;
        let bucket = (position.checked_shr(self.shift).unwrap_or(0) as usize).min(last_bucket);
        let lo = self.buckets[bucket] as usize;
        let hi = self.buckets[bucket + 1] as usize;
        // About two points per bucket: a short forward scan, whose length the branch
        // predictor mostly guesses, beats a binary search here.
        let at = lo
            + self.points[lo..hi]
                .iter()
                .take_while(|&&p| p < position)
                .count();
        Some(if at == self.points.len() { 0 } else { at })
    }

    /// Up to `n` distinct nodes for `key`, in ring order: the owner first, then the next
    /// distinct nodes clockwise (replica placement).
    ///
    /// The walk skips further points of nodes already yielded, stops as soon as it has
    /// `n` nodes or every node, and never clones the ring. It allocates nothing for
    /// `n <= 8`; above that, one bitset of `len() / 8` bytes.
    pub fn owners(&self, key: impl RingKey, n: usize) -> Owners<'_> {
        let position = self.position(key);
        self.owners_at(position, n)
    }

    /// [`HashRing::owners`] for a position computed elsewhere.
    pub fn owners_at(&self, position: u64, n: usize) -> Owners<'_> {
        Owners {
            ring: self,
            at: self.point_at(position).unwrap_or(0),
            steps: 0,
            wanted: n.min(self.nodes.len()),
            seen: Seen::default(),
        }
    }

    /// A new ring with `changes` applied, in order, in one rebuild. `self` is unchanged.
    ///
    /// # Errors
    /// [`Error::DuplicateNode`] for adding a member, [`Error::UnknownNode`] for removing
    /// or re-weighting a non-member, [`Error::ZeroWeight`], [`Error::EmptyId`],
    /// [`Error::TooManyPoints`]. On error no change is applied.
    pub fn with_changes(&self, changes: impl IntoIterator<Item = Change>) -> Result<HashRing> {
        let mut members: BTreeMap<NodeId, u32> = self
            .nodes
            .iter()
            .map(|n| (n.id().clone(), n.weight()))
            .collect();
        for change in changes {
            match change {
                Change::Add(node) => {
                    check_node(&node)?;
                    if members.contains_key(node.id()) {
                        return Err(Error::DuplicateNode {
                            id: node.id().to_string(),
                        });
                    }
                    members.insert(node.id().clone(), node.weight());
                }
                Change::Remove(id) => {
                    if members.remove(&id).is_none() {
                        return Err(Error::UnknownNode { id: id.to_string() });
                    }
                }
                Change::SetWeight(id, weight) => {
                    check_node(&Node::weighted(id.clone(), weight))?;
                    match members.get_mut(&id) {
                        Some(w) => *w = weight,
                        None => return Err(Error::UnknownNode { id: id.to_string() }),
                    }
                }
            }
        }
        let nodes = members
            .into_iter()
            .map(|(id, weight)| Node::weighted(id, weight))
            .collect();
        self.rebuild(nodes)
    }

    /// Applies `changes` in one rebuild; on error the ring is unchanged.
    ///
    /// # Errors
    /// As [`HashRing::with_changes`].
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> Result<()> {
        *self = self.with_changes(changes)?;
        Ok(())
    }

    /// Adds one node.
    ///
    /// # Errors
    /// As [`HashRing::with_changes`].
    pub fn add(&mut self, node: Node) -> Result<()> {
        self.apply([Change::Add(node)])
    }

    /// Removes one node.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] when no node has this id.
    pub fn remove(&mut self, id: &str) -> Result<()> {
        self.apply([Change::remove(id)])
    }

    /// Changes one node's weight.
    ///
    /// # Errors
    /// [`Error::UnknownNode`], [`Error::ZeroWeight`], [`Error::TooManyPoints`].
    pub fn set_weight(&mut self, id: &str, weight: u32) -> Result<()> {
        self.apply([Change::set_weight(id, weight)])
    }

    /// Builds the ring of the same settings over `nodes` (sorted by id, validated),
    /// reusing the points of nodes whose id and weight are unchanged.
    fn rebuild(&self, nodes: Vec<Node>) -> Result<HashRing> {
        let counts = point_counts(self.hash, self.vnodes, &nodes)?;
        let reusable = !is_ketama(self.hash) && !self.nodes.is_empty();
        let mut fresh = Vec::new();
        let mut kept = Vec::new();
        if reusable {
            let map = self.index_map(&nodes);
            kept.reserve(self.points.len());
            for (&p, &o) in self.points.iter().zip(&self.owners) {
                if let Some(new) = map[o as usize] {
                    kept.push((p, new));
                }
            }
            let reused: Vec<bool> = {
                let mut r = vec![false; nodes.len()];
                map.iter().flatten().for_each(|&i| r[i as usize] = true);
                r
            };
            for (i, node) in nodes.iter().enumerate() {
                if !reused[i] {
                    push_points(self.hash, node, counts[i], i as u32, &mut fresh);
                }
            }
        } else {
            fresh.reserve(counts.iter().sum::<u64>() as usize);
            for (i, node) in nodes.iter().enumerate() {
                push_points(self.hash, node, counts[i], i as u32, &mut fresh);
            }
        }
        fresh.sort_unstable();
        let entries = merge(kept, fresh);
        let (points, owners): (Vec<u64>, Vec<u32>) = entries.into_iter().unzip();
        let (buckets, shift) = bucket_index(self.hash, &points);
        Ok(HashRing {
            vnodes: self.vnodes,
            hash: self.hash,
            nodes,
            points,
            owners,
            buckets,
            shift,
        })
    }

    /// For each old node index, its index in `nodes` when its id and weight are
    /// unchanged. Both lists are sorted by id, so the map is increasing.
    fn index_map(&self, nodes: &[Node]) -> Vec<Option<u32>> {
        let mut map = vec![None; self.nodes.len()];
        let mut j = 0;
        for (i, old) in self.nodes.iter().enumerate() {
            while j < nodes.len() && nodes[j].id() < old.id() {
                j += 1;
            }
            if j < nodes.len() && nodes[j] == *old {
                map[i] = Some(j as u32);
            }
        }
        map
    }

    pub(crate) fn raw_points(&self) -> &[u64] {
        &self.points
    }

    pub(crate) fn raw_owners(&self) -> &[u32] {
        &self.owners
    }
}

/// Whether points depend on the whole membership (ketama scales them by weight share),
/// so that no node's points can be reused across a rebuild.
fn is_ketama(hash: HashKind) -> bool {
    #[cfg(feature = "ketama")]
    if hash == HashKind::Ketama {
        return true;
    }
    let _ = hash;
    false
}

/// Points per node, checked against [`MAX_POINTS`].
fn point_counts(hash: HashKind, vnodes: u32, nodes: &[Node]) -> Result<Vec<u64>> {
    let counts: Vec<u64> = match hash {
        #[cfg(feature = "ketama")]
        HashKind::Ketama => ketama_counts(vnodes, nodes),
        _ => nodes
            .iter()
            .map(|n| u64::from(vnodes) * u64::from(n.weight()))
            .collect(),
    };
    let total = counts.iter().fold(0u64, |sum, &c| sum.saturating_add(c));
    if total > MAX_POINTS || nodes.len() as u64 > MAX_POINTS {
        return Err(Error::TooManyPoints {
            points: total,
            max: MAX_POINTS,
        });
    }
    Ok(counts)
}

/// libketama's share: `floorf(pct * 40.0 * numservers)` digests of 4 points, where
/// `pct = (float) weight / (float) total`; the arithmetic follows C's promotions
/// (float share, double product, float floor) so the counts match bit for bit.
#[cfg(feature = "ketama")]
fn ketama_counts(vnodes: u32, nodes: &[Node]) -> Vec<u64> {
    let total: u64 = nodes.iter().map(|n| u64::from(n.weight())).sum();
    let servers = nodes.len() as f32;
    let digests_per_server = f64::from(vnodes / 4);
    nodes
        .iter()
        .map(|n| {
            let pct = n.weight() as f32 / total as f32;
            let digests = (f64::from(pct) * digests_per_server * f64::from(servers)) as f32;
            digests.floor() as u64 * 4
        })
        .collect()
}

/// Appends `count` points of `node` (index `owner`).
fn push_points(hash: HashKind, node: &Node, count: u64, owner: u32, out: &mut Vec<(u64, u32)>) {
    let mut labels = Labels::new(node.id());
    match hash {
        #[cfg(feature = "ketama")]
        HashKind::Ketama => {
            for d in 0..count / 4 {
                let digest = crate::hash::md5(labels.get(d));
                for word in digest.chunks_exact(4) {
                    let point = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                    out.push((u64::from(point), owner));
                }
            }
        }
        _ => {
            for i in 0..count {
                out.push((hash.position(labels.get(i)), owner));
            }
        }
    }
}

/// Merges two sorted entry lists.
fn merge(a: Vec<(u64, u32)>, b: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// A bucket index over the top bits of the positions: about two points per bucket, at
/// most 2^22 buckets.
fn bucket_index(hash: HashKind, points: &[u64]) -> (Vec<u32>, u32) {
    let len = points.len();
    let bits = if len < 4 {
        0
    } else {
        (len / 2).ilog2().min(22)
    };
    let shift = hash.bits() - bits;
    let count = 1usize << bits;
    let mut buckets = Vec::with_capacity(count + 1);
    let mut at = 0;
    for b in 0..count as u64 {
        let start = b.checked_shl(shift).unwrap_or(0);
        while at < len && points[at] < start {
            at += 1;
        }
        buckets.push(at as u32);
    }
    buckets.push(len as u32);
    (buckets, shift)
}

impl Placement for HashRing {
    fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    fn locate_bytes(&self, key: &[u8]) -> Option<usize> {
        self.index_at(self.hash.position(key))
    }
}

/// The distinct owners of a key, from [`HashRing::owners`].
#[derive(Debug, Clone)]
pub struct Owners<'a> {
    ring: &'a HashRing,
    at: usize,
    steps: usize,
    wanted: usize,
    seen: Seen,
}

impl<'a> Iterator for Owners<'a> {
    type Item = &'a Node;

    fn next(&mut self) -> Option<&'a Node> {
        let ring = self.ring;
        let len = ring.points.len();
        while self.wanted > 0 && self.steps < len {
            let owner = ring.owners[self.at];
            self.at = if self.at + 1 == len { 0 } else { self.at + 1 };
            self.steps += 1;
            if self.seen.insert(owner, ring.nodes.len()) {
                self.wanted -= 1;
                return Some(&ring.nodes[owner as usize]);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.wanted))
    }
}

impl FusedIterator for Owners<'_> {}

/// Node indices already yielded: inline for the first eight, then a bitset.
#[derive(Debug, Clone)]
enum Seen {
    Inline { items: [u32; 8], len: usize },
    Bits(Vec<u64>),
}

impl Default for Seen {
    fn default() -> Self {
        Seen::Inline {
            items: [0; 8],
            len: 0,
        }
    }
}

impl Seen {
    /// Records `owner`; false when it was already there.
    fn insert(&mut self, owner: u32, nodes: usize) -> bool {
        match self {
            Seen::Inline { items, len } => {
                if items[..*len].contains(&owner) {
                    return false;
                }
                if *len < items.len() {
                    items[*len] = owner;
                    *len += 1;
                    return true;
                }
                let mut bits = vec![0u64; nodes.div_ceil(64)];
                for &i in items.iter() {
                    bits[i as usize / 64] |= 1 << (i % 64);
                }
                *self = Seen::Bits(bits);
                self.insert(owner, nodes)
            }
            Seen::Bits(bits) => {
                let (word, bit) = (owner as usize / 64, 1u64 << (owner % 64));
                let fresh = bits[word] & bit == 0;
                bits[word] |= bit;
                fresh
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> HashRing {
        HashRing::new(ids.iter().map(|id| Node::new(*id))).unwrap()
    }

    #[test]
    fn lookup_matches_a_linear_scan() {
        let ring = ring(&["a", "b", "c", "d", "e"]);
        for k in 0..2000u32 {
            let pos = ring.position(k);
            let expected = ring
                .points()
                .find(|(p, _)| *p >= pos)
                .or_else(|| ring.points().next())
                .map(|(_, n)| n);
            assert_eq!(ring.node(k), expected, "key {k}");
        }
    }

    #[test]
    fn bucket_index_covers_edges() {
        let ring = ring(&["a"]);
        let first = ring.raw_points()[0];
        let last = *ring.raw_points().last().unwrap();
        assert_eq!(ring.point_at(0), Some(0));
        assert_eq!(ring.point_at(first), Some(0));
        assert_eq!(ring.point_at(last), Some(ring.point_count() - 1));
        assert_eq!(ring.point_at(last + 1), Some(0));
        assert_eq!(ring.point_at(u64::MAX), Some(0));
    }

    #[test]
    fn incremental_rebuild_equals_full_build() {
        let mut inc = ring(&["a", "b", "c"]);
        inc.apply([
            Change::add(Node::weighted("d", 2)),
            Change::remove("b"),
            Change::set_weight("a", 3),
        ])
        .unwrap();
        let full = HashRing::new([
            Node::weighted("a", 3),
            Node::new("c"),
            Node::weighted("d", 2),
        ])
        .unwrap();
        assert_eq!(inc, full);
    }

    #[test]
    fn owners_spill_past_eight() {
        let ids: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        let ring = HashRing::new(ids.iter().map(Node::new)).unwrap();
        let owners: Vec<_> = ring.owners("k", 50).map(|n| n.id().clone()).collect();
        assert_eq!(owners.len(), 20);
        let mut sorted = owners.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 20);
    }
}
