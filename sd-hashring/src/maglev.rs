//! Maglev hashing (Eisenbud et al., NSDI 2016): a prime-sized lookup table.

use crate::error::{Error, Result};
use crate::hash::{xxh3, xxh3_seeded};
use crate::node::{Node, sorted_members};
use crate::placement::Placement;

/// Maglev hashing: each node fills table slots along its own permutation of a prime
/// table, in turns, until the table is full; a key reads one slot. Keep the table size
/// fixed across membership changes (see [`Maglev::new`]).
///
/// Lookups are `O(1)` (one hash, one load), the best of the placements here, and the
/// balance is within about 1 % when the table has more than 100 slots per node. The
/// price is disruption: removing one of `n` nodes moves somewhat more than `1/n` of the
/// keys (about 1.5 % instead of 1 % at 100 nodes), and a rebuild costs `O(M log M)`.
/// It fits load balancers that need fast lookups and tolerate a few extra moves.
/// Weighted nodes take `weight` slots per turn. Nodes are kept sorted by id, so any
/// insertion order gives the same table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Maglev {
    nodes: Vec<Node>,
    table: Vec<u32>,
}

const EMPTY: u32 = u32::MAX;
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

impl Maglev {
    /// The table [`Maglev::new`] uses: 65 537 slots, as in the paper.
    pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
    /// The largest table allowed (2^24 slots, 64 MiB).
    pub const MAX_TABLE_SIZE: u32 = 1 << 24;

    /// Maglev over `nodes` with the paper's table of [`Maglev::DEFAULT_TABLE_SIZE`]
    /// (65 537) slots: within about 1 % balance up to 655 units of weight.
    ///
    /// The table size must stay the same across membership changes: keys are placed by
    /// `hash % size`, so a new size moves nearly every key. For larger fleets pick one
    /// size for the largest fleet you expect (a prime above 100 × total weight, such as
    /// 655 373) and pass it to [`Maglev::with_table_size`] every time.
    ///
    /// # Errors
    /// [`Error::EmptyId`], [`Error::ZeroWeight`], [`Error::DuplicateNode`], and
    /// [`Error::InvalidConfig`] (field `nodes`) when the total weight exceeds the table.
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Result<Self> {
        let nodes = sorted_members(nodes)?;
        if total_weight(&nodes) > u64::from(Self::DEFAULT_TABLE_SIZE) {
            return Err(Error::config(
                "nodes",
                format!(
                    "a total weight of {} does not fit the default table of {} slots; \
                     use `with_table_size` with a prime above 100 x the total weight",
                    total_weight(&nodes),
                    Self::DEFAULT_TABLE_SIZE
                ),
            ));
        }
        Ok(Self::populate(nodes, Self::DEFAULT_TABLE_SIZE))
    }

    /// Maglev over `nodes` with a table of exactly `size` slots.
    ///
    /// # Errors
    /// As [`Maglev::new`], and [`Error::InvalidConfig`] (field `table_size`) unless
    /// `size` is a prime between the total weight and [`Maglev::MAX_TABLE_SIZE`].
    pub fn with_table_size(nodes: impl IntoIterator<Item = Node>, size: u32) -> Result<Self> {
        let nodes = sorted_members(nodes)?;
        if !is_prime(u64::from(size)) || size > Self::MAX_TABLE_SIZE {
            return Err(Error::config(
                "table_size",
                format!("must be a prime no larger than 2^24 (65537 is usual), not {size}"),
            ));
        }
        if u64::from(size) < total_weight(&nodes) {
            return Err(Error::config(
                "table_size",
                format!(
                    "{size} slots cannot hold a total weight of {}; use about 100 slots per unit",
                    total_weight(&nodes)
                ),
            ));
        }
        Ok(Self::populate(nodes, size))
    }

    fn populate(nodes: Vec<Node>, size: u32) -> Self {
        if nodes.is_empty() {
            return Maglev {
                nodes,
                table: Vec::new(),
            };
        }
        let m = u64::from(size);
        let mut cursor: Vec<u64> = Vec::with_capacity(nodes.len());
        let mut skip: Vec<u64> = Vec::with_capacity(nodes.len());
        for node in &nodes {
            cursor.push(xxh3_seeded(node.id().as_bytes(), OFFSET_SEED) % m);
            skip.push(xxh3_seeded(node.id().as_bytes(), SKIP_SEED) % (m - 1) + 1);
        }
        let mut table = vec![EMPTY; size as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (i, node) in nodes.iter().enumerate() {
                for _ in 0..node.weight() {
                    // Each node's sequence is a permutation of 0..m (m prime, skip in
                    // 1..m), so a free slot is always found while the table is not full.
                    while table[cursor[i] as usize] != EMPTY {
                        cursor[i] = (cursor[i] + skip[i]) % m;
                    }
                    table[cursor[i] as usize] = i as u32;
                    cursor[i] = (cursor[i] + skip[i]) % m;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { nodes, table }
    }

    /// The nodes, sorted by id.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Slots in the table (0 when there is no node).
    pub fn table_size(&self) -> usize {
        self.table.len()
    }
}

impl Placement for Maglev {
    fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    fn locate_bytes(&self, key: &[u8]) -> Option<usize> {
        let len = self.table.len() as u64;
        if len == 0 {
            return None;
        }
        Some(self.table[(xxh3(key) % len) as usize] as usize)
    }
}

fn total_weight(nodes: &[Node]) -> u64 {
    nodes.iter().map(|n| u64::from(n.weight())).sum()
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(65_537));
        assert!(!is_prime(65_535));
        assert!(is_prime(655_373));
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let nodes: Vec<Node> = (0..10).map(|i| Node::new(format!("n{i}"))).collect();
        let maglev = Maglev::new(nodes).unwrap();
        assert_eq!(maglev.table_size(), 65_537);
        let mut counts = [0usize; 10];
        for &slot in &maglev.table {
            counts[slot as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "{counts:?}");
    }
}
