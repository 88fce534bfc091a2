//! sd-hashring beside the `hashring` crate (0.3), on identical vnode labels and keys.
//!
//! The peer has no virtual nodes of its own, so it is given the very labels sd's ring
//! hashes (`"{node}-{i}"`, 160 per node) as separate entries: both rings then hold the
//! same number of points and do the same work per lookup (hash the key, binary search).
//! sd hashes with CRC32 + fmix32, the peer with SipHash-2-4, its only option.
//!
//! `owners3`: the first three distinct nodes clockwise. The peer has no distinct-replica
//! lookup (its `get_with_replicas` clones the whole ring per call and may repeat a
//! node), so its row is the walk a user would write over the peer's own points: the
//! peer's hasher and order, read once at setup, then per key one hash, one binary
//! search and a walk that skips nodes already taken, as sd's `owners` does.
//!
//! `cargo bench -p sd-benches --bench hashring -- --warm-up-time 1 --measurement-time 3`

use std::hash::BuildHasher as _;
use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use sd_hashring::{HashKind, HashRing, Jump, Maglev, Node, Placement, Rendezvous};

const SIZES: [usize; 3] = [10, 100, 1000];
const VNODES: u32 = 160;

fn node_ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.0.{}.{}:6379", i / 256, i % 256))
        .collect()
}

fn nodes(n: usize) -> Vec<Node> {
    node_ids(n).into_iter().map(Node::new).collect()
}

/// The labels sd's ring hashes, handed to the peer as entries.
fn peer_ring(n: usize) -> hashring::HashRing<String> {
    let mut ring = hashring::HashRing::new();
    ring.batch_add(vnode_labels(n));
    ring
}

/// The peer's points (its SipHash of each label, in its order) with the node each
/// belongs to, for a distinct walk that borrows instead of cloning the ring.
struct PeerWalk {
    points: Vec<(u64, u32)>,
}

impl PeerWalk {
    fn new(peer: &hashring::HashRing<String>) -> Self {
        let hasher = hashring::DefaultHashBuilder;
        let ids = node_ids(peer.len() / VNODES as usize);
        let points: Vec<(u64, u32)> = peer
            .clone()
            .into_iter()
            .map(|label| {
                let (id, _) = label.rsplit_once('-').expect("a vnode label");
                let node = ids.iter().position(|n| n == id).expect("a member");
                (
                    hasher.hash_one(&label),
                    u32::try_from(node).expect("few nodes"),
                )
            })
            .collect();
        assert!(
            points.is_sorted(),
            "the peer keeps its points in hash order"
        );
        Self { points }
    }

    /// The first three distinct nodes clockwise from `key`'s position on the peer's ring.
    fn owners3(&self, key: &String) -> [u32; 3] {
        let k = hashring::DefaultHashBuilder.hash_one(key);
        let start = self.points.partition_point(|(p, _)| *p < k);
        let mut owners = [u32::MAX; 3];
        let mut found = 0;
        for &(_, node) in self.points[start..].iter().chain(&self.points[..start]) {
            if !owners[..found].contains(&node) {
                owners[found] = node;
                found += 1;
                if found == 3 {
                    break;
                }
            }
        }
        owners
    }
}

fn vnode_labels(n: usize) -> Vec<String> {
    node_ids(n)
        .iter()
        .flat_map(|id| (0..VNODES).map(move |i| format!("{id}-{i}")))
        .collect()
}

fn lookups(c: &mut Criterion) {
    let keys = sd_benches::keys(4096);
    let mut group = c.benchmark_group("hashring");
    for n in SIZES {
        let sd = HashRing::new(nodes(n)).expect("valid ring");
        let sd64 = HashRing::builder()
            .hash(HashKind::Xxh3)
            .build(nodes(n))
            .expect("valid ring");
        let peer = peer_ring(n);
        assert_eq!(sd.point_count(), peer.len());
        let walk = PeerWalk::new(&peer);
        for key in keys.iter().take(64) {
            let first = peer.get(key).expect("a node");
            assert_eq!(
                node_ids(n)[walk.owners3(key)[0] as usize],
                first[..first.rfind('-').expect("a vnode label")],
                "the walk starts where the peer's own lookup does"
            );
        }
        let jump = Jump::new(nodes(n)).expect("valid jump");
        let rendezvous = Rendezvous::new(nodes(n)).expect("valid rendezvous");
        let maglev = Maglev::new(nodes(n)).expect("valid maglev");

        let mut i = 0usize;
        let mut next = || {
            i = (i + 1) & 4095;
            &keys[i]
        };
        group.bench_function(BenchmarkId::new("lookup/sd_ring_crc32", n), |b| {
            b.iter(|| sd.node(black_box(next())))
        });
        group.bench_function(BenchmarkId::new("lookup/sd_ring_xxh3", n), |b| {
            b.iter(|| sd64.node(black_box(next())))
        });
        group.bench_function(BenchmarkId::new("lookup/hashring_crate", n), |b| {
            b.iter(|| peer.get(black_box(next())))
        });
        group.bench_function(BenchmarkId::new("lookup/sd_jump", n), |b| {
            b.iter(|| jump.locate(black_box(next())))
        });
        group.bench_function(BenchmarkId::new("lookup/sd_rendezvous", n), |b| {
            b.iter(|| rendezvous.locate(black_box(next())))
        });
        group.bench_function(BenchmarkId::new("lookup/sd_maglev", n), |b| {
            b.iter(|| maglev.locate(black_box(next())))
        });
        group.bench_function(BenchmarkId::new("owners3/sd_ring", n), |b| {
            b.iter(|| {
                let mut it = sd.owners(black_box(next()), 3);
                (it.next(), it.next(), it.next())
            })
        });
        group.bench_function(BenchmarkId::new("owners3/hashring_crate_walk", n), |b| {
            b.iter(|| walk.owners3(black_box(next())))
        });
        group.bench_function(BenchmarkId::new("owners3/sd_rendezvous", n), |b| {
            b.iter(|| rendezvous.owners(black_box(next()), 3))
        });
    }
    group.finish();
}

fn builds(c: &mut Criterion) {
    let mut group = c.benchmark_group("hashring_build");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for n in SIZES {
        let members = nodes(n);
        let labels = vnode_labels(n);
        // Each side's input is cloned outside the timed routine, so the peer is not
        // charged for copying its 160 × n label strings nor sd for its n ids.
        group.bench_function(BenchmarkId::new("sd_ring", n), |b| {
            b.iter_batched(
                || members.clone(),
                |members| HashRing::new(black_box(members)),
                BatchSize::LargeInput,
            )
        });
        group.bench_function(BenchmarkId::new("hashring_crate", n), |b| {
            b.iter_batched(
                || labels.clone(),
                |labels| {
                    let mut ring = hashring::HashRing::new();
                    ring.batch_add(black_box(labels));
                    ring
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_function(BenchmarkId::new("sd_maglev", n), |b| {
            b.iter_batched(
                || members.clone(),
                |members| Maglev::new(black_box(members)),
                BatchSize::LargeInput,
            )
        });
        let ring = HashRing::new(members.clone()).expect("valid ring");
        group.bench_function(BenchmarkId::new("sd_ring_add_one", n), |b| {
            b.iter(|| ring.with_changes([sd_hashring::Change::add(Node::new("joiner"))]))
        });
    }
    group.finish();
}

criterion_group!(benches, lookups, builds);
criterion_main!(benches);
