//! Idempotency-Key store on memory, Redis and PostgreSQL, and middleware that executes
//! each request once under concurrent retries.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
pub mod memory;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod middleware;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod run_once;
pub mod store;

pub use error::{Error, Result};
pub use memory::{ManualClock, MemoryStore};
#[cfg(feature = "tower")]
pub use middleware::IdempotencyLayer;
pub use run_once::{DEFAULT_LOCK_TTL, DEFAULT_RETENTION, Outcome, RunError, RunOnce, run_once};
pub use store::{
    Claim, ClaimOutcome, Fingerprint, Store, StoredResponse, run_sweeper, validate_key,
};
