//! [`Capture`]: what instances built under a test's own recorder reported.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

/// A recorder of a test's own (over `metrics-util`'s registry, never the global
/// recorder, so tests running side by side do not see each other's counts) and reads of
/// what it recorded. Reads take nothing away: a counter reads its total every time.
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
/// assert_eq!(capture.counter("sd.demo.count", &[(label::OUTCOME, "denied")]), 2);
/// assert_eq!(capture.counter("sd.demo.count", &[(label::OUTCOME, "allowed")]), 0);
/// ```
#[derive(Clone)]
pub struct Capture {
    registry: Arc<Registry<Key, AtomicStorage>>,
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

/// Whether `key` is named `name` and its labels include every pair of `wanted`.
fn matches(key: &Key, name: &str, wanted: &[(&str, &str)]) -> bool {
    key.name() == name
        && wanted.iter().all(|(k, v)| {
            key.labels()
                .any(|label| label.key() == *k && label.value() == *v)
        })
}

impl Capture {
    /// An empty recorder.
    pub fn new() -> Self {
        Capture {
            registry: Arc::new(Registry::atomic()),
        }
    }

    /// Runs `build` with this recorder as the current one, so the handles it registers
    /// report here.
    pub fn build<T>(&self, build: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, build)
    }

    /// The sum of the counters named `name` whose labels include `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut total = 0;
        self.registry.visit_counters(|key, c| {
            if matches(key, name, labels) {
                total += c.load(Ordering::Acquire);
            }
        });
        total
    }

    /// The values of the gauges named `name` whose labels include `labels`.
    pub fn gauges(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let mut out = Vec::new();
        self.registry.visit_gauges(|key, g| {
            if matches(key, name, labels) {
                out.push(f64::from_bits(g.load(Ordering::Acquire)));
            }
        });
        out
    }

    /// Every sample of the histograms named `name` whose labels include `labels`.
    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let mut out = Vec::new();
        self.registry.visit_histograms(|key, h| {
            if matches(key, name, labels) {
                out.extend(h.data());
            }
        });
        out
    }
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}
