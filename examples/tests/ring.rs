//! The `ring` command's parsing and key loop, without a process.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../ring.rs"]
mod ring;

use sd_hashring::{HashRing, Node};

fn args(list: &[&str]) -> ring::Args {
    ring::parse_args(list.iter().map(|s| s.to_string())).unwrap()
}

#[test]
fn weights_follow_a_second_colon() {
    let nodes = ring::parse_nodes("a:11211, b:11211:2,c,[fd00::1]:6379,[fd00::2]:6379:3").unwrap();
    let got: Vec<(&str, u32)> = nodes
        .iter()
        .map(|n| (n.id().as_str(), n.weight()))
        .collect();
    assert_eq!(
        got,
        [
            ("a:11211", 1),
            ("b:11211", 2),
            ("c", 1),
            ("[fd00::1]:6379", 1),
            ("[fd00::2]:6379", 3),
        ]
    );
    let err = ring::parse_nodes("a:11211:x").unwrap_err().to_string();
    assert!(err.contains("weight of `a:11211:x`"), "{err}");
}

#[test]
fn keys_are_bytes_and_match_the_library() {
    let args = args(&["--nodes", "a:1,b:1:2,c:1"]);
    let placement = ring::build(&args).unwrap();
    let lib =
        HashRing::new([Node::new("a:1"), Node::weighted("b:1", 2), Node::new("c:1")]).unwrap();
    // A key that is not UTF-8, one with a CRLF ending, and an empty one.
    let input: &[u8] = b"user:1\n\xff\xfekey\nuser:2\r\n\n";
    let mut out = Vec::new();
    ring::map_keys(&placement, &args, input, &mut out).unwrap();
    let lines: Vec<&[u8]> = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let keys: [&[u8]; 4] = [b"user:1", b"\xff\xfekey", b"user:2", b""];
    assert_eq!(lines.len(), keys.len());
    for (line, key) in lines.iter().zip(keys) {
        let mut want = key.to_vec();
        want.push(b'\t');
        want.extend_from_slice(lib.node(key).unwrap().id().as_bytes());
        assert_eq!(*line, &want[..]);
    }
}
