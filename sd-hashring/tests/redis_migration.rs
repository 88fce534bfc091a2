//! The move plan against real data: keys spread over three real Redis servers, a fourth
//! joins, and only the keys the plan names are moved; afterwards every key sits where
//! the new ring says and nothing else was touched.

use std::collections::BTreeMap;

use sd_hashring::{Change, HashRing, Node};
use sd_testkit::RedisServer;
use sd_testkit::resp::Reply;

const KEYS: usize = 1000;

fn text(reply: &Reply) -> Option<String> {
    reply.as_text()
}

fn keys_on(server: &RedisServer) -> Vec<String> {
    match server.command(&["KEYS", "user:*"]).expect("KEYS") {
        Reply::Array(Some(items)) => items.iter().filter_map(text).collect(),
        other => panic!("unexpected KEYS reply {other:?}"),
    }
}

#[test]
fn a_fourth_server_joins_and_only_planned_keys_move() {
    let servers = RedisServer::start_many(4).expect("four redis servers");
    let names = ["shard-a", "shard-b", "shard-c", "shard-d"];
    let by_name: BTreeMap<&str, &RedisServer> = names.iter().copied().zip(&servers).collect();

    let old = HashRing::new(names[..3].iter().map(|n| Node::new(*n))).unwrap();
    for i in 0..KEYS {
        let key = format!("user:{i}");
        let owner = old.node(&key).unwrap().id().as_str();
        by_name[owner]
            .command(&["SET", &key, &i.to_string()])
            .unwrap();
    }
    let before: BTreeMap<&str, Vec<String>> =
        names.iter().map(|n| (*n, keys_on(by_name[n]))).collect();
    assert_eq!(before.values().map(Vec::len).sum::<usize>(), KEYS);

    let new = old
        .with_changes([Change::add(Node::new("shard-d"))])
        .unwrap();
    let plan = old.diff(&new).unwrap();
    let mut moved = 0;
    for from in &names[..3] {
        for key in keys_on(by_name[from]) {
            let Some(step) = plan.destination(&key) else {
                continue;
            };
            assert_eq!(step.from.as_str(), *from, "{key}");
            assert_eq!(
                step.to.as_str(),
                "shard-d",
                "a join moves keys only to the joiner"
            );
            let value = text(&by_name[from].command(&["GET", &key]).unwrap()).unwrap();
            by_name[step.to.as_str()]
                .command(&["SET", &key, &value])
                .unwrap();
            by_name[from].command(&["DEL", &key]).unwrap();
            moved += 1;
        }
    }

    // Exactly the keys whose owner changed were moved: about a quarter of them.
    let expected_moves = (0..KEYS)
        .filter(|i| old.node(format!("user:{i}")) != new.node(format!("user:{i}")))
        .count();
    assert_eq!(moved, expected_moves);
    assert!(
        (KEYS / 8..KEYS / 2).contains(&moved),
        "moved {moved} of {KEYS}"
    );

    // Every key is where the new ring says, with its value; kept keys were not touched.
    for (name, server) in &by_name {
        let mut held = keys_on(server);
        held.sort();
        let mut wanted: Vec<String> = (0..KEYS)
            .map(|i| format!("user:{i}"))
            .filter(|k| new.node(k).unwrap().id() == *name)
            .collect();
        wanted.sort();
        assert_eq!(held, wanted, "{name}");
        if *name != "shard-d" {
            assert!(before[name].iter().filter(|k| held.contains(k)).count() == held.len());
        }
    }
    for i in (0..KEYS).step_by(97) {
        let key = format!("user:{i}");
        let owner = new.node(&key).unwrap().id().as_str();
        let value = text(&by_name[owner].command(&["GET", &key]).unwrap());
        assert_eq!(value, Some(i.to_string()));
    }
}
