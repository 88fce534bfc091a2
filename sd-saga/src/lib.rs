//! Saga orchestrator with a durable log, retries, pivot semantics and crash recovery.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod definition;
mod error;
pub mod memory;
mod metrics;
mod orchestrator;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
mod retry;
mod store;

pub use crate::definition::{
    BoxFuture, Direction, Saga, SagaBuilder, Step, StepContext, StepError, StepKind,
    idempotency_key,
};
pub use crate::error::{Error, Result};
pub use crate::memory::MemoryStore;
pub use crate::metrics::{LATENCY_BUCKETS, Latency, LocalMetrics, Metrics};
pub use crate::orchestrator::{Orchestrator, OrchestratorBuilder, Recovery, SagaOutcome};
pub use crate::retry::{RetryPolicy, RetryPolicyBuilder};
pub use crate::store::{
    Clock, Event, EventKind, Lease, ManualClock, NewSaga, SagaRecord, SagaState, SagaStore,
    StoreStats, StoredEvent, SystemClock, Write,
};
