//! Lookups allocate nothing: a counting allocator watches `node`, `node_at`,
//! `owners(.., 3)`, `node_bounded` and the other placements' lookups.
//!
//! This file holds a single test, so no other test thread allocates while it counts.
#![allow(unsafe_code)] // a global allocator must be declared with `unsafe impl`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use sd_hashring::{BoundedLoad, HashKind, HashRing, Jump, Maglev, Node, Placement};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged, and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn lookups_do_not_allocate() {
    let nodes: Vec<Node> = (0..100).map(|i| Node::new(format!("n{i}"))).collect();
    let crc = HashRing::new(nodes.clone()).expect("valid ring");
    let xxh = HashRing::builder()
        .hash(HashKind::Xxh3)
        .build(nodes.clone())
        .expect("valid ring");
    let jump = Jump::new(nodes.clone()).expect("valid jump");
    let maglev = Maglev::new(nodes).expect("valid maglev");
    let loads = vec![0u64; 100];
    let bound = BoundedLoad::default();
    let keys: Vec<String> = (0..1000).map(|i| format!("user:{i}")).collect();

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut found = 0usize;
    for (i, key) in keys.iter().enumerate() {
        found += usize::from(crc.node(key).is_some());
        found += usize::from(xxh.node(i as u64).is_some());
        found += usize::from(crc.node_at(i as u64).is_some());
        found += crc.owners(key, 3).count();
        found += usize::from(crc.node_bounded(key, &loads, &bound).is_ok());
        found += usize::from(jump.locate(key).is_some());
        found += usize::from(maglev.locate(key).is_some());
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(found, 1000 * 9);
    assert_eq!(
        after - before,
        0,
        "lookups allocated {} times",
        after - before
    );
}
