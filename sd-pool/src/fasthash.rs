//! The hasher of the crate's internal maps.
//!
//! Their keys are partition numbers, slots, topic names and job keys, and a job key is
//! already a hash (SipHash, see [`Job::with_key`](crate::Job::with_key); the Kafka
//! consumer's, of a record's topic and key, is this one, see [`hash_one`]). With the
//! std's keyed SipHash, hashing was over a quarter of the Kafka poll thread's samples
//! (several lookups per record). This is FxHash (rustc's): one rotate, xor and multiply
//! per word. It has no key, so it is kept to maps whose size the pool bounds (a pool's
//! keys map holds only keys with a job running or queued) or whose keys the
//! configuration picks (topics, partitions).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` hashed with [`FxHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// FxHash: fast, unkeyed, for small keys.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_i32(&mut self, n: i32) {
        self.add(u64::from(n as u32));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // A product's low bits depend only on the low bits of its factors, and the table
        // takes its bucket from the low bits: rotate the well-mixed high bits down (as
        // rustc-hash 2 does). Without it, keys that differ only past their first bytes
        // (`k1`, `k2`, ... hashed after a topic name) shared their low bits.
        self.hash.rotate_left(26)
    }
}

/// `value` hashed with [`FxHasher`].
#[cfg(feature = "kafka")]
pub(crate) fn hash_one<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = FxHasher::default();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(value: &T) -> u64 {
        BuildHasherDefault::<FxHasher>::default().hash_one(value)
    }

    #[test]
    fn equal_keys_hash_equal_and_near_keys_apart() {
        assert_eq!(hash(&("orders", 3)), hash(&("orders", 3)));
        assert_ne!(hash(&("orders", 3)), hash(&("orders", 4)));
        assert_ne!(hash(&"orders-1"), hash(&"orders-2"));
        // Strings that differ only past the first word, and in their tail.
        assert_ne!(hash(&"partition-topic-a"), hash(&"partition-topic-b"));
        // The length terminator keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(hash(&("ab", "c")), hash(&("a", "bc")));
        let small: std::collections::HashSet<u64> = (0u32..1_000).map(|p| hash(&p)).collect();
        assert_eq!(small.len(), 1_000);
        // The low bits, where a table takes its bucket, spread too: keys that differ
        // only past their first byte, hashed after a common prefix, and hashed again
        // (a job key is a hash, and the pool's map hashes it).
        let low: std::collections::HashSet<u64> = (0..1_000)
            .map(|k| hash(&hash(&("bench-topic", format!("k{k}").as_bytes()))) & 0xff)
            .collect();
        assert!(low.len() > 200, "{} of 256 low bytes", low.len());
    }

    #[test]
    fn a_map_finds_what_it_holds() {
        let mut map: FastMap<u64, u64> = FastMap::default();
        for k in 0..10_000u64 {
            map.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k);
        }
        for k in 0..10_000u64 {
            assert_eq!(map.get(&k.wrapping_mul(0x9e37_79b9_7f4a_7c15)), Some(&k));
        }
    }
}
