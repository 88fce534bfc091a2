//! Unit tests of the header parsers and the client pick.

use super::proxy_protocol::V2_SIGNATURE;
use super::*;

fn xff(trust: Trust, values: &[&str], peer: Option<&str>) -> Result<IpAddr> {
    ClientIp::x_forwarded_for(trust)?.resolve(
        values.iter().map(|v| v.as_bytes()),
        peer.map(|p| p.parse().unwrap()),
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn xff_hops_take_the_nth_from_the_right() {
    assert_eq!(
        xff(Trust::Hops(1), &["1.1.1.1, 2.2.2.2"], None).unwrap(),
        ip("2.2.2.2")
    );
    assert_eq!(
        xff(Trust::Hops(2), &["1.1.1.1, 2.2.2.2", "3.3.3.3"], None).unwrap(),
        ip("2.2.2.2")
    );
    // Spoofed entries on the left are never read, even malformed ones.
    assert_eq!(
        xff(Trust::Hops(1), &["<script>, evil,,, 9.9.9.9"], None).unwrap(),
        ip("9.9.9.9")
    );
    assert!(matches!(
        xff(Trust::Hops(3), &["1.1.1.1, 2.2.2.2"], None),
        Err(Error::TooFewHops {
            found: 2,
            trusted_hops: 3,
            ..
        })
    ));
    assert!(matches!(
        xff(Trust::Hops(1), &["1.1.1.1, nonsense"], None),
        Err(Error::MalformedHeader { position: 1, .. })
    ));
    assert!(matches!(
        xff(Trust::Hops(1), &[], None),
        Err(Error::MissingHeader { .. })
    ));
    assert!(matches!(
        xff(Trust::Hops(1), &["1.1.1.1,"], None),
        Err(Error::MalformedHeader { .. })
    ));
}

#[test]
fn xff_forms_and_canonical_addresses() {
    for (header, client) in [
        ("1.2.3.4:8080", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
    ] {
        assert_eq!(
            xff(Trust::Hops(1), &[header], None).unwrap(),
            ip(client),
            "{header}"
        );
    }
    for bad in [
        "1.2.3.4:99999",
        "[::1",
        "[::1]x",
        "1.2.3",
        "1.2.3.4:",
        "01.2.3.4x",
        "\u{7f}",
    ] {
        assert!(xff(Trust::Hops(1), &[bad], None).is_err(), "{bad}");
    }
    assert!(matches!(
        xff(Trust::Hops(1), &["unknown"], None),
        Err(Error::NoClientAddress { .. })
    ));
}

#[test]
fn xff_trusted_proxies_walk_from_the_peer() {
    let trust = || {
        Trust::Proxies(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ])
    };
    for (header, peer, client) in [
        // Through two trusted proxies.
        ("6.6.6.6, 1.1.1.1, 10.0.0.2", "10.0.0.1", "1.1.1.1"),
        // The client put a trusted-looking address on the left: still the first untrusted.
        ("10.9.9.9, 1.1.1.1", "10.0.0.1", "1.1.1.1"),
        // A direct client that sets the header itself is its peer address.
        ("1.1.1.1", "8.8.8.8", "8.8.8.8"),
        // Internal traffic: everything trusted.
        ("10.1.1.1", "10.0.0.1", "10.1.1.1"),
    ] {
        assert_eq!(
            xff(trust(), &[header], Some(peer)).unwrap(),
            ip(client),
            "{header} from {peer}"
        );
    }
    let long = vec!["10.0.0.1"; 100].join(",");
    assert!(xff(trust(), &[&long], Some("10.0.0.1")).is_err());
    let huge = "1.1.1.1,".repeat(2000);
    assert!(matches!(
        xff(trust(), &[&huge], Some("10.0.0.1")),
        Err(Error::MalformedHeader { position: 0, .. })
    ));
}

#[test]
fn forwarded_rightmost_for() {
    let fwd = |trust, v: &str| {
        ClientIp::forwarded(trust)
            .unwrap()
            .resolve([v.as_bytes()], None)
    };
    assert_eq!(
        fwd(
            Trust::Hops(1),
            r#"for=6.6.6.6;proto=http, For="[2001:db8:cafe::17]:4711";by=_proxy"#
        )
        .unwrap(),
        ip("2001:db8:cafe::17")
    );
    assert_eq!(
        fwd(
            Trust::Hops(2),
            r#"for=192.0.2.60;proto=http;by=203.0.113.43, for="198.51.100.17""#
        )
        .unwrap(),
        ip("192.0.2.60")
    );
    // A quoted comma does not split elements.
    assert_eq!(
        fwd(Trust::Hops(1), r#"for=1.1.1.1;x="a,b", for=2.2.2.2"#).unwrap(),
        ip("2.2.2.2")
    );
    assert_eq!(
        fwd(Trust::Hops(2), r#"for=1.1.1.1;x="a,b", for=2.2.2.2"#).unwrap(),
        ip("1.1.1.1")
    );
    assert!(matches!(
        fwd(Trust::Hops(1), "for=_hidden"),
        Err(Error::NoClientAddress { .. })
    ));
    assert!(matches!(
        fwd(Trust::Hops(1), "proto=https"),
        Err(Error::NoClientAddress { .. })
    ));
    for bad in [
        "for",
        "for=\"1.1.1.1",
        "for=1.1.1.1 x",
        "=1",
        "for=1.1.1.1;for=2.2.2.2",
        "for=\"\\",
    ] {
        assert!(fwd(Trust::Hops(1), bad).is_err(), "{bad}");
    }
}

#[test]
fn config_errors_name_the_field() {
    assert!(matches!(
        ClientIp::x_forwarded_for(Trust::Hops(0)),
        Err(Error::InvalidConfig {
            field: "trusted_hops",
            ..
        })
    ));
    assert!(matches!(
        ClientIp::forwarded(Trust::Proxies(vec![])),
        Err(Error::InvalidConfig {
            field: "trusted_proxies",
            ..
        })
    ));
    assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    assert!("nonsense/8".parse::<Cidr>().is_err());
    assert!(matches!(
        ClientIp::builder().ipv6_prefix(0).build(),
        Err(Error::InvalidConfig {
            field: "ipv6_prefix",
            ..
        })
    ));
    assert!(ClientIp::builder().ipv6_prefix(129).build().is_err());
}

#[test]
fn ipv6_keys_cover_the_prefix() {
    let c = ClientIp::peer();
    assert_eq!(c.key(ip("2001:db8::1")), c.key(ip("2001:db8::ffff:1")));
    assert_eq!(c.key(ip("2001:db8::1")), "2001:db8::/64");
    assert_eq!(c.key(ip("::ffff:1.2.3.4")), "1.2.3.4");
}

#[test]
fn proxy_v1() {
    let (h, n) = parse_proxy_header(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET /")
        .unwrap()
        .unwrap();
    assert_eq!(n, 45);
    assert_eq!(h.source, Some("192.0.2.1:56324".parse().unwrap()));
    assert_eq!(h.destination, Some("198.51.100.1:443".parse().unwrap()));
    let (h, _) = parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.source, Some("[2001:db8::1]:1".parse().unwrap()));
    assert_eq!(
        parse_proxy_header(b"PROXY UNKNOWN\r\n")
            .unwrap()
            .unwrap()
            .0
            .source,
        None
    );
    assert_eq!(parse_proxy_header(b"PROXY TCP4 1.2.3.4").unwrap(), None);
    assert_eq!(parse_proxy_header(b"PRO").unwrap(), None);
    for bad in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n",
    ] {
        assert!(
            parse_proxy_header(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = [b"PROXY ".as_slice(), &[b'A'; 200]].concat();
    assert!(parse_proxy_header(&long).is_err());
}

fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut v = V2_SIGNATURE.to_vec();
    v.push(0x20 | cmd);
    v.push(fam);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[test]
fn proxy_v2() {
    let body = [192, 0, 2, 1, 198, 51, 100, 1, 0xdc, 0x04, 0x01, 0xbb];
    let (h, n) = parse_proxy_header(&v2(1, 0x11, &body)).unwrap().unwrap();
    assert_eq!(n, 28);
    assert_eq!(h.source, Some("192.0.2.1:56324".parse().unwrap()));
    // With a TLV (type 1 ALPN, length 2).
    let with_tlv = [&body[..], &[1, 0, 2, b'h', b'2']].concat();
    assert!(
        parse_proxy_header(&v2(1, 0x11, &with_tlv))
            .unwrap()
            .is_some()
    );
    // LOCAL: a health check, no client.
    assert_eq!(
        parse_proxy_header(&v2(0, 0x11, &body))
            .unwrap()
            .unwrap()
            .0
            .source,
        None
    );
    let mut v6 = vec![0u8; 36];
    v6[15] = 1;
    v6[33] = 80;
    let (h, _) = parse_proxy_header(&v2(1, 0x21, &v6)).unwrap().unwrap();
    assert_eq!(h.source, Some("[::1]:80".parse().unwrap()));
    // Incomplete, then hostile.
    assert_eq!(parse_proxy_header(&v2(1, 0x11, &body)[..20]).unwrap(), None);
    assert_eq!(parse_proxy_header(&V2_SIGNATURE[..5]).unwrap(), None);
    for bad in [
        v2(1, 0x11, &body[..8]),
        v2(2, 0x11, &body),
        v2(1, 0x41, &body),
        v2(1, 0x13, &body),
        v2(1, 0x21, &body),
        v2(1, 0x11, &[&body[..], &[1, 0, 9, 1]].concat()),
        v2(1, 0x11, &[&body[..], &[1, 0]].concat()),
    ] {
        assert!(parse_proxy_header(&bad).is_err(), "{bad:?}");
    }
    let mut wrong_version = v2(1, 0x11, &body);
    wrong_version[12] = 0x11;
    assert!(parse_proxy_header(&wrong_version).is_err());
}

#[test]
fn parsers_never_panic_on_garbage() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let alphabet = b"0123456789abcdef:.,;=[]\" _\\forFORunknown\r\nPROXY TCP4";
    for _ in 0..20_000 {
        let len = (next() % 80) as usize;
        let s: Vec<u8> = (0..len)
            .map(|_| alphabet[(next() as usize) % alphabet.len()])
            .collect();
        let _ = ClientIp::forwarded(Trust::Hops(1))
            .unwrap()
            .resolve([&s[..]], None);
        let _ = ClientIp::x_forwarded_for(Trust::Hops(2))
            .unwrap()
            .resolve([&s[..]], None);
        let _ = parse_proxy_header(&s);
        let mut b = V2_SIGNATURE.to_vec();
        b.extend((0..len).map(|_| next() as u8));
        let _ = parse_proxy_header(&b);
    }
}
