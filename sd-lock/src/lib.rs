//! Distributed leases with fencing tokens on Redis, Redlock over N masters, PostgreSQL and etcd, with a watchdog.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 6 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis backend (redis-rs, async, connection manager).
//! - `postgres`: the PostgreSQL backend (sqlx 0.8).
//! - `etcd`: the etcd backend.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
