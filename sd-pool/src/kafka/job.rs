//! The job that runs one record: attempts with backoff, then the dead-letter topic, then
//! a report to the poll thread.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sd_core::RetryPolicy;

use super::record::{Counters, Record, add};
use super::tracker::RevokedFlag;
use crate::observe::{ConsumerMeters, Processed};
use crate::pool::panic_message;

/// A job's report: its record's offset may be committed (`done`) or must be delivered
/// again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finished {
    pub(crate) slot: u32,
    pub(crate) offset: i64,
    pub(crate) done: bool,
}

/// Sends the report when dropped, so a job aborted by the pool still reports (as not
/// done). A job the pool refused (full, or closed) is disarmed before it is dropped, since
/// it was never counted.
struct Reporter<H> {
    parts: Arc<JobParts<H>>,
    finished: Finished,
    armed: bool,
}

impl<H> Drop for Reporter<H> {
    fn drop(&mut self) {
        if self.armed {
            // The poll thread is gone only when the run is over: nothing to tell.
            let _ = self.parts.reports.send(self.finished);
        }
    }
}

pin_project_lite::pin_project! {
    /// A record's job: its attempts, then the report (sent when the attempts end, or when
    /// the job is dropped before, as not done).
    pub(crate) struct RecordJob<H, A> {
        #[pin]
        attempts: A,
        reporter: Option<Reporter<H>>,
    }
}

impl<H, A> RecordJob<H, A> {
    /// The pool refused the job: it was never counted, so it reports nothing.
    pub(crate) fn disarm(mut self) {
        if let Some(reporter) = &mut self.reporter {
            reporter.armed = false;
        }
    }
}

impl<H, A: Future<Output = bool>> Future for RecordJob<H, A> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let done = std::task::ready!(this.attempts.poll(cx));
        if let Some(mut reporter) = this.reporter.take() {
            reporter.finished.done = done;
        }
        Poll::Ready(())
    }
}

/// The dead-letter topic and the producer that writes to it.
#[derive(Clone)]
pub(crate) struct DeadLetters {
    pub(crate) topic: Arc<str>,
    pub(crate) producer: FutureProducer,
    pub(crate) timeout: Duration,
}

/// The header of a dead-lettered record naming the topic it was read from.
pub const DLQ_TOPIC: &str = "sd-dlq-topic";
/// The header of a dead-lettered record naming its partition (decimal).
pub const DLQ_PARTITION: &str = "sd-dlq-partition";
/// The header of a dead-lettered record naming its offset (decimal).
pub const DLQ_OFFSET: &str = "sd-dlq-offset";
/// The header of a dead-lettered record holding the last attempt's error (its
/// `Display`, or the panic message).
pub const DLQ_ERROR: &str = "sd-dlq-error";
/// The header of a dead-lettered record counting its attempts (decimal).
pub const DLQ_ATTEMPTS: &str = "sd-dlq-attempts";

impl DeadLetters {
    /// Writes `record` to the dead-letter topic with the same key, value and headers plus
    /// the `sd-dlq-*` headers; retries (1 s apart) until the broker acknowledges or the
    /// partition is revoked (then `false`).
    async fn send(
        &self,
        record: &Record,
        error: &str,
        attempts: u32,
        revoked: &RevokedFlag,
    ) -> bool {
        let (partition, offset, attempts) = (
            record.partition().to_string(),
            record.offset().to_string(),
            attempts.to_string(),
        );
        loop {
            let mut headers = OwnedHeaders::new();
            for (key, value) in record.headers() {
                headers = headers.insert(Header { key, value });
            }
            for (key, value) in [
                (DLQ_TOPIC, record.topic()),
                (DLQ_PARTITION, partition.as_str()),
                (DLQ_OFFSET, offset.as_str()),
                (DLQ_ERROR, error),
                (DLQ_ATTEMPTS, attempts.as_str()),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut out = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
            if let Some(key) = record.key() {
                out = out.key(key);
            }
            if let Some(payload) = record.payload() {
                out = out.payload(payload);
            }
            match self.producer.send(out, self.timeout).await {
                Ok(_) => return true,
                Err((error, _)) => {
                    tracing::warn!(
                        topic = record.topic(),
                        partition = record.partition(),
                        offset = record.offset(),
                        %error,
                        "sd-pool: dead-letter write failed; retrying"
                    );
                }
            }
            if revoked.is_set() {
                return false;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if revoked.is_set() {
                return false;
            }
        }
    }
}

/// Everything a job needs besides its record.
pub(crate) struct JobParts<H> {
    pub(crate) handler: H,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letters: Option<DeadLetters>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) reports: Sender<Finished>,
    pub(crate) meters: ConsumerMeters,
}

impl<H, Fut, E> JobParts<H>
where
    H: Fn(Record) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    /// The job of `record`: runs the handler until it succeeds or the retry policy gives
    /// up, then dead-letters (or gives up on) the record, and reports. A partition revoked
    /// before the job starts, or between attempts, leaves the record to its next owner.
    /// If the pool refuses the job, [`RecordJob::disarm`] it.
    pub(crate) fn job(
        self: &Arc<Self>,
        record: Record,
        slot: u32,
        revoked: RevokedFlag,
    ) -> RecordJob<H, impl Future<Output = bool> + Send + 'static + use<H, Fut, E>> {
        let reporter = Reporter {
            parts: Arc::clone(self),
            finished: Finished {
                slot,
                offset: record.offset(),
                done: false,
            },
            armed: true,
        };
        let parts = Arc::clone(self);
        let attempts = async move {
            let done = parts.attempts(record, &revoked).await;
            if !done {
                add(&parts.counters.abandoned, 1);
            }
            done
        };
        RecordJob {
            attempts,
            reporter: Some(reporter),
        }
    }

    async fn attempts(&self, record: Record, revoked: &RevokedFlag) -> bool {
        let mut attempt = 1;
        loop {
            if revoked.is_set() {
                return false;
            }
            let started = Instant::now();
            let run = (self.handler)(record.with_attempt(attempt));
            let error = match AssertUnwindSafe(run).catch_unwind().await {
                Ok(Ok(())) => {
                    self.meters.processed(Processed::Ok, started);
                    add(&self.counters.handled, 1);
                    return true;
                }
                Ok(Err(error)) => {
                    self.meters.processed(Processed::Error, started);
                    error.to_string()
                }
                Err(panic) => {
                    self.meters.processed(Processed::Panicked, started);
                    format!("the handler panicked: {}", panic_message(&*panic))
                }
            };
            if self.retry.allows_retry_after(attempt) {
                tracing::debug!(
                    topic = record.topic(),
                    partition = record.partition(),
                    offset = record.offset(),
                    attempt,
                    %error,
                    "sd-pool: record failed; retrying"
                );
                // Boxed, as is the dead-letter write: rare steps whose futures would
                // otherwise make every job's future (moved and allocated per record) large.
                Box::pin(tokio::time::sleep(self.retry.random_delay(attempt))).await;
                attempt += 1;
                add(&self.counters.retries, 1);
                continue;
            }
            return match &self.dead_letters {
                Some(dlq) => {
                    let sent = Box::pin(dlq.send(&record, &error, attempt, revoked)).await;
                    if sent {
                        add(&self.counters.dead_lettered, 1);
                    }
                    sent
                }
                None => {
                    tracing::error!(
                        topic = record.topic(),
                        partition = record.partition(),
                        offset = record.offset(),
                        attempts = attempt,
                        %error,
                        "sd-pool: record failed its last attempt and no dead-letter topic is set; committing past it"
                    );
                    add(&self.counters.gave_up, 1);
                    true
                }
            };
        }
    }
}
