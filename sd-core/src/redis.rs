//! Running a Lua script on Redis, one way for every crate.
//!
//! A [`Script`] is sent by SHA (`EVALSHA`, one round trip). A server that does not know
//! it (restarted, failed over, `SCRIPT FLUSH`ed) answers `NOSCRIPT`; the call is then
//! sent once more as `EVAL` with the source, which also caches it there. Nothing is
//! loaded ahead and no `SCRIPT LOAD` round trip is spent. Works over any redis-rs
//! `ConnectionLike`: a `MultiplexedConnection`, a `ConnectionManager`, a cluster
//! connection.
//!
//! [`wait_for_replicas`] asks the master that holds a key to `WAIT` until replicas
//! acknowledge a write, for the crates' optional durability on claims and leases.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, RedisResult, ToRedisArgs, Value};

/// A Lua script: its source and its SHA1, computed once.
///
/// ```
/// use sd_core::redis::Script;
///
/// static INCR_BY: Script = Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
/// assert_eq!(INCR_BY.sha().len(), 40);
/// let mut call = INCR_BY.call(1);
/// call.arg("counter").arg(5);
/// // call.invoke::<i64>(&mut conn).await?
/// ```
#[derive(Debug)]
pub struct Script {
    source: Cow<'static, str>,
    sha: OnceLock<String>,
}

impl Script {
    /// A script from static source (usable in a `static`).
    pub const fn new(source: &'static str) -> Self {
        Script {
            source: Cow::Borrowed(source),
            sha: OnceLock::new(),
        }
    }

    /// A script from source built at run time (a shared prelude and a body, say).
    pub fn from_parts(parts: &[&str]) -> Self {
        Script {
            source: Cow::Owned(parts.concat()),
            sha: OnceLock::new(),
        }
    }

    /// The source, as `EVAL` sends it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The SHA1 of the source, as `EVALSHA` sends it.
    pub fn sha(&self) -> &str {
        self.sha
            .get_or_init(|| redis::Script::new(&self.source).get_hash().to_owned())
    }

    /// A call with `keys` keys: append the keys, then the arguments, with
    /// [`ScriptCall::arg`].
    pub fn call(&self, keys: usize) -> ScriptCall<'_> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.sha()).arg(keys);
        ScriptCall { script: self, cmd }
    }
}

/// A script call under construction: `EVALSHA sha numkeys`, then what
/// [`arg`](Self::arg) appends (the keys first).
#[derive(Debug, Clone)]
pub struct ScriptCall<'a> {
    script: &'a Script,
    cmd: Cmd,
}

impl ScriptCall<'_> {
    /// Appends a key or an argument.
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// The `EVALSHA` command as built so far.
    pub fn cmd(&self) -> &Cmd {
        &self.cmd
    }

    /// The same call as `EVAL` with the source.
    pub fn to_eval(&self) -> Cmd {
        let mut eval = redis::cmd("EVAL");
        eval.arg(self.script.source());
        // Skip `EVALSHA` and the SHA; keep the key count, the keys and the arguments.
        for arg in self.cmd.args_iter().skip(2) {
            if let redis::Arg::Simple(bytes) = arg {
                eval.arg(bytes);
            }
        }
        eval
    }

    /// Runs the call: `EVALSHA`, then `EVAL` once if the server answers `NOSCRIPT`.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if is_noscript(&e) => self.to_eval().query_async(conn).await,
            other => other,
        }
    }
}

/// True when the server did not know the script (`NOSCRIPT`).
pub fn is_noscript(error: &RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// What [`wait_for_replicas`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// The write was in place on the master and `WAIT` answered: this many replicas
    /// acknowledged it (and everything the master took before it).
    Acked(u32),
    /// The confirming script found the write gone (it answered 0): the master that
    /// answered never had it or lost it, so it counts for nothing.
    Missing,
}

/// How many replicas hold a write that a script made, with `WAIT replicas timeout`.
///
/// `confirm` is a script on the written key that, when the write is still in place,
/// writes it again unchanged (so it is replicated: a `SET` or `HSET` of the same value)
/// and answers 1, else answers 0. It is sent with `WAIT` in one pipeline: one request,
/// so both go over one connection to the key's master (redis-rs routes a cluster
/// pipeline by its first keyed command; a lone `WAIT` would go to every master), and
/// `WAIT` then counts the replicas that acknowledged the confirming write, hence the
/// first write too, however the connection moved in between (a `WAIT` on a new
/// connection would count replicas that acknowledged nothing of ours).
///
/// Errors inside a pipeline come back as replies, not as errors the connection acts
/// on: on `NOSCRIPT` the pipeline is sent again with `EVAL`; on any other refusal of the
/// script (`READONLY`, `MOVED`, `CLUSTERDOWN`...) the script is sent alone, so the
/// connection follows the failover as it does for every call, then the pipeline once
/// more. A server that refuses `WAIT` (some managed services do) makes this an error.
pub async fn wait_for_replicas(
    conn: &mut impl ConnectionLike,
    confirm: &ScriptCall<'_>,
    replicas: u32,
    timeout: Duration,
) -> RedisResult<Replication> {
    let wait_ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut eval = false;
    let mut last = None;
    for _ in 0..4 {
        let mut pipe = redis::pipe();
        pipe.add_command(if eval {
            confirm.to_eval()
        } else {
            confirm.cmd().clone()
        });
        pipe.cmd("WAIT").arg(replicas).arg(wait_ms);
        let mut replies = conn.req_packed_commands(&pipe, 0, 2).await?.into_iter();
        let (found, acked) = (replies.next(), replies.next());
        match found {
            Some(Value::Int(0)) => return Ok(Replication::Missing),
            Some(Value::Int(_)) => {
                return match acked {
                    Some(Value::Int(n)) => Ok(Replication::Acked(
                        u32::try_from(n.max(0)).unwrap_or(u32::MAX),
                    )),
                    Some(Value::ServerError(e)) => Err(e.into()),
                    _ => Err(unexpected("WAIT did not answer with a number")),
                };
            }
            Some(Value::ServerError(e)) => {
                let error = RedisError::from(e);
                if is_noscript(&error) && !eval {
                    eval = true;
                    continue;
                }
                // Refused before it ran: alone, the call follows the failover.
                if confirm.invoke::<i64>(conn).await? == 0 {
                    return Ok(Replication::Missing);
                }
                last = Some(error);
            }
            _ => return Err(unexpected("the confirming script did not answer 0 or 1")),
        }
    }
    Err(last.unwrap_or_else(|| unexpected("no answer")))
}

fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::UnexpectedReturnType, what))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    static ECHO: Script = Script::new("return {KEYS[1], ARGV[1]}");

    #[test]
    fn eval_keeps_the_key_count_keys_and_args() {
        let mut call = ECHO.call(1);
        call.arg("k").arg(7);
        let eval: Vec<Vec<u8>> = call
            .to_eval()
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let expect: Vec<Vec<u8>> = ["EVAL", ECHO.source(), "1", "k", "7"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        assert_eq!(eval, expect);
        assert_eq!(
            ECHO.sha(),
            Script::from_parts(&["return {KEYS[1], ", "ARGV[1]}"]).sha()
        );
    }
}
