//! Backpressured worker pool with per-key ordering, completion watermarks for stream consumers, panic isolation and a graceful drain.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 10 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis backend (redis-rs, async, connection manager).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
