//! sd-hashring beside the `hashring` crate (0.3), on identical vnode labels and keys.
//!
//! The peer has no virtual nodes of its own, so it is given the very labels sd's ring
//! hashes (`"{node}-{i}"`, 160 per node) as separate entries: both rings then hold the
//! same number of points and do the same work per lookup (hash the key, binary search).
//! sd hashes with CRC32 + fmix32, the peer with SipHash-2-4, its only option.
//!
//! `cargo bench -p sd-benches --bench hashring -- --warm-up-time 1 --measurement-time 3`

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
        // The peer's replica call clones its whole ring and may repeat a node; it is
        // here because it is what its users call for replicas today.
        group.bench_function(BenchmarkId::new("owners3/hashring_crate", n), |b| {
            b.iter(|| peer.get_with_replicas(black_box(next()), 2))
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
