//! Counters an orchestrator keeps, and the snapshot a user exports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::SagaState;

/// Upper bounds of the step-latency histogram buckets (the last bucket is open).
pub const LATENCY_BUCKETS: [Duration; 8] = [
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(25),
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(10),
    Duration::from_secs(60),
];

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) started: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) compensated: AtomicU64,
    pub(crate) stuck: AtomicU64,
    pub(crate) recovered: AtomicU64,
    pub(crate) resumed: AtomicU64,
    pub(crate) attempts: AtomicU64,
    pub(crate) failed_attempts: AtomicU64,
    pub(crate) compensations_run: AtomicU64,
    pub(crate) fenced: AtomicU64,
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        bump(&self.latency_count);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| took <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        bump(&self.latency_buckets[bucket]);
    }

    pub(crate) fn snapshot(&self) -> LocalMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LocalMetrics {
            started: get(&self.started),
            completed: get(&self.completed),
            compensated: get(&self.compensated),
            stuck: get(&self.stuck),
            recovered: get(&self.recovered),
            resumed: get(&self.resumed),
            attempts: get(&self.attempts),
            failed_attempts: get(&self.failed_attempts),
            compensations_run: get(&self.compensations_run),
            fenced: get(&self.fenced),
            step_latency: Latency {
                count: get(&self.latency_count),
                sum: Duration::from_micros(get(&self.latency_sum_us)),
                max: Duration::from_micros(get(&self.latency_max_us)),
                buckets: self.latency_buckets.iter().map(get).collect(),
            },
        }
    }
}

/// A histogram of step-attempt latencies (actions and compensations).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// Attempts observed.
    pub count: u64,
    /// Their total time.
    pub sum: Duration,
    /// The longest.
    pub max: Duration,
    /// Counts per bucket: `buckets[i]` counts attempts at most [`LATENCY_BUCKETS`]`[i]`
    /// (and above the previous bound); the last counts the rest.
    pub buckets: Vec<u64>,
}

impl Latency {
    /// The mean, or zero when nothing was observed.
    pub fn mean(&self) -> Duration {
        if self.count == 0 {
            Duration::ZERO
        } else {
            self.sum / u32::try_from(self.count).unwrap_or(u32::MAX)
        }
    }
}

/// What this orchestrator did since it was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalMetrics {
    /// Sagas started.
    pub started: u64,
    /// Sagas this orchestrator drove to Completed.
    pub completed: u64,
    /// Sagas this orchestrator drove to Compensated.
    pub compensated: u64,
    /// Sagas this orchestrator left Stuck.
    pub stuck: u64,
    /// Abandoned sagas claimed by `recover`.
    pub recovered: u64,
    /// Stuck sagas resumed.
    pub resumed: u64,
    /// Step attempts run (actions and compensations).
    pub attempts: u64,
    /// Attempts that failed.
    pub failed_attempts: u64,
    /// Compensations that succeeded.
    pub compensations_run: u64,
    /// Writes refused because another orchestrator took the saga over.
    pub fenced: u64,
    /// Step-attempt latency.
    pub step_latency: Latency,
}

/// A snapshot to export: the log's view of every saga of this type plus this
/// orchestrator's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Sagas of this type per state, from the log (all orchestrators).
    pub by_state: Vec<(SagaState, u64)>,
    /// Age of the oldest saga that is running, compensating or stuck.
    pub oldest_unfinished_age: Option<Duration>,
    /// This orchestrator's counters.
    pub local: LocalMetrics,
}

impl Metrics {
    /// The count of sagas in `state`.
    pub fn count(&self, state: SagaState) -> u64 {
        self.by_state
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n)
    }
}
