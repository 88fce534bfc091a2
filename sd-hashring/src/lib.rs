//! Consistent hashing for sharding keys over nodes: a CRC32 virtual-node ring with
//! weights, distinct replicas, bounded loads and move plans, plus jump, rendezvous and
//! Maglev behind one small trait.
//!
//! A service that spreads cache keys, lock keys or rate-limit counters over N Redis
//! nodes, or requests over a pool of backends, needs three things from its placement:
//! when a node joins or leaves only about `K/N` keys move (modulo hashing moves nearly
//! all of them, a cache-miss storm); the load stays even; and every process, release
//! and platform maps a key to the same node.
//!
//! # Should I use this crate?
//!
//! - **[`HashRing`]** is the default: any membership, weights, replicas
//!   ([`HashRing::owners`]), bounded loads ([`HashRing::node_bounded`]) and move plans
//!   ([`diff`], [`ranges`]). Lookups are `O(1)` on average (a bucket index over a sorted
//!   vector, then a scan of the two or so points in the bucket), allocation-free.
//! - **[`Jump`]** for numbered storage shards `0..n` that only grow or shrink at the end:
//!   no memory, perfect balance.
//! - **[`Rendezvous`]** for tens of nodes when you want top-k replicas by score and
//!   exactly minimal movement; `O(n)` per lookup.
//! - **[`Maglev`]** for load balancers: one table read per lookup, about 1 % imbalance,
//!   a little more than minimal movement on change.
//! - With the `ketama` feature, a `HashKind::Ketama` ring is the libketama / twemproxy
//!   continuum, so a Rust service and an existing memcached client fleet agree on where
//!   every key lives.
//!
//! Not for: placing data with rack or zone constraints (use a CRUSH-like scheme), or
//! Redis Cluster itself (it has fixed hash slots; use the cluster client).
//!
//! # Example
//!
//! ```
//! use sd_hashring::{BoundedLoad, Change, HashRing, Node};
//!
//! let mut ring = HashRing::new([
//!     Node::new("10.0.0.1:6379"),
//!     Node::new("10.0.0.2:6379"),
//!     Node::weighted("10.0.0.3:6379", 2), // twice the share
//! ])?;
//! let owner = ring.node("user:42").unwrap();
//! // Replicas: three distinct physical nodes, the owner first.
//! let replicas: Vec<_> = ring.owners("user:42", 3).collect();
//! assert_eq!(replicas.len(), 3);
//! assert_eq!(replicas[0], owner);
//!
//! // A fourth node joins: the plan lists the ranges that move, all of them to it.
//! let old = ring.clone();
//! ring.apply([Change::add(Node::new("10.0.0.4:6379"))])?;
//! let plan = old.diff(&ring)?;
//! assert!(plan.moves().iter().all(|m| m.to.as_str() == "10.0.0.4:6379"));
//! assert!(plan.moved_fraction() > 0.1 && plan.moved_fraction() < 0.35);
//!
//! // Bounded loads: skip nodes above 1.25 × their fair share.
//! let loads = [10, 0, 0, 0];
//! let pick = ring.node_bounded("user:42", &loads, &BoundedLoad::default())?;
//! assert!(loads[pick.index] < pick.cap);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Guarantees
//!
//! - **Stable placement.** Keys are hashed as bytes with a fixed encoding ([`RingKey`]:
//!   strings and byte slices as they are, integers little-endian at their width), never
//!   through `std::hash::Hash`. Golden-vector tests pin the mapping of every
//!   [`HashKind`], and the ketama vectors match ones published by Couchbase (SDK RFC 26)
//!   and the libketama Python bindings.
//! - **Same membership, same ring.** Nodes are sorted by id and points by
//!   `(position, node)`, so insertion order never matters. Colliding points both stay;
//!   the smaller id owns the arc, and removing one node never removes another's point.
//! - **Minimal movement.** Adding a node moves keys only to it (about `1/(n+1)` of them);
//!   removing one moves only its keys. Property tests check both, for the ring, jump and
//!   rendezvous.
//! - **Delimited labels.** Vnode `i` of node `id` hashes `"{id}-{i}"`, so ids such as
//!   `a:55` and `a:555` can never produce the same label; ids may hold any character.
//! - **Typed errors, no panics.** Weight 0, empty or duplicate ids, `vnodes = 0`,
//!   `c < 1`, oversize rings: each fails at construction with an [`Error`] naming the
//!   field. Bounded mode returns [`Error::EmptyRing`] / [`Error::AllNodesFull`] instead of
//!   panicking.
//! - **Readers never wait.** [`SharedRing`] publishes each new ring with one atomic swap
//!   (`arc-swap`); writers apply a batch of [`Change`]s with one rebuild.
//!
//! # Figures
//!
//! Lookup time per key (`user:{i}:session`, 14–17 bytes), one criterion run on the
//! shared 2-core machine, load average 1.2–2.5, 2026-11-28 (`cargo bench -p sd-benches
//! --bench hashring -- --warm-up-time 1 --measurement-time 3`). The `hashring` crate
//! (0.3.6) is given sd's exact vnode labels as entries, so both rings hold the same
//! points:
//!
//! | nodes × 160 vnodes | sd ring, CRC32 | sd ring, XXH3 | `hashring` crate | ratio (CRC32 / XXH3) |
//! |---|---|---|---|---|
//! | 10 | 19.0 ns | 15.8 ns | 62.2 ns | 3.3× / 3.9× |
//! | 100 | 34.6 ns | 25.9 ns | 151 ns | 4.4× / 5.8× |
//! | 1000 | 49.9 ns | 31.7 ns | 257 ns | 5.1× / 8.1× |
//!
//! A repeat of the CRC32 pair a minute later: 18.8 / 57.5, 31.5 / 108 and 42.7 / 226 ns
//! (3.1× / 3.4× / 5.3×). Wall-clock ratios move with the machine's load (an earlier,
//! quieter run, before keys shorter than 64 bytes got their own CRC32, measured 21.8
//! against 35.3 ns at 10 nodes); instruction counts do not. Callgrind, on one driver
//! loop over the same keys for both: about 183 instructions per CRC32 lookup at 10, 100
//! or 1000 nodes (hashing the key is 87 of them; 231 in all with `crc32fast` for short
//! keys and a binary search), against 355 / 388 / 432 for the peer.
//!
//! Same run, other placements at 10 / 100 / 1000 nodes: jump 32 / 54 / 71 ns, Maglev
//! 16 / 11 / 13 ns, rendezvous 100 ns / 0.51 µs / 5.3 µs. `owners(key, 3)`: 78 / 88 /
//! 116 ns (the `hashring` crate's `get_with_replicas(key, 2)` clones its ring: 124 µs /
//! 1.2 ms / 47 ms, and may repeat a node). Building a ring, inputs cloned outside the
//! timing for both: 0.086 / 0.93 / 10.2 ms (peer 0.094 / 1.1 / 17.3 ms); adding one
//! node to a built ring reuses the other points: 0.026 / 0.16 / 2.2 ms. A
//! counting-allocator test checks that lookups, `owners(.., 3)` and bounded lookups
//! allocate nothing.
//!
//! Balance at 10 nodes × 160 vnodes, from the exact shares of hash space (no key
//! sampling) over twelve fixed memberships of addresses, host names and pool names
//! (`tests/balance.rs`, also printed by the `ring_balance` example): peak/mean 1.12 on
//! average, worst 1.20 (`10.0.0.{1..10}:11211`), 1.17 for the bench's ids; XXH3 1.12,
//! worst 1.15. That is what a uniform hash gives (relative std-dev 1/√160 ≈ 7.9 %);
//! the test asserts the average stays at or below 1.15. With 100 000 sampled keys
//! (`ring_balance`), relative std-dev of load and peak/mean at 10 / 100 / 1000 nodes
//! are 8.5 % 1.16 / 7.6 % 1.20 / 8.4 % 1.30 for the CRC32 ring over the bench's ids
//! (exact shares: 9.2 % 1.17 / 7.0 % 1.16 / 7.9 % 1.25). Jump, rendezvous and Maglev
//! stay within 1–3.3 %. Adding or removing one node moves 1/(n+1) or 1/n of the keys (within sampling noise) for the
//! ring, jump and rendezvous; Maglev moves 0.44 % instead of 0.10 % at 1000 nodes.
//! Bounded loads at c = 1.25 keep max/avg at 1.24 / 1.25 / 1.25, sending 1.7–2.9 % of
//! keys past their natural owner.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `ketama`: `HashKind::Ketama`, the libketama / twemproxy continuum (MD5, 40
//!   digests × 4 little-endian `u32` points = 160 points per server scaled by weight
//!   share, labels `"{server}-{i}"`, key position = first 4 MD5 bytes). Pass
//!   twemproxy's server *names* (or libketama's `host:port`) as node ids; for a
//!   twemproxy pool whose `hash:` is not MD5, compute the key hash yourself and call
//!   [`HashRing::node_at`].
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bounded;
mod error;
mod hash;
mod jump;
mod key;
mod maglev;
mod node;
mod placement;
mod plan;
mod rendezvous;
mod ring;
mod shared;

pub use bounded::{BoundedLoad, BoundedPick};
pub use error::{Error, Result};
pub use hash::HashKind;
pub use jump::{Jump, jump_hash};
pub use key::{Bytes, RingKey};
pub use maglev::Maglev;
pub use node::{Node, NodeId};
pub use placement::Placement;
pub use plan::{KeyRange, Move, MovePlan, diff, ranges};
pub use rendezvous::Rendezvous;
pub use ring::{Change, DEFAULT_VNODES, HashRing, MAX_POINTS, Owners, RingBuilder};
pub use shared::{SharedRing, Swap};
