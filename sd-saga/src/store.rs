//! The durable log behind the orchestrator: the [`SagaStore`] contract and its records.

use std::fmt;
use std::time::Duration;

use crate::definition::Direction;
use crate::error::{Error, Result};

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum SagaState {
    /// Going forward; `step` is the step running or next.
    Running,
    /// Undoing; `step` is the step being compensated, counting down to 0.
    Compensating,
    /// Every step succeeded. Final.
    Completed,
    /// A step before the pivot failed and every completed step was compensated. Final.
    Compensated,
    /// A compensation, or a retriable step after the pivot, still failed when its retry
    /// policy ran out (or failed with a non-retryable error). Nobody drives it; the reason
    /// is stored; an operator fixes the cause and calls
    /// [`Orchestrator::resume`](crate::Orchestrator::resume).
    Stuck,
}

impl SagaState {
    /// Every state, in declaration order.
    pub const ALL: [SagaState; 5] = [
        SagaState::Running,
        SagaState::Compensating,
        SagaState::Completed,
        SagaState::Compensated,
        SagaState::Stuck,
    ];

    /// The state's name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Completed => "completed",
            SagaState::Compensated => "compensated",
            SagaState::Stuck => "stuck",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(text: &str) -> Result<Self> {
        SagaState::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| Error::corrupt(format!("unknown saga state `{text}`")))
    }

    /// Completed or Compensated.
    pub fn is_final(self) -> bool {
        matches!(self, SagaState::Completed | SagaState::Compensated)
    }

    /// Running or Compensating: an owner drives it.
    pub fn is_live(self) -> bool {
        matches!(self, SagaState::Running | SagaState::Compensating)
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One saga instance as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRecord {
    /// The saga id.
    pub id: String,
    /// The saga definition's name.
    pub saga_type: String,
    /// Where it is.
    pub state: SagaState,
    /// The step running (forward) or being compensated; for a parallel group, its first
    /// step (the branches' progress is in [`progress`](Self::progress)).
    pub step: u32,
    /// True when it was compensating (what a stuck saga resumes).
    pub compensating: bool,
    /// The saga data, as JSON.
    pub data: String,
    /// Bumped by every write: the optimistic-concurrency check.
    pub version: u64,
    /// The orchestrator holding the lease, if live.
    pub owner: Option<String>,
    /// Bumped by every claim: the fencing epoch.
    pub epoch: u64,
    /// Why it compensated or is stuck.
    pub reason: Option<String>,
    /// The current stage's progress (its parallel branches), as JSON; `None` in a row
    /// written before the log kept it.
    pub progress: Option<String>,
    /// Why a cancel was requested, once one was ([`SagaStore::cancel`]).
    pub cancel_reason: Option<String>,
    /// The deadline, on the starting orchestrator's [`Clock`](crate::Clock).
    pub deadline: Option<Duration>,
    /// The version of the definition the saga was started under (1 for rows written
    /// before versions were stored).
    pub definition_version: u32,
}

impl SagaRecord {
    /// The lease this record carries, for the owner that just claimed it.
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id.clone(),
            owner: self.owner.clone().unwrap_or_default(),
            epoch: self.epoch,
            version: self.version,
            cancel_requested: self.cancel_reason.is_some(),
        }
    }
}

/// What an owner holds: a write succeeds only while the saga still has this epoch and
/// version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The saga id.
    pub id: String,
    /// The owner.
    pub owner: String,
    /// The fencing epoch of the owner's claim.
    pub epoch: u64,
    /// The version of the owner's last write.
    pub version: u64,
    /// A cancel had been requested when the write (or claim) that returned this lease
    /// happened. Ignored in a lease passed to the store.
    pub cancel_requested: bool,
}

impl Lease {
    /// The refusal of a write with this lease.
    pub fn fenced(&self) -> Error {
        Error::Fenced {
            id: self.id.clone(),
            epoch: self.epoch,
        }
    }
}

/// What a log event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// An attempt is about to run (written before the participant is called).
    Intent,
    /// The attempt succeeded.
    Done,
    /// The attempt failed.
    Failed,
    /// An operator resumed the stuck saga.
    Resumed,
    /// A requested cancel took effect: no new forward step starts; the saga compensates.
    Cancelled,
    /// The saga's deadline passed: no new forward step starts; the saga compensates.
    DeadlinePassed,
}

impl EventKind {
    /// The kind's name in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Intent => "intent",
            EventKind::Done => "done",
            EventKind::Failed => "failed",
            EventKind::Resumed => "resumed",
            EventKind::Cancelled => "cancelled",
            EventKind::DeadlinePassed => "deadline",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(text: &str) -> Result<Self> {
        [
            EventKind::Intent,
            EventKind::Done,
            EventKind::Failed,
            EventKind::Resumed,
            EventKind::Cancelled,
            EventKind::DeadlinePassed,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
        .ok_or_else(|| Error::corrupt(format!("unknown event kind `{text}`")))
    }
}

/// One entry of a saga's step log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The step index.
    pub step: u32,
    /// Forward or compensate.
    pub direction: Direction,
    /// What happened.
    pub kind: EventKind,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The failure, for [`EventKind::Failed`].
    pub error: Option<String>,
}

/// An event as stored: with the saga version it was written at and its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The saga version written with it (events are ordered by it).
    pub version: u64,
    /// The writer's epoch.
    pub epoch: u64,
    /// The event.
    pub event: Event,
}

/// A new saga: the instance and the intent of its first step, written together.
#[derive(Debug, Clone)]
pub struct NewSaga<'a> {
    /// The saga id.
    pub id: &'a str,
    /// The saga definition's name.
    pub saga_type: &'a str,
    /// The initial data, as JSON.
    pub data: &'a str,
    /// The orchestrator that will drive it.
    pub owner: &'a str,
    /// The lease's length.
    pub lease_ttl: Duration,
    /// The first stage's progress, as JSON.
    pub progress: &'a str,
    /// The deadline, on the orchestrator's clock.
    pub deadline: Option<Duration>,
    /// The definition's version.
    pub definition_version: u32,
}

/// Who claims sagas: an orchestrator's saga type, its name as the new owner, and the
/// length of the lease it takes.
#[derive(Debug, Clone, Copy)]
pub struct Claimant<'a> {
    /// The saga definition's name; only sagas of this type are claimed.
    pub saga_type: &'a str,
    /// The orchestrator that will drive the claimed sagas.
    pub owner: &'a str,
    /// The lease's length.
    pub lease_ttl: Duration,
}

/// One state change and the event that explains it, written atomically.
#[derive(Debug, Clone)]
pub struct Write<'a> {
    /// The new state. In a final or stuck state the lease is released.
    pub state: SagaState,
    /// The new step.
    pub step: u32,
    /// The compensating flag.
    pub compensating: bool,
    /// New data as JSON, or `None` to keep it.
    pub data: Option<&'a str>,
    /// The new reason (replaces the old one).
    pub reason: Option<&'a str>,
    /// The current stage's progress, as JSON (replaces the old one).
    pub progress: &'a str,
    /// The definition version the saga now runs under (changes only by a migration).
    pub definition_version: u32,
    /// The event to append.
    pub event: Event,
    /// The lease is renewed for this long (while live).
    pub lease_ttl: Duration,
}

/// Sagas of one type per state, and the age of the oldest unfinished one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Count per state (absent states are zero).
    pub by_state: Vec<(SagaState, u64)>,
    /// The age of the oldest saga that is running, compensating or stuck.
    pub oldest_unfinished_age: Option<Duration>,
}

/// The durable log: saga instances (state, step, data, version) and their step events.
///
/// # Contract
///
/// - [`create`](Self::create) inserts the instance (state `running`, step 0, version 1,
///   epoch 1, leased to `owner`, with the given progress, deadline and definition
///   version) and the intent event of step 0, atomically; an existing id is
///   [`Error::AlreadyExists`].
/// - [`write`](Self::write) applies the change (state, step, flag, data, reason, progress,
///   definition version) and appends the event atomically, only if
///   the saga's version and epoch equal the lease's, then returns the lease with the new
///   version (and whether a cancel was requested); otherwise [`Error::Fenced`] (or
///   [`Error::NotFound`]) and nothing changes.
///   Live states renew the lease; final and stuck states release it.
/// - [`renew`](Self::renew) extends the lease if the epoch and owner still match, without
///   changing the version.
/// - [`claim_expired`](Self::claim_expired) takes over live sagas of a type whose lease
///   has expired: owner set, epoch and version bumped, lease renewed. Two callers never
///   claim the same saga.
/// - [`claim_stuck`](Self::claim_stuck) makes a stuck saga live again (running or
///   compensating, as the flag says), with a new owner and epoch, and appends a
///   [`EventKind::Resumed`] event.
/// - [`cancel`](Self::cancel) records a cancel request on a live saga (the first reason
///   stays), without changing its version or epoch, so the owner is not fenced: it sees
///   the request in the lease of its next write.
///
/// Lease times are the store's clock: the memory store's [`Clock`](crate::Clock), PostgreSQL's
/// `clock_timestamp()`.
pub trait SagaStore: Send + Sync + 'static {
    /// Creates a saga; see the contract.
    fn create(&self, saga: &NewSaga<'_>) -> impl Future<Output = Result<Lease>> + Send;

    /// Writes a change and its event if `lease` still holds; see the contract.
    fn write(&self, lease: &Lease, write: &Write<'_>)
    -> impl Future<Output = Result<Lease>> + Send;

    /// Extends a live lease.
    fn renew(&self, lease: &Lease, ttl: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Claims up to `limit` live sagas of the claimant's type whose lease expired.
    fn claim_expired(
        &self,
        by: &Claimant<'_>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SagaRecord>>> + Send;

    /// Claims the stuck saga `id` of the claimant's type for the claimant.
    fn claim_stuck(
        &self,
        by: &Claimant<'_>,
        id: &str,
    ) -> impl Future<Output = Result<SagaRecord>> + Send;

    /// Records a cancel request for the live saga `id` (see the contract) and returns
    /// the saga as it then is; a saga that is not live is returned unchanged.
    fn cancel(&self, id: &str, reason: &str) -> impl Future<Output = Result<SagaRecord>> + Send;

    /// The saga `id`, if any.
    fn load(&self, id: &str) -> impl Future<Output = Result<Option<SagaRecord>>> + Send;

    /// The saga's events, oldest first.
    fn events(&self, id: &str) -> impl Future<Output = Result<Vec<StoredEvent>>> + Send;

    /// Counts per state and the oldest unfinished saga of `saga_type`.
    fn stats(&self, saga_type: &str) -> impl Future<Output = Result<StoreStats>> + Send;
}
