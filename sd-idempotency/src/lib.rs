//! Idempotency-Key store on memory, Redis and PostgreSQL, and middleware that executes each request once under concurrent retries.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 7 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis backend (redis-rs, async, connection manager).
//! - `postgres`: the PostgreSQL backend (sqlx 0.8).
//! - `tower`: the tower / axum middleware.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
