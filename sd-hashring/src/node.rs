//! Nodes: an id and a weight.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A node's id: any non-empty UTF-8 string, such as `10.0.0.1:6379` or `cache-7`.
///
/// Ids may hold any character, `-`, `:`, NUL and newlines included; labels stay
/// unambiguous because the vnode number comes last. Clones share one allocation, so
/// move plans and snapshots copy ids cheaply.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Wraps an id. Emptiness is checked when a placement is built.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        NodeId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for NodeId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for NodeId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        NodeId(id.into())
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        NodeId(id.into())
    }
}

impl From<&String> for NodeId {
    fn from(id: &String) -> Self {
        NodeId(id.as_str().into())
    }
}

impl From<Arc<str>> for NodeId {
    fn from(id: Arc<str>) -> Self {
        NodeId(id)
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// A member of a placement: an id and a weight.
///
/// A node of weight `w` gets `w` times the share of a node of weight 1 (on the ring:
/// `w × vnodes` points). Weight 0 is rejected when the placement is built; remove the
/// node instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    id: NodeId,
    weight: u32,
}

impl Node {
    /// A node of weight 1.
    pub fn new(id: impl Into<NodeId>) -> Self {
        Node::weighted(id, 1)
    }

    /// A node of weight `weight`.
    pub fn weighted(id: impl Into<NodeId>, weight: u32) -> Self {
        Node {
            id: id.into(),
            weight,
        }
    }

    /// The node's id.
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// The node's weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }
}

/// Checks one node on its own: non-empty id, weight at least 1.
pub(crate) fn check_node(node: &Node) -> Result<()> {
    if node.id.is_empty() {
        return Err(Error::EmptyId);
    }
    if node.weight == 0 {
        return Err(Error::ZeroWeight {
            id: node.id.to_string(),
        });
    }
    Ok(())
}

/// Validates a membership and returns it sorted by id, so that every insertion order
/// gives the same placement.
pub(crate) fn sorted_members(nodes: impl IntoIterator<Item = Node>) -> Result<Vec<Node>> {
    let mut nodes: Vec<Node> = nodes.into_iter().collect();
    nodes.iter().try_for_each(check_node)?;
    nodes.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    check_unique(&nodes)?;
    Ok(nodes)
}

/// Rejects a duplicate id in a list sorted by id.
fn check_unique(sorted: &[Node]) -> Result<()> {
    match sorted.windows(2).find(|pair| pair[0].id == pair[1].id) {
        Some(pair) => Err(Error::DuplicateNode {
            id: pair[0].id.to_string(),
        }),
        None => Ok(()),
    }
}

/// Validates a membership whose order is meaningful (jump hash buckets): same checks,
/// order kept.
pub(crate) fn ordered_members(nodes: impl IntoIterator<Item = Node>) -> Result<Vec<Node>> {
    let nodes: Vec<Node> = nodes.into_iter().collect();
    sorted_members(nodes.iter().cloned())?;
    Ok(nodes)
}
