//! The in-memory log: one mutex over a map, for tests and for sagas that need not survive
//! the process.
//!
//! It honours the whole [`SagaStore`] contract (leases, epochs, versions), so several
//! orchestrators sharing one `MemoryStore` recover and fence each other exactly as they
//! would on PostgreSQL; it just forgets everything when the process exits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::definition::Direction;
use crate::error::{Error, Result};
use crate::store::{
    Claimant, Event, EventKind, Lease, NewSaga, SagaRecord, SagaState, SagaStore, StoreStats,
    StoredEvent, Write,
};
use sd_core::{Clock, SystemClock};

#[derive(Debug)]
struct Entry {
    record: SagaRecord,
    lease_until: Option<Duration>,
    created_at: Duration,
    updated_at: Duration,
    events: Vec<StoredEvent>,
}

/// The in-memory log; clones share the same sagas.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    sagas: Arc<Mutex<HashMap<String, Entry>>>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty log on the wall clock ([`SystemClock`]).
    pub fn new() -> Self {
        MemoryStore::with_clock(SystemClock)
    }

    /// An empty log on `clock` (leases expire and ages grow by it).
    pub fn with_clock(clock: impl Clock) -> Self {
        MemoryStore {
            sagas: Arc::new(Mutex::new(HashMap::new())),
            clock: Arc::new(clock),
        }
    }

    /// Deletes Completed and Compensated sagas (and their events) last written at least
    /// `older_than` ago; returns how many. Stuck and live sagas are kept.
    pub fn prune_finished(&self, older_than: Duration) -> usize {
        let now = self.clock.now();
        let mut sagas = self.lock();
        let before = sagas.len();
        sagas.retain(|_, e| {
            !(e.record.state.is_final() && now.saturating_sub(e.updated_at) >= older_than)
        });
        before - sagas.len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves whole entries behind; keep going.
        self.sagas.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(entry: &mut Entry, event: Event) {
        entry.events.push(StoredEvent {
            version: entry.record.version,
            epoch: entry.record.epoch,
            event,
        });
    }

    fn claim(entry: &mut Entry, owner: &str, until: Duration) {
        let r = &mut entry.record;
        r.owner = Some(owner.to_owned());
        r.epoch += 1;
        r.version += 1;
        entry.lease_until = Some(until);
    }
}

impl SagaStore for MemoryStore {
    async fn create(&self, saga: &NewSaga<'_>) -> Result<Lease> {
        let now = self.clock.now();
        let mut sagas = self.lock();
        if sagas.contains_key(saga.id) {
            return Err(Error::AlreadyExists {
                id: saga.id.to_owned(),
            });
        }
        let record = SagaRecord {
            id: saga.id.to_owned(),
            saga_type: saga.saga_type.to_owned(),
            state: SagaState::Running,
            step: 0,
            compensating: false,
            data: saga.data.to_owned(),
            version: 1,
            owner: Some(saga.owner.to_owned()),
            epoch: 1,
            reason: None,
            progress: Some(saga.progress.to_owned()),
            cancel_reason: None,
            deadline: saga.deadline,
            definition_version: saga.definition_version,
        };
        let lease = record.lease();
        let mut entry = Entry {
            record,
            lease_until: Some(now + saga.lease_ttl),
            created_at: now,
            updated_at: now,
            events: Vec::new(),
        };
        Self::push(
            &mut entry,
            Event {
                step: 0,
                direction: Direction::Forward,
                kind: EventKind::Intent,
                attempt: 1,
                error: None,
            },
        );
        sagas.insert(saga.id.to_owned(), entry);
        Ok(lease)
    }

    async fn write(&self, lease: &Lease, write: &Write<'_>) -> Result<Lease> {
        let now = self.clock.now();
        let mut sagas = self.lock();
        let entry = sagas.get_mut(&lease.id).ok_or_else(|| Error::NotFound {
            id: lease.id.clone(),
        })?;
        let r = &mut entry.record;
        if r.version != lease.version || r.epoch != lease.epoch {
            return Err(lease.fenced());
        }
        r.state = write.state;
        r.step = write.step;
        r.compensating = write.compensating;
        if let Some(data) = write.data {
            r.data = data.to_owned();
        }
        r.reason = write.reason.map(str::to_owned);
        r.progress = Some(write.progress.to_owned());
        r.definition_version = write.definition_version;
        r.version += 1;
        entry.updated_at = now;
        if write.state.is_live() {
            entry.lease_until = Some(now + write.lease_ttl);
        } else {
            r.owner = None;
            entry.lease_until = None;
        }
        let lease = Lease {
            version: r.version,
            cancel_requested: r.cancel_reason.is_some(),
            ..lease.clone()
        };
        Self::push(entry, write.event.clone());
        Ok(lease)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<()> {
        let now = self.clock.now();
        let mut sagas = self.lock();
        match sagas.get_mut(&lease.id) {
            Some(e)
                if e.record.epoch == lease.epoch
                    && e.record.state.is_live()
                    && e.record.owner.as_deref() == Some(lease.owner.as_str()) =>
            {
                e.lease_until = Some(now + ttl);
                Ok(())
            }
            Some(_) => Err(lease.fenced()),
            None => Err(Error::NotFound {
                id: lease.id.clone(),
            }),
        }
    }

    async fn claim_expired(&self, by: &Claimant<'_>, limit: usize) -> Result<Vec<SagaRecord>> {
        let now = self.clock.now();
        let mut sagas = self.lock();
        let mut expired: Vec<&mut Entry> = sagas
            .values_mut()
            .filter(|e| {
                e.record.saga_type == by.saga_type
                    && e.record.state.is_live()
                    && e.lease_until.is_none_or(|until| until <= now)
            })
            .collect();
        expired.sort_by_key(|e| e.lease_until);
        Ok(expired
            .into_iter()
            .take(limit)
            .map(|e| {
                Self::claim(e, by.owner, now + by.lease_ttl);
                e.record.clone()
            })
            .collect())
    }

    async fn claim_stuck(&self, by: &Claimant<'_>, id: &str) -> Result<SagaRecord> {
        let now = self.clock.now();
        let mut sagas = self.lock();
        let entry = sagas
            .get_mut(id)
            .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
        check_stuck(&entry.record, by.saga_type)?;
        Self::claim(entry, by.owner, now + by.lease_ttl);
        let r = &mut entry.record;
        r.state = if r.compensating {
            SagaState::Compensating
        } else {
            SagaState::Running
        };
        let event = Event {
            step: r.step,
            direction: if r.compensating {
                Direction::Compensate
            } else {
                Direction::Forward
            },
            kind: EventKind::Resumed,
            attempt: 0,
            error: None,
        };
        Self::push(entry, event);
        Ok(entry.record.clone())
    }

    async fn cancel(&self, id: &str, reason: &str) -> Result<SagaRecord> {
        let now = self.clock.now();
        let mut sagas = self.lock();
        let entry = sagas
            .get_mut(id)
            .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
        let r = &mut entry.record;
        if r.state.is_live() && r.cancel_reason.is_none() {
            r.cancel_reason = Some(reason.to_owned());
            entry.updated_at = now;
        }
        Ok(entry.record.clone())
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>> {
        Ok(self.lock().get(id).map(|e| e.record.clone()))
    }

    async fn events(&self, id: &str) -> Result<Vec<StoredEvent>> {
        Ok(self
            .lock()
            .get(id)
            .map(|e| e.events.clone())
            .unwrap_or_default())
    }

    async fn stats(&self, saga_type: &str) -> Result<StoreStats> {
        let now = self.clock.now();
        let sagas = self.lock();
        let mut counts = [0u64; 5];
        let mut oldest: Option<Duration> = None;
        for e in sagas.values().filter(|e| e.record.saga_type == saga_type) {
            let i = SagaState::ALL
                .iter()
                .position(|s| *s == e.record.state)
                .unwrap_or(0);
            counts[i] += 1;
            if !e.record.state.is_final() {
                oldest = Some(oldest.map_or(e.created_at, |o| o.min(e.created_at)));
            }
        }
        Ok(StoreStats {
            by_state: SagaState::ALL.into_iter().zip(counts).collect(),
            oldest_unfinished_age: oldest.map(|created| now.saturating_sub(created)),
        })
    }
}

/// [`Error::WrongType`] or [`Error::NotStuck`] unless `record` is a stuck `saga_type`.
pub(crate) fn check_stuck(record: &SagaRecord, saga_type: &str) -> Result<()> {
    if record.saga_type != saga_type {
        return Err(Error::WrongType {
            id: record.id.clone(),
            expected: saga_type.to_owned(),
            found: record.saga_type.clone(),
        });
    }
    if record.state != SagaState::Stuck {
        return Err(Error::NotStuck {
            id: record.id.clone(),
            state: record.state,
        });
    }
    Ok(())
}
