//! Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016).

use crate::error::{Error, Result};
use crate::key::RingKey;
use crate::node::Node;
use crate::ring::HashRing;

/// The balance factor `c` of bounded-load placement: no node takes a new key while its
/// load is at or above `ceil(c × average)`, weighted by its share of the total weight.
///
/// `c = 1.25` (the default, as in brpc and buraksezer/consistent) keeps every node
/// within 25 % of its fair share; HAProxy calls the same knob `hash-balance-factor`.
/// Smaller `c` balances better and moves more keys off their natural owner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundedLoad {
    c: f64,
}

impl Default for BoundedLoad {
    fn default() -> Self {
        BoundedLoad { c: Self::DEFAULT_C }
    }
}

impl BoundedLoad {
    /// The default balance factor, 1.25.
    pub const DEFAULT_C: f64 = 1.25;

    /// A balance factor `c`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] (field `c`) unless `c` is finite and at least 1: below
    /// 1 the caps would add up to less than the load, and some key would have no node.
    pub fn new(c: f64) -> Result<Self> {
        if !c.is_finite() || c < 1.0 {
            return Err(Error::config(
                "c",
                format!("must be a finite number of at least 1.0 (1.25 is usual), not {c}"),
            ));
        }
        Ok(BoundedLoad { c })
    }

    /// The balance factor.
    pub fn c(&self) -> f64 {
        self.c
    }

    /// The cap of a node of `weight` out of `total_weight`, once `total_load` keys
    /// (counting the one being placed) are placed: `ceil(c × total_load × weight /
    /// total_weight)`, and at least 1.
    pub fn cap(&self, total_load: u64, weight: u32, total_weight: u64) -> u64 {
        if total_weight == 0 {
            return 0;
        }
        let share = total_load as f64 * f64::from(weight) / total_weight as f64;
        ((self.c * share).ceil() as u64).max(1)
    }
}

/// Where bounded-load placement put a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BoundedPick<'a> {
    /// The node chosen.
    pub node: &'a Node,
    /// Its index in [`HashRing::nodes`]: the slot to increment in your loads.
    pub index: usize,
    /// Its cap for this placement; its load was below it.
    pub cap: u64,
    /// Points walked past because their node was full (0 when the natural owner took
    /// the key).
    pub skipped: usize,
}

impl HashRing {
    /// The node for `key` under bounded loads: the first node clockwise from the key
    /// whose load is below its cap.
    ///
    /// `loads[i]` is the current load (keys, connections, requests in flight) of
    /// `nodes()[i]`; the caller increments the chosen node's load after placing. With
    /// `m = loads.sum()`, node `i` takes the key only while `loads[i] < ceil(c ×
    /// (m + 1) × wᵢ / W)`, so after the placement no node exceeds its cap. The walk
    /// visits each point at most once and allocates nothing.
    ///
    /// # Errors
    /// [`Error::EmptyRing`]; [`Error::LoadsMismatch`] unless there is one load per node;
    /// [`Error::AllNodesFull`] if no node is below its cap (possible only when loads
    /// exceed what caps allow, for example loads reported by another process). It never
    /// panics.
    pub fn node_bounded(
        &self,
        key: impl RingKey,
        loads: &[u64],
        bound: &BoundedLoad,
    ) -> Result<BoundedPick<'_>> {
        let position = self.position(key);
        self.node_bounded_at(position, loads, bound)
    }

    /// [`HashRing::node_bounded`] for a position computed elsewhere.
    ///
    /// # Errors
    /// As [`HashRing::node_bounded`].
    pub fn node_bounded_at(
        &self,
        position: u64,
        loads: &[u64],
        bound: &BoundedLoad,
    ) -> Result<BoundedPick<'_>> {
        let Some(start) = self.point_at(position) else {
            return Err(Error::EmptyRing);
        };
        if loads.len() != self.len() {
            return Err(Error::LoadsMismatch {
                expected: self.len(),
                got: loads.len(),
            });
        }
        let total_load = loads.iter().fold(0u64, |s, &l| s.saturating_add(l));
        let after = total_load.saturating_add(1);
        let total_weight: u64 = self.nodes().iter().map(|n| u64::from(n.weight())).sum();
        let owners = self.raw_owners();
        let len = owners.len();
        for skipped in 0..len {
            let at = (start + skipped) % len;
            let index = owners[at] as usize;
            let node = &self.nodes()[index];
            let cap = bound.cap(after, node.weight(), total_weight);
            if loads[index] < cap {
                return Ok(BoundedPick {
                    node,
                    index,
                    cap,
                    skipped,
                });
            }
        }
        Err(Error::AllNodesFull {
            nodes: self.len(),
            total_load,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_below_one_or_not_finite_is_rejected() {
        for c in [0.99, 0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                BoundedLoad::new(c),
                Err(Error::InvalidConfig { field: "c", .. })
            ));
        }
        assert_eq!(BoundedLoad::new(1.0).unwrap().c(), 1.0);
        assert_eq!(BoundedLoad::default().c(), 1.25);
    }

    #[test]
    fn caps_follow_weight() {
        let b = BoundedLoad::default();
        assert_eq!(b.cap(100, 1, 4), 32); // ceil(1.25 * 25)
        assert_eq!(b.cap(100, 2, 4), 63); // ceil(1.25 * 50)
        assert_eq!(b.cap(1, 1, 10), 1);
        assert_eq!(b.cap(u64::MAX, u32::MAX, 1), u64::MAX);
    }
}
