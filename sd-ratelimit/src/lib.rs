//! Rate limiting: GCRA, token bucket and leaky bucket on memory and Redis, with a tower layer and client IPs that cannot be spoofed.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 4 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: the Redis backend (redis-rs, async, connection manager).
//! - `tower`: the tower / axum middleware.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
