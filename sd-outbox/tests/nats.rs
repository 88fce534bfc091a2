//! The relay to NATS JetStream.
#![allow(clippy::unwrap_used)]
