//! The trait every placement implements.

use crate::key::RingKey;
use crate::node::Node;

/// Maps keys to nodes. [`HashRing`](crate::HashRing), [`Jump`](crate::Jump),
/// [`Rendezvous`](crate::Rendezvous) and [`Maglev`](crate::Maglev) implement it, so
/// code that routes keys can take any of them, and a benchmark or a balance report can
/// compare them on the same input.
///
/// The contract: for the same nodes and the same key bytes, `locate_bytes` returns the
/// same index on every call, thread, process, platform and release; it returns `None`
/// only when there is no node. The trait is object-safe (`Box<dyn Placement>`) for
/// choosing a placement at run time; the generic helpers need a sized type.
pub trait Placement {
    /// The nodes keys are placed on. Indices returned by `locate_bytes` index this slice.
    fn nodes(&self) -> &[Node];

    /// The index in [`Placement::nodes`] of the node that owns the key with these bytes,
    /// or `None` when there is no node.
    fn locate_bytes(&self, key: &[u8]) -> Option<usize>;

    /// The index of the node that owns `key`.
    fn locate(&self, key: impl RingKey) -> Option<usize>
    where
        Self: Sized,
    {
        key.with_key_bytes(|bytes| self.locate_bytes(bytes))
    }

    /// The node that owns `key`.
    fn locate_node(&self, key: impl RingKey) -> Option<&Node>
    where
        Self: Sized,
    {
        self.locate(key).and_then(|i| self.nodes().get(i))
    }
}

impl<P: Placement + ?Sized> Placement for &P {
    fn nodes(&self) -> &[Node] {
        (**self).nodes()
    }

    fn locate_bytes(&self, key: &[u8]) -> Option<usize> {
        (**self).locate_bytes(key)
    }
}

impl<P: Placement + ?Sized> Placement for Box<P> {
    fn nodes(&self) -> &[Node] {
        (**self).nodes()
    }

    fn locate_bytes(&self, key: &[u8]) -> Option<usize> {
        (**self).locate_bytes(key)
    }
}
