//! [`Capture`]: what instances built under a test's own recorder reported.

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// A recorder of a test's own (`metrics-util`'s debugging recorder, never the global
/// one, so tests running side by side do not see each other's counts) and reads of what
/// it recorded.
///
/// Build the instances under test inside [`Capture::build`]: their handles are made
/// then and keep reporting here afterwards, in any thread or task.
///
/// ```
/// use sd_core::observe::{Capture, Labels, counter, label};
///
/// let capture = Capture::new();
/// let denied = capture.build(|| counter("sd.demo.count", "a count", &Labels::new().with(label::OUTCOME, "denied")));
/// denied.increment(2);
/// assert_eq!(capture.counter("sd.demo.count", &[(label::OUTCOME, "denied")]), 2);
/// assert_eq!(capture.counter("sd.demo.count", &[(label::OUTCOME, "allowed")]), 0);
/// ```
pub struct Capture {
    recorder: DebuggingRecorder,
    snapshotter: Snapshotter,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").finish_non_exhaustive()
    }
}

impl Default for Capture {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the metric's labels include every pair of `wanted`.
fn has_labels(key: &metrics::Key, wanted: &[(&str, &str)]) -> bool {
    wanted.iter().all(|(k, v)| {
        key.labels()
            .any(|label| label.key() == *k && label.value() == *v)
    })
}

impl Capture {
    /// An empty recorder.
    pub fn new() -> Self {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        Capture {
            recorder,
            snapshotter,
        }
    }

    /// Runs `build` with this recorder as the current one, so the handles it registers
    /// report here.
    pub fn build<T>(&self, build: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, build)
    }

    /// The sum of the counters named `name` whose labels include `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.values(name, labels)
            .into_iter()
            .map(|v| match v {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum()
    }

    /// The values of the gauges named `name` whose labels include `labels`.
    pub fn gauges(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.values(name, labels)
            .into_iter()
            .filter_map(|v| match v {
                DebugValue::Gauge(g) => Some(g.into_inner()),
                _ => None,
            })
            .collect()
    }

    /// The samples of the histograms named `name` whose labels include `labels`,
    /// recorded since the last read of a histogram (a read takes them).
    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.values(name, labels)
            .into_iter()
            .flat_map(|v| match v {
                DebugValue::Histogram(s) => s.into_iter().map(|x| x.into_inner()).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn values(&self, name: &str, labels: &[(&str, &str)]) -> Vec<DebugValue> {
        self.snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == name && has_labels(key.key(), labels))
            .map(|(.., value)| value)
            .collect()
    }
}
