//! Registering metric handles once, with bounded labels, through the `metrics` facade.

use std::time::Instant;

use super::label;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Unit};

/// Bounded labels of one metric: keys from [`super::label`], values from configuration
/// or from the fixed sets of the sibling modules.
///
/// ```
/// use sd_core::observe::{Labels, backend, label};
///
/// let labels = Labels::new().with(label::BACKEND, backend::REDIS).with(label::NAME, "login");
/// assert_eq!(labels.len(), 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Labels(Vec<Label>);

impl Labels {
    /// No labels.
    pub fn new() -> Self {
        Labels(Vec::new())
    }

    /// The labels of one instance: its name ([`label::NAME`]) and backend
    /// ([`label::BACKEND`]).
    pub fn instance(name: &str, backend: &'static str) -> Self {
        Labels::new()
            .with(label::NAME, name)
            .with(label::BACKEND, backend)
    }

    /// These labels and `key = value`.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.0.push(Label::new(key, value.into()));
        self
    }

    /// How many labels there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn key(&self, name: &'static str) -> Key {
        Key::from_parts(name, self.0.clone())
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

/// Registers the counter `name` with `labels` (and its description) with the recorder
/// installed now, and returns its handle.
pub fn counter(name: &'static str, description: &'static str, labels: &Labels) -> Counter {
    metrics::with_recorder(|r| {
        r.describe_counter(name.into(), Some(Unit::Count), description.into());
        r.register_counter(&labels.key(name), &metadata())
    })
}

/// Registers the duration histogram `name` (in seconds) with `labels` with the recorder
/// installed now, and returns its handle.
pub fn histogram(name: &'static str, description: &'static str, labels: &Labels) -> Histogram {
    metrics::with_recorder(|r| {
        r.describe_histogram(name.into(), Some(Unit::Seconds), description.into());
        r.register_histogram(&labels.key(name), &metadata())
    })
}

/// Registers the gauge `name` with `labels` with the recorder installed now, and returns
/// its handle. `unit` is `None` for a count, `Some(Unit::Seconds)` for an age.
pub fn gauge(
    name: &'static str,
    unit: Option<Unit>,
    description: &'static str,
    labels: &Labels,
) -> Gauge {
    metrics::with_recorder(|r| {
        r.describe_gauge(name.into(), unit, description.into());
        r.register_gauge(&labels.key(name), &metadata())
    })
}

/// Records the seconds since `start` in `histogram`.
#[inline]
pub fn record_since(histogram: &Histogram, start: Instant) {
    histogram.record(start.elapsed().as_secs_f64());
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use super::*;
    use crate::observe::{Capture, label};

    #[test]
    fn handles_record_into_the_recorder_installed_when_they_were_made() {
        let capture = Capture::new();
        let labels = Labels::new().with(label::OUTCOME, "denied");
        let (c, h) = capture.build(|| {
            (
                counter("sd.test.count", "a count", &labels),
                histogram("sd.test.duration", "a duration", &labels),
            )
        });
        // Used after the recorder's scope ended: the handles still reach it.
        c.increment(3);
        record_since(&h, Instant::now());
        assert_eq!(
            capture.counter("sd.test.count", &[(label::OUTCOME, "denied")]),
            3
        );
        assert_eq!(
            capture
                .samples("sd.test.duration", &[(label::OUTCOME, "denied")])
                .len(),
            1
        );
        assert!(
            capture
                .samples("sd.test.duration", &[(label::OUTCOME, "allowed")])
                .is_empty()
        );
    }
}
