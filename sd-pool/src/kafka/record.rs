//! What a handler sees of a Kafka record, and what a run reports.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};

/// Which records of a topic may run at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RecordOrder {
    /// Records with equal keys (in one topic) run one after another, in offset order;
    /// different keys run in parallel. A record without a key is ordered with its
    /// partition's other keyless records. Needs a pool built with [`Order::PerKey`].
    ///
    /// [`Order::PerKey`]: crate::Order::PerKey
    #[default]
    PerKey,
    /// The records of a partition run one after another; partitions run in parallel
    /// (what a plain consumer loop per partition gives). Needs [`Order::PerKey`].
    ///
    /// [`Order::PerKey`]: crate::Order::PerKey
    PerPartition,
    /// Any record may run beside any other.
    Unordered,
}

/// A header's name and value.
type Header = (String, Option<Box<[u8]>>);

/// One record, as the handler gets it: cheap to clone (the bytes are shared).
#[derive(Clone)]
pub struct Record {
    topic: Arc<str>,
    /// The key, then the payload: one allocation per record.
    bytes: Arc<[u8]>,
    /// `None` when the record has no headers (no allocation).
    headers: Option<Arc<[Header]>>,
    offset: i64,
    timestamp: Option<i64>,
    /// The key's length, if the record has a key.
    key_len: Option<usize>,
    partition: i32,
    /// Whether the record has a payload (the bytes after the key).
    has_payload: bool,
    attempt: u32,
}

impl Record {
    /// The record of `message`, its key and payload copied once (through `scratch`, the
    /// caller's buffer, when it has both).
    pub(crate) fn from_message(
        message: &BorrowedMessage<'_>,
        topic: Arc<str>,
        scratch: &mut Vec<u8>,
    ) -> Self {
        let headers = message.headers().filter(|hs| hs.count() > 0).map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), h.value.map(Box::from)))
                .collect()
        });
        let (key, payload) = (message.key(), message.payload());
        let bytes: Arc<[u8]> = match (key.unwrap_or_default(), payload.unwrap_or_default()) {
            ([], only) | (only, []) => Arc::from(only),
            (key, payload) => {
                scratch.clear();
                scratch.extend_from_slice(key);
                scratch.extend_from_slice(payload);
                Arc::from(scratch.as_slice())
            }
        };
        Record {
            topic,
            bytes,
            headers,
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key_len: key.map(<[u8]>::len),
            partition: message.partition(),
            has_payload: payload.is_some(),
            attempt: 1,
        }
    }

    /// The topic it was read from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) fn topic_arc(&self) -> &Arc<str> {
        &self.topic
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Its offset in the partition: with the topic and partition, a unique id to
    /// deduplicate by (an inbox row, say).
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Its key, if it has one.
    pub fn key(&self) -> Option<&[u8]> {
        self.key_len.and_then(|n| self.bytes.get(..n))
    }

    /// Its value, if it has one.
    pub fn payload(&self) -> Option<&[u8]> {
        self.has_payload
            .then(|| self.bytes.get(self.key_len.unwrap_or(0)..))
            .flatten()
    }

    /// The value of the first header named `name` (`Some(None)` for a header without a
    /// value).
    pub fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .flat_map(|hs| hs.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref())
    }

    /// Every header, in the record's order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers
            .iter()
            .flat_map(|hs| hs.iter())
            .map(|(k, v)| (k.as_str(), v.as_deref()))
    }

    /// The W3C trace context in the record's `traceparent` (and `tracestate`) headers,
    /// as sd-outbox's Kafka sink writes them; `None` when there is none or it is
    /// malformed (see [`TraceParent::extract`](sd_core::trace::TraceParent::extract)).
    /// The consumer makes it the parent of the record's job span.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn trace_parent(&self) -> Option<sd_core::trace::TraceParent> {
        sd_core::trace::TraceParent::extract(
            self.headers()
                .filter_map(|(k, v)| Some((k, std::str::from_utf8(v?).ok()?))),
        )
    }

    /// The record's timestamp in milliseconds since the epoch, if it has one.
    pub fn timestamp_millis(&self) -> Option<i64> {
        self.timestamp
    }

    /// Which attempt this is: 1 the first time, 2 after one failure, and so on.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub(crate) fn with_attempt(&self, attempt: u32) -> Self {
        Record {
            attempt,
            ..self.clone()
        }
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("key", &self.key().map(|k| k.escape_ascii().to_string()))
            .field("payload_len", &self.payload().map(<[u8]>::len))
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// What one [`KafkaConsumer::run`](super::KafkaConsumer::run) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KafkaReport {
    /// Records polled from the broker.
    pub received: u64,
    /// Records whose handler returned `Ok`.
    pub handled: u64,
    /// Attempts after a failure (a record that succeeds at its third attempt counts 2).
    pub retries: u64,
    /// Records sent to the dead-letter topic after their last attempt failed.
    pub dead_lettered: u64,
    /// Records whose last attempt failed with no dead-letter topic set: logged at
    /// `error` and committed past.
    pub gave_up: u64,
    /// Records not run because the commit metadata listed them as done.
    pub skipped: u64,
    /// Records whose job stopped or never started because their partition was revoked
    /// or the consumer stopped: not committed, so the next owner runs them.
    pub abandoned: u64,
    /// Times a partition was paused because its window or the pool was full.
    pub paused: u64,
    /// Partitions assigned and revoked (each counts one).
    pub assigned: u64,
    /// See `assigned`.
    pub revoked: u64,
    /// Jobs still running when a revoked partition's drain deadline passed (their
    /// records may run again on the new owner while they finish here).
    pub revoke_overran: u64,
    /// Offset commits sent (one per partition whose offset moved).
    pub commits: u64,
    /// Commits the broker refused or that timed out (sent again on the next interval).
    pub commit_errors: u64,
}

/// The report's counters, shared by the poll thread and the jobs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) gave_up: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) paused: AtomicU64,
    pub(crate) assigned: AtomicU64,
    pub(crate) revoked: AtomicU64,
    pub(crate) revoke_overran: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) commit_errors: AtomicU64,
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn report(&self) -> KafkaReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KafkaReport {
            received: get(&self.received),
            handled: get(&self.handled),
            retries: get(&self.retries),
            dead_lettered: get(&self.dead_lettered),
            gave_up: get(&self.gave_up),
            skipped: get(&self.skipped),
            abandoned: get(&self.abandoned),
            paused: get(&self.paused),
            assigned: get(&self.assigned),
            revoked: get(&self.revoked),
            revoke_overran: get(&self.revoke_overran),
            commits: get(&self.commits),
            commit_errors: get(&self.commit_errors),
        }
    }
}
