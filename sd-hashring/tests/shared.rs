//! Many readers, one writer: readers always see a whole ring, never a half-built one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sd_hashring::{Change, HashRing, Node, SharedRing};

#[test]
fn readers_see_whole_rings_while_a_writer_swaps() {
    let base: Vec<Node> = (0..8).map(|i| Node::new(format!("base-{i}"))).collect();
    let shared = Arc::new(SharedRing::new(HashRing::new(base).unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (shared, stop, reads) =
                (Arc::clone(&shared), Arc::clone(&stop), Arc::clone(&reads));
            std::thread::spawn(move || {
                let mut k = t as u64;
                while !stop.load(Ordering::Relaxed) {
                    let ring = shared.snapshot();
                    // A consistent snapshot: 8 or 9 nodes, every key owned by a member.
                    assert!(ring.len() == 8 || ring.len() == 9);
                    let node = ring.node(k).unwrap();
                    assert!(ring.contains(node.id()));
                    assert_eq!(ring.point_count(), ring.len() * 160);
                    assert!(shared.with(|r| r.node(k).is_some()));
                    k += 3;
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for round in 0..200 {
        let id = format!("extra-{round}");
        let swap = shared
            .update([Change::add(Node::new(id.as_str()))])
            .unwrap();
        assert_eq!(swap.new.len(), 9);
        let plan = swap.plan().unwrap();
        assert!(plan.moves().iter().all(|m| m.to.as_str() == id));
        shared.update([Change::remove(id.as_str())]).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(shared.snapshot().len(), 8);
}

#[test]
fn concurrent_writers_do_not_lose_batches() {
    let shared = Arc::new(SharedRing::new(HashRing::new([Node::new("seed")]).unwrap()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                for i in 0..25 {
                    shared
                        .update([Change::add(Node::new(format!("w{w}-{i}")))])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(shared.snapshot().len(), 101);
}
