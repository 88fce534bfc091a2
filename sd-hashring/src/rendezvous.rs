//! Rendezvous / highest-random-weight hashing (Thaler & Ravishankar, 1998).

use crate::error::Result;
use crate::hash::xxh3;
use crate::key::RingKey;
use crate::node::{Node, sorted_members};
use crate::placement::Placement;

/// Rendezvous (HRW) hashing: every node scores the key, the highest score wins.
///
/// No ring and no table: `O(n)` per lookup, which is cheap for tens of nodes and slow
/// for thousands. Removing a node moves only its keys, and the next-best scores give
/// replica sets directly ([`Rendezvous::owners`]). Weighted nodes use the logarithmic
/// method (Schindelhauer & Schomaker; score `w / -ln(u)`), so a node of weight 2 gets
/// twice the keys of a node of weight 1 and still only its own keys move.
///
/// Scores are `fmix64(xxh3(key) ^ xxh3(id))`; the logarithm is computed with a fixed
/// series in plain IEEE arithmetic (not the platform's `ln`), so weighted results are
/// the same on every platform. Nodes are kept sorted by id, and ties go to the smaller
/// id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rendezvous {
    nodes: Vec<Node>,
    seeds: Vec<u64>,
    weighted: bool,
}

impl Rendezvous {
    /// Rendezvous hashing over `nodes`, in any order.
    ///
    /// # Errors
    /// [`Error::EmptyId`](crate::Error::EmptyId), [`Error::ZeroWeight`](crate::Error::ZeroWeight),
    /// [`Error::DuplicateNode`](crate::Error::DuplicateNode).
    pub fn new(nodes: impl IntoIterator<Item = Node>) -> Result<Self> {
        let nodes = sorted_members(nodes)?;
        let seeds = nodes.iter().map(|n| xxh3(n.id().as_bytes())).collect();
        let weighted = nodes.windows(2).any(|w| w[0].weight() != w[1].weight());
        Ok(Rendezvous {
            nodes,
            seeds,
            weighted,
        })
    }

    /// The nodes, sorted by id.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Up to `n` distinct nodes for `key`, best score first; the first is the owner.
    /// Costs `O(len · log len)` and one allocation.
    pub fn owners(&self, key: impl RingKey, n: usize) -> Vec<&Node> {
        let kh = key.with_key_bytes(xxh3);
        let mut scored: Vec<(Score, usize)> = (0..self.nodes.len())
            .map(|i| (self.score(i, kh), i))
            .collect();
        scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(n)
            .map(|(_, i)| &self.nodes[i])
            .collect()
    }

    fn score(&self, i: usize, key_hash: u64) -> Score {
        let raw = fmix64(key_hash ^ self.seeds[i]);
        if !self.weighted {
            return Score::Raw(raw);
        }
        // u in (0, 1): the top 53 bits, offset by half a step so that it is never 0.
        let u = ((raw >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        Score::Weighted(f64::from(self.nodes[i].weight()) / -ln(u))
    }
}

/// A node's score for a key: raw hash bits when all weights are equal (exact integer
/// comparison), the weighted score otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Score {
    Raw(u64),
    Weighted(f64),
}

impl Score {
    fn total_cmp(&self, other: &Score) -> std::cmp::Ordering {
        match (self, other) {
            (Score::Raw(a), Score::Raw(b)) => a.cmp(b),
            (Score::Weighted(a), Score::Weighted(b)) => a.total_cmp(b),
            (Score::Raw(_), Score::Weighted(_)) => std::cmp::Ordering::Less,
            (Score::Weighted(_), Score::Raw(_)) => std::cmp::Ordering::Greater,
        }
    }
}

impl Placement for Rendezvous {
    fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    fn locate_bytes(&self, key: &[u8]) -> Option<usize> {
        let kh = xxh3(key);
        let mut best: Option<(Score, usize)> = None;
        for i in 0..self.nodes.len() {
            let s = self.score(i, kh);
            if best.is_none_or(|(b, _)| s.total_cmp(&b).is_gt()) {
                best = Some((s, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

/// MurmurHash3's 64-bit finalizer: every input bit flips each output bit with
/// probability close to 1/2.
pub(crate) fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Natural logarithm of a positive, normal `x`, with only `+ - * /` (which IEEE 754
/// rounds the same everywhere), unlike `f64::ln`, whose last bit may differ between
/// libm implementations. Error below 1e-15 relative.
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172: 12 terms reach 1e-19.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut series = 0.0;
    for k in (0..12u32).rev() {
        series = series * s2 + 1.0 / f64::from(2 * k + 1);
    }
    2.0 * s * series + exponent as f64 * std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_std() {
        let mut x = 1e-16;
        while x < 1.0 {
            let (ours, std) = (ln(x), x.ln());
            assert!(
                (ours - std).abs() <= 1e-15 * std.abs().max(1.0),
                "ln({x}): {ours} vs {std}"
            );
            x *= 1.37;
        }
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn fmix64_is_the_murmur3_finalizer() {
        assert_eq!(fmix64(0), 0);
        assert_ne!(fmix64(1), 1);
    }
}
