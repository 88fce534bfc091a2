//! The Redis Streams sink: one `XADD` per event to a stream per aggregate type,
//! pipelined per stream.
//!
//! Each entry has the fields `id` (the outbox id, the consumer's dedupe key),
//! `aggregatetype`, `aggregateid`, `type`, `payload_kind` (`json` or `bytes`),
//! `payload` and `headers` (a JSON object). The stream key is `{prefix}:{aggregate
//! type}` (prefix `outbox` by default, so `outbox:order`): the colon is sd's, as in
//! every sd crate, so a prefix must not end with one. Redis does not deduplicate: an event
//! published again after a lost acknowledgement or a relay crash is a second entry
//! with the same `id`, which the consumer's inbox absorbs.
//!
//! # Redis Cluster, Sentinel and failover
//!
//! Every command is one `XADD` on one stream, so nothing spans two keys. A batch is
//! split by the part of the stream key a Redis Cluster hashes (its `{hash tag}`, else the
//! whole key): one pipeline per group, sent concurrently, each in the batch's order. A
//! cluster refuses a pipeline whose keys sit in different slots (`CROSSSLOT`), and one
//! batch usually holds several aggregate types; on a single server the groups share the
//! connection, and what lands in each stream is the same as with one pipeline. Streams
//! of different aggregate types land on whichever shards their keys hash to; the events
//! of one aggregate are in one stream, so their order is kept. Give the connection as
//! an [`sd_core::failover::FailoverConnection`] (a single server, a Sentinel group or a
//! Cluster) to follow failovers.
//!
//! On failure, `published` is the first event of the batch, in batch order, whose group
//! was not acknowledged; events of other groups after it may have landed and are sent
//! again (at least once).
//!
//! Redis replicates asynchronously: an `XADD` that a master acknowledged and then lost
//! in a crash, before its replica had it, is gone from the stream after the failover,
//! while the relay has marked it published. With
//! [`wait_for_replicas`](RedisStreamsPublisherBuilder::wait_for_replicas)`(n, timeout)`
//! each group's pipeline ends with `WAIT n timeout` on the same connection, and the group
//! counts as published only when `n` replicas acknowledged it; otherwise the relay sends
//! it again later. What this promises, per backend:
//!
//! | backend | an acknowledged event survives |
//! |---|---|
//! | one server | a restart only with AOF `appendfsync always` (RDB or `everysec` lose the last writes) |
//! | Sentinel or Cluster, no `WAIT` | a manual failover (`CLUSTER FAILOVER`, `SENTINEL FAILOVER` of a synced replica); a crashed master loses what it had not passed on |
//! | Sentinel or Cluster, `wait_for_replicas(1, ..)` | a crashed master too, when the replica that acknowledged is the one promoted (one replica per master, or all `n`); publishing stops while a master has fewer than `n` replicas |
//!
//! Some managed services refuse or restrict `WAIT`; there every publish fails.

use std::future::Future;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Pipeline, Value};
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
    replicas: Option<Replicas>,
}

/// `WAIT count timeout` after each pipeline.
#[derive(Debug, Clone, Copy)]
struct Replicas {
    count: u32,
    timeout: Duration,
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

    /// Counts a batch as published only once `count` replicas of each stream's master
    /// acknowledged its entries: `WAIT count timeout` ends each pipeline (one per
    /// stream's slot), on the same connection as the `XADD`s. Fewer acknowledgements
    /// within `timeout` is [`Error::Publish`] from the first event of that stream, and the
    /// relay sends it again later (a second entry if the first one did land). Off by
    /// default: an acknowledged `XADD` that the master lost in a crash before its replica
    /// had it is then lost (see the [module docs](self)). While a master has fewer than
    /// `count` replicas in sync, nothing is published to its streams. `count` 0 or a zero
    /// `timeout` fails [`build`](Self::build) with field `wait_for_replicas`.
    pub fn wait_for_replicas(mut self, count: u32, timeout: Duration) -> Self {
        self.replicas = Some(Replicas { count, timeout });
        self
    }

    /// The publisher; fails with [`Error::InvalidConfig`] naming `prefix`, `max_len` or
    /// `wait_for_replicas`.
    pub fn build(self) -> Result<RedisStreamsPublisher<C>> {
        let prefix = KeyPrefix::parse("prefix", &self.prefix)?;
        if self.max_len == Some(0) {
            return Err(Error::config("max_len", "must be at least 1, or None"));
        }
        if let Some(replicas) = self.replicas {
            if replicas.count == 0 {
                return Err(Error::config(
                    "wait_for_replicas",
                    "wait for at least 1 replica, or leave it unset to not wait",
                ));
            }
            if replicas.timeout.as_millis() == 0 {
                return Err(Error::config(
                    "wait_for_replicas",
                    "the timeout must be at least 1 ms (`WAIT` with 0 blocks for ever)",
                ));
            }
        }
        Ok(RedisStreamsPublisher {
            conn: self.conn,
            prefix,
            max_len: self.max_len,
            replicas: self.replicas,
        })
    }
}

/// Publishes to Redis Streams over any redis-rs connection (an
/// [`sd_core::failover::FailoverConnection`] for a server, a Sentinel group or a Cluster;
/// a `MultiplexedConnection`, a `ConnectionManager`, a cluster connection); see the
/// [module docs](self).
#[derive(Clone)]
pub struct RedisStreamsPublisher<C> {
    conn: C,
    prefix: KeyPrefix,
    max_len: Option<usize>,
    replicas: Option<Replicas>,
}

impl<C> std::fmt::Debug for RedisStreamsPublisher<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamsPublisher")
            .field("prefix", &self.prefix)
            .field("max_len", &self.max_len)
            .field("wait_for_replicas", &self.replicas)
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
            replicas: None,
        }
    }

    /// The stream an aggregate type goes to: `{prefix}:{aggregate type}`.
    pub fn stream(&self, aggregate_type: &str) -> String {
        self.prefix.key(aggregate_type)
    }

    /// The batch as one pipeline per group of streams that share a cluster slot (by
    /// hash tag), each with the batch indices of its events, in batch order.
    fn pipelines(&self, events: &[Event]) -> Vec<(Pipeline, Vec<usize>)> {
        let mut groups: Vec<(String, Pipeline, Vec<usize>)> = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let stream = self.stream(&event.aggregate_type);
            let tag = hash_tag(&stream);
            let group = match groups.iter().position(|(t, ..)| t == tag) {
                Some(group) => group,
                None => {
                    groups.push((tag.to_owned(), redis::pipe(), Vec::new()));
                    groups.len() - 1
                }
            };
            let (_, pipe, indices) = &mut groups[group];
            indices.push(index);
            let headers = serde_json::to_string(&event.headers).unwrap_or_default();
            let cmd = pipe.cmd("XADD").arg(stream);
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
                .arg(headers);
        }
        groups
            .into_iter()
            .map(|(_, mut pipe, indices)| {
                if let Some(replicas) = self.replicas {
                    let ms = u64::try_from(replicas.timeout.as_millis()).unwrap_or(u64::MAX);
                    pipe.cmd("WAIT").arg(replicas.count).arg(ms);
                }
                (pipe, indices)
            })
            .collect()
    }
}

/// Sends one group's pipeline; `Ok` when every `XADD` was taken (and, with `replicas`,
/// `WAIT` counted enough replicas), else how many leading `XADD`s were taken and why the
/// rest were not.
async fn send_group<C: ConnectionLike>(
    mut conn: C,
    pipe: Pipeline,
    adds: usize,
    replicas: Option<Replicas>,
) -> std::result::Result<(), (usize, String)> {
    let sent = adds + usize::from(replicas.is_some());
    let replies = conn
        .req_packed_commands(&pipe, 0, sent)
        .await
        .map_err(|e| (0, format!("redis: {e}")))?;
    let mut replies = replies.into_iter();
    for taken in 0..adds {
        match replies.next() {
            Some(Value::ServerError(e)) => return Err((taken, format!("redis: XADD: {e}"))),
            Some(_) => {}
            None => return Err((taken, "redis: XADD: no reply".to_owned())),
        }
    }
    let Some(wanted) = replicas else {
        return Ok(());
    };
    // Entries not on enough replicas count for nothing: a crash of the master loses them.
    match replies.next() {
        Some(Value::Int(acked)) if acked >= i64::from(wanted.count) => Ok(()),
        Some(Value::Int(acked)) => Err((
            0,
            format!(
                "redis: WAIT: {acked} of the {} replicas acknowledged within {:?}; check the replicas and their links, or lower `wait_for_replicas`",
                wanted.count, wanted.timeout
            ),
        )),
        Some(Value::ServerError(e)) => Err((0, format!("redis: WAIT: {e}"))),
        _ => Err((0, "redis: WAIT did not answer with a number".to_owned())),
    }
}

/// The part of a key Redis Cluster hashes: the first non-empty `{tag}`, else the key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

impl<C> Publisher for RedisStreamsPublisher<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn system(&self) -> &'static str {
        sd_core::observe::backend::REDIS
    }

    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        let sends: Vec<_> = self
            .pipelines(events)
            .into_iter()
            .map(|(pipe, indices)| {
                let send = send_group(self.conn.clone(), pipe, indices.len(), self.replicas);
                async move { (send.await, indices) }
            })
            .collect();
        async move {
            // An empty batch makes no group: nothing to send is acknowledged as is.
            let mut first_failure: Option<(usize, String)> = None;
            for (sent, indices) in futures::future::join_all(sends).await {
                if let Err((taken, reason)) = sent {
                    let failed = indices.get(taken).copied().unwrap_or(usize::MAX);
                    if first_failure.as_ref().is_none_or(|(f, _)| failed < *f) {
                        first_failure = Some((failed, reason));
                    }
                }
            }
            match first_failure {
                None => Ok(()),
                Some((published, reason)) => Err(Error::publish(published, reason)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::message::Message;

    fn event(aggregate_type: &str, id: &str) -> Event {
        Event::from_message(Message::json(
            aggregate_type,
            id,
            "changed",
            serde_json::json!({}),
        ))
    }

    #[test]
    fn a_batch_is_split_by_slot_keeping_its_order_and_ends_each_part_with_wait() {
        let publisher = RedisStreamsPublisher::builder(())
            .wait_for_replicas(1, Duration::from_millis(250))
            .build()
            .unwrap();
        let events = [
            event("order", "o-1"),
            event("invoice", "i-1"),
            event("order", "o-2"),
            event("x{order}", "t-1"),
        ];
        let groups = publisher.pipelines(&events);
        let indices: Vec<Vec<usize>> = groups.iter().map(|(_, i)| i.clone()).collect();
        // `outbox:x{order}` hashes `order`, not `outbox:order`: a group of its own.
        assert_eq!(indices, [vec![0, 2], vec![1], vec![3]]);
        for (pipe, indices) in &groups {
            let names: Vec<Vec<u8>> = pipe
                .cmd_iter()
                .map(|c| match c.args_iter().next() {
                    Some(redis::Arg::Simple(name)) => name.to_vec(),
                    _ => Vec::new(),
                })
                .collect();
            assert_eq!(names.len(), indices.len() + 1);
            assert_eq!(names.last().unwrap(), b"WAIT");
        }
        assert_eq!(hash_tag("{a}:b"), "a");
        assert_eq!(hash_tag("a{}b{c}"), "a{}b{c}");
        assert!(publisher.pipelines(&[]).is_empty());
    }

    #[test]
    fn wait_for_replicas_refuses_what_cannot_be_met() {
        for (count, timeout) in [(0, Duration::from_secs(1)), (1, Duration::ZERO)] {
            match RedisStreamsPublisher::builder(())
                .wait_for_replicas(count, timeout)
                .build()
            {
                Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "wait_for_replicas"),
                other => panic!("({count}, {timeout:?}) was accepted: {other:?}"),
            }
        }
    }
}
