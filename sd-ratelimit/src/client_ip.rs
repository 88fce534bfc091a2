//! The client's IP address, from sources that a client cannot forge.
//!
//! Behind proxies, the address list in `X-Forwarded-For` (or RFC 7239 `Forwarded`) grows
//! to the right: each proxy appends the address it received the request from. Everything
//! left of what your own proxies wrote is whatever the client sent. So the client is the
//! **rightmost address not written by a trusted proxy**, never the leftmost:
//!
//! - [`Trust::Hops`]`(n)`: you run `n` proxies, each appending one entry; the client is
//!   the `n`-th entry from the right.
//! - [`Trust::Proxies`]: walk from the right (starting with the TCP peer) and skip
//!   addresses inside the trusted CIDRs; the first one outside is the client. A peer
//!   outside the CIDRs is the client itself, whatever its headers say.
//!
//! Several headers of one name are one list, in order. Entries are parsed strictly; a
//! malformed entry at or right of the client's position is an error, never skipped
//! (entries further left are never read). IPv4-mapped IPv6 addresses are read as IPv4.
//!
//! For a TCP listener behind a load balancer that speaks the PROXY protocol, accept
//! connections through `ProxyListener` (feature `tokio`), which reads and strips the
//! header of every connection and hands on the client's address, or read the header
//! yourself with [`parse_proxy_header`] (or `read_proxy_header`). A listener is either
//! configured for the protocol or not: the header is never guessed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::error::{Error, Result};

/// Header values longer than this are refused (a proxy chain never needs 8 KiB).
pub const MAX_HEADER_LEN: usize = 8 * 1024;

/// At most this many hops are walked or trusted.
pub const MAX_HOPS: usize = 64;

const XFF: &str = "x-forwarded-for";
const FORWARDED: &str = "forwarded";

/// An IP network, such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network `addr/prefix`; host bits of `addr` are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(Error::config(
                "prefix",
                "longer than the address (32 for IPv4, 128 for IPv6)",
            ));
        }
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` lies in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            Error::config("trusted_proxies", "not an IP network such as 10.0.0.0/8")
        })?;
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| Error::config("trusted_proxies", "prefix length is not a number"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

/// Which entries of the address list your own infrastructure wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// That many proxies, each appending one entry.
    Hops(usize),
    /// Every proxy has an address in one of these networks.
    Proxies(Vec<Cidr>),
}

/// Where the client address comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Peer,
    XForwardedFor(Trust),
    Forwarded(Trust),
}

/// How to find the client's IP for a request.
///
/// ```
/// use sd_ratelimit::client_ip::{ClientIp, Trust};
///
/// // One proxy (nginx) in front: the client is the rightmost entry it appended.
/// let ip = ClientIp::x_forwarded_for(Trust::Hops(1))?;
/// let client = ip.resolve([&b"6.6.6.6, 203.0.113.7"[..]], None)?;
/// assert_eq!(client.to_string(), "203.0.113.7"); // not the spoofed 6.6.6.6
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIp {
    source: Source,
    ipv6_prefix: u8,
}

impl ClientIp {
    /// The TCP peer address (no proxy in front, or a PROXY-protocol listener that already
    /// replaced the peer with the header's source).
    pub fn peer() -> Self {
        ClientIp {
            source: Source::Peer,
            ipv6_prefix: 64,
        }
    }

    /// The rightmost untrusted entry of `X-Forwarded-For`.
    pub fn x_forwarded_for(trust: Trust) -> Result<Self> {
        Ok(ClientIp {
            source: Source::XForwardedFor(check_trust(trust)?),
            ipv6_prefix: 64,
        })
    }

    /// The rightmost untrusted `for=` of RFC 7239 `Forwarded`.
    pub fn forwarded(trust: Trust) -> Result<Self> {
        Ok(ClientIp {
            source: Source::Forwarded(check_trust(trust)?),
            ipv6_prefix: 64,
        })
    }

    /// The IPv6 prefix length that [`Self::key`] keeps (default 64: one subscriber's
    /// whole /64 is one client, so rotating addresses inside it does not escape the
    /// limit).
    pub fn ipv6_prefix(mut self, prefix: u8) -> Result<Self> {
        if prefix == 0 || prefix > 128 {
            return Err(Error::config("ipv6_prefix", "must be between 1 and 128"));
        }
        self.ipv6_prefix = prefix;
        Ok(self)
    }

    /// The header this source reads, if any.
    pub fn header(&self) -> Option<&'static str> {
        match self.source {
            Source::Peer => None,
            Source::XForwardedFor(_) => Some(XFF),
            Source::Forwarded(_) => Some(FORWARDED),
        }
    }

    /// The client IP from the values of [`Self::header`] (in order) and the TCP peer.
    pub fn resolve<'a>(
        &self,
        values: impl IntoIterator<Item = &'a [u8]>,
        peer: Option<IpAddr>,
    ) -> Result<IpAddr> {
        let peer = peer.map(|p| p.to_canonical());
        match &self.source {
            Source::Peer => peer.ok_or(Error::MissingHeader {
                header: "peer address",
            }),
            Source::XForwardedFor(trust) => {
                let values = collect(values, XFF)?;
                let entries = values
                    .iter()
                    .rev()
                    .flat_map(|v| v.rsplit(','))
                    .map(|e| node(e.trim(), XFF));
                pick(entries, trust, peer, XFF)
            }
            Source::Forwarded(trust) => {
                let values = collect(values, FORWARDED)?;
                let mut entries = Vec::new();
                for v in &values {
                    forwarded_fors(v, &mut entries)?;
                }
                pick(entries.into_iter().rev(), trust, peer, FORWARDED)
            }
        }
    }

    /// The rate-limit key for `ip`: the address itself for IPv4, its prefix for IPv6.
    pub fn key(&self, ip: IpAddr) -> String {
        match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_string(),
            v6 => format!("{}/{}", mask(v6, self.ipv6_prefix), self.ipv6_prefix),
        }
    }
}

fn check_trust(trust: Trust) -> Result<Trust> {
    match &trust {
        Trust::Hops(0) => Err(Error::config(
            "trusted_hops",
            "must be at least 1; with no proxy in front use `ClientIp::peer()`",
        )),
        Trust::Hops(n) if *n > MAX_HOPS => Err(Error::config("trusted_hops", "more than 64 hops")),
        Trust::Proxies(cidrs) if cidrs.is_empty() => Err(Error::config(
            "trusted_proxies",
            "must name at least one network; with no proxy in front use `ClientIp::peer()`",
        )),
        _ => Ok(trust),
    }
}

fn collect<'a>(
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
enum Node {
    Ip(IpAddr),
    Opaque(String),
}

/// Parses a node: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:443`,
/// `unknown`, `_obfuscated`.
fn node(s: &str, header: &'static str) -> Result<Node> {
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

fn valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
}

/// Chooses the client among `entries` (rightmost first).
fn pick(
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
fn forwarded_fors(value: &str, out: &mut Vec<Result<Node>>) -> Result<()> {
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

/// A parsed PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyHeader {
    /// 1 (text) or 2 (binary).
    pub version: u8,
    /// The client's address; `None` for `UNKNOWN`, `LOCAL` (a health check from the
    /// proxy itself) and address families without an IP.
    pub source: Option<SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;

/// Parses a PROXY protocol v1 or v2 header at the start of `buf`.
///
/// `Ok(None)`: `buf` is a valid beginning but too short; read more and call again.
/// `Ok(Some((header, n)))`: the header is the first `n` bytes; the stream's data follows.
/// Anything that is not a PROXY header is an error: a listener configured for the
/// protocol must drop such connections, never fall back to guessing.
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>> {
    let bad = |reason| Error::ProxyProtocol { reason };
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(12);
    if buf[..n] == V2_SIGNATURE[..n] {
        return if buf.len() < 16 {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err(bad("no PROXY signature"));
    }
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(bad("v1 line longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| bad("v1 line is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => ProxyHeader {
            version: 1,
            source: None,
            destination: None,
        },
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr> {
                let ip: IpAddr = if *family == "TCP4" {
                    IpAddr::V4(s.parse().map_err(|_| bad("v1 address is not IPv4"))?)
                } else {
                    IpAddr::V6(s.parse().map_err(|_| bad("v1 address is not IPv6"))?)
                };
                Ok(ip)
            };
            let port = |p: &str| -> Result<u16> {
                if !valid_port(p) || (p.len() > 1 && p.starts_with('0')) {
                    return Err(bad("v1 port is not a number 0-65535"));
                }
                p.parse()
                    .map_err(|_| bad("v1 port is not a number 0-65535"))
            };
            ProxyHeader {
                version: 1,
                source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
                destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
            }
        }
        _ => return Err(bad("v1 line is not `PROXY TCP4|TCP6|UNKNOWN ...`")),
    };
    Ok(Some((header, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>> {
    let bad = |reason| Error::ProxyProtocol { reason };
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(bad("v2 version nibble is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(bad("v2 command is neither LOCAL nor PROXY")),
    };
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let (addrs, used) = match family >> 4 {
        0 => (None, 0),
        1 => {
            if body.len() < 12 {
                return Err(bad("v2 IPv4 address block shorter than 12 bytes"));
            }
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                Some((
                    SocketAddr::new(ip(0), port(8)),
                    SocketAddr::new(ip(4), port(10)),
                )),
                12,
            )
        }
        2 => {
            if body.len() < 36 {
                return Err(bad("v2 IPv6 address block shorter than 36 bytes"));
            }
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                Some((
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                )),
                36,
            )
        }
        3 => {
            if body.len() < 216 {
                return Err(bad("v2 unix address block shorter than 216 bytes"));
            }
            (None, 216)
        }
        _ => return Err(bad("v2 address family is not UNSPEC, INET, INET6 or UNIX")),
    };
    if !matches!(family & 0x0f, 0..=2) {
        return Err(bad("v2 transport is not UNSPEC, STREAM or DGRAM"));
    }
    // TLVs: type (1), length (2), value; they must tile the rest exactly.
    let mut rest = &body[used..];
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(bad("v2 TLV header truncated"));
        }
        let l = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        rest = rest
            .get(3 + l..)
            .ok_or(bad("v2 TLV longer than the header"))?;
    }
    let (source, destination) = match (local, addrs) {
        (false, Some((s, d))) => (Some(s), Some(d)),
        _ => (None, None),
    };
    Ok(Some((
        ProxyHeader {
            version: 2,
            source,
            destination,
        },
        total,
    )))
}

/// Reads exactly the PROXY header from the start of a connection (nothing after it).
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
pub async fn read_proxy_header<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ProxyHeader> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::with_capacity(V1_MAX);
    loop {
        // Byte by byte up to the fixed v2 part (16 bytes) or the v1 line end, so no byte
        // of the stream's own data is consumed.
        let want = if buf.len() >= 16 && buf.starts_with(V2_SIGNATURE) {
            16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
        } else {
            buf.len() + 1
        };
        let start = buf.len();
        buf.resize(want, 0);
        stream.read_exact(&mut buf[start..]).await?;
        if let Some((header, _)) = parse_proxy_header(&buf)? {
            return Ok(header);
        }
    }
}

/// A TCP listener configured for the PROXY protocol: every accepted connection must
/// start with a v1 or v2 header, which is read and stripped before the connection is
/// handed on with the client's address. A connection without a valid header is dropped
/// (never guessed as "no header"), and so is one that does not send its header within
/// the timeout.
///
/// Headers are read concurrently (one slow or silent peer does not hold up the others),
/// at most [`ProxyListener::MAX_PENDING`] at a time; beyond that, accepting waits.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_ratelimit::client_ip::ProxyListener;
///
/// let tcp = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// let mut listener = ProxyListener::new(tcp, Duration::from_secs(5))?;
/// loop {
///     let (stream, client) = listener.accept().await?;
///     // `client` is the address the load balancer saw; serve `stream` as usual.
/// #   drop((stream, client));
/// }
/// # }
/// ```
#[cfg(feature = "tokio")]
#[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
#[derive(Debug)]
pub struct ProxyListener {
    inner: tokio::net::TcpListener,
    header_timeout: std::time::Duration,
    pending: tokio::task::JoinSet<Option<(tokio::net::TcpStream, SocketAddr)>>,
    rejected: u64,
}

#[cfg(feature = "tokio")]
impl ProxyListener {
    /// The most connections whose header is being read at once.
    pub const MAX_PENDING: usize = 1024;

    /// Wraps `inner`; a peer must send its whole header within `header_timeout`.
    pub fn new(
        inner: tokio::net::TcpListener,
        header_timeout: std::time::Duration,
    ) -> Result<Self> {
        if header_timeout.is_zero() {
            return Err(Error::config("header_timeout", "must be longer than zero"));
        }
        Ok(ProxyListener {
            inner,
            header_timeout,
            pending: tokio::task::JoinSet::new(),
            rejected: 0,
        })
    }

    /// The next connection whose header was valid, with the client's address: the
    /// header's source, or the TCP peer for a `LOCAL` header (the proxy's own health
    /// check) and for `UNKNOWN` / non-IP families. Errors are the listener's own
    /// (`accept` failing, such as running out of file descriptors); a bad header only
    /// drops its connection and counts in [`Self::rejected`].
    pub async fn accept(&mut self) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
        loop {
            let full = self.pending.len() >= Self::MAX_PENDING;
            tokio::select! {
                accepted = self.inner.accept(), if !full => {
                    let (stream, peer) = accepted?;
                    let timeout = self.header_timeout;
                    self.pending.spawn(async move {
                        let mut stream = stream;
                        match tokio::time::timeout(timeout, read_proxy_header(&mut stream)).await {
                            Ok(Ok(header)) => Some((stream, header.source.unwrap_or(peer))),
                            Ok(Err(error)) => {
                                tracing::debug!(%error, %peer, "dropping a connection without a valid PROXY header");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "dropping a connection that sent no PROXY header in time");
                                None
                            }
                        }
                    });
                }
                Some(done) = self.pending.join_next(), if !self.pending.is_empty() => {
                    match done {
                        Ok(Some(ready)) => return Ok(ready),
                        // A bad header, or the reading task panicked (it does not).
                        _ => self.rejected += 1,
                    }
                }
            }
        }
    }

    /// How many connections were dropped for a missing, malformed or late header.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// The local address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(
            xff(Trust::Hops(1), &["1.2.3.4:8080"], None).unwrap(),
            ip("1.2.3.4")
        );
        assert_eq!(
            xff(Trust::Hops(1), &["[2001:db8::1]:443"], None).unwrap(),
            ip("2001:db8::1")
        );
        assert_eq!(
            xff(Trust::Hops(1), &["2001:db8::1"], None).unwrap(),
            ip("2001:db8::1")
        );
        assert_eq!(
            xff(Trust::Hops(1), &["::ffff:1.2.3.4"], None).unwrap(),
            ip("1.2.3.4")
        );
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
        // Through two trusted proxies.
        assert_eq!(
            xff(trust(), &["6.6.6.6, 1.1.1.1, 10.0.0.2"], Some("10.0.0.1")).unwrap(),
            ip("1.1.1.1")
        );
        // The client put a trusted-looking address on the left: still the first untrusted.
        assert_eq!(
            xff(trust(), &["10.9.9.9, 1.1.1.1"], Some("10.0.0.1")).unwrap(),
            ip("1.1.1.1")
        );
        // A direct client that sets the header itself is its peer address.
        assert_eq!(
            xff(trust(), &["1.1.1.1"], Some("8.8.8.8")).unwrap(),
            ip("8.8.8.8")
        );
        // Internal traffic: everything trusted.
        assert_eq!(
            xff(trust(), &["10.1.1.1"], Some("10.0.0.1")).unwrap(),
            ip("10.1.1.1")
        );
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
        assert!(ClientIp::peer().ipv6_prefix(0).is_err());
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
}
