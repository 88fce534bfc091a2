//! The orchestrator: runs sagas step by step through the log, compensates in reverse,
//! retries, recovers abandoned sagas and resumes stuck ones.

use std::collections::HashSet;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::definition::{BoxFuture, Direction, Saga, StepContext, StepDef, StepError, StepKind};
use crate::error::{Error, Result};
use crate::metrics::{Counters, LocalMetrics, Metrics, bump};
use crate::store::{
    Claimant, Event, EventKind, Lease, NewSaga, SagaRecord, SagaState, SagaStore, StoredEvent,
    Write,
};
use sd_core::RetryPolicy;

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
    /// Sagas whose run stopped on an error (log down, fenced again); they are retried by
    /// a later `recover` once this orchestrator's lease on them expires.
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
                saga: self.saga,
                store: self.store,
                owner,
                lease_ttl: self.lease_ttl,
                recover_batch: self.recover_batch,
                recover_concurrency: self.recover_concurrency,
                counters: Counters::default(),
            }),
        })
    }
}

struct Inner<D, S> {
    saga: Saga<D>,
    store: S,
    owner: String,
    lease_ttl: Duration,
    recover_batch: usize,
    recover_concurrency: usize,
    counters: Counters,
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
    inner: Arc<Inner<D, S>>,
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

/// One saga being driven by this orchestrator.
struct Run<D> {
    id: Arc<str>,
    state: SagaState,
    step: usize,
    data: D,
    lease: Lease,
    reason: Option<String>,
    /// The intent of the next attempt is already in the log (written by `create`).
    intent_written: bool,
}

/// Where the orchestrator goes after one step.
enum Next<D> {
    Continue,
    Done(SagaOutcome<D>),
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

/// A write that keeps the saga where it is and appends `event`.
fn same_state<D>(run: &Run<D>, event: Event, lease_ttl: Duration) -> Write<'_> {
    Write {
        state: run.state,
        step: step_u32(run.step),
        compensating: run.state == SagaState::Compensating,
        data: None,
        reason: run.reason.as_deref(),
        event,
        lease_ttl,
    }
}

/// Makes the events of one attempt: `attempt` of `step` in `direction`, of any kind.
fn event_of(
    step: usize,
    direction: Direction,
    attempt: u32,
) -> impl Fn(EventKind, Option<String>) -> Event {
    let step = step_u32(step);
    move |kind, error| Event {
        step,
        direction,
        kind,
        attempt,
        error,
    }
}

fn step_u32(step: usize) -> u32 {
    u32::try_from(step).unwrap_or(u32::MAX)
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
        let id: String = id.into();
        check_id(&id)?;
        let json = serde_json::to_string(&data)?;
        let inner = &self.inner;
        let lease = inner
            .store
            .create(&NewSaga {
                id: &id,
                saga_type: &inner.saga.name,
                data: &json,
                owner: &inner.owner,
                lease_ttl: inner.lease_ttl,
            })
            .await?;
        bump(&inner.counters.started);
        let run = Run {
            id: id.into(),
            state: SagaState::Running,
            step: 0,
            data,
            lease,
            reason: None,
            intent_written: true,
        };
        self.drive(run).await
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
        let data: D = serde_json::from_str(&record.data)?;
        let lease = record.lease();
        let run = Run {
            id: record.id.into(),
            state: record.state,
            step: usize::try_from(record.step).unwrap_or(usize::MAX),
            data,
            lease,
            reason: record.reason,
            intent_written: false,
        };
        self.drive(run).await
    }

    async fn drive(&self, mut run: Run<D>) -> Result<SagaOutcome<D>> {
        let steps = self.inner.saga.steps.clone();
        loop {
            let def = steps.get(run.step).ok_or_else(|| {
                Error::corrupt(format!(
                    "saga `{}` is at step {} of a {}-step definition",
                    run.id,
                    run.step,
                    steps.len()
                ))
            })?;
            let next = match run.state {
                SagaState::Running => self.forward(&mut run, def, steps.len()).await,
                SagaState::Compensating => self.compensate(&mut run, def).await,
                other => Err(Error::corrupt(format!(
                    "saga `{}` is {other}, which nobody drives",
                    run.id
                ))),
            };
            match next {
                Ok(Next::Continue) => {}
                Ok(Next::Done(outcome)) => {
                    let c = &self.inner.counters;
                    bump(match outcome.state() {
                        SagaState::Completed => &c.completed,
                        SagaState::Compensated => &c.compensated,
                        _ => &c.stuck,
                    });
                    return Ok(outcome);
                }
                Err(e) => {
                    if matches!(e, Error::Fenced { .. }) {
                        bump(&self.inner.counters.fenced);
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn forward(&self, run: &mut Run<D>, def: &StepDef<D>, len: usize) -> Result<Next<D>> {
        let action = def.action.clone();
        let data = run.data.clone();
        let (attempt, result) = self
            .attempts(run, def, Direction::Forward, def.retry, move |ctx| {
                action(ctx, data.clone())
            })
            .await?;
        let event = event_of(run.step, Direction::Forward, attempt);
        match result {
            Ok(data) => {
                let json = serde_json::to_string(&data)?;
                let next = run.step + 1;
                let done = next == len;
                let write = Write {
                    state: if done {
                        SagaState::Completed
                    } else {
                        SagaState::Running
                    },
                    step: step_u32(next),
                    compensating: false,
                    data: Some(&json),
                    reason: None,
                    event: event(EventKind::Done, None),
                    lease_ttl: self.inner.lease_ttl,
                };
                run.lease = self.inner.store.write(&run.lease, &write).await?;
                run.data = data;
                run.step = next;
                if done {
                    return Ok(Next::Done(SagaOutcome::Completed(run.data.clone())));
                }
                Ok(Next::Continue)
            }
            Err(error) => {
                let reason = format!("step `{}` failed: {error}", def.name);
                let failed = event(EventKind::Failed, Some(error.message().to_owned()));
                if def.kind == StepKind::Retriable {
                    self.finish(run, SagaState::Stuck, false, &reason, failed)
                        .await?;
                    return Ok(Next::Done(SagaOutcome::Stuck { reason }));
                }
                // A timed-out attempt may still land: undo it too when it can be undone.
                let undo_self = error.is_timeout() && def.compensation.is_some();
                let first = if undo_self {
                    Some(run.step)
                } else {
                    run.step.checked_sub(1)
                };
                match first {
                    None => {
                        self.finish(run, SagaState::Compensated, true, &reason, failed)
                            .await?;
                        Ok(Next::Done(SagaOutcome::Compensated { reason }))
                    }
                    Some(first) => {
                        self.move_to(run, SagaState::Compensating, first, true, &reason, failed)
                            .await?;
                        run.reason = Some(reason);
                        Ok(Next::Continue)
                    }
                }
            }
        }
    }

    async fn compensate(&self, run: &mut Run<D>, def: &StepDef<D>) -> Result<Next<D>> {
        let (attempt, result) = match def.compensation.clone() {
            Some(compensation) => {
                let data = run.data.clone();
                self.attempts(
                    run,
                    def,
                    Direction::Compensate,
                    def.compensation_retry,
                    move |ctx| compensation(ctx, data.clone()),
                )
                .await?
            }
            // Only compensatable steps are compensated; nothing to undo otherwise.
            None => (0, Ok(())),
        };
        let event = event_of(run.step, Direction::Compensate, attempt);
        let reason = run.reason.clone().unwrap_or_default();
        match result {
            Ok(()) => {
                if def.compensation.is_some() {
                    bump(&self.inner.counters.compensations_run);
                }
                let done = event(EventKind::Done, None);
                if run.step == 0 {
                    self.finish(run, SagaState::Compensated, true, &reason, done)
                        .await?;
                    return Ok(Next::Done(SagaOutcome::Compensated { reason }));
                }
                let previous = run.step - 1;
                self.move_to(run, SagaState::Compensating, previous, true, &reason, done)
                    .await?;
                Ok(Next::Continue)
            }
            Err(error) => {
                let stuck = format!(
                    "compensation of step `{}` failed: {error} (after: {reason})",
                    def.name
                );
                let failed = event(EventKind::Failed, Some(error.message().to_owned()));
                self.finish(run, SagaState::Stuck, true, &stuck, failed)
                    .await?;
                Ok(Next::Done(SagaOutcome::Stuck { reason: stuck }))
            }
        }
    }

    /// Writes a final or stuck state, which releases the lease.
    async fn finish(
        &self,
        run: &mut Run<D>,
        state: SagaState,
        compensating: bool,
        reason: &str,
        event: Event,
    ) -> Result<()> {
        let step = run.step;
        self.move_to(run, state, step, compensating, reason, event)
            .await
    }

    /// Writes `state` at `step` with `reason` and `event` (data unchanged), then moves
    /// `run` there.
    async fn move_to(
        &self,
        run: &mut Run<D>,
        state: SagaState,
        step: usize,
        compensating: bool,
        reason: &str,
        event: Event,
    ) -> Result<()> {
        let write = Write {
            state,
            step: step_u32(step),
            compensating,
            data: None,
            reason: Some(reason),
            event,
            lease_ttl: self.inner.lease_ttl,
        };
        run.lease = self.inner.store.write(&run.lease, &write).await?;
        run.state = state;
        run.step = step;
        Ok(())
    }

    /// Runs attempts of one call under `policy`: an intent before each (unless `create`
    /// wrote the first), a failed event after each failure that is retried. Returns the
    /// last attempt's number and result; the caller records the outcome.
    async fn attempts<T>(
        &self,
        run: &mut Run<D>,
        def: &StepDef<D>,
        direction: Direction,
        policy: RetryPolicy,
        call: impl Fn(StepContext) -> BoxFuture<Result<T, StepError>>,
    ) -> Result<(u32, Result<T, StepError>)> {
        let inner = &self.inner;
        let mut attempt = 1;
        loop {
            let event = event_of(run.step, direction, attempt);
            if run.intent_written {
                run.intent_written = false;
            } else {
                let intent = same_state(run, event(EventKind::Intent, None), inner.lease_ttl);
                let lease = inner.store.write(&run.lease, &intent).await?;
                run.lease = lease;
            }
            let ctx = StepContext {
                saga_id: run.id.clone(),
                step: run.step,
                step_name: def.name.clone(),
                direction,
                attempt,
            };
            let started = Instant::now();
            let result = self.call(&run.lease, def.timeout, call(ctx)).await?;
            inner.counters.observe(started.elapsed());
            bump(&inner.counters.attempts);
            let error = match result {
                Ok(value) => return Ok((attempt, Ok(value))),
                Err(error) => error,
            };
            bump(&inner.counters.failed_attempts);
            if !error.is_retryable() || !policy.allows_retry_after(attempt) {
                return Ok((attempt, Err(error)));
            }
            tracing::debug!(saga = %run.id, step = %def.name, %direction, attempt, %error, "saga step attempt failed; retrying");
            let error_text = Some(error.message().to_owned());
            let failed = same_state(run, event(EventKind::Failed, error_text), inner.lease_ttl);
            let lease = inner.store.write(&run.lease, &failed).await?;
            run.lease = lease;
            tokio::time::sleep(policy.random_delay(attempt)).await;
            attempt += 1;
        }
    }

    /// One attempt under its timeout, renewing the lease every third of its length while
    /// it runs. A panic in the step is a retryable failure; a lost lease stops the attempt.
    async fn call<T>(
        &self,
        lease: &Lease,
        timeout: Duration,
        step: BoxFuture<Result<T, StepError>>,
    ) -> Result<Result<T, StepError>> {
        let inner = &self.inner;
        let attempt = tokio::time::timeout(timeout, AssertUnwindSafe(step).catch_unwind());
        tokio::pin!(attempt);
        let period = inner.lease_ttl / 3;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                done = &mut attempt => {
                    return Ok(match done {
                        Ok(Ok(result)) => result,
                        Ok(Err(_panic)) => Err(StepError::retryable("the step panicked")),
                        Err(_elapsed) => Err(StepError::timed_out(timeout)),
                    });
                }
                _ = heartbeat.tick() => match inner.store.renew(lease, inner.lease_ttl).await {
                    Ok(()) => {}
                    Err(e @ (Error::Fenced { .. } | Error::NotFound { .. })) => return Err(e),
                    Err(e) => tracing::warn!(saga = %lease.id, error = %e, "saga lease renewal failed; the step keeps running"),
                },
            }
        }
    }
}
