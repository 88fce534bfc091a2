//! The behaviour suite on the memory backend, its clock moved by hand.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use sd_idempotency::Clock as _;
use sd_idempotency::{Error, ManualClock, MemoryStore, RunOnce};
use suite::Harness;

fn harness() -> (tokio::runtime::Runtime, Harness<MemoryStore<ManualClock>>) {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    (sd_testkit::runtime(), suite::manual_time(store, clock))
}

behaviour_suite!(harness());

#[test]
fn run_once_config_errors_name_the_field() {
    let runner = RunOnce::builder(MemoryStore::new());
    let err = runner.clone().lock_ttl(Duration::ZERO).build().unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "lock_ttl",
            ..
        }
    ));
    let err = runner.retention(Duration::ZERO).build().unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "retention",
            ..
        }
    ));
}

/// The model over 512 sequences on the manual clock, where every time is exact (the
/// abandoned-record grace included).
#[test]
fn memory_store_follows_the_model() {
    let (runtime, _) = harness();
    suite::model::check(&runtime, 512, suite::model::ops(80, 70, true), || {
        let clock = ManualClock::new();
        clock.advance(Duration::from_secs(1));
        let store = MemoryStore::with_clock(clock.clone());
        let now = clock.clone();
        let backend = suite::model::Backend {
            lock: Duration::from_millis(30),
            retention: Duration::from_millis(50),
            expiry_forgets: false,
            sweep_counts: true,
            slack: 0,
            now: Arc::new(move || u64::try_from(now.now().as_millis()).unwrap()),
            pass: Arc::new(move |d| {
                clock.advance(d);
                Box::pin(std::future::ready(()))
            }),
        };
        (store, backend)
    });
}
