//! A TCP listener that reads and strips the PROXY header of every connection.

use super::*;

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
                        let span = tracing::Span::none();
                        match sd_core::deadline::timeout(timeout, span, read_proxy_header(&mut stream)).await {
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
