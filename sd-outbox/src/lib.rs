//! Transactional outbox on PostgreSQL with a relay to Redis Streams and NATS JetStream, ordered and parallel, losing nothing.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 9 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `postgres`: the PostgreSQL backend (sqlx 0.8).
//! - `redis`: the Redis backend (redis-rs, async, connection manager).
//! - `nats`: the NATS JetStream sink.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
