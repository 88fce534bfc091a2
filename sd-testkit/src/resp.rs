//! A tiny synchronous RESP client: enough to check readiness, build a cluster and let
//! the self-test talk to a server without pulling a Redis client into the testkit.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::error::{Error, Result, io_err};

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and other simple strings.
    Status(String),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$n` bulk string; `None` for the nil reply.
    Bulk(Option<Vec<u8>>),
    /// `*n` array; `None` for the nil array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text, for simple and bulk strings.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// Sends one command to the Redis server on `127.0.0.1:port` and reads its reply.
pub fn command(port: u16, args: &[&str]) -> Result<Reply> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .map_err(io_err(format!("connecting to redis on port {port}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err("setting a read timeout"))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    (&stream)
        .write_all(&request)
        .map_err(io_err(format!("writing to redis on port {port}")))?;
    read_reply(&mut BufReader::new(stream))
}

fn read_reply(reader: &mut impl BufRead) -> Result<Reply> {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(io_err("reading a redis reply"))?;
    let line = line.trim_end_matches("\r\n");
    let bad = |detail: String| Error::Protocol {
        server: "redis",
        detail,
    };
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| bad("empty reply".into()))?;
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| bad(format!("bad length or integer {rest:?}")))
    };
    Ok(match kind {
        "+" => Reply::Status(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Integer(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let mut data = vec![0; len + 2];
                reader
                    .read_exact(&mut data)
                    .map_err(io_err("reading a bulk string"))?;
                data.truncate(len);
                Reply::Bulk(Some(data))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(None),
            Ok(len) => Reply::Array(Some(
                (0..len)
                    .map(|_| read_reply(reader))
                    .collect::<Result<_>>()?,
            )),
        },
        other => return Err(bad(format!("unknown reply type {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_replies() {
        let wire = b"*3\r\n$5\r\nhello\r\n:7\r\n*2\r\n+OK\r\n$-1\r\n".to_vec();
        let reply = read_reply(&mut &wire[..]).unwrap();
        assert_eq!(
            reply,
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"hello".to_vec())),
                Reply::Integer(7),
                Reply::Array(Some(vec![Reply::Status("OK".into()), Reply::Bulk(None)])),
            ]))
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(read_reply(&mut &b"?what\r\n"[..]).is_err());
        assert!(read_reply(&mut &b"$abc\r\n"[..]).is_err());
        assert!(read_reply(&mut &b""[..]).is_err());
    }
}
