//! The orchestrator: runs sagas step by step through the log, compensates in reverse,
//! retries, recovers abandoned sagas and resumes stuck ones.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::definition::Saga;
use crate::error::{Error, Result};
use crate::metrics::{Counters, LocalMetrics, Metrics, bump};
use crate::observe::Meters;
use crate::plan::Position;
use crate::run::Run;
use crate::store::{Claimant, NewSaga, SagaRecord, SagaState, SagaStore, StoredEvent};
use sd_core::{Clock, SystemClock};

/// How a saga ended (for this call).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SagaOutcome<D> {
    /// Every step succeeded; the data as the last step left it.
    Completed(D),
    /// A step before the pivot failed and the completed steps were compensated, in
    /// reverse order.
    Compensated {
        /// Which step failed and why.
        reason: String,
    },
    /// A compensation or a retriable step ran out of retries; nobody drives the saga
    /// until an operator calls [`Orchestrator::resume`].
    Stuck {
        /// What failed.
        reason: String,
    },
}

impl<D> SagaOutcome<D> {
    /// The saga state this outcome leaves.
    pub fn state(&self) -> SagaState {
        match self {
            SagaOutcome::Completed(_) => SagaState::Completed,
            SagaOutcome::Compensated { .. } => SagaState::Compensated,
            SagaOutcome::Stuck { .. } => SagaState::Stuck,
        }
    }
}

/// What one [`Orchestrator::recover`] call did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Recovery {
    /// Sagas claimed from owners whose lease had expired.
    pub claimed: usize,
    /// Of those, driven to Completed.
    pub completed: usize,
    /// Driven to Compensated.
    pub compensated: usize,
    /// Left Stuck.
    pub stuck: usize,
    /// Sagas whose run stopped on an error (log down, fenced again, or started under
    /// another definition version: [`Error::DefinitionVersion`]); they are retried by a
    /// later `recover` (here, or on an orchestrator of their version) once this
    /// orchestrator's lease on them expires.
    pub errors: Vec<(String, Error)>,
}

/// Builds an [`Orchestrator`].
#[derive(Debug)]
pub struct OrchestratorBuilder<D, S> {
    saga: Saga<D>,
    store: S,
    owner: Option<String>,
    lease_ttl: Duration,
    recover_batch: usize,
    recover_concurrency: usize,
    clock: Arc<dyn Clock>,
}

impl<D, S> OrchestratorBuilder<D, S>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: SagaStore,
{
    /// This orchestrator's name in the log's `owner` column (default
    /// `orchestrator-{pid}-{random}`); 1 to 200 bytes, unique per running orchestrator.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// How long a claim on a saga lasts without a write or a heartbeat (default 30 s;
    /// at least 10 ms). While a step runs the lease is renewed every third of it; when
    /// the orchestrator dies, `recover` on another one claims its sagas after this long.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How many sagas `recover` claims per round trip (default 100).
    pub fn recover_batch(mut self, n: usize) -> Self {
        self.recover_batch = n;
        self
    }

    /// How many recovered sagas run at once (default 16).
    pub fn recover_concurrency(mut self, n: usize) -> Self {
        self.recover_concurrency = n;
        self
    }

    /// The clock deadlines are set and checked by (default [`SystemClock`], wall time).
    /// Orchestrators sharing a log should share a clock: a deadline is stored as a time
    /// on it.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The orchestrator, or [`Error::InvalidConfig`] naming the field out of range.
    pub fn build(self) -> Result<Orchestrator<D, S>> {
        let owner = self.owner.unwrap_or_else(|| {
            format!(
                "orchestrator-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            )
        });
        if owner.is_empty() || owner.len() > 200 {
            return Err(Error::config("owner", "must be 1 to 200 bytes"));
        }
        if self.lease_ttl < Duration::from_millis(10) {
            return Err(Error::config(
                "lease_ttl",
                format!("{:?} is below the 10 ms minimum", self.lease_ttl),
            ));
        }
        if self.recover_batch == 0 {
            return Err(Error::config("recover_batch", "must be at least 1"));
        }
        if self.recover_concurrency == 0 {
            return Err(Error::config("recover_concurrency", "must be at least 1"));
        }
        Ok(Orchestrator {
            inner: Arc::new(Inner {
                meters: Meters::new(&self.saga),
                saga: self.saga,
                store: self.store,
                owner,
                lease_ttl: self.lease_ttl,
                recover_batch: self.recover_batch,
                recover_concurrency: self.recover_concurrency,
                clock: self.clock,
                counters: Counters::default(),
            }),
        })
    }
}

pub(crate) struct Inner<D, S> {
    pub(crate) saga: Saga<D>,
    pub(crate) store: S,
    owner: String,
    pub(crate) lease_ttl: Duration,
    recover_batch: usize,
    recover_concurrency: usize,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) counters: Counters,
    pub(crate) meters: Meters,
}

impl<D, S> Inner<D, S> {
    /// This orchestrator as the claimant of expired and stuck sagas of its type.
    fn claimant(&self) -> Claimant<'_> {
        Claimant {
            saga_type: &self.saga.name,
            owner: &self.owner,
            lease_ttl: self.lease_ttl,
        }
    }
}

/// Runs sagas of one definition through a [`SagaStore`]; cheap to clone, `Send + Sync`.
///
/// See the [crate docs](crate) for the guarantees.
pub struct Orchestrator<D, S> {
    pub(crate) inner: Arc<Inner<D, S>>,
}

impl<D, S> Clone for Orchestrator<D, S> {
    fn clone(&self) -> Self {
        Orchestrator {
            inner: self.inner.clone(),
        }
    }
}

impl<D, S: fmt::Debug> fmt::Debug for Orchestrator<D, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Orchestrator")
            .field("saga", &self.inner.saga)
            .field("store", &self.inner.store)
            .field("owner", &self.inner.owner)
            .field("lease_ttl", &self.inner.lease_ttl)
            .finish_non_exhaustive()
    }
}

fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 200 {
        return Err(Error::InvalidId {
            reason: "it must be 1 to 200 bytes",
        });
    }
    if id.chars().any(char::is_control) {
        return Err(Error::InvalidId {
            reason: "it contains control characters",
        });
    }
    Ok(())
}

impl<D, S> Orchestrator<D, S>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: SagaStore,
{
    /// A builder for an orchestrator of `saga` on `store`.
    pub fn builder(saga: Saga<D>, store: S) -> OrchestratorBuilder<D, S> {
        OrchestratorBuilder {
            saga,
            store,
            owner: None,
            lease_ttl: Duration::from_secs(30),
            recover_batch: 100,
            recover_concurrency: 16,
            clock: Arc::new(SystemClock),
        }
    }

    /// The saga definition.
    pub fn saga(&self) -> &Saga<D> {
        &self.inner.saga
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// This orchestrator's owner name.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Starts saga `id` with `data` and drives it to its end: Completed, Compensated or
    /// Stuck. The instance and the intent of the first step are written before the first
    /// step runs.
    ///
    /// An `Err` means the log failed or another orchestrator took the saga over; the saga
    /// is then left as the log last recorded it, and [`recover`](Self::recover) (here or
    /// elsewhere) continues it once the lease expires. Dropping the returned future has
    /// the same effect.
    pub async fn run(&self, id: impl Into<String>, data: D) -> Result<SagaOutcome<D>> {
        self.start(id.into(), data, self.inner.saga.deadline).await
    }

    /// [`run`](Self::run) with a deadline of its own for this saga, `within` from now on
    /// the orchestrator's clock (instead of the definition's
    /// [`deadline`](crate::SagaBuilder::deadline)). Past it, no new forward step starts
    /// and the saga compensates; once the pivot succeeded it only goes forward. The
    /// deadline is stored with the saga, so a recovering orchestrator honours it.
    pub async fn run_within(
        &self,
        id: impl Into<String>,
        data: D,
        within: Duration,
    ) -> Result<SagaOutcome<D>> {
        self.start(id.into(), data, Some(within)).await
    }

    async fn start(&self, id: String, data: D, within: Option<Duration>) -> Result<SagaOutcome<D>> {
        check_id(&id)?;
        let json = serde_json::to_string(&data)?;
        let inner = &self.inner;
        let pos = Position::start();
        let progress = pos.progress.to_json();
        let deadline = within.map(|d| inner.clock.now() + d);
        let lease = inner
            .store
            .create(&NewSaga {
                id: &id,
                saga_type: &inner.saga.name,
                data: &json,
                owner: &inner.owner,
                lease_ttl: inner.lease_ttl,
                progress: &progress,
                deadline,
                definition_version: inner.saga.version,
            })
            .await?;
        bump(&inner.counters.started);
        let run = Run {
            id: id.into(),
            pos,
            data,
            lease,
            reason: None,
            cancel_reason: None,
            cancel_requested: false,
            deadline,
            intent_written: true,
        };
        self.drive(run).await
    }

    /// Asks saga `id` to stop: the request (with `reason`) is written to the log, and
    /// the saga's owner (this orchestrator or another, or whoever recovers it) starts no
    /// new forward step after it: steps running are awaited, then every completed step
    /// is compensated. A saga past its pivot only goes forward, so there it changes
    /// nothing; a finished or stuck saga is left as it is. Returns the saga as the log
    /// then holds it ([`SagaRecord::cancel_reason`] is set when the request was taken).
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<SagaRecord> {
        let inner = &self.inner;
        let record = inner
            .store
            .load(id)
            .await?
            .ok_or_else(|| Error::NotFound { id: id.to_owned() })?;
        if record.saga_type != *inner.saga.name {
            return Err(Error::WrongType {
                id: id.to_owned(),
                expected: inner.saga.name.to_string(),
                found: record.saga_type,
            });
        }
        inner.store.cancel(id, reason).await
    }

    /// Claims every live saga of this type whose owner's lease expired (a crashed or
    /// partitioned orchestrator) and drives each to its end, forward or compensating from
    /// the step the log recorded. The step that was in flight runs again with the same
    /// idempotency key. Call it at start-up and then periodically.
    pub async fn recover(&self) -> Result<Recovery> {
        let inner = &self.inner;
        let mut report = Recovery::default();
        let mut seen = HashSet::new();
        loop {
            let batch = inner
                .store
                .claim_expired(&inner.claimant(), inner.recover_batch)
                .await?;
            if batch.is_empty() {
                break;
            }
            // A saga claimed twice in one call failed fast and its lease already ran out:
            // finish this round and leave it to the next call.
            let repeated = batch.iter().any(|r| !seen.insert(r.id.clone()));
            report.claimed += batch.len();
            let results: Vec<_> = futures::stream::iter(batch)
                .map(|record| async move {
                    bump(&inner.counters.recovered);
                    let id = record.id.clone();
                    (id, self.drive_record(record).await)
                })
                .buffer_unordered(inner.recover_concurrency)
                .collect()
                .await;
            for (id, result) in results {
                match result {
                    Ok(SagaOutcome::Completed(_)) => report.completed += 1,
                    Ok(SagaOutcome::Compensated { .. }) => report.compensated += 1,
                    Ok(SagaOutcome::Stuck { .. }) => report.stuck += 1,
                    Err(e) => report.errors.push((id, e)),
                }
            }
            if repeated {
                break;
            }
        }
        Ok(report)
    }

    /// Resumes the stuck saga `id` after an operator fixed the cause: the failed
    /// compensation (or retriable step) is tried again under a fresh retry budget, and the
    /// saga is driven to its end.
    pub async fn resume(&self, id: &str) -> Result<SagaOutcome<D>> {
        let inner = &self.inner;
        // A saga of another definition version is refused before it is claimed.
        if let Some(record) = inner.store.load(id).await? {
            let (found, saga) = (record.definition_version, &inner.saga);
            if found != saga.version && !saga.migrations.contains_key(&found) {
                return Err(Error::DefinitionVersion {
                    id: record.id,
                    found,
                    expected: saga.version,
                    step: record.step,
                });
            }
        }
        let record = inner.store.claim_stuck(&inner.claimant(), id).await?;
        bump(&inner.counters.resumed);
        self.drive_record(record).await
    }

    /// The saga `id` as the log holds it.
    pub async fn get(&self, id: &str) -> Result<Option<SagaRecord>> {
        self.inner.store.load(id).await
    }

    /// The saga's step events, oldest first.
    pub async fn events(&self, id: &str) -> Result<Vec<StoredEvent>> {
        self.inner.store.events(id).await
    }

    /// This orchestrator's counters, without asking the log.
    pub fn local_metrics(&self) -> LocalMetrics {
        self.inner.counters.snapshot()
    }

    /// Sagas of this type by state and the oldest unfinished one's age (one query to the
    /// log), with this orchestrator's counters.
    pub async fn metrics(&self) -> Result<Metrics> {
        let stats = self.inner.store.stats(&self.inner.saga.name).await?;
        Ok(Metrics {
            by_state: stats.by_state,
            oldest_unfinished_age: stats.oldest_unfinished_age,
            local: self.local_metrics(),
        })
    }

    async fn drive_record(&self, record: SagaRecord) -> Result<SagaOutcome<D>> {
        let saga = &self.inner.saga;
        let (id, found, step) = (record.id.clone(), record.definition_version, record.step);
        let refused = || Error::DefinitionVersion {
            id: id.clone(),
            found,
            expected: saga.version,
            step,
        };
        let run = Run::of_record(record, |pos| {
            if found == saga.version {
                return Ok(());
            }
            let map = saga.migrations.get(&found).ok_or_else(refused)?;
            migrate(pos, map.as_ref()).ok_or_else(refused)
        })?;
        self.drive(run).await
    }
}

/// `pos` with every step index mapped by `map`, or `None` when one has no place.
fn migrate(pos: &mut Position, map: &dyn Fn(usize) -> Option<usize>) -> Option<()> {
    let set = |s: &BTreeSet<usize>| s.iter().map(|i| map(*i)).collect::<Option<BTreeSet<_>>>();
    let p = &mut pos.progress;
    pos.step = map(pos.step)?;
    p.started = set(&p.started)?;
    p.done = set(&p.done)?;
    p.failed = set(&p.failed)?;
    p.doubt = set(&p.doubt)?;
    p.undone = set(&p.undone)?;
    if let Some(undo) = &p.undo {
        p.undo = Some(set(undo)?);
    }
    Some(())
}
