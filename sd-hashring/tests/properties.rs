//! Property tests: the guarantees of every placement, on random memberships and keys.

use std::collections::HashMap;

use proptest::prelude::*;
use sd_hashring::{
    BoundedLoad, Change, HashKind, HashRing, Jump, Maglev, MovePlan, Node, Placement, Rendezvous,
    RingKey,
};

fn ids(n: usize, salt: u32) -> Vec<String> {
    (0..n).map(|i| format!("node-{salt}-{i}")).collect()
}

fn ring_of(ids: &[String], hash: HashKind) -> HashRing {
    HashRing::builder()
        .hash(hash)
        .build(ids.iter().map(Node::new))
        .expect("a valid ring")
}

fn hash_kind() -> impl Strategy<Value = HashKind> {
    prop_oneof![Just(HashKind::Crc32), Just(HashKind::Xxh3)]
}

/// Every key the plan moves changes owner from `from` to `to`, and every key it does not
/// move keeps its owner.
fn plan_agrees_with_lookups(
    old: &HashRing,
    new: &HashRing,
    plan: &MovePlan,
) -> Result<(), TestCaseError> {
    for k in 0..1000u64 {
        let (a, b) = (
            old.node(k).expect("a non-empty ring"),
            new.node(k).expect("a non-empty ring"),
        );
        match plan.destination(k) {
            Some(m) => {
                prop_assert_eq!(&m.from, a.id());
                prop_assert_eq!(&m.to, b.id());
                prop_assert_ne!(a.id(), b.id());
            }
            None => prop_assert_eq!(a.id(), b.id()),
        }
    }
    Ok(())
}

const KEYS: u64 = 3000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Adding a node moves keys only to it, about 1/(n+1) of them.
    #[test]
    fn adding_a_node_moves_keys_only_to_it(n in 2usize..24, salt in any::<u32>(), hash in hash_kind()) {
        let ids = ids(n, salt);
        let old = ring_of(&ids, hash);
        let new = old.with_changes([Change::add(Node::new("joiner"))]).unwrap();
        let mut moved = 0;
        for k in 0..KEYS {
            let (a, b) = (old.node(k).unwrap(), new.node(k).unwrap());
            if a != b {
                prop_assert_eq!(b.id().as_str(), "joiner");
                moved += 1;
            }
        }
        // The exact moved share of hash space is the joiner's share: 1/(n+1) with
        // 1/sqrt(160) = 7.9 % relative deviation, so within 35 % (4.4 deviations).
        let exact = old.diff(&new).unwrap().moved_fraction();
        let ideal = 1.0 / (n as f64 + 1.0);
        prop_assert!(exact > ideal * 0.65 && exact < ideal * 1.35,
            "moved {exact:.4} of hash space, ideal {ideal:.4}");
        // The sampled keys agree with it within 5 binomial deviations.
        let fraction = moved as f64 / KEYS as f64;
        let sd = (exact * (1.0 - exact) / KEYS as f64).sqrt();
        prop_assert!((fraction - exact).abs() < 5.0 * sd,
            "moved {fraction:.4} of the keys, {exact:.4} of hash space");
    }

    /// `owners` yields the distinct nodes met walking the points clockwise from the key.
    #[test]
    fn owners_follow_a_naive_walk_of_the_points(n in 1usize..20, want in 0usize..24, salt in any::<u32>(), key in any::<u64>()) {
        let ring = ring_of(&ids(n, salt), HashKind::Crc32);
        let points: Vec<(u64, &Node)> = ring.points().collect();
        let pos = ring.position(key);
        let start = points.iter().position(|(p, _)| *p >= pos).unwrap_or(0);
        let mut walk: Vec<&Node> = Vec::new();
        for i in 0..points.len() {
            let node = points[(start + i) % points.len()].1;
            if walk.len() < want && !walk.contains(&node) {
                walk.push(node);
            }
        }
        let owners: Vec<&Node> = ring.owners(key, want).collect();
        prop_assert_eq!(owners, walk);
    }

    /// The ranges of all nodes partition the hash space, each owned as lookups say.
    #[test]
    fn ranges_partition_the_space(n in 1usize..12, salt in any::<u32>(), hash in hash_kind()) {
        let ring = ring_of(&ids(n, salt), hash);
        let mut all: Vec<(u64, u64, &str)> = Vec::new();
        for node in ring.nodes() {
            for r in ring.ranges(node.id()).unwrap() {
                prop_assert_eq!(ring.node_at(r.start()).unwrap(), node);
                prop_assert_eq!(ring.node_at(r.end()).unwrap(), node);
                all.push((r.start(), r.end(), node.id().as_str()));
            }
        }
        all.sort_unstable();
        prop_assert_eq!(all[0].0, 0);
        prop_assert_eq!(all.last().unwrap().1, hash.max_position());
        for w in all.windows(2) {
            prop_assert_eq!(w[0].1 + 1, w[1].0, "gap or overlap between {:?} and {:?}", w[0], w[1]);
        }
    }

    /// Raising one node's weight moves keys only to it; lowering it moves only its keys;
    /// the plan agrees with lookups either way.
    #[test]
    fn diff_after_a_weight_change(n in 2usize..10, salt in any::<u32>(), weight in 2u32..5) {
        let ids = ids(n, salt);
        let base = ring_of(&ids, HashKind::Crc32);
        let heavy = base.with_changes([Change::set_weight(ids[0].as_str(), weight)]).unwrap();
        for (old, new, up) in [(&base, &heavy, true), (&heavy, &base, false)] {
            let plan = old.diff(new).unwrap();
            prop_assert!(!plan.is_empty());
            for m in plan.moves() {
                let node = if up { &m.to } else { &m.from };
                prop_assert_eq!(node.as_str(), ids[0].as_str());
            }
            plan_agrees_with_lookups(old, new, &plan)?;
        }
        // The node's share grows from about 1/n to about w/(n-1+w).
        let moved = base.diff(&heavy).unwrap().moved_fraction();
        let ideal = weight as f64 / (n as f64 - 1.0 + weight as f64) - 1.0 / n as f64;
        prop_assert!(moved > ideal * 0.5 && moved < ideal * 1.5, "moved {moved:.4}, ideal {ideal:.4}");
    }

    /// Removing a node moves only the keys it held.
    #[test]
    fn removing_a_node_moves_only_its_keys(n in 2usize..24, salt in any::<u32>(), victim in any::<prop::sample::Index>()) {
        let ids = ids(n, salt);
        let old = ring_of(&ids, HashKind::Crc32);
        let gone = &ids[victim.index(n)];
        let new = old.with_changes([Change::remove(gone.as_str())]).unwrap();
        for k in 0..KEYS {
            let (a, b) = (old.node(k).unwrap(), new.node(k).unwrap());
            if a != b {
                prop_assert_eq!(a.id().as_str(), gone.as_str());
            }
            prop_assert_ne!(b.id().as_str(), gone.as_str());
        }
    }

    /// The same membership, inserted in any order or in several batches, gives the same ring.
    #[test]
    fn any_order_gives_the_same_ring(n in 1usize..16, salt in any::<u32>(), seed in any::<u64>(), hash in hash_kind()) {
        let ids = ids(n, salt);
        let mut shuffled = ids.clone();
        // A deterministic shuffle from the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let a = ring_of(&ids, hash);
        let b = ring_of(&shuffled, hash);
        prop_assert_eq!(&a, &b);
        let mut c = HashRing::builder().hash(hash).build([]).unwrap();
        for id in shuffled.iter().rev() {
            c.add(Node::new(id)).unwrap();
        }
        prop_assert_eq!(&a, &c);
    }

    /// Owners are distinct, the first is the owner, and there are min(n, len) of them.
    #[test]
    fn owners_are_distinct(n in 1usize..30, want in 0usize..40, salt in any::<u32>(), key in any::<u64>()) {
        let ring = ring_of(&ids(n, salt), HashKind::Crc32);
        let owners: Vec<&Node> = ring.owners(key, want).collect();
        prop_assert_eq!(owners.len(), want.min(n));
        let mut seen: Vec<&str> = owners.iter().map(|o| o.id().as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        prop_assert_eq!(seen.len(), owners.len());
        if want > 0 {
            prop_assert_eq!(owners[0], ring.node(key).unwrap());
        }
    }

    /// Bounded mode never puts a node above its cap, for any c >= 1 and weights.
    #[test]
    fn bounded_mode_respects_caps(
        weights in prop::collection::vec(1u32..4, 1..12),
        c in 1.0f64..2.0,
        keys in 1u64..1500,
        salt in any::<u32>(),
    ) {
        let nodes = weights.iter().enumerate().map(|(i, &w)| Node::weighted(format!("n{salt}-{i}"), w));
        let ring = HashRing::builder().vnodes(40).build(nodes).unwrap();
        let bound = BoundedLoad::new(c).unwrap();
        let total_weight: u64 = ring.nodes().iter().map(|n| u64::from(n.weight())).sum();
        let mut loads = vec![0u64; ring.len()];
        for k in 0..keys {
            let pick = ring.node_bounded(k, &loads, &bound).unwrap();
            loads[pick.index] += 1;
            let placed = k + 1;
            for (i, node) in ring.nodes().iter().enumerate() {
                let cap = bound.cap(placed, node.weight(), total_weight);
                prop_assert!(loads[i] <= cap, "node {i} load {} cap {cap}", loads[i]);
            }
        }
    }

    /// A node of weight 3 gets about three times the keys of a node of weight 1. Each
    /// node's share wanders by about 1/sqrt(points) (8 % at 160 vnodes, 4.6 % for the
    /// heavy node's 480), so with 3 light nodes heavy/light has a spread of about 0.2:
    /// the band is about 5 spreads wide each side (a 2.4-3.7 band failed once in CI at
    /// 3.74), and still fails a ring that ignores weights (1) or doubles them (6).
    #[test]
    fn weights_shift_load_in_proportion(n in 3usize..8, salt in any::<u32>()) {
        let mut nodes: Vec<Node> = ids(n, salt).iter().map(Node::new).collect();
        nodes.push(Node::weighted("heavy", 3));
        let ring = HashRing::new(nodes).unwrap();
        let mut counts: HashMap<String, u64> = HashMap::new();
        let keys = 20_000u64;
        for k in 0..keys {
            *counts.entry(ring.node(k).unwrap().id().to_string()).or_default() += 1;
        }
        let heavy = counts["heavy"] as f64;
        let light = (keys as f64 - heavy) / n as f64;
        let ratio = heavy / light;
        prop_assert!(ratio > 2.0 && ratio < 4.2, "heavy/light = {ratio:.2}");
    }

    /// Rendezvous and Maglev: a node of weight 3 gets three times the keys of a node of
    /// weight 1. Both split load by weight exactly up to sampling noise (Maglev up to
    /// its table's rounding too), so the band is tighter than the ring's.
    #[test]
    fn rendezvous_and_maglev_weights_shift_load_in_proportion(n in 3usize..8, salt in any::<u32>()) {
        let mut nodes: Vec<Node> = ids(n, salt).iter().map(Node::new).collect();
        nodes.push(Node::weighted("heavy", 3));
        let rendezvous = Rendezvous::new(nodes.clone()).unwrap();
        let maglev = Maglev::new(nodes).unwrap();
        for (name, p) in [("rendezvous", &rendezvous as &dyn Placement), ("maglev", &maglev)] {
            let keys = 20_000u64;
            let heavy = (0..keys)
                .filter(|k| k.with_key_bytes(|b| p.locate_bytes(b)).map(|i| p.nodes()[i].id().as_str()) == Some("heavy"))
                .count() as f64;
            let ratio = heavy / ((keys as f64 - heavy) / n as f64);
            prop_assert!(ratio > 2.7 && ratio < 3.3, "{name}: heavy/light = {ratio:.2}");
        }
    }

    /// The move plan agrees with the lookups of both rings, and ranges agree with lookups.
    #[test]
    fn move_plan_matches_lookups(n in 1usize..12, salt in any::<u32>(), add in 0usize..3, remove in 0usize..2) {
        let ids = ids(n, salt);
        let old = ring_of(&ids, HashKind::Crc32);
        let mut changes: Vec<Change> = (0..add).map(|i| Change::add(Node::new(format!("new-{i}")))).collect();
        if remove > 0 && n > 1 {
            changes.push(Change::remove(ids[0].as_str()));
        }
        let new = old.with_changes(changes).unwrap();
        let plan = old.diff(&new).unwrap();
        plan_agrees_with_lookups(&old, &new, &plan)?;
        for k in 0..1000u64 {
            let b = new.node(k).unwrap();
            let owned = new.ranges(b.id()).unwrap();
            let pos = new.position(k);
            prop_assert!(owned.iter().any(|r| r.contains(pos)));
        }
    }

    /// Rendezvous: removing a node moves only its keys; weights hold.
    #[test]
    fn rendezvous_removal_is_minimal(n in 2usize..16, salt in any::<u32>(), weighted in any::<bool>()) {
        let ids = ids(n, salt);
        let nodes: Vec<Node> = ids.iter().enumerate()
            .map(|(i, id)| Node::weighted(id, if weighted { 1 + i as u32 % 3 } else { 1 }))
            .collect();
        let old = Rendezvous::new(nodes.clone()).unwrap();
        let new = Rendezvous::new(nodes[1..].to_vec()).unwrap();
        for k in 0..KEYS {
            let (a, b) = (old.locate_node(k).unwrap(), new.locate_node(k).unwrap());
            if a != b {
                prop_assert_eq!(a.id(), nodes[0].id());
            }
            prop_assert_eq!(old.owners(k, 1)[0], a);
        }
    }

    /// Jump: growing by one bucket moves keys only to the new bucket.
    #[test]
    fn jump_growth_is_minimal(n in 1usize..40, salt in any::<u32>()) {
        let ids = ids(n + 1, salt);
        let old = Jump::new(ids[..n].iter().map(Node::new)).unwrap();
        let new = Jump::new(ids.iter().map(Node::new)).unwrap();
        for k in 0..KEYS {
            let (a, b) = (old.locate(k).unwrap(), new.locate(k).unwrap());
            if a != b {
                prop_assert_eq!(b, n);
            }
        }
    }

    /// Maglev: every key has an owner, and the same nodes in any order give the same table.
    #[test]
    fn maglev_is_order_independent(n in 1usize..12, salt in any::<u32>()) {
        let ids = ids(n, salt);
        let a = Maglev::with_table_size(ids.iter().map(Node::new), 1031).unwrap();
        let b = Maglev::with_table_size(ids.iter().rev().map(Node::new), 1031).unwrap();
        prop_assert_eq!(&a, &b);
        for k in 0..200u64 {
            prop_assert!(a.locate(k).is_some());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary byte keys and arbitrary (possibly empty, duplicate, weight-0) ids:
    /// construction either succeeds or returns a typed error, and lookups, owners,
    /// bounded lookups, ranges and diffs on what was built never panic and stay
    /// consistent with each other.
    #[test]
    fn arbitrary_keys_and_ids_never_panic(
        members in prop::collection::vec((".{0,12}", prop_oneof![9 => 1u32..4, 1 => Just(0u32)]), 0..8),
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..20),
        loads in prop::collection::vec(any::<u64>(), 0..8),
        want in 0usize..10,
        vnodes in 1u32..200,
        hash in hash_kind(),
    ) {
        let nodes = members.iter().map(|(id, w)| Node::weighted(id.as_str(), *w));
        let Ok(ring) = HashRing::builder().hash(hash).vnodes(vnodes).build(nodes) else {
            return Ok(());
        };
        let empty = HashRing::builder().hash(hash).vnodes(vnodes).build([]).unwrap();
        let plan = empty.diff(&ring).unwrap();
        prop_assert!(plan.is_empty(), "an empty ring owns nothing, so nothing moves");
        let back = ring.diff(&empty);
        prop_assert_eq!(back.is_err(), !ring.is_empty());
        for key in &keys {
            let owner = ring.node(key.as_slice());
            prop_assert_eq!(owner.is_some(), !ring.is_empty());
            let owners: Vec<&Node> = ring.owners(key.as_slice(), want).collect();
            prop_assert_eq!(owners.len(), want.min(ring.len()));
            prop_assert_eq!(owners.first().copied(), if want > 0 { owner } else { None });
            let bounded = ring.node_bounded(key.as_slice(), &loads, &BoundedLoad::default());
            if let Ok(pick) = bounded {
                prop_assert_eq!(loads.len(), ring.len());
                prop_assert!(loads[pick.index] < pick.cap);
            }
            if let Some(node) = owner {
                let pos = ring.position(key.as_slice());
                prop_assert!(ring.ranges(node.id()).unwrap().iter().any(|r| r.contains(pos)));
            }
        }
        if let Some(first) = ring.nodes().first() {
            let smaller = ring.with_changes([Change::remove(first.id().clone())]).unwrap();
            let plan = ring.diff(&smaller);
            prop_assert_eq!(plan.is_ok(), !smaller.is_empty());
            if let Ok(plan) = plan {
                prop_assert!(plan.moves().iter().all(|m| &m.from == first.id()));
            }
        }
    }
}

/// Found by the property above when points were raw CRC32 of the labels: the node of
/// weight 3 got 4.1 times the load of the others, because CRC32 is linear. Positions are
/// now CRC32 followed by `fmix32`; this case stays as a regression test.
#[test]
fn weights_regression_raw_crc32_linearity() {
    let mut nodes: Vec<Node> = ids(7, 3_853_609_231).iter().map(Node::new).collect();
    nodes.push(Node::weighted("heavy", 3));
    let ring = HashRing::new(nodes).unwrap();
    let heavy = (0..20_000u64)
        .filter(|&k| ring.node(k).unwrap().id() == "heavy")
        .count();
    let ratio = heavy as f64 / ((20_000 - heavy) as f64 / 7.0);
    assert!(ratio > 2.4 && ratio < 3.7, "heavy/light = {ratio:.2}");
}
