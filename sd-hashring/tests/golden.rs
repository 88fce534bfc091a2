//! Golden vectors: these pin the mapping of keys to nodes across releases and platforms.
//!
//! The CRC32 and ketama vectors were computed by an independent reference (a short
//! Python script using `zlib.crc32` followed by MurmurHash3's `fmix32`, and
//! `hashlib.md5`, sorting `(point, node)` and taking the first point at or after the
//! key's position); the ketama ones also check
//! facts published by others. If one of these fails, keys would land on other nodes
//! after an upgrade: that is a breaking change, never a test to update lightly.

use sd_hashring::{HashKind, HashRing, Maglev, Node, Placement, Rendezvous, RingKey, jump_hash};

fn redis3() -> HashRing {
    HashRing::new([
        Node::new("10.0.0.3:6379"),
        Node::new("10.0.0.1:6379"),
        Node::new("10.0.0.2:6379"),
    ])
    .expect("a valid ring")
}

#[test]
fn crc32_ring_first_points() {
    let ring = redis3();
    let first: Vec<(u64, &str)> = ring
        .points()
        .take(3)
        .map(|(p, n)| (p, n.id().as_str()))
        .collect();
    assert_eq!(
        first,
        [
            (7_811_473, "10.0.0.2:6379"),
            (9_255_884, "10.0.0.2:6379"),
            (18_485_747, "10.0.0.2:6379"),
        ]
    );
    assert_eq!(ring.point_count(), 480);
}

/// Key `key(k)` of `redis3` must land on node `10.0.0.{expected[k]}:6379`, for every `k`.
fn assert_redis3_routes<K: RingKey + std::fmt::Debug>(expected: &[u8], key: impl Fn(u64) -> K) {
    let ring = redis3();
    for (k, n) in (0u64..).zip(expected) {
        let key = key(k);
        let want = format!("10.0.0.{n}:6379");
        assert_eq!(
            ring.node(&key).map(|node| node.id().as_str()),
            Some(want.as_str()),
            "{key:?}"
        );
    }
}

#[test]
fn crc32_ring_string_keys() {
    assert_redis3_routes(&[3, 3, 2, 1, 2, 3, 3, 1, 1, 1], |k| format!("user:{k}"));
}

#[test]
fn crc32_ring_integer_keys_are_little_endian_u64() {
    let expected = [1, 1, 3, 2, 2, 1];
    assert_redis3_routes(&expected, |k| k);
    let ring = redis3();
    for k in 0..expected.len() as u64 {
        assert_eq!(ring.node(k), ring.node(k.to_le_bytes()));
    }
}

#[test]
fn crc32_weighted_ring() {
    let ring = HashRing::builder()
        .vnodes(40)
        .build([Node::new("a"), Node::weighted("b", 2), Node::new("c")])
        .unwrap();
    assert_eq!(ring.point_count(), 160);
    let got: String = (0..10)
        .map(|k| ring.node(format!("k{k}")).unwrap().id().as_str().to_owned())
        .collect();
    assert_eq!(got, "caabbbacba");
}

/// XXH3 vectors pin this crate's own output (no independent reference was at hand);
/// the hash itself is checked against the xxHash reference value in the unit tests.
#[test]
fn xxh3_ring_is_pinned() {
    let ring = HashRing::builder()
        .hash(HashKind::Xxh3)
        .build([Node::new("a"), Node::new("b"), Node::new("c")])
        .unwrap();
    let got: String = (0..16u32)
        .map(|k| ring.node(k).unwrap().id().as_str().to_owned())
        .collect();
    assert_eq!(got, XXH3_PINNED);
}

const XXH3_PINNED: &str = "cbacbcbbbacaacab";

/// The golden values Guava checks `Hashing.consistentHash` against "to see that
/// implementations across languages are equivalent" (HashingTest,
/// `testConsistentHash_linearCongruentialGeneratorCompatibility`); Guava implements the
/// Lamping–Veach algorithm with the paper's generator.
#[test]
fn jump_hash_matches_guava_golden_values() {
    let golden100 = [
        0, 55, 62, 8, 45, 59, 86, 97, 82, 59, 73, 37, 17, 56, 86, 21, 90, 37, 38, 83,
    ];
    for (key, want) in golden100.into_iter().enumerate() {
        assert_eq!(jump_hash(key as u64, 100), Some(want), "key {key}");
    }
    assert_eq!(jump_hash(10_863_919_174_838_991, 11), Some(6));
    assert_eq!(jump_hash(2_016_238_256_797_177_309, 11), Some(3));
    assert_eq!(jump_hash(1_673_758_223_894_951_030, 11), Some(5));
    assert_eq!(jump_hash(2, 100_001), Some(80_343));
    assert_eq!(jump_hash(2201, 100_001), Some(22_152));
    assert_eq!(jump_hash(2202, 100_001), Some(15_018));
    assert_eq!(jump_hash(42, 1), Some(0));
    assert_eq!(jump_hash(42, 0), None);
}

/// Owners of keys `0..16u32` among `a`, `b` (weight 2) and `c`, one letter per key.
fn pinned(p: &dyn Placement) -> String {
    (0..16u32)
        .map(|k| {
            let i = k.with_key_bytes(|b| p.locate_bytes(b)).expect("a member");
            p.nodes()[i].id().as_str().to_owned()
        })
        .collect()
}

fn abc() -> [Node; 3] {
    [Node::new("a"), Node::weighted("b", 2), Node::new("c")]
}

/// Rendezvous and Maglev have no independent reference (their hashes are this crate's
/// choice): these vectors pin this crate's own output, so a change of scoring, seeds
/// or table filling shows up as a failed test, not as keys silently moving.
#[test]
fn rendezvous_is_pinned() {
    let r = Rendezvous::new(abc()).unwrap();
    assert_eq!(pinned(&r), RENDEZVOUS_PINNED);
    let top: Vec<&str> = r
        .owners("user:42", 3)
        .iter()
        .map(|n| n.id().as_str())
        .collect();
    assert_eq!(top, RENDEZVOUS_TOP3);
}

#[test]
fn maglev_is_pinned() {
    let m = Maglev::with_table_size(abc(), 13).unwrap();
    assert_eq!(pinned(&m), MAGLEV_PINNED_13);
    let m = Maglev::new(abc()).unwrap();
    assert_eq!(pinned(&m), MAGLEV_PINNED_DEFAULT);
}

const RENDEZVOUS_PINNED: &str = "aabbbacbcbcaccbb";
const RENDEZVOUS_TOP3: [&str; 3] = ["c", "a", "b"];
const MAGLEV_PINNED_13: &str = "cabababcbcaaabca";
const MAGLEV_PINNED_DEFAULT: &str = "cbbaacabacbbbaab";

#[cfg(feature = "ketama")]
mod ketama {
    use sd_hashring::{HashKind, HashRing, Node};

    fn ketama(nodes: impl IntoIterator<Item = Node>) -> HashRing {
        HashRing::builder()
            .hash(HashKind::Ketama)
            .build(nodes)
            .expect("a valid ring")
    }

    /// Couchbase SDK RFC 26 publishes the continuum of these four servers; its Java
    /// test (`KetamaRingTest.wrapsAround`) asserts that position 2^32 - 1 wraps to
    /// 192.168.1.104:11210, and the reference gives its first point as 19069626.
    #[test]
    fn couchbase_rfc26_continuum() {
        let ring = ketama((1..=4).map(|i| Node::new(format!("192.168.1.10{i}:11210"))));
        assert_eq!(ring.point_count(), 640);
        let (first, owner) = ring.points().next().unwrap();
        assert_eq!(
            (first, owner.id().as_str()),
            (19_069_626, "192.168.1.104:11210")
        );
        assert_eq!(
            ring.node_at(u64::from(u32::MAX)).unwrap().id(),
            "192.168.1.104:11210"
        );
    }

    /// The same test suite publishes a collision: `example.com:11210` and
    /// `example137723.com:11210` both place a point at 1723476360. Both points stay;
    /// the smaller id owns the arc.
    #[test]
    fn couchbase_rfc26_collision() {
        let ring = ketama([
            Node::new("example.com:11210"),
            Node::new("example137723.com:11210"),
        ]);
        let at: Vec<&str> = ring
            .points()
            .filter(|(p, _)| *p == 1_723_476_360)
            .map(|(_, n)| n.id().as_str())
            .collect();
        assert_eq!(at, ["example.com:11210", "example137723.com:11210"]);
        assert_eq!(ring.point_count(), 320);
        assert_eq!(
            ring.node_at(1_723_476_360).unwrap().id(),
            "example.com:11210"
        );
        // Removing the winner leaves the other node's point in place.
        let mut ring = ring;
        ring.remove("example.com:11210").unwrap();
        assert_eq!(
            ring.node_at(1_723_476_360).unwrap().id(),
            "example137723.com:11210"
        );
    }

    /// The README of the Python bindings for libketama: weights 400/600/600 (memory),
    /// key "1" is on 127.0.0.1:3, key "3" is not on 127.0.0.1:1.
    #[test]
    fn libketama_python_bindings_readme() {
        let ring = ketama([
            Node::weighted("127.0.0.1:1", 400),
            Node::weighted("127.0.0.1:2", 600),
            Node::weighted("127.0.0.1:3", 600),
        ]);
        assert_eq!(ring.point_count(), 480);
        assert_eq!(ring.node("1").unwrap().id(), "127.0.0.1:3");
        assert_ne!(ring.node("3").unwrap().id(), "127.0.0.1:1");
    }

    /// Weighted continuum: libketama gives `floorf(w / W * 40 * n)` digests per server.
    #[test]
    fn weighted_continuum() {
        let ring = ketama([
            Node::new("10.0.1.1:11211"),
            Node::weighted("10.0.1.2:11211", 2),
            Node::new("10.0.1.3:11211"),
            Node::weighted("10.0.1.4:11211", 3),
        ]);
        let counts: Vec<usize> = ring
            .nodes()
            .iter()
            .map(|n| ring.points().filter(|(_, o)| o.id() == n.id()).count())
            .collect();
        assert_eq!(counts, [88, 180, 88, 272]);
        let expected = [
            ("key0", 4_060_279_841, "10.0.1.4:11211"),
            ("key1", 2_497_097_154, "10.0.1.4:11211"),
            ("key2", 2_854_615_160, "10.0.1.4:11211"),
            ("key3", 2_237_083_958, "10.0.1.4:11211"),
            ("key4", 1_273_231_562, "10.0.1.2:11211"),
            ("key5", 2_593_892_925, "10.0.1.1:11211"),
            ("key6", 2_717_347_172, "10.0.1.3:11211"),
            ("key7", 3_444_871_673, "10.0.1.3:11211"),
        ];
        for (key, position, node) in expected {
            assert_eq!(ring.position(key), position, "{key}");
            assert_eq!(ring.node(key).unwrap().id(), node, "{key}");
        }
    }
}
