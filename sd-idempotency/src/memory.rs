//! The in-memory backend: one process, no server.
//!
//! Each state change runs under the lock of the key's shard (a `DashMap` entry), so
//! claims of one key are linearizable inside the process. Nothing survives a restart
//! and replicas do not share records: use it for tests, single-instance services, and
//! as the model the other backends are checked against.

use std::future::{Future, ready};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use sd_core::{Clock, SystemClock};

use crate::error::Result;
use crate::observe::Meters;
use crate::store::{
    Claim, ClaimOutcome, Fingerprint, Record, Store, StoredResponse, completed, decide_claim,
    extended, holds, new_token, ttl_ms,
};
use sd_core::observe::backend;

/// Milliseconds on `clock` (wall time for [`SystemClock`]).
fn now_ms(clock: &impl Clock) -> u64 {
    u64::try_from(clock.now().as_millis()).unwrap_or(u64::MAX)
}

/// Records in this process's memory. Clones share the records.
#[derive(Debug, Clone)]
pub struct MemoryStore<C = SystemClock> {
    records: Arc<DashMap<(String, String), Record>>,
    clock: C,
    meters: Meters,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the wall clock ([`SystemClock`]).
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }
}

impl<C: Clock> MemoryStore<C> {
    /// An empty store on `clock` (a [`ManualClock`](sd_core::ManualClock) in tests).
    pub fn with_clock(clock: C) -> Self {
        MemoryStore {
            records: Arc::new(DashMap::new()),
            clock,
            meters: Meters::new(sd_core::observe::DEFAULT_NAME, backend::MEMORY),
        }
    }

    /// Names the store (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`), registered again with the recorder installed now.
    pub fn with_name(mut self, name: &str) -> Self {
        self.meters = Meters::new(name, backend::MEMORY);
        self
    }

    /// How many records are held (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Replaces the claim's record with `next(record, now)` when the claim holds it.
    fn as_holder(&self, claim: &Claim, next: impl FnOnce(&Record, u64) -> Record) -> Result<()> {
        let now = now_ms(&self.clock);
        match self.records.entry((claim.scope.clone(), claim.key.clone())) {
            Entry::Occupied(mut slot) if holds(Some(slot.get()), claim, now) => {
                let record = next(slot.get(), now);
                slot.insert(record);
                Ok(())
            }
            _ => Err(claim.lost()),
        }
    }
}

// Each state change runs when it is called, under the shard lock, and hands back a
// ready future.
impl<C: Clock + Clone> Store for MemoryStore<C> {
    fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome>> + Send {
        let answer = ttl_ms("lock_ttl", lock_ttl).map(|lock_ttl| {
            let token = new_token();
            let now = now_ms(&self.clock);
            let entry = self.records.entry((scope.to_owned(), key.to_owned()));
            let current = match &entry {
                Entry::Occupied(slot) => Some(slot.get()),
                Entry::Vacant(_) => None,
            };
            let (decision, record) = decide_claim(current, fingerprint, now, lock_ttl, token);
            if let Some(record) = record {
                entry.insert(record);
            }
            decision.into_outcome(scope, key, token)
        });
        self.meters.claimed(&answer);
        ready(answer)
    }

    fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        ready(ttl_ms("retention", retention).and_then(|retention| {
            self.as_holder(claim, |record, now| {
                completed(record, response.clone(), now, retention)
            })
        }))
    }

    fn release(&self, claim: &Claim) -> impl Future<Output = Result<()>> + Send {
        let now = now_ms(&self.clock);
        let removed = self
            .records
            .remove_if(&(claim.scope.clone(), claim.key.clone()), |_, r| {
                holds(Some(r), claim, now)
            });
        ready(removed.map(|_| ()).ok_or_else(|| claim.lost()))
    }

    fn extend(&self, claim: &Claim, lock_ttl: Duration) -> impl Future<Output = Result<()>> + Send {
        ready(ttl_ms("lock_ttl", lock_ttl).and_then(|lock_ttl| {
            self.as_holder(claim, |record, now| extended(record, now, lock_ttl))
        }))
    }

    fn sweep(&self) -> impl Future<Output = Result<u64>> + Send {
        let now = now_ms(&self.clock);
        let before = self.records.len();
        self.records.retain(|_, r| r.expires_at > now);
        ready(Ok(before.saturating_sub(self.records.len()) as u64))
    }
}
