//! The Redis server's clock, estimated from `TIME` replies.

/// The Redis server's clock as this process estimates it from `TIME` replies.
#[derive(Debug)]
pub(super) struct ServerClock {
    origin: std::time::Instant,
    /// Server µs minus local µs, taken as an upper bound (see `RedisCache::read_plain`).
    offset_us: std::sync::atomic::AtomicI64,
    /// Local µs of the last sync; `u64::MAX` before the first.
    pub(super) synced_at_us: std::sync::atomic::AtomicU64,
}

impl ServerClock {
    pub(super) fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
            offset_us: std::sync::atomic::AtomicI64::new(0),
            synced_at_us: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    pub(super) fn local_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The server said `server_us` in reply to a request sent at local `sent_us`: at any
    /// later local instant `t`, the server's clock reads at most `server_us + (t - sent_us)`.
    pub(super) fn sync(&self, sent_us: u64, server_us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let offset = i64::try_from(server_us).unwrap_or(i64::MAX)
            - i64::try_from(sent_us).unwrap_or(i64::MAX);
        self.offset_us.store(offset, Relaxed);
        self.synced_at_us.store(sent_us, Relaxed);
    }

    pub(super) fn server_ms(&self) -> u64 {
        let us = i64::try_from(self.local_us()).unwrap_or(i64::MAX)
            + self.offset_us.load(std::sync::atomic::Ordering::Relaxed);
        u64::try_from(us.max(0)).unwrap_or(0) / 1_000
    }
}
