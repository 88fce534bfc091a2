//! The subscription on a Redis Cluster: sharded pub/sub (`SSUBSCRIBE`, Redis 7) on a
//! connection of its own to the master that owns the coherence channels' slot.
//!
//! redis-rs 1.8's async `PubSub` has no `SSUBSCRIBE`, and its cluster connection
//! re-subscribes on its own after a failover, which hides the gap this cache must see (a
//! message published while nobody listened is lost). So this module speaks the few RESP2
//! frames a subscription needs over a plain TCP connection, and ends the subscription on
//! anything that may have lost a message: the connection closing, the master giving the
//! slot away (it sends `sunsubscribe`), or an unexpected reply. The caller then resyncs
//! and subscribes again, asking the cluster who owns the slot now.

use std::io;

use futures::stream::BoxStream;
use redis::{ConnectionAddr, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::*;

/// The largest frame element read (a key or payload); anything longer ends the
/// subscription rather than allocating without bound.
const MAX_BULK: usize = 16 * 1024 * 1024;

/// How to reach a cluster's shard masters: the credentials of the client the instance was
/// built with.
#[derive(Clone)]
pub(super) struct ShardClient {
    username: Option<String>,
    password: Option<String>,
    timeout: Duration,
}

impl ShardClient {
    /// Takes the credentials of `client` (a client of any node of the cluster).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] (field `pubsub`) for TLS or Unix-socket clients.
    pub(super) fn new(client: &redis::Client, timeout: Duration) -> Result<Self> {
        let info = client.get_connection_info();
        if !matches!(info.addr(), ConnectionAddr::Tcp(..)) {
            return Err(Error::InvalidConfig {
                field: "pubsub",
                reason: "a cluster's sharded subscription runs over plain TCP (redis://); \
                         TLS and Unix sockets are not supported there"
                    .into(),
            });
        }
        let settings = info.redis_settings();
        Ok(Self {
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            timeout,
        })
    }

    /// Subscribes to `sharded` (`SSUBSCRIBE`, all in one slot) and `broadcast`
    /// (`SUBSCRIBE`) on the master that owns the slot of `sharded[0]`, as `conn`'s cluster
    /// names it. The node must answer `ROLE` with `master` in the same pipeline, so a
    /// subscription never starts on a replica (a replica's subscribers hear the shard's
    /// messages too, but are not told when it is promoted and messages were lost).
    pub(super) async fn subscribe<C: ConnectionLike>(
        &self,
        conn: &mut C,
        sharded: &[String],
        broadcast: &[String],
    ) -> io::Result<Messages> {
        let slot = key_slot(sharded.first().map_or("", String::as_str));
        let attempt = async {
            let (host, port) = owner(conn, slot).await?;
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            let mut reader = BufReader::new(stream);
            let mut out = Vec::new();
            let mut expect_ok = 0;
            if let Some(password) = &self.password {
                let mut auth = redis::cmd("AUTH");
                if let Some(user) = &self.username {
                    auth.arg(user);
                }
                auth.arg(password);
                out.extend(auth.get_packed_command());
                expect_ok += 1;
            }
            out.extend(redis::cmd("ROLE").get_packed_command());
            out.extend(redis::cmd("SSUBSCRIBE").arg(sharded).get_packed_command());
            out.extend(redis::cmd("SUBSCRIBE").arg(broadcast).get_packed_command());
            reader.get_mut().write_all(&out).await?;
            for _ in 0..expect_ok {
                if let Frame::Error(e) = read_frame(&mut reader).await? {
                    return Err(refused(format!("AUTH: {e}")));
                }
            }
            match read_frame(&mut reader).await? {
                Frame::Array(items) if matches!(items.first(), Some(Frame::Bulk(role)) if role == b"master") =>
                    {}
                other => return Err(refused(format!("{host}:{port} is not a master: {other:?}"))),
            }
            for (kind, channels) in [(&b"ssubscribe"[..], sharded), (b"subscribe", broadcast)] {
                for _ in channels {
                    match read_frame(&mut reader).await? {
                        Frame::Array(items) if matches!(items.first(), Some(Frame::Bulk(k)) if k == kind) =>
                            {}
                        // `-MOVED`: the slot has moved since the cluster was asked.
                        other => return Err(refused(format!("{host}:{port}: {other:?}"))),
                    }
                }
            }
            Ok(reader)
        };
        let reader = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "subscribing timed out"))??;
        Ok(messages(reader))
    }
}

/// `(channel, payload)` in the order the master sent them; ends on the first frame that
/// is not a message (`sunsubscribe` after the slot moved, an error) or when the
/// connection closes.
pub(super) type Messages = BoxStream<'static, (String, String)>;

fn messages(reader: BufReader<TcpStream>) -> Messages {
    Box::pin(futures::stream::unfold(reader, |mut reader| async move {
        loop {
            let frame = read_frame(&mut reader).await.ok()?;
            let Frame::Array(items) = frame else {
                return None;
            };
            let mut items = items.into_iter();
            let (Some(Frame::Bulk(kind)), Some(Frame::Bulk(channel)), Some(payload)) =
                (items.next(), items.next(), items.next())
            else {
                return None;
            };
            match (kind.as_slice(), payload) {
                (b"smessage" | b"message", Frame::Bulk(payload)) => {
                    // A payload that is not UTF-8 is not ours: skip it.
                    let (Ok(channel), Ok(payload)) =
                        (String::from_utf8(channel), String::from_utf8(payload))
                    else {
                        continue;
                    };
                    return Some(((channel, payload), reader));
                }
                // `sunsubscribe` (the slot moved away) or anything unexpected.
                _ => return None,
            }
        }
    }))
}

/// `host:port` of the master serving `slot`, from `CLUSTER SLOTS` through `conn`.
async fn owner<C: ConnectionLike>(conn: &mut C, slot: u16) -> io::Result<(String, u16)> {
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .map_err(io::Error::other)?;
    let Value::Array(ranges) = slots else {
        return Err(refused("CLUSTER SLOTS gave no array".into()));
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        if !(*from..=*to).contains(&i64::from(slot)) {
            continue;
        }
        if let (Some(Value::BulkString(host)), Some(Value::Int(port))) =
            (master.first(), master.get(1))
            && let (Ok(host), Ok(port)) = (std::str::from_utf8(host), u16::try_from(*port))
        {
            return Ok((host.to_owned(), port));
        }
    }
    Err(refused(format!("no master serves slot {slot}")))
}

fn refused(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, detail)
}

/// The RESP2 frames a subscription connection receives.
#[derive(Debug)]
enum Frame {
    Array(Vec<Frame>),
    Bulk(Vec<u8>),
    Nil,
    /// An integer or a status (`+OK`): nothing a subscription needs to read.
    Other,
    Error(String),
}

fn read_frame<'a>(
    reader: &'a mut BufReader<TcpStream>,
) -> futures::future::BoxFuture<'a, io::Result<Frame>> {
    Box::pin(async move {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_at_checked(1).unwrap_or(("", ""));
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| refused(format!("bad RESP length {rest:?}")))
        };
        Ok(match kind {
            "+" => Frame::Other,
            "-" => Frame::Error(rest.to_owned()),
            ":" => {
                number()?;
                Frame::Other
            }
            "$" => match usize::try_from(number()?) {
                Err(_) => Frame::Nil,
                Ok(n) if n > MAX_BULK => return Err(refused("oversized bulk string".into())),
                Ok(n) => {
                    let mut bytes = vec![0; n + 2];
                    reader.read_exact(&mut bytes).await?;
                    bytes.truncate(n);
                    Frame::Bulk(bytes)
                }
            },
            "*" => match usize::try_from(number()?) {
                Err(_) => Frame::Nil,
                Ok(n) if n > 1024 => return Err(refused("oversized array".into())),
                Ok(n) => {
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(read_frame(reader).await?);
                    }
                    Frame::Array(items)
                }
            },
            _ => return Err(refused(format!("unexpected RESP frame {line:?}"))),
        })
    })
}

/// The cluster slot of `key` (CRC16/XMODEM of its hash tag, modulo 16384).
pub(super) fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(bytes) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on redis-server 7.0.
        assert_eq!(key_slot("p:two-tier"), 13054);
        assert_eq!(key_slot("p:{p:two-tier}"), 13054);
        assert_eq!(key_slot("p:two-tier:instances"), 6612);
        assert_eq!(key_slot("{}x"), key_slot("{}x"));
        assert_eq!(key_slot("123456789"), 0x31c3);
    }
}
