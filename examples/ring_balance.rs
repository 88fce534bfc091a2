//! How even is each placement, and how many keys move when a node joins or leaves?
//!
//! For 10, 100 and 1000 nodes, prints per placement: the relative standard deviation
//! of load, peak/mean load, and the fraction of keys moved when one node is added and
//! when one is removed (the ideal is 1/(n+1) and 1/n). Then bounded-load placement's
//! max/avg at c = 1.25. Last, the figure the crate promises: peak/mean of the exact
//! shares of hash space at 10 nodes × 160 vnodes, for each of a fixed set of
//! memberships (the ones `sd-hashring/tests/balance.rs` checks), with their mean.
//!
//! `cargo run --release -p sd-examples --example ring_balance`

use sd_hashring::{
    BoundedLoad, Change, HashKind, HashRing, Jump, Maglev, Node, Placement, Rendezvous,
};

/// The memberships and the exact peak/mean computation of sd-hashring's balance test.
#[path = "../sd-hashring/tests/common/memberships.rs"]
mod memberships;

fn nodes(n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| Node::new(format!("10.0.{}.{}:6379", i / 256, i % 256)))
        .collect()
}

fn keys(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("user:{i}:session")).collect()
}

/// `(relative std-dev, peak/mean)` of the number of keys per node.
fn balance(p: &dyn Placement, keys: &[String]) -> (f64, f64) {
    let mut counts = vec![0u64; p.nodes().len()];
    for k in keys {
        if let Some(i) = p.locate_bytes(k.as_bytes()) {
            counts[i] += 1;
        }
    }
    spread(&counts)
}

fn spread(counts: &[u64]) -> (f64, f64) {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<u64>() as f64 / n;
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let peak = counts.iter().copied().max().unwrap_or(0) as f64;
    (var.sqrt() / mean, peak / mean)
}

/// Fraction of keys whose owner id differs between two placements.
fn moved(a: &dyn Placement, b: &dyn Placement, keys: &[String]) -> f64 {
    let owner = |p: &dyn Placement, k: &String| {
        p.locate_bytes(k.as_bytes())
            .and_then(|i| p.nodes().get(i))
            .map(|n| n.id().clone())
    };
    let moved = keys.iter().filter(|k| owner(a, k) != owner(b, k)).count();
    moved as f64 / keys.len() as f64
}

struct Row {
    name: &'static str,
    before: Box<dyn Placement>,
    added: Box<dyn Placement>,
    removed: Box<dyn Placement>,
}

fn rows(n: usize) -> Result<Vec<Row>, sd_hashring::Error> {
    let all = nodes(n + 1);
    let (base, joiner) = (&all[..n], &all[n]);
    // Remove a node from the middle, except for jump, which can only drop the last.
    let middle: Vec<Node> = base
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != n / 2)
        .map(|(_, x)| x.clone())
        .collect();
    let ring = |hash| HashRing::builder().hash(hash).build(base.to_vec());
    let mut out = Vec::new();
    for (name, hash) in [
        ("ring crc32", HashKind::Crc32),
        ("ring xxh3", HashKind::Xxh3),
        ("ring ketama", HashKind::Ketama),
    ] {
        let before = ring(hash)?;
        let added = before.with_changes([Change::add(joiner.clone())])?;
        let removed = before.with_changes([Change::remove(base[n / 2].id().clone())])?;
        out.push(Row {
            name,
            before: Box::new(before),
            added: Box::new(added),
            removed: Box::new(removed),
        });
    }
    out.push(Row {
        name: "jump",
        before: Box::new(Jump::new(base.to_vec())?),
        added: Box::new(Jump::new(all.clone())?),
        removed: Box::new(Jump::new(base[..n - 1].to_vec())?),
    });
    out.push(Row {
        name: "rendezvous",
        before: Box::new(Rendezvous::new(base.to_vec())?),
        added: Box::new(Rendezvous::new(all.clone())?),
        removed: Box::new(Rendezvous::new(middle.clone())?),
    });
    // One table size for every membership (655 373 > 100 slots per node at 1000 nodes):
    // a size that followed the node count would move nearly every key.
    let maglev = |nodes: Vec<Node>| Maglev::with_table_size(nodes, 655_373);
    out.push(Row {
        name: "maglev",
        before: Box::new(maglev(base.to_vec())?),
        added: Box::new(maglev(all.clone())?),
        removed: Box::new(maglev(middle)?),
    });
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("placement      nodes   keys  rel-sd  peak/mean  moved+1 (ideal)  moved-1 (ideal)");
    for n in [10usize, 100, 1000] {
        let keys = keys((1000 * n).max(100_000));
        for row in rows(n)? {
            let (sd, peak) = balance(&*row.before, &keys);
            let add = moved(&*row.before, &*row.added, &keys);
            let remove = moved(&*row.before, &*row.removed, &keys);
            println!(
                "{:<13} {:>6} {:>6}k  {:>5.1}%  {:>9.3}  {:>6.2}% ({:>5.2}%)  {:>6.2}% ({:>5.2}%)",
                row.name,
                n,
                keys.len() / 1000,
                sd * 100.0,
                peak,
                add * 100.0,
                100.0 / (n as f64 + 1.0),
                remove * 100.0,
                100.0 / n as f64,
            );
        }
        // The ring's own figure, free of key sampling noise: each node's share of hash space.
        let ring = HashRing::new(nodes(n))?;
        let shares: Vec<u64> = ring
            .nodes()
            .iter()
            .map(|node| {
                let width: u128 = ring
                    .ranges(node.id())
                    .map(|r| r.iter().map(|x| x.width()).sum())
                    .unwrap_or(0);
                width as u64
            })
            .collect();
        let (sd, peak) = spread(&shares);
        println!(
            "ring crc32 arcs {n:>5}          {:>5.1}%  {:>9.3}   (exact shares of hash space)",
            sd * 100.0,
            peak
        );
        // Bounded loads: place keys one by one with live loads.
        let bound = BoundedLoad::default();
        let mut loads = vec![0u64; ring.len()];
        let placed = 100 * n;
        let mut skipped = 0usize;
        for k in keys.iter().take(placed) {
            let pick = ring.node_bounded(k, &loads, &bound)?;
            loads[pick.index] += 1;
            skipped += usize::from(pick.skipped > 0);
        }
        let (sd, peak) = spread(&loads);
        println!(
            "ring bounded   {n:>5} {:>6}k  {:>5.1}%  {:>9.3}   max/avg at c = {}, {:.1}% of keys off their natural owner",
            placed / 1000,
            sd * 100.0,
            peak,
            bound.c(),
            skipped as f64 * 100.0 / placed as f64,
        );
        println!();
    }
    println!("peak/mean of exact shares, 10 nodes x 160 vnodes:");
    for hash in [HashKind::Crc32, HashKind::Xxh3] {
        let all = memberships::memberships();
        let mut ratios = Vec::new();
        for (name, ids) in &all {
            let ring = HashRing::builder()
                .hash(hash)
                .build(ids.iter().map(Node::new))?;
            let ratio = memberships::peak_over_mean(&ring);
            println!("  {hash:<6} {name:<50} {ratio:.3}");
            ratios.push(ratio);
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        let worst = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "  {hash:<6} mean over {} memberships {mean:.3}, worst {worst:.3}",
            ratios.len()
        );
    }
    Ok(())
}
