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
//! # How it compares
//!
//! Against the `hashring` crate given the same vnode labels (so both rings hold the same
//! points), lookups here are faster and the gap widens with the number of
//! nodes: a bucket index finds the point instead of a binary search, and short keys are
//! hashed without `crc32fast`'s per-call set-up. `owners(key, n)` walks the ring instead
//! of cloning it (the peer has no distinct-owner lookup, so the benches compare it with
//! the same walk written over the peer's points), and lookups, `owners` and bounded lookups allocate nothing (a
//! counting-allocator test checks it). Balance is what a uniform hash gives at 160 vnodes
//! (`tests/balance.rs` asserts it from the exact shares of hash space; the `ring_balance`
//! example prints it); jump, rendezvous and Maglev balance more evenly, and Maglev moves
//! a few more keys than the minimum on a change. The measured figures, with the peers'
//! from the same run, are in
//! [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
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
//!
//! # Running the tests
//!
//! `cargo test -p sd-hashring` (or `cargo nextest run -p sd-hashring`) runs every
//! suite, the `ketama` golden vectors included: the crate's tests turn the feature on
//! through a dev-dependency on the crate itself. The Redis migration test starts a real
//! `redis-server` through `sd-testkit`; a missing binary fails it, it is never skipped.
#![forbid(unsafe_code)]
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
pub use ring::{Change, DEFAULT_VNODES, HashRing, HashRingBuilder, MAX_POINTS, Owners};
pub use shared::{SharedRing, Swap};
