//! A ring that many threads read while one writer at a time swaps in a new one.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::error::Result;
use crate::key::RingKey;
use crate::node::NodeId;
use crate::plan::MovePlan;
use crate::ring::{Change, HashRing};

/// A shared, swappable [`HashRing`].
///
/// Readers never block and never see a half-built ring: each read works on one
/// immutable snapshot (an `arc-swap` load, a few nanoseconds with no lock and no
/// reference-count contention). Writers build the next ring off to the side, one batch
/// at a time under a writer lock (so concurrent batches never lose each other's
/// changes), then publish it with one atomic swap.
///
/// ```
/// use std::sync::Arc;
/// use sd_hashring::{Change, HashRing, Node, SharedRing};
///
/// let shared = Arc::new(SharedRing::new(HashRing::new([Node::new("a"), Node::new("b")])?));
/// let reader = {
///     let shared = Arc::clone(&shared);
///     std::thread::spawn(move || shared.node_id("user:42").is_some())
/// };
/// let swap = shared.update([Change::add(Node::new("c"))])?;
/// assert!(reader.join().unwrap());
/// assert_eq!(shared.snapshot().len(), 3);
/// let plan = swap.plan()?;
/// assert!(plan.moves().iter().all(|m| m.to.as_str() == "c"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SharedRing {
    current: ArcSwap<HashRing>,
    writer: Mutex<()>,
}

/// The rings before and after an update, from [`SharedRing::update`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Swap {
    /// The ring that was current before the update.
    pub old: Arc<HashRing>,
    /// The ring now current.
    pub new: Arc<HashRing>,
}

impl Swap {
    /// The ranges whose keys changed owner in this update.
    ///
    /// # Errors
    /// As [`diff`](crate::diff).
    pub fn plan(&self) -> Result<MovePlan> {
        crate::diff(&self.old, &self.new)
    }
}

impl SharedRing {
    /// Shares `ring`.
    pub fn new(ring: HashRing) -> Self {
        SharedRing {
            current: ArcSwap::from_pointee(ring),
            writer: Mutex::new(()),
        }
    }

    /// The current ring; it stays valid (and unchanged) however long it is held.
    pub fn snapshot(&self) -> Arc<HashRing> {
        self.current.load_full()
    }

    /// Runs `f` on the current ring without touching its reference count: the cheapest
    /// read, for lookups on a hot path.
    pub fn with<R>(&self, f: impl FnOnce(&HashRing) -> R) -> R {
        f(&self.current.load())
    }

    /// The id of the node that owns `key` now.
    pub fn node_id(&self, key: impl RingKey) -> Option<NodeId> {
        self.with(|ring| ring.node(key).map(|n| n.id().clone()))
    }

    /// Applies `changes` as one batch (one rebuild) and publishes the result.
    ///
    /// # Errors
    /// As [`HashRing::with_changes`]; on error the current ring stays.
    pub fn update(&self, changes: impl IntoIterator<Item = Change>) -> Result<Swap> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.current.load_full();
        let new = Arc::new(old.with_changes(changes)?);
        self.current.store(Arc::clone(&new));
        Ok(Swap { old, new })
    }

    /// Publishes `ring` in place of the current one, whatever it holds.
    pub fn replace(&self, ring: HashRing) -> Swap {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let new = Arc::new(ring);
        let old = self.current.swap(Arc::clone(&new));
        Swap { old, new }
    }
}
