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
use crate::store::{
    Claim, ClaimOutcome, Fingerprint, Record, Store, StoredResponse, completed, decide_claim,
    extended, holds, new_token, ttl_ms,
};

/// Milliseconds on `clock` (wall time for [`SystemClock`]).
fn now_ms(clock: &impl Clock) -> u64 {
    u64::try_from(clock.now().as_millis()).unwrap_or(u64::MAX)
}

/// Records in this process's memory. Clones share the records.
#[derive(Debug, Clone)]
pub struct MemoryStore<C = SystemClock> {
    records: Arc<DashMap<(String, String), Record>>,
    clock: C,
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
        }
    }

    /// How many records are held (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn claim_now(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<ClaimOutcome> {
        let lock_ttl = ttl_ms("lock_ttl", lock_ttl)?;
        let token = new_token();
        let now = now_ms(&self.clock);
        let decision = match self.records.entry((scope.to_owned(), key.to_owned())) {
            Entry::Vacant(slot) => {
                let (decision, record) = decide_claim(None, fingerprint, now, lock_ttl, token);
                if let Some(record) = record {
                    slot.insert(record);
                }
                decision
            }
            Entry::Occupied(mut slot) => {
                let (decision, record) =
                    decide_claim(Some(slot.get()), fingerprint, now, lock_ttl, token);
                if let Some(record) = record {
                    slot.insert(record);
                }
                decision
            }
        };
        Ok(decision.into_outcome(scope, key, token))
    }

    /// Applies `change` to the claim's record when the claim holds it.
    fn as_holder(
        &self,
        claim: &Claim,
        change: impl FnOnce(&mut Entry<'_, (String, String), Record>, u64),
    ) -> Result<()> {
        let now = now_ms(&self.clock);
        let mut entry = self.records.entry((claim.scope.clone(), claim.key.clone()));
        let held = match &entry {
            Entry::Occupied(slot) => holds(Some(slot.get()), claim, now),
            Entry::Vacant(_) => false,
        };
        if !held {
            return Err(claim.lost());
        }
        change(&mut entry, now);
        Ok(())
    }

    fn complete_now(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<()> {
        let retention = ttl_ms("retention", retention)?;
        self.as_holder(claim, |entry, now| {
            if let Entry::Occupied(slot) = entry {
                let next = completed(slot.get(), response.clone(), now, retention);
                slot.insert(next);
            }
        })
    }

    fn extend_now(&self, claim: &Claim, lock_ttl: Duration) -> Result<()> {
        let lock_ttl = ttl_ms("lock_ttl", lock_ttl)?;
        self.as_holder(claim, |entry, now| {
            if let Entry::Occupied(slot) = entry {
                let next = extended(slot.get(), now, lock_ttl);
                slot.insert(next);
            }
        })
    }

    fn release_now(&self, claim: &Claim) -> Result<()> {
        let now = now_ms(&self.clock);
        let removed = self
            .records
            .remove_if(&(claim.scope.clone(), claim.key.clone()), |_, r| {
                holds(Some(r), claim, now)
            });
        removed.map(|_| ()).ok_or_else(|| claim.lost())
    }

    fn sweep_now(&self) -> u64 {
        let now = now_ms(&self.clock);
        let before = self.records.len();
        self.records.retain(|_, r| r.expires_at > now);
        before.saturating_sub(self.records.len()) as u64
    }
}

impl<C: Clock + Clone> Store for MemoryStore<C> {
    fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome>> + Send {
        ready(self.claim_now(scope, key, fingerprint, lock_ttl))
    }

    fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        ready(self.complete_now(claim, response, retention))
    }

    fn release(&self, claim: &Claim) -> impl Future<Output = Result<()>> + Send {
        ready(self.release_now(claim))
    }

    fn extend(&self, claim: &Claim, lock_ttl: Duration) -> impl Future<Output = Result<()>> + Send {
        ready(self.extend_now(claim, lock_ttl))
    }

    fn sweep(&self) -> impl Future<Output = Result<u64>> + Send {
        ready(Ok(self.sweep_now()))
    }
}
