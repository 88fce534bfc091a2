//! The Redis Streams sink: one `XADD` per event to a stream per aggregate type,
//! pipelined per batch.
//!
//! Each entry has the fields `id` (the outbox id, the consumer's dedupe key),
//! `aggregatetype`, `aggregateid`, `type`, `payload_kind` (`json` or `bytes`),
//! `payload` and `headers` (a JSON object). The stream key is `{prefix}:{aggregate
//! type}` (prefix `outbox` by default, so `outbox:order`): the colon is sd's, as in
//! every sd crate, so a prefix must not end with one. Redis does not deduplicate: an event
//! published again after a lost acknowledgement or a relay crash is a second entry
//! with the same `id`, which the consumer's inbox absorbs.

use std::future::Future;

use redis::aio::ConnectionLike;
use sd_core::KeyPrefix;

use crate::error::{Error, Result};
use crate::message::Event;
use crate::publisher::Publisher;

/// Options of a [`RedisStreamsPublisher`].
#[derive(Debug, Clone)]
pub struct RedisStreamsPublisherBuilder<C> {
    conn: C,
    prefix: String,
    max_len: Option<usize>,
}

impl<C> RedisStreamsPublisherBuilder<C> {
    /// The stream key prefix (default `outbox`): streams are `{prefix}:{aggregate type}`,
    /// the colon added by sd. sd-core's [`KeyPrefix`] rule: 1 to 64 bytes of printable
    /// ASCII without spaces, `{`, `}` or a trailing `:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Trims each stream to about this many entries (`MAXLEN ~`); default: no trim.
    pub fn max_len(mut self, max_len: Option<usize>) -> Self {
        self.max_len = max_len;
        self
    }

    /// The publisher; fails with [`Error::InvalidConfig`] naming `prefix` or `max_len`.
    pub fn build(self) -> Result<RedisStreamsPublisher<C>> {
        let prefix = KeyPrefix::parse("prefix", &self.prefix)?;
        if self.max_len == Some(0) {
            return Err(Error::config("max_len", "must be at least 1, or None"));
        }
        Ok(RedisStreamsPublisher {
            conn: self.conn,
            prefix,
            max_len: self.max_len,
        })
    }
}

/// Publishes to Redis Streams over any redis-rs connection (a `MultiplexedConnection`,
/// a `ConnectionManager`, a cluster connection); see the [module docs](self).
#[derive(Clone)]
pub struct RedisStreamsPublisher<C> {
    conn: C,
    prefix: KeyPrefix,
    max_len: Option<usize>,
}

impl<C> std::fmt::Debug for RedisStreamsPublisher<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsPublisher")
            .field("prefix", &self.prefix)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl<C> RedisStreamsPublisher<C> {
    /// Options on `conn` (set its response timeout: a paused server otherwise stalls
    /// the relay until the batch timeout).
    pub fn builder(conn: C) -> RedisStreamsPublisherBuilder<C> {
        RedisStreamsPublisherBuilder {
            conn,
            prefix: "outbox".into(),
            max_len: None,
        }
    }

    /// The stream an aggregate type goes to: `{prefix}:{aggregate type}`.
    pub fn stream(&self, aggregate_type: &str) -> String {
        self.prefix.key(aggregate_type)
    }
}

impl<C> Publisher for RedisStreamsPublisher<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn system(&self) -> &'static str {
        sd_core::observe::backend::REDIS
    }

    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        let mut pipe = redis::pipe();
        for event in events {
            let headers = serde_json::to_string(&event.headers).unwrap_or_default();
            let cmd = pipe.cmd("XADD").arg(self.stream(&event.aggregate_type));
            if let Some(max_len) = self.max_len {
                cmd.arg("MAXLEN").arg("~").arg(max_len);
            }
            cmd.arg("*")
                .arg("id")
                .arg(event.id.to_string())
                .arg("aggregatetype")
                .arg(&event.aggregate_type)
                .arg("aggregateid")
                .arg(&event.aggregate_id)
                .arg("type")
                .arg(&event.event_type)
                .arg("payload_kind")
                .arg(event.payload.kind())
                .arg("payload")
                .arg(event.payload.to_bytes())
                .arg("headers")
                .arg(headers)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let empty = events.is_empty();
        async move {
            if empty {
                // Redis refuses an empty pipeline; nothing to send is acknowledged as is.
                return Ok(());
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| Error::publish(0, format!("redis: {e}")))
        }
    }
}
