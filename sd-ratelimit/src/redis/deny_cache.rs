//! The deny cache: keys Redis denied, answered locally until they could be admitted.

use super::*;

/// Keys Redis denied, answered locally until they could be admitted (see
/// [`RedisLimiterBuilder::deny_cache`]).
pub(super) struct DenyCache {
    /// Key → (denied until, for costs of at least, the denial).
    pub(super) entries: dashmap::DashMap<String, (tokio::time::Instant, u32, Decision)>,
    pub(super) max_keys: usize,
    /// Denials not cached since the last sweep, which runs once per `max_keys / 8`.
    pub(super) refused: std::sync::atomic::AtomicUsize,
}

impl DenyCache {
    /// The denial for a request of `cost` on `key`, if one still holds.
    pub(super) fn get(&self, key: &str, cost: u32) -> Option<Decision> {
        let entry = self.entries.get(key)?;
        let (until, min_cost, d) = *entry;
        let now = tokio::time::Instant::now();
        if cost < min_cost || now >= until {
            return None;
        }
        let elapsed = now.saturating_duration_since(until.checked_sub(d.retry_after)?);
        Some(Decision {
            retry_after: until - now,
            reset_after: d.reset_after.saturating_sub(elapsed),
            ..d
        })
    }

    pub(super) fn insert(&self, key: &str, cost: u32, sent: tokio::time::Instant, d: Decision) {
        if d.retry_after.is_zero() {
            return;
        }
        if self.entries.len() >= self.max_keys && !self.entries.contains_key(key) {
            use std::sync::atomic::Ordering::Relaxed;
            if self.refused.fetch_add(1, Relaxed) + 1 < (self.max_keys / 8).max(1) {
                return;
            }
            self.refused.store(0, Relaxed);
            let now = tokio::time::Instant::now();
            self.entries.retain(|_, (until, ..)| *until > now);
            if self.entries.len() >= self.max_keys {
                return;
            }
        }
        self.entries
            .insert(key.to_owned(), (sent + d.retry_after, cost, d));
    }
}
