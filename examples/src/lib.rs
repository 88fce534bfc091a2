//! Runnable programs that use the sd crates. Run the tour with
//! `cargo run -p sd-examples --example tour`.
#![forbid(unsafe_code)]

#[cfg(any(feature = "idempotency-grpc", feature = "saga", feature = "checkout"))]
pub mod grpc;

/// One crate of the workspace as the tour presents it.
#[derive(Debug, Clone, Copy)]
pub struct CrateStatus {
    /// Package name.
    pub name: &'static str,
    /// The pattern, in a few words.
    pub pattern: &'static str,
    /// What a user can use today.
    pub today: &'static str,
}

/// Every pattern crate, in the order the README lists them.
pub const CRATES: &[CrateStatus] = &[
    CrateStatus {
        name: "sd-ratelimit",
        pattern: "rate limiting: GCRA, token and leaky bucket; tower layer",
        today: "GCRA, token/leaky bucket, sliding window on memory and Redis (cluster too); tower layer; spoof-proof client IP, PROXY listener; keyed 1.4-1.5x governor, Redis batching and deny cache",
    },
    CrateStatus {
        name: "sd-cache",
        pattern: "read-through cache without stampedes: single-flight + XFetch",
        today: "memory (moka), Redis and two-tier (acknowledged invalidation) caches: single-flight, XFetch once per expiry, one loader across processes, negative caching, stale-on-error; write-through, write-behind",
    },
    CrateStatus {
        name: "sd-hashring",
        pattern: "consistent hashing: CRC32 vnode ring, replicas, bounded loads",
        today: "weighted ring, distinct replicas, move plans, bounded loads, jump/rendezvous/Maglev, ketama",
    },
    CrateStatus {
        name: "sd-lock",
        pattern: "leases with fencing tokens: Redis, Redlock, PostgreSQL, etcd",
        today: "leases + fencing tokens on memory, Redis, Redlock, PostgreSQL (table + advisory), etcd; watchdog; Redis/Postgres fences",
    },
    CrateStatus {
        name: "sd-idempotency",
        pattern: "Idempotency-Key store and middleware",
        today: "store (memory, Redis, PostgreSQL) with takeover epochs, run_once (tonic example), tower/axum middleware per the IETF draft",
    },
    CrateStatus {
        name: "sd-saga",
        pattern: "saga orchestrator with a durable log and recovery",
        today: "compensatable/pivot/retriable steps, retries with backoff, reverse compensation, Stuck + resume; memory and PostgreSQL logs (2 writes/step), leases + fencing, recover(); gRPC order example",
    },
    CrateStatus {
        name: "sd-outbox",
        pattern: "transactional outbox with a relay to Redis Streams / NATS",
        today: "enqueue in your sqlx transaction (or a MemoryOutbox unit of work in process); ordered (one active relay) and parallel (per-aggregate order) relays to Redis Streams / NATS JetStream, at least once, dead letters, inbox",
    },
    CrateStatus {
        name: "sd-pool",
        pattern: "backpressured worker pool, per-key order, offset watermarks",
        today: "pool with backpressure, per-key/serial order, offset watermarks, panic isolation, drain; Redis Streams consumer (at least once)",
    },
];
