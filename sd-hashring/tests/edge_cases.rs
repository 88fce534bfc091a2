//! Edge cases: empty ring, one node, odd ids, invalid weights and configs, duplicates.

use sd_hashring::{
    BoundedLoad, Change, Error, HashKind, HashRing, Jump, Maglev, Node, Placement, Rendezvous, diff,
};

#[test]
fn empty_ring_answers_none_and_typed_errors() {
    let ring = HashRing::new([]).unwrap();
    assert!(ring.is_empty());
    assert_eq!(ring.node("k"), None);
    assert_eq!(ring.node_at(0), None);
    assert_eq!(ring.owners("k", 3).count(), 0);
    assert_eq!(
        ring.node_bounded("k", &[], &BoundedLoad::default()),
        Err(Error::EmptyRing)
    );
    let one = HashRing::new([Node::new("a")]).unwrap();
    assert!(diff(&ring, &one).unwrap().is_empty());
    assert_eq!(diff(&one, &ring), Err(Error::EmptyRing));
    assert_eq!(ring.ranges("a"), Err(Error::UnknownNode { id: "a".into() }));
    assert_eq!(HashRing::default(), ring);
    // The other placements too.
    assert_eq!(Jump::new([]).unwrap().locate("k"), None);
    assert_eq!(Rendezvous::new([]).unwrap().locate("k"), None);
    assert!(Rendezvous::new([]).unwrap().owners("k", 2).is_empty());
    assert_eq!(Maglev::new([]).unwrap().locate("k"), None);
}

#[test]
fn one_node_owns_everything() {
    let ring = HashRing::new([Node::new("solo")]).unwrap();
    for k in 0..1000u32 {
        assert_eq!(ring.node(k).unwrap().id(), "solo");
    }
    assert_eq!(ring.owners("k", 5).count(), 1);
    let all = ring.ranges("solo").unwrap();
    let covered: u128 = all.iter().map(|r| r.width()).sum();
    assert_eq!(covered, 1u128 << 32);
    let pick = ring
        .node_bounded("k", &[1_000_000], &BoundedLoad::default())
        .unwrap();
    assert_eq!(pick.node.id(), "solo");
    for p in [
        &Jump::new([Node::new("solo")]).unwrap() as &dyn Placement,
        &Rendezvous::new([Node::new("solo")]).unwrap(),
        &Maglev::new([Node::new("solo")]).unwrap(),
    ] {
        assert_eq!(p.locate_bytes(b"k"), Some(0));
    }
}

#[test]
fn odd_ids_are_fine_and_labels_do_not_collide() {
    let odd = [
        "-", "--", "a-1", "a", "a:55", "a:555", "\0", "\n\t", "ключ", "🦀-0", " ", "a-",
    ];
    let ring = HashRing::new(odd.iter().map(|id| Node::new(*id))).unwrap();
    assert_eq!(ring.len(), odd.len());
    // Every point was placed by the node whose label hashes there: no two nodes share a
    // label, so the point set is the union of each node's own points.
    for id in odd {
        let alone = HashRing::new([Node::new(id)]).unwrap();
        let mine: Vec<u64> = ring
            .points()
            .filter(|(_, n)| n.id() == id)
            .map(|(p, _)| p)
            .collect();
        let own: Vec<u64> = alone.points().map(|(p, _)| p).collect();
        assert_eq!(mine, own, "{id:?}");
        assert!(ring.contains(id));
    }
    for k in 0..500u32 {
        assert!(ring.node(k).is_some());
    }
}

#[test]
fn weight_zero_is_rejected_with_a_typed_error() {
    let zero = Error::ZeroWeight { id: "b".into() };
    assert_eq!(
        HashRing::new([Node::new("a"), Node::weighted("b", 0)]),
        Err(zero.clone())
    );
    let mut ring = HashRing::new([Node::new("a"), Node::new("b")]).unwrap();
    let before = ring.clone();
    assert_eq!(ring.set_weight("b", 0), Err(zero.clone()));
    assert_eq!(
        ring.add(Node::weighted("c", 0)),
        Err(Error::ZeroWeight { id: "c".into() })
    );
    assert_eq!(ring, before, "a failed batch leaves the ring unchanged");
    assert_eq!(Rendezvous::new([Node::weighted("b", 0)]), Err(zero.clone()));
    assert_eq!(Maglev::new([Node::weighted("b", 0)]), Err(zero.clone()));
    assert_eq!(Jump::new([Node::weighted("b", 0)]), Err(zero));
    let msg = Error::ZeroWeight { id: "b".into() }.to_string();
    assert!(msg.contains("weight of at least 1"), "{msg}");
}

#[test]
fn duplicate_and_unknown_ids_are_rejected() {
    let dup = Error::DuplicateNode { id: "a".into() };
    assert_eq!(
        HashRing::new([Node::new("a"), Node::new("b"), Node::new("a")]),
        Err(dup.clone())
    );
    let mut ring = HashRing::new([Node::new("a")]).unwrap();
    assert_eq!(ring.add(Node::weighted("a", 2)), Err(dup.clone()));
    assert_eq!(
        ring.remove("zz"),
        Err(Error::UnknownNode { id: "zz".into() })
    );
    assert_eq!(
        ring.set_weight("zz", 2),
        Err(Error::UnknownNode { id: "zz".into() })
    );
    assert_eq!(
        Jump::new([Node::new("a"), Node::new("a")]),
        Err(dup.clone())
    );
    assert_eq!(Maglev::new([Node::new("a"), Node::new("a")]), Err(dup));
    // Within one batch, remove then add again is allowed.
    ring.apply([Change::remove("a"), Change::add(Node::weighted("a", 2))])
        .unwrap();
    assert_eq!(ring.nodes()[0].weight(), 2);
    assert_eq!(HashRing::new([Node::new("")]), Err(Error::EmptyId));
}

#[test]
fn invalid_configs_name_the_field() {
    let field = |e: Error| match e {
        Error::InvalidConfig { field, .. } => field,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        field(HashRing::builder().vnodes(0).build([]).unwrap_err()),
        "vnodes"
    );
    assert_eq!(field(BoundedLoad::new(0.5).unwrap_err()), "c");
    assert_eq!(
        field(Jump::new([Node::weighted("a", 2)]).unwrap_err()),
        "weight"
    );
    assert_eq!(
        field(Maglev::with_table_size([Node::new("a")], 65_536).unwrap_err()),
        "table_size"
    );
    assert_eq!(
        field(Maglev::with_table_size([Node::weighted("a", 20)], 7).unwrap_err()),
        "table_size"
    );
    assert_eq!(
        field(Maglev::new([Node::weighted("a", u32::MAX)]).unwrap_err()),
        "nodes"
    );
    #[cfg(feature = "ketama")]
    assert_eq!(
        field(
            HashRing::builder()
                .hash(HashKind::Ketama)
                .vnodes(10)
                .build([])
                .unwrap_err()
        ),
        "vnodes"
    );
}

#[test]
fn huge_weights_fail_instead_of_exhausting_memory() {
    let err = HashRing::new([Node::weighted("a", u32::MAX)]).unwrap_err();
    assert!(matches!(err, Error::TooManyPoints { .. }), "{err:?}");
    let err = HashRing::builder()
        .vnodes(u32::MAX)
        .build([Node::weighted("a", u32::MAX)]);
    assert!(matches!(err, Err(Error::TooManyPoints { .. })));
}

#[test]
fn bounded_mode_reports_bad_loads_and_full_rings() {
    let ring = HashRing::new([Node::new("a"), Node::new("b")]).unwrap();
    let bound = BoundedLoad::default();
    assert_eq!(
        ring.node_bounded("k", &[0], &bound),
        Err(Error::LoadsMismatch {
            expected: 2,
            got: 1
        })
    );
    // Loads far above any cap (reported by another process, say): a typed error.
    assert_eq!(
        ring.node_bounded("k", &[u64::MAX, u64::MAX], &bound),
        Err(Error::AllNodesFull {
            nodes: 2,
            total_load: u64::MAX
        })
    );
    // All full except one: the walk finds it.
    let pick = ring.node_bounded("k", &[100, 0], &bound).unwrap();
    assert_eq!(pick.node.id(), "b");
}

#[test]
fn diff_rejects_rings_with_different_hashes() {
    let a = HashRing::new([Node::new("a")]).unwrap();
    let b = HashRing::builder()
        .hash(HashKind::Xxh3)
        .build([Node::new("a")])
        .unwrap();
    assert_eq!(
        diff(&a, &b),
        Err(Error::HashMismatch {
            old: HashKind::Crc32,
            new: HashKind::Xxh3
        })
    );
}

#[test]
fn positions_past_the_hash_range_wrap() {
    let ring = HashRing::new([Node::new("a"), Node::new("b")]).unwrap();
    let first = ring.points().next().unwrap().1;
    assert_eq!(ring.node_at(u64::MAX), Some(first));
    assert_eq!(ring.node_at(1 << 40), Some(first));
}

/// Two ids whose CRC32 labels collide, found offline by brute force over
/// `host-{12 hex digits}` ids. CRC32 is linear, so a colliding pair collides at
/// several vnodes at once (`b-99 = a-122`, `b-98 = a-123`, ...).
const COLLIDING: (&str, &str) = ("host-0e661cf1c565", "host-bf85e7b97856");

#[test]
fn colliding_points_resolve_by_id_in_any_order() {
    let (a, b) = COLLIDING;
    let shared = HashKind::Crc32.position(format!("{a}-122").as_bytes());
    assert_eq!(
        shared,
        HashKind::Crc32.position(format!("{b}-99").as_bytes())
    );
    let collisions: Vec<u64> = (0..160)
        .map(|i| HashKind::Crc32.position(format!("{a}-{i}").as_bytes()))
        .filter(|p| (0..160).any(|j| HashKind::Crc32.position(format!("{b}-{j}").as_bytes()) == *p))
        .collect();
    assert!(collisions.len() >= 8, "{collisions:?}");

    let built = HashRing::new([Node::new(a), Node::new(b), Node::new("c")]).unwrap();
    let mut forward = HashRing::default();
    for id in [a, b, "c"] {
        forward.add(Node::new(id)).unwrap();
    }
    let mut reversed = HashRing::default();
    for id in ["c", b, a] {
        reversed.add(Node::new(id)).unwrap();
    }
    assert_eq!(forward, built);
    assert_eq!(reversed, built);
    assert_eq!(built.point_count(), 3 * 160, "both colliding points stay");

    for &p in &collisions {
        let at: Vec<&str> = built
            .points()
            .filter(|(q, _)| *q == p)
            .map(|(_, n)| n.id().as_str())
            .collect();
        assert_eq!(at, [a, b], "both points, the smaller id first");
        // The smaller id owns the arc ending at the shared position.
        assert_eq!(built.node_at(p).unwrap().id(), a);
    }
    // Removing either node leaves the other's point, which then owns the arc.
    for (gone, kept) in [(a, b), (b, a)] {
        let mut ring = built.clone();
        ring.remove(gone).unwrap();
        assert_eq!(ring.point_count(), 2 * 160);
        for &p in &collisions {
            assert_eq!(ring.node_at(p).unwrap().id(), kept, "{gone} removed");
        }
        assert_eq!(
            ring,
            HashRing::new([Node::new(kept), Node::new("c")]).unwrap()
        );
    }
}
