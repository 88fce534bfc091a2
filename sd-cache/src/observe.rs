//! What a cache reports (feature `metrics`), beside the counters of [`CacheStats`]:
//! every count that `CacheStats` keeps is also added to a `metrics` handle registered
//! when the cache is built, under the names and labels of `sd_core::observe`. Without
//! the feature the handles are zero-sized and cost nothing. Hits are a
//! `sd_core::tally::Tally`, published to their metric in steps.
//!
//! [`CacheStats`]: crate::CacheStats

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sd_core::tally::Tally;

/// One count: the atomic `CacheStats` reads, and its metric.
#[derive(Debug, Default)]
pub(crate) struct Count {
    n: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: Metric,
}

/// A counter handle, a no-op by default.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Metric(metrics::Counter);

#[cfg(feature = "metrics")]
impl Default for Metric {
    fn default() -> Self {
        Metric(metrics::Counter::noop())
    }
}

impl Count {
    /// A count reported as the counter `name` with `labels` and `sd.outcome = outcome`
    /// when there is one.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(name: &'static str, help: &'static str, labels: &Labels, outcome: Option<&str>) -> Self {
        Count {
            n: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: Metric(sd_core::observe::counter(
                name,
                help,
                &match outcome {
                    Some(o) => labels
                        .labels
                        .clone()
                        .with(sd_core::observe::label::OUTCOME, o),
                    None => labels.labels.clone(),
                },
            )),
        }
    }

    /// Adds `n`.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.n.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.0.increment(n);
    }

    /// The count.
    pub(crate) fn load(&self, order: Ordering) -> u64 {
        self.n.load(order)
    }
}

/// The labels of one cache: its name and backend.
#[derive(Debug, Clone)]
pub(crate) struct Labels {
    #[cfg(feature = "metrics")]
    labels: sd_core::observe::Labels,
}

impl Labels {
    /// The labels of the cache `name` on `backend`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: &str, backend: &'static str) -> Self {
        Labels {
            #[cfg(feature = "metrics")]
            labels: sd_core::observe::Labels::instance(name, backend),
        }
    }
}

/// The load-time histogram.
#[derive(Debug, Default)]
pub(crate) struct LoadTime {
    #[cfg(feature = "metrics")]
    histogram: Option<metrics::Histogram>,
}

impl LoadTime {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn record(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.histogram {
            h.record(took.as_secs_f64());
        }
    }
}

/// The names of a cache's metrics, and its handles: `(hit, [misses, loads, load errors,
/// early refreshes, skipped refreshes, stampede joins, evictions, stale served, fallback
/// loads], load time)`.
pub(crate) fn handles(labels: &Labels) -> (Tally<1>, [Count; 9], LoadTime) {
    const LOOKUPS: &str = "sd.cache.lookups";
    const LOADS: &str = "sd.cache.loads";
    let lookups = "reads by whether a fresh entry answered";
    let loads = "loader calls (misses that led a load, and early refreshes)";
    let counts = [
        Count::new(LOOKUPS, lookups, labels, Some("miss")),
        Count::new(LOADS, loads, labels, None),
        Count::new(
            "sd.cache.load_errors",
            "loader calls that returned an error",
            labels,
            None,
        ),
        Count::new(
            "sd.cache.early_refreshes",
            "loads started early (XFetch)",
            labels,
            None,
        ),
        Count::new(
            "sd.cache.skipped_refreshes",
            "early refreshes that found the entry changed",
            labels,
            None,
        ),
        Count::new(
            "sd.cache.stampede.joins",
            "callers that waited on another caller's load",
            labels,
            None,
        ),
        Count::new(
            "sd.cache.evictions",
            "entries evicted for capacity",
            labels,
            None,
        ),
        Count::new(
            "sd.cache.stale_served",
            "expired values served because a load failed",
            labels,
            None,
        ),
        Count::new(
            "sd.cache.fallback_loads",
            "reads the loader answered around a failed Redis",
            labels,
            None,
        ),
    ];
    #[cfg(feature = "metrics")]
    let hit = Tally::metered([Count::new(LOOKUPS, lookups, labels, Some("hit")).metric.0]);
    #[cfg(not(feature = "metrics"))]
    let hit = Tally::new();
    let load_time = LoadTime {
        #[cfg(feature = "metrics")]
        histogram: Some(sd_core::observe::histogram(
            "sd.cache.load.duration",
            "time of one loader call",
            &labels.labels,
        )),
    };
    (hit, counts, load_time)
}

/// The span of one run of a loader, with the field names every sd crate's spans use.
#[inline]
pub(crate) fn load_span(name: &str, backend: &'static str) -> tracing::Span {
    tracing::debug_span!(
        "cache.load",
        sd.name = name,
        sd.backend = backend,
        sd.operation = sd_core::observe::operation::LOAD,
    )
}

/// The span of one call to Redis (`operation` from `sd_core::observe::operation`).
#[cfg(feature = "redis")]
#[inline]
pub(crate) fn redis_span(name: &str, operation: &'static str) -> tracing::Span {
    tracing::debug_span!(
        "cache.redis",
        sd.name = name,
        sd.backend = sd_core::observe::backend::REDIS,
        sd.operation = operation,
    )
}
