//! The one error type of the crate.

use std::borrow::Cow;

use crate::hash::HashKind;

/// Everything that can go wrong in `sd-hashring`.
///
/// Configuration and membership errors come back from the constructor or the batch that
/// caused them, and leave any existing ring untouched. Lookups on an empty ring return
/// `None`; only the calls that must name a node (bounded loads, move plans) return
/// [`Error::EmptyRing`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The builder method or argument at fault, such as `vnodes` or `c`.
        field: &'static str,
        /// What is wrong and what to use instead.
        reason: Cow<'static, str>,
    },
    /// A node was given weight 0.
    #[error("node `{id}` has weight 0; give it a weight of at least 1, or remove it")]
    ZeroWeight {
        /// The node's id.
        id: String,
    },
    /// A node id is the empty string.
    #[error("a node id is empty; give every node a non-empty id such as `10.0.0.1:6379`")]
    EmptyId,
    /// The same node id appears twice in one membership.
    #[error("node `{id}` appears twice; ids must be unique (use a weight change to resize a node)")]
    DuplicateNode {
        /// The repeated id.
        id: String,
    },
    /// A change names a node that the ring does not hold.
    #[error("node `{id}` is not in the ring; check the id, or add the node first")]
    UnknownNode {
        /// The id that was not found.
        id: String,
    },
    /// The membership would need more points than the ring allows.
    #[error(
        "the ring would hold {points} points, over the limit of {max}; lower `vnodes` or the weights"
    )]
    TooManyPoints {
        /// Points the membership asked for.
        points: u64,
        /// The limit, [`crate::MAX_POINTS`].
        max: u64,
    },
    /// The call needs at least one node, and the ring has none.
    #[error("the ring is empty; add at least one node first")]
    EmptyRing,
    /// Bounded-load placement found every node at or above its cap.
    #[error(
        "all {nodes} nodes are at their load cap (total load {total_load}); raise `c` or add nodes"
    )]
    AllNodesFull {
        /// Nodes in the ring.
        nodes: usize,
        /// The sum of the loads that were given.
        total_load: u64,
    },
    /// The load slice does not have one entry per node.
    #[error(
        "{got} loads were given for {expected} nodes; pass one load per node, in `nodes()` order"
    )]
    LoadsMismatch {
        /// Nodes in the ring.
        expected: usize,
        /// Length of the slice that was given.
        got: usize,
    },
    /// Two rings hash keys differently, so ranges of one mean nothing in the other.
    #[error(
        "the rings hash keys differently ({old} and {new}); diff rings built with the same `hash`"
    )]
    HashMismatch {
        /// Hash of the old ring.
        old: HashKind,
        /// Hash of the new ring.
        new: HashKind,
    },
}

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
