//! PROXY protocol v1 (text) and v2 (binary) headers.

use super::*;

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

pub(super) const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
pub(super) const V1_MAX: usize = 107;

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
