//! What a pool reports (feature `metrics`): jobs by outcome, queue depth, jobs in flight,
//! time queued and time run, under the names and labels of `sd_core::observe`.
//!
//! Handles are registered when the pool is built; without the feature this is a
//! zero-sized type whose methods do nothing. Gauges are set under the pool's lock, so
//! they never go backwards out of order.

use std::time::Duration;

#[cfg(feature = "metrics")]
use sd_core::observe::{self, Labels, label, outcome};

/// How a job ended, for `sd.pool.jobs`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum JobEnd {
    Ok = 0,
    Error = 1,
    Panicked = 2,
    Rejected = 3,
    Cancelled = 4,
}

/// A pool's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct PoolMeters {
    #[cfg(feature = "metrics")]
    jobs: [metrics::Counter; 5],
    #[cfg(feature = "metrics")]
    queued: metrics::Gauge,
    #[cfg(feature = "metrics")]
    running: metrics::Gauge,
    #[cfg(feature = "metrics")]
    wait: metrics::Histogram,
    #[cfg(feature = "metrics")]
    run: metrics::Histogram,
}

impl PoolMeters {
    /// The handles of the pool `name`, registered with the recorder installed now.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = Labels::new().with(label::NAME, name);
            let jobs = [
                outcome::OK,
                outcome::ERROR,
                outcome::PANICKED,
                outcome::REJECTED,
                outcome::CANCELLED,
            ]
            .map(|o| {
                observe::counter(
                    "sd.pool.jobs",
                    "pool jobs by how they ended",
                    &labels.clone().with(label::OUTCOME, o),
                )
            });
            PoolMeters {
                jobs,
                queued: observe::gauge(
                    "sd.pool.queue.depth",
                    None,
                    "jobs accepted and not started",
                    &labels,
                ),
                running: observe::gauge("sd.pool.in_flight", None, "jobs running", &labels),
                wait: observe::histogram(
                    "sd.pool.queue.wait_time",
                    "time a job waited in the queue before it started",
                    &labels,
                ),
                run: observe::histogram("sd.pool.job.duration", "time a job ran", &labels),
            }
        }
        #[cfg(not(feature = "metrics"))]
        PoolMeters {}
    }

    /// Counts a job that ended as `end`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn ended(&self, end: JobEnd) {
        #[cfg(feature = "metrics")]
        self.jobs[end as usize].increment(1);
    }

    /// Records a finished job's time queued and time run.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn timed(&self, queued: Duration, ran: Duration) {
        #[cfg(feature = "metrics")]
        {
            self.wait.record(queued.as_secs_f64());
            self.run.record(ran.as_secs_f64());
        }
    }

    /// Sets the gauges to the pool's state now (call under its lock).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn state(&self, queued: usize, running: usize) {
        #[cfg(feature = "metrics")]
        {
            self.queued.set(queued as f64);
            self.running.set(running as f64);
        }
    }
}

/// The gauges `sd.pool.watermark.lag` of a pool's partitions, registered when a
/// partition's first job is accepted (with the recorder installed then) and set under
/// the pool's lock.
#[derive(Debug, Default)]
pub(crate) struct Lags {
    #[cfg(feature = "metrics")]
    gauges: std::collections::HashMap<u32, metrics::Gauge>,
}

impl Lags {
    /// Sets the lag of `partition` of the pool `name`: jobs accepted with that partition
    /// and not yet below its watermark.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn set(&mut self, name: &str, partition: u32, lag: usize) {
        #[cfg(feature = "metrics")]
        self.gauges
            .entry(partition)
            .or_insert_with(|| {
                observe::gauge(
                    "sd.pool.watermark.lag",
                    None,
                    "jobs of a partition accepted and not yet below its watermark",
                    &Labels::new()
                        .with(label::NAME, name)
                        .with(label::PARTITION, partition.to_string()),
                )
            })
            .set(lag as f64);
    }
}

/// How one handler run ended, for `messaging.process.duration`'s `error.type`.
#[cfg(any(feature = "redis", feature = "kafka"))]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Processed {
    Ok = 0,
    Error = 1,
    #[cfg(feature = "kafka")]
    Panicked = 2,
}

/// A stream consumer's handles: messages consumed, and the time each handler run took,
/// by how it ended.
#[cfg(any(feature = "redis", feature = "kafka"))]
#[derive(Debug, Clone)]
pub(crate) struct ConsumerMeters {
    #[cfg(feature = "metrics")]
    consumed: metrics::Counter,
    #[cfg(feature = "metrics")]
    processed: [metrics::Histogram; 3],
}

#[cfg(any(feature = "redis", feature = "kafka"))]
impl ConsumerMeters {
    /// The handles of a consumer feeding the pool `name` from `system` (`redis`,
    /// `kafka`), registered with the recorder installed now.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: &str, system: &'static str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = Labels::new()
                .with(label::NAME, name)
                .with(label::MESSAGING_SYSTEM, system);
            let process = labels
                .clone()
                .with(label::MESSAGING_OPERATION, observe::operation::PROCESS);
            let histogram = |error: Option<&'static str>| {
                let labels = match error {
                    Some(error) => process.clone().with(label::ERROR_TYPE, error),
                    None => process.clone(),
                };
                observe::histogram(
                    "messaging.process.duration",
                    "time a handler took over one message",
                    &labels,
                )
            };
            ConsumerMeters {
                consumed: observe::counter(
                    "messaging.client.consumed.messages",
                    "messages read from the stream or polled, redeliveries included",
                    &labels.with(label::MESSAGING_OPERATION, observe::operation::RECEIVE),
                ),
                processed: [
                    histogram(None),
                    histogram(Some(outcome::ERROR)),
                    histogram(Some(outcome::PANICKED)),
                ],
            }
        }
        #[cfg(not(feature = "metrics"))]
        ConsumerMeters {}
    }

    /// Counts `n` messages consumed.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn consumed(&self, n: u64) {
        #[cfg(feature = "metrics")]
        self.consumed.increment(n);
    }

    /// Records one handler run that began at `started` and ended as `end`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn processed(&self, end: Processed, started: std::time::Instant) {
        #[cfg(feature = "metrics")]
        observe::record_since(&self.processed[end as usize], started);
    }
}
