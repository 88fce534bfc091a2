//! Saga orchestrator with a durable log, retries, pivot semantics and crash recovery.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 8 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `postgres`: the PostgreSQL backend (sqlx 0.8).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
