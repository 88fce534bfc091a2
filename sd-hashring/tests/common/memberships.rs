//! Exact balance of a ring over fixed ten-node memberships, shared by
//! `tests/balance.rs` and `examples/ring_balance.rs` so the documented figures are
//! the ones the test checks.
//!
//! The memberships are ones operators write, fixed before any figure was computed;
//! none is dropped for its result.

use sd_hashring::HashRing;

/// Ten-node memberships: addresses, host names and pool names as deployed.
pub(crate) fn memberships() -> Vec<(&'static str, Vec<String>)> {
    let ids = |f: &dyn Fn(usize) -> String| (0..10).map(f).collect::<Vec<_>>();
    vec![
        (
            "10.0.0.{1..10}:11211",
            ids(&|i| format!("10.0.0.{}:11211", i + 1)),
        ),
        (
            "10.0.0.{0..9}:6379 (bench)",
            ids(&|i| format!("10.0.0.{i}:6379")),
        ),
        (
            "192.168.1.{101..110}:6379",
            ids(&|i| format!("192.168.1.{}:6379", 101 + i)),
        ),
        (
            "172.16.{0..9}.5:6379",
            ids(&|i| format!("172.16.{i}.5:6379")),
        ),
        ("cache-{0..9}", ids(&|i| format!("cache-{i}"))),
        ("redis-{1..10}", ids(&|i| format!("redis-{}", i + 1))),
        ("node{01..10}", ids(&|i| format!("node{:02}", i + 1))),
        (
            "shard-{a..j}",
            ids(&|i| format!("shard-{}", char::from(b'a' + i as u8))),
        ),
        (
            "cache{01..10}.prod.example.com:11211",
            ids(&|i| format!("cache{:02}.prod.example.com:11211", i + 1)),
        ),
        (
            "redis-{0..9}.redis.default.svc.cluster.local:6379",
            ids(&|i| format!("redis-{i}.redis.default.svc.cluster.local:6379")),
        ),
        (
            "memcached-{0..9}.memcached:11211",
            ids(&|i| format!("memcached-{i}.memcached:11211")),
        ),
        (
            "[fd00::{1..a}]:6379",
            ids(&|i| format!("[fd00::{:x}]:6379", i + 1)),
        ),
    ]
}

/// Peak / mean of the nodes' exact shares of hash space.
pub(crate) fn peak_over_mean(ring: &HashRing) -> f64 {
    let widths: Vec<u128> = ring
        .nodes()
        .iter()
        .map(|node| {
            let ranges = ring.ranges(node.id()).unwrap_or_default();
            ranges.iter().map(|r| r.width()).sum()
        })
        .collect();
    let total: u128 = widths.iter().sum();
    assert_eq!(
        total,
        u128::from(ring.hash_kind().max_position()) + 1,
        "shares cover the space"
    );
    let peak = widths.iter().copied().max().unwrap_or(0);
    peak as f64 * widths.len() as f64 / total as f64
}
