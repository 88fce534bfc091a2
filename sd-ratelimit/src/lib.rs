//! Rate limiting: GCRA, token bucket and leaky bucket on memory and Redis, with a tower
//! layer and client IPs that cannot be spoofed.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod algorithm;
pub mod client_ip;
mod error;
pub mod memory;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub use crate::algorithm::{Decision, Limit, MAX_SLIDING_WINDOW_LIMIT, Quota};
pub use crate::error::{Error, Result};
