//! Consistent hashing: a CRC32 virtual-node ring with weights, distinct replicas, bounded loads and move plans.
//!
//! **Status: not implemented yet.** This crate holds its place in the workspace and
//! declares its cargo features; the pattern itself lands with issue 3 of the sd tracker.
//! Nothing here is usable today, and no API is promised until then.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `ketama`: the libketama / twemproxy compatible continuum (MD5).
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
