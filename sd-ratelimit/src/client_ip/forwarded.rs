//! `X-Forwarded-For` and RFC 7239 `Forwarded`: strict parsing of the entries and the
//! pick of the rightmost untrusted one.

use super::*;

pub(super) fn collect<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    header: &'static str,
) -> Result<Vec<&'a str>> {
    let mut total = 0;
    let mut out = Vec::new();
    for v in values {
        total += v.len() + 1;
        if total > MAX_HEADER_LEN {
            return Err(Error::MalformedHeader {
                header,
                position: 0,
                reason: "longer than 8 KiB",
            });
        }
        let s = std::str::from_utf8(v)
            .ok()
            .filter(|s| s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
            .ok_or(Error::MalformedHeader {
                header,
                position: 0,
                reason: "not visible ASCII",
            })?;
        out.push(s);
    }
    if out.is_empty() {
        return Err(Error::MissingHeader { header });
    }
    Ok(out)
}

/// One hop: an address, or a node that names none (`unknown`, `_hidden`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Node {
    Ip(IpAddr),
    Opaque(String),
}

/// Parses a node: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:443`,
/// `unknown`, `_obfuscated`.
pub(super) fn node(s: &str, header: &'static str) -> Result<Node> {
    let bad = |reason| Error::MalformedHeader {
        header,
        position: 0,
        reason,
    };
    if s.is_empty() {
        return Err(bad("empty entry"));
    }
    if s.eq_ignore_ascii_case("unknown") || s.starts_with('_') {
        if s.len() > 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad("invalid obfuscated identifier"));
        }
        return Ok(Node::Opaque(s.to_owned()));
    }
    let ip = if let Some(rest) = s.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or(bad("unclosed `[`"))?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(valid_port)) {
            return Err(bad("invalid port after `]`"));
        }
        IpAddr::V6(inner.parse().map_err(|_| bad("not an IPv6 address"))?)
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else if let Some((host, port)) = s.rsplit_once(':')
        && valid_port(port)
    {
        IpAddr::V4(host.parse().map_err(|_| bad("not an IP address"))?)
    } else {
        return Err(bad("not an IP address"));
    };
    Ok(Node::Ip(ip.to_canonical()))
}

pub(super) fn valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
}

/// Chooses the client among `entries` (rightmost first).
pub(super) fn pick(
    entries: impl Iterator<Item = Result<Node>>,
    trust: &Trust,
    peer: Option<IpAddr>,
    header: &'static str,
) -> Result<IpAddr> {
    let at = |position: usize| {
        move |e: Error| match e {
            Error::MalformedHeader { header, reason, .. } => Error::MalformedHeader {
                header,
                position,
                reason,
            },
            other => other,
        }
    };
    let opaque = |value: String| Error::NoClientAddress {
        header,
        value: value.chars().take(64).collect(),
    };
    match trust {
        Trust::Hops(n) => {
            let mut found = 0;
            for (i, entry) in entries.enumerate().take(*n) {
                let node = entry.map_err(at(i + 1))?;
                found = i + 1;
                if found == *n {
                    return match node {
                        Node::Ip(ip) => Ok(ip),
                        Node::Opaque(v) => Err(opaque(v)),
                    };
                }
            }
            Err(Error::TooFewHops {
                header,
                trusted_hops: *n,
                found,
            })
        }
        Trust::Proxies(cidrs) => {
            let trusted = |ip: IpAddr| cidrs.iter().any(|c| c.contains(ip));
            if let Some(peer) = peer
                && !trusted(peer)
            {
                // Not sent through a trusted proxy: its headers are the client's words.
                return Ok(peer);
            }
            let mut leftmost = None;
            for (i, entry) in entries.enumerate() {
                if i >= MAX_HOPS {
                    return Err(Error::MalformedHeader {
                        header,
                        position: i + 1,
                        reason: "more than 64 trusted hops",
                    });
                }
                match entry.map_err(at(i + 1))? {
                    Node::Ip(ip) if trusted(ip) => leftmost = Some(ip),
                    Node::Ip(ip) => return Ok(ip),
                    Node::Opaque(v) => return Err(opaque(v)),
                }
            }
            // Every hop is trusted: the request started inside the trusted networks.
            leftmost.or(peer).ok_or(Error::MissingHeader { header })
        }
    }
}

/// Appends the `for=` node of every element of one `Forwarded` value (an element
/// without `for=` counts as an opaque hop).
pub(super) fn forwarded_fors(value: &str, out: &mut Vec<Result<Node>>) -> Result<()> {
    let bad = |reason| Error::MalformedHeader {
        header: FORWARDED,
        position: 0,
        reason,
    };
    let bytes = value.as_bytes();
    let mut i = 0;
    let mut current: Option<Result<Node>> = None;
    loop {
        // One pair: token "=" (token / quoted-string).
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphanumeric()
            || i < bytes.len() && b"!#$%&'*+-.^_`|~".contains(&bytes[i])
        {
            i += 1;
        }
        let name = &value[start..i];
        if name.is_empty() {
            return Err(bad("expected a parameter name"));
        }
        if bytes.get(i) != Some(&b'=') {
            return Err(bad("expected `=` after the parameter name"));
        }
        i += 1;
        let val = if bytes.get(i) == Some(&b'"') {
            i += 1;
            let mut s = String::new();
            loop {
                match bytes.get(i) {
                    None => return Err(bad("unterminated quoted string")),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let c = bytes.get(i + 1).ok_or(bad("unterminated escape"))?;
                        s.push(char::from(*c));
                        i += 2;
                    }
                    Some(c) => {
                        s.push(char::from(*c));
                        i += 1;
                    }
                }
            }
            s
        } else {
            let start = i;
            while i < bytes.len() && !b",; \t".contains(&bytes[i]) {
                i += 1;
            }
            value[start..i].to_owned()
        };
        if name.eq_ignore_ascii_case("for") {
            if current.is_some() {
                return Err(bad("two `for=` in one element"));
            }
            current = Some(node(&val, FORWARDED));
        }
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b'\t') {
            i += 1;
        }
        match bytes.get(i) {
            Some(b';') => i += 1,
            Some(b',') | None => {
                out.push(
                    current
                        .take()
                        .unwrap_or_else(|| Ok(Node::Opaque("(no for=)".into()))),
                );
                if out.len() > 4 * MAX_HOPS {
                    return Err(bad("too many elements"));
                }
                match bytes.get(i) {
                    None => return Ok(()),
                    _ => i += 1,
                }
            }
            Some(_) => return Err(bad("expected `;` or `,`")),
        }
    }
}
