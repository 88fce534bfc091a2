//! The behaviour suite on the memory backend, its clock moved by hand.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use sd_idempotency::{ManualClock, MemoryStore};
use suite::Harness;

fn harness() -> (tokio::runtime::Runtime, Harness<MemoryStore<ManualClock>>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    let harness = Harness {
        store,
        lock_ttl: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
        pass: Arc::new(move |d| {
            clock.advance(d);
            Box::pin(std::future::ready(()))
        }),
        guard: Box::new(()),
    };
    (runtime, harness)
}

behaviour_suite!(harness());
