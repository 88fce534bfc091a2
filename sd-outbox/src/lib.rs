//! Transactional outbox on PostgreSQL with a relay to Redis Streams and NATS JetStream,
//! ordered and parallel, losing nothing.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod error;
mod message;
mod publisher;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub use crate::backoff::Backoff;
pub use crate::error::{Error, Result};
pub use crate::message::{Event, Headers, MAX_FIELD_LEN, Message, Payload, new_id};
pub use crate::publisher::{MemoryPublisher, Publisher};
