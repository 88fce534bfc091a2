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
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }

    /// The rightmost untrusted entry of `X-Forwarded-For` (the IPv6 prefix at its
    /// default; set it with [`Self::builder`]).
    pub fn x_forwarded_for(trust: Trust) -> Result<Self> {
        Self::builder().x_forwarded_for(trust).build()
    }

    /// The rightmost untrusted `for=` of RFC 7239 `Forwarded` (the IPv6 prefix at its
    /// default; set it with [`Self::builder`]).
    pub fn forwarded(trust: Trust) -> Result<Self> {
        Self::builder().forwarded(trust).build()
    }

    /// Every setting: the source (the TCP peer unless set) and the IPv6 prefix.
    ///
    /// ```
    /// use sd_ratelimit::client_ip::{ClientIp, Trust};
    ///
    /// let ip = ClientIp::builder()
    ///     .x_forwarded_for(Trust::Hops(1))
    ///     .ipv6_prefix(56)
    ///     .build()?;
    /// assert_eq!(ip.key("2001:db8:1:2ff::1".parse()?), "2001:db8:1:200::/56");
    /// assert!(ClientIp::builder().ipv6_prefix(0).build().is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn builder() -> ClientIpBuilder {
        ClientIpBuilder {
            source: Source::Peer,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
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

/// The IPv6 prefix length a client's key keeps unless told otherwise: one subscriber's
/// whole /64 is one client, so rotating addresses inside it does not escape the limit.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// The settings of a [`ClientIp`], from [`ClientIp::builder`]; [`build`](Self::build)
/// checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct ClientIpBuilder {
    source: Source,
    ipv6_prefix: u8,
}

impl ClientIpBuilder {
    /// The TCP peer address (the default source).
    pub fn peer(mut self) -> Self {
        self.source = Source::Peer;
        self
    }

    /// The rightmost untrusted entry of `X-Forwarded-For`.
    pub fn x_forwarded_for(mut self, trust: Trust) -> Self {
        self.source = Source::XForwardedFor(trust);
        self
    }

    /// The rightmost untrusted `for=` of RFC 7239 `Forwarded`.
    pub fn forwarded(mut self, trust: Trust) -> Self {
        self.source = Source::Forwarded(trust);
        self
    }

    /// The IPv6 prefix length that [`ClientIp::key`] keeps, 1 to 128 (default
    /// [`DEFAULT_IPV6_PREFIX`]).
    pub fn ipv6_prefix(mut self, prefix: u8) -> Self {
        self.ipv6_prefix = prefix;
        self
    }

    /// The configuration, or [`Error::InvalidConfig`] naming `trusted_hops`,
    /// `trusted_proxies` or `ipv6_prefix`.
    pub fn build(self) -> Result<ClientIp> {
        if self.ipv6_prefix == 0 || self.ipv6_prefix > 128 {
            return Err(Error::config("ipv6_prefix", "must be between 1 and 128"));
        }
        let source = match self.source {
            Source::Peer => Source::Peer,
            Source::XForwardedFor(trust) => Source::XForwardedFor(check_trust(trust)?),
            Source::Forwarded(trust) => Source::Forwarded(check_trust(trust)?),
        };
        Ok(ClientIp {
            source,
            ipv6_prefix: self.ipv6_prefix,
        })
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

mod forwarded;
#[cfg(feature = "tokio")]
mod listener;
mod proxy_protocol;
#[cfg(test)]
mod tests;

use forwarded::{collect, forwarded_fors, node, pick, valid_port};
#[cfg(feature = "tokio")]
pub use listener::ProxyListener;
#[cfg(feature = "tokio")]
pub use proxy_protocol::read_proxy_header;
pub use proxy_protocol::{ProxyHeader, parse_proxy_header};
