//! Read-through caching without stampedes (single-flight and XFetch early refresh), write-through and write-behind, over memory and Redis tiers.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 5 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis backend (redis-rs, async, connection manager).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
