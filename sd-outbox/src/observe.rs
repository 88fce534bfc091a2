//! What the outbox reports (feature `metrics`): events enqueued, and per relay the
//! messages published, publish latency, failed attempts, dead letters and the age of the
//! oldest unpublished row, under the names and labels of `sd_core::observe`
//! (OpenTelemetry's `messaging.*` where one exists).
//!
//! Handles are registered when the outbox or relay is built; without the feature these
//! are zero-sized types whose methods do nothing.

use std::time::{Duration, Instant};

#[cfg(feature = "metrics")]
use sd_core::observe::{self, Labels, label, operation};

/// `sd.outbox.enqueued`.
#[cfg(feature = "metrics")]
const ENQUEUED: &str = "sd.outbox.enqueued";
/// OpenTelemetry's `messaging.client.sent.messages`.
#[cfg(feature = "metrics")]
const SENT: &str = "messaging.client.sent.messages";
/// OpenTelemetry's `messaging.client.operation.duration`.
#[cfg(feature = "metrics")]
const OPERATION_DURATION: &str = "messaging.client.operation.duration";
/// `sd.outbox.publish.failures`.
#[cfg(feature = "metrics")]
const FAILURES: &str = "sd.outbox.publish.failures";
/// `sd.outbox.dead_letters`.
#[cfg(feature = "metrics")]
const DEAD_LETTERS: &str = "sd.outbox.dead_letters";
/// `sd.outbox.oldest_unpublished.age`.
#[cfg(feature = "metrics")]
const OLDEST_AGE: &str = "sd.outbox.oldest_unpublished.age";

/// The outbox table's handles.
#[derive(Debug, Clone)]
pub(crate) struct OutboxMeters {
    #[cfg(feature = "metrics")]
    enqueued: metrics::Counter,
}

impl OutboxMeters {
    /// The handles of the outbox table `table`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(table: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = Labels::new().with(label::NAME, table);
            OutboxMeters {
                enqueued: observe::counter(ENQUEUED, "events written to the outbox", &labels),
            }
        }
        #[cfg(not(feature = "metrics"))]
        OutboxMeters {}
    }

    /// Counts one event enqueued (its transaction may still roll back).
    pub(crate) fn enqueued(&self) {
        #[cfg(feature = "metrics")]
        self.enqueued.increment(1);
    }
}

/// A relay's handles.
#[derive(Debug, Clone)]
pub(crate) struct RelayMeters {
    #[cfg(feature = "metrics")]
    sent: metrics::Counter,
    #[cfg(feature = "metrics")]
    duration: metrics::Histogram,
    #[cfg(feature = "metrics")]
    failures: metrics::Counter,
    #[cfg(feature = "metrics")]
    dead_letters: metrics::Counter,
    #[cfg(feature = "metrics")]
    oldest_age: metrics::Gauge,
}

impl RelayMeters {
    /// The handles of a relay of the outbox table `table` publishing to `system`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(table: &str, system: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let table = Labels::new().with(label::NAME, table);
            let publish = table
                .clone()
                .with(label::MESSAGING_SYSTEM, system)
                .with(label::MESSAGING_OPERATION, operation::PUBLISH);
            RelayMeters {
                sent: observe::counter(SENT, "outbox events the sink acknowledged", &publish),
                duration: observe::histogram(
                    OPERATION_DURATION,
                    "time of one publish of a relay batch to the sink",
                    &publish,
                ),
                failures: observe::counter(FAILURES, "failed publish attempts", &publish),
                dead_letters: observe::counter(
                    DEAD_LETTERS,
                    "outbox events dead-lettered after their last attempt",
                    &table,
                ),
                oldest_age: observe::gauge(
                    OLDEST_AGE,
                    Some(metrics::Unit::Seconds),
                    "age of the oldest unpublished outbox row (0 when none waits)",
                    &table,
                ),
            }
        }
        #[cfg(not(feature = "metrics"))]
        RelayMeters {}
    }

    /// Records one publish call that started at `start`, acknowledged `sent` events and
    /// failed or not.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn published(&self, start: Instant, sent: usize, failed: bool) {
        #[cfg(feature = "metrics")]
        {
            observe::record_since(&self.duration, start);
            self.sent.increment(sent as u64);
            if failed {
                self.failures.increment(1);
            }
        }
    }

    /// Counts one dead letter.
    pub(crate) fn dead_lettered(&self) {
        #[cfg(feature = "metrics")]
        self.dead_letters.increment(1);
    }

    /// Sets the age of the oldest unpublished row (`None`: nothing waits).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables, dead_code))]
    pub(crate) fn oldest(&self, age: Option<Duration>) {
        #[cfg(feature = "metrics")]
        self.oldest_age.set(age.map_or(0.0, |a| a.as_secs_f64()));
    }
}
