//! Counters, gauges and watermarks of a pool.

use super::*;

/// Counters and gauges of a pool, taken at one instant.
///
/// A job's counters are booked before its handle resolves, so after awaiting a handle
/// the metrics (and the watermark) include that job. Times come from one clock reading
/// per transition: when a job is accepted into the queue and when it ends; a worker's
/// next job starts at the instant its previous one ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Jobs accepted and not started.
    pub queued: usize,
    /// Jobs running now.
    pub running: usize,
    /// The concurrency limit now.
    pub workers: usize,
    /// The most jobs ever running at once.
    pub running_peak: usize,
    /// The most jobs ever queued at once.
    pub queued_peak: usize,
    /// Jobs accepted.
    pub submitted: u64,
    /// Jobs that ran to their end (their output may be a failure).
    pub completed: u64,
    /// Completed jobs whose output was a failure (see [`Outcome`]).
    pub failed: u64,
    /// Jobs that panicked.
    pub panicked: u64,
    /// Jobs aborted while running by [`Pool::shutdown_now`].
    pub cancelled: u64,
    /// Accepted jobs handed back unrun by `drain` or `shutdown_now`.
    pub returned: u64,
    /// Total time started jobs spent queued.
    pub queue_time_total: Duration,
    /// Longest time a job spent queued.
    pub queue_time_max: Duration,
    /// Total run time of finished jobs (completed or panicked).
    pub run_time_total: Duration,
    /// Longest run time of a finished job.
    pub run_time_max: Duration,
}

impl Pool {
    /// The counters and gauges now.
    pub fn metrics(&self) -> Metrics {
        let st = lock(&self.shared.state);
        let mut m = st.metrics.clone();
        m.queued = st.queued();
        m.running = st.running;
        m.workers = st.limit;
        m
    }

    /// The ordering mode.
    pub fn order(&self) -> Order {
        self.shared.order
    }

    /// The watermark of `partition`: the highest offset at or below which every job
    /// submitted with that partition is done (completed, failed or panicked).
    pub fn watermark(&self, partition: u32) -> Option<u64> {
        lock(&self.shared.state).watermarks.committed(partition)
    }

    /// Every partition's watermark, in partition order.
    pub fn watermarks(&self) -> Vec<(u32, u64)> {
        lock(&self.shared.state).watermarks.all_committed()
    }

    /// Finished jobs of `partition` waiting behind an unfinished one.
    pub fn watermark_window(&self, partition: u32) -> usize {
        lock(&self.shared.state).watermarks.window(partition)
    }
}
