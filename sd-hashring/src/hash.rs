//! The hash functions behind ring points and key positions.

use std::fmt;

/// How a [`HashRing`](crate::HashRing) turns vnode labels and keys into positions.
///
/// Every choice is a fixed, published function of bytes, so two processes, two
/// platforms or two releases of this crate agree on every placement. Golden-vector
/// tests pin each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum HashKind {
    /// CRC-32 (IEEE, the zlib / `crc32fast` polynomial) of the label `"{id}-{i}"` and of
    /// the key, passed through MurmurHash3's 32-bit finalizer `fmix32`: positions are
    /// 32-bit. The default.
    ///
    /// The finalizer is a bijection, so it keeps CRC32's speed and collision count, but
    /// it breaks CRC32's linearity: raw CRC32 of `"{id}-0"`, `"{id}-1"`, ... gives every
    /// node a shifted copy of the same point pattern. Over the twelve 10-node
    /// memberships of `tests/balance.rs` (exact shares of hash space, 160 vnodes), raw
    /// CRC32 gives 17 % relative std-dev of load and peak/mean 1.28 on average; with
    /// the finalizer, 7.5 % and 1.12 (worst 1.20), about the 1/√160 ≈ 7.9 % that a
    /// uniform hash gives.
    ///
    /// With 32-bit points, collisions become likely past a few ten thousand points
    /// (100 nodes × 160 vnodes: about 3 %; 1000 nodes: about 3 expected). They are
    /// resolved deterministically, so nothing breaks, but the colliding vnode loses its
    /// arc; use [`HashKind::Xxh3`] for rings that large. Those counts are for a random
    /// hash; CRC32 is linear, so collisions cluster: ids that differ in a few decimal
    /// digits rarely collide at all (no two of the ids `node-0` .. `node-3999` do, over
    /// 160 vnodes each), while a pair whose labels collide once may collide at several
    /// vnodes (`tests/edge_cases.rs` pins two 17-character ids that collide at eight).
    #[default]
    Crc32,
    /// XXH3-64 (seed 0) of the label and of the key: positions are 64-bit, so point
    /// collisions are negligible at any ring size. XXH3 is a frozen specification
    /// (xxHash 0.8), the hash Envoy's ring uses.
    Xxh3,
    /// The libketama / twemproxy continuum: MD5 of `"{id}-{d}"` gives four little-endian
    /// `u32` points per digest, points per node scale with its share of the total weight,
    /// and a key's position is the first four MD5 bytes, little-endian.
    #[cfg(feature = "ketama")]
    Ketama,
}

impl HashKind {
    /// The largest position this hash produces: `u32::MAX` or `u64::MAX`.
    pub fn max_position(self) -> u64 {
        match self {
            HashKind::Crc32 => u64::from(u32::MAX),
            HashKind::Xxh3 => u64::MAX,
            #[cfg(feature = "ketama")]
            HashKind::Ketama => u64::from(u32::MAX),
        }
    }

    /// Bits in a position: 32 or 64.
    pub fn bits(self) -> u32 {
        if self.max_position() == u64::MAX {
            64
        } else {
            32
        }
    }

    /// The position of a key whose bytes are `bytes`.
    pub fn position(self, bytes: &[u8]) -> u64 {
        match self {
            HashKind::Crc32 => u64::from(fmix32(crc32(bytes))),
            HashKind::Xxh3 => xxh3(bytes),
            #[cfg(feature = "ketama")]
            HashKind::Ketama => {
                let digest = md5(bytes);
                u64::from(u32::from_le_bytes([
                    digest[0], digest[1], digest[2], digest[3],
                ]))
            }
        }
    }
}

impl fmt::Display for HashKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            HashKind::Crc32 => "crc32",
            HashKind::Xxh3 => "xxh3",
            #[cfg(feature = "ketama")]
            HashKind::Ketama => "ketama",
        })
    }
}

/// Keys shorter than this are hashed with [`crc32_short`]; longer ones with
/// `crc32fast`, whose carry-less-multiply folding wins once there are a few blocks.
const SHORT_KEY: usize = 64;

/// CRC-32 (IEEE) of `bytes`: the value of `crc32fast::hash` and zlib's `crc32`.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    if bytes.len() < SHORT_KEY {
        crc32_short(bytes)
    } else {
        crc32fast::hash(bytes)
    }
}

/// Slicing-by-16 tables for CRC-32 (IEEE, reflected polynomial `0xEDB88320`):
/// `TABLES[0]` is the classic byte table, `TABLES[k][b]` is `b` followed by `k` zero
/// bytes.
static TABLES: [[u32; 256]; 16] = crc32_tables();

const fn crc32_tables() -> [[u32; 256]; 16] {
    let mut tables = [[0u32; 256]; 16];
    let mut b = 0;
    while b < 256 {
        let mut crc = b as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][b] = crc;
        b += 1;
    }
    let mut k = 1;
    while k < 16 {
        let mut b = 0;
        while b < 256 {
            let prev = tables[k - 1][b];
            tables[k][b] = (prev >> 8) ^ tables[0][(prev & 0xFF) as usize];
            b += 1;
        }
        k += 1;
    }
    tables
}

/// CRC-32 (IEEE) by slicing-by-16 tables, with no set-up or CPU-feature dispatch. For
/// short keys (a typical cache key is 10–40 bytes) `crc32fast::hash`'s per-call
/// dispatch and 128-bit reduction dominate, so short keys are hashed here, in fewer
/// steps than through `crc32fast`.
pub(crate) fn crc32_short(bytes: &[u8]) -> u32 {
    let t = &TABLES;
    let mut crc = !0u32;
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        let w = u32::from_le_bytes([block[0], block[1], block[2], block[3]]) ^ crc;
        crc = t[15][(w & 0xFF) as usize]
            ^ t[14][((w >> 8) & 0xFF) as usize]
            ^ t[13][((w >> 16) & 0xFF) as usize]
            ^ t[12][(w >> 24) as usize]
            ^ t[11][usize::from(block[4])]
            ^ t[10][usize::from(block[5])]
            ^ t[9][usize::from(block[6])]
            ^ t[8][usize::from(block[7])]
            ^ t[7][usize::from(block[8])]
            ^ t[6][usize::from(block[9])]
            ^ t[5][usize::from(block[10])]
            ^ t[4][usize::from(block[11])]
            ^ t[3][usize::from(block[12])]
            ^ t[2][usize::from(block[13])]
            ^ t[1][usize::from(block[14])]
            ^ t[0][usize::from(block[15])];
    }
    let mut rest = blocks.remainder();
    if rest.len() >= 8 {
        let w = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) ^ crc;
        crc = t[7][(w & 0xFF) as usize]
            ^ t[6][((w >> 8) & 0xFF) as usize]
            ^ t[5][((w >> 16) & 0xFF) as usize]
            ^ t[4][(w >> 24) as usize]
            ^ t[3][usize::from(rest[4])]
            ^ t[2][usize::from(rest[5])]
            ^ t[1][usize::from(rest[6])]
            ^ t[0][usize::from(rest[7])];
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let w = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) ^ crc;
        crc = t[3][(w & 0xFF) as usize]
            ^ t[2][((w >> 8) & 0xFF) as usize]
            ^ t[1][((w >> 16) & 0xFF) as usize]
            ^ t[0][(w >> 24) as usize];
        rest = &rest[4..];
    }
    for &byte in rest {
        crc = (crc >> 8) ^ t[0][((crc ^ u32::from(byte)) & 0xFF) as usize];
    }
    !crc
}

/// MurmurHash3's 32-bit finalizer: a bijection on `u32` that spreads every input bit
/// over the whole output.
pub(crate) fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// XXH3-64 with seed 0, the crate's 64-bit hash for labels, keys and the other placements.
pub(crate) fn xxh3(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// XXH3-64 with an explicit seed, for placements that need two independent hashes.
pub(crate) fn xxh3_seeded(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

#[cfg(feature = "ketama")]
pub(crate) fn md5(bytes: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(bytes).into()
}

/// Builds vnode labels `"{id}-{i}"` in one reused buffer, so a ring of any size is
/// built with one allocation per node.
///
/// The delimiter makes labels unambiguous: `i` is written in decimal and holds no `-`,
/// so the last `-` always splits a label back into `(id, i)`. Without it, node `a:55`
/// vnode 5 and node `a:555` vnode (none) could collide, as in ringpop-node#241.
pub(crate) struct Labels {
    buf: Vec<u8>,
    prefix: usize,
}

impl Labels {
    pub(crate) fn new(id: &str) -> Self {
        let mut buf = Vec::with_capacity(id.len() + 12);
        buf.extend_from_slice(id.as_bytes());
        buf.push(b'-');
        let prefix = buf.len();
        Labels { buf, prefix }
    }

    /// The label of vnode `i`.
    pub(crate) fn get(&mut self, i: u64) -> &[u8] {
        self.buf.truncate(self.prefix);
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = i;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.buf.extend_from_slice(&digits[at..]);
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_delimited_decimal() {
        let mut labels = Labels::new("a:55");
        assert_eq!(labels.get(0), b"a:55-0");
        assert_eq!(labels.get(5), b"a:55-5");
        assert_eq!(labels.get(159), b"a:55-159");
        assert_eq!(labels.get(u64::MAX), b"a:55-18446744073709551615");
        let mut other = Labels::new("a:555");
        assert_ne!(other.get(5), Labels::new("a:55").get(55));
    }

    #[test]
    fn crc32_positions_are_zlib_crc32_then_fmix32() {
        // zlib.crc32(b"123456789") == 0xCBF43926 (the CRC-32 check value).
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            HashKind::Crc32.position(b"123456789"),
            u64::from(fmix32(0xCBF4_3926))
        );
        // From the Python reference: fmix32(zlib.crc32(b"a-0")).
        assert_eq!(HashKind::Crc32.position(b"a-0"), 1_671_536_082);
        assert_eq!(HashKind::Crc32.position(b""), 0);
        assert_eq!(fmix32(1), 1_364_076_727);
    }

    #[test]
    fn short_crc32_matches_crc32fast_at_every_length() {
        let bytes: Vec<u8> = (0..200u32)
            .map(|i| (i.wrapping_mul(151) ^ 0x5a) as u8)
            .collect();
        for len in 0..bytes.len() {
            assert_eq!(
                crc32_short(&bytes[..len]),
                crc32fast::hash(&bytes[..len]),
                "{len}"
            );
            assert_eq!(
                crc32(&bytes[..len]),
                crc32fast::hash(&bytes[..len]),
                "{len}"
            );
        }
        assert_eq!(crc32_short(b"123456789"), 0xCBF4_3926);
    }

    proptest::proptest! {
        #[test]
        fn short_crc32_matches_crc32fast(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..160)) {
            proptest::prop_assert_eq!(crc32_short(&bytes), crc32fast::hash(&bytes));
            proptest::prop_assert_eq!(crc32(&bytes), crc32fast::hash(&bytes));
        }
    }

    #[test]
    fn xxh3_matches_the_reference_vector() {
        // XXH3_64bits("", 0) from the xxHash reference implementation.
        assert_eq!(xxh3(b""), 0x2D06_8005_38D3_94C2);
    }

    #[cfg(feature = "ketama")]
    #[test]
    fn ketama_key_position_is_the_first_md5_word() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(HashKind::Ketama.position(b""), 0xd98c_1dd4);
    }
}
