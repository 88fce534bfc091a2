//! Jump consistent hash (Lamping & Veach, 2014): numbered shards, no memory.

use crate::error::{Error, Result};
use crate::hash::xxh3;
use crate::node::{Node, check_node, ordered_members};
use crate::placement::Placement;

/// Jump consistent hash over numbered shards: node `i` of the list is bucket `i`.
///
/// Lookups take `O(ln n)` steps and no memory beyond the node list, and the balance is
/// near perfect. The limit is the numbering: shards can only be added or removed at
/// the end ([`Jump::push`], [`Jump::pop`]), so it suits storage shards `0..n`, not a
/// peer set where any member may leave. Every shard has the same share, so weights
/// other than 1 are rejected. Keys are hashed with XXH3-64 (seed 0) first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Jump {
    nodes: Vec<Node>,
}

impl Jump {
    /// Jump hash over `nodes`, in this order (bucket `i` is `nodes[i]`).
    ///
    /// # Errors
    /// [`Error::EmptyId`], [`Error::ZeroWeight`], [`Error::DuplicateNode`], and
    /// [`Error::InvalidConfig`] (field `weight`) for a weight other than 1.
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Result<Self> {
        let nodes = ordered_members(nodes)?;
        nodes.iter().try_for_each(check_unweighted)?;
        if nodes.len() > i32::MAX as usize {
            return Err(Error::config(
                "nodes",
                "jump hash numbers at most 2^31 - 1 buckets",
            ));
        }
        Ok(Jump { nodes })
    }

    /// Appends a shard as the last bucket: about `1/(n+1)` of the keys move to it.
    ///
    /// # Errors
    /// As [`Jump::new`].
    pub fn push(&mut self, node: Node) -> Result<()> {
        check_node(&node)?;
        check_unweighted(&node)?;
        if self.nodes.iter().any(|n| n.id() == node.id()) {
            return Err(Error::DuplicateNode {
                id: node.id().to_string(),
            });
        }
        self.nodes.push(node);
        Ok(())
    }

    /// Removes the last shard; only its keys move.
    pub fn pop(&mut self) -> Option<Node> {
        self.nodes.pop()
    }

    /// The nodes, bucket order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
}

fn check_unweighted(node: &Node) -> Result<()> {
    if node.weight() == 1 {
        return Ok(());
    }
    Err(Error::config(
        "weight",
        format!(
            "jump hash gives every shard the same share; node `{}` has weight {}: use 1, \
             or the ring or rendezvous for weighted nodes",
            node.id(),
            node.weight()
        ),
    ))
}

/// The bucket in `0..buckets` for a 64-bit key, as in the paper; `None` when
/// `buckets` is 0.
pub fn jump_hash(mut key: u64, buckets: u32) -> Option<u32> {
    if buckets == 0 {
        return None;
    }
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1i64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    Some(b as u32)
}

impl Placement for Jump {
    fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    fn locate_bytes(&self, key: &[u8]) -> Option<usize> {
        let buckets = u32::try_from(self.nodes.len()).ok()?;
        jump_hash(xxh3(key), buckets).map(|b| b as usize)
    }
}
