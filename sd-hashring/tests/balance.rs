//! Balance at the default 160 vnodes, measured exactly: each node's share of hash
//! space from [`HashRing::ranges`], so the figures carry no key-sampling noise.
//!
//! The memberships (in `common/memberships.rs`, shared with the `ring_balance`
//! example) are ones operators write, fixed before any figure was computed, and none
//! is dropped for its result: the crate's promise is about the average over them, and
//! the worst one is reported beside it.

mod common;

use common::memberships::{memberships, peak_over_mean};
use sd_hashring::{HashKind, HashRing, Node};

fn report(hash: HashKind) -> (f64, f64) {
    let mut sum = 0.0;
    let mut worst = 0.0f64;
    let all = memberships();
    for (name, ids) in &all {
        let ring = HashRing::builder()
            .hash(hash)
            .build(ids.iter().map(Node::new))
            .expect("valid ring");
        let ratio = peak_over_mean(&ring);
        println!("{hash} {name:<50} peak/mean {ratio:.3}");
        sum += ratio;
        worst = worst.max(ratio);
    }
    let mean = sum / all.len() as f64;
    println!(
        "{hash} mean over {} memberships {mean:.3}, worst {worst:.3}",
        all.len()
    );
    (mean, worst)
}

/// The goal of the crate: peak/mean at 10 nodes × 160 vnodes no worse than 1.15, on
/// average over memberships. A single membership can exceed it (the maximum of ten
/// shares with 7.9 % relative deviation often reaches 1.2).
fn assert_peak_over_mean(kind: HashKind) {
    let (mean, worst) = report(kind);
    assert!(
        mean <= 1.15,
        "mean peak/mean {mean:.3} over the memberships"
    );
    assert!(worst < 1.30, "worst peak/mean {worst:.3}");
}

#[test]
fn crc32_ring_peak_over_mean_at_ten_nodes() {
    assert_peak_over_mean(HashKind::Crc32);
}

#[test]
fn xxh3_ring_peak_over_mean_at_ten_nodes() {
    assert_peak_over_mean(HashKind::Xxh3);
}
