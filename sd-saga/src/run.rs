//! Executing a saga: [`plan`](crate::plan) says what to run, this module runs it (the
//! branches of a stage concurrently), and writes each outcome with the position the
//! plan computes. Writes of one saga go through one mutex, so concurrent branches keep
//! the log's version sequence.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::definition::{BoxFuture, Direction, StepContext, StepDef, StepError};
use crate::error::{Error, Result};
use crate::metrics::bump;
use crate::observe::{Call, operation_of};
use crate::orchestrator::{Orchestrator, SagaOutcome};
use crate::plan::{self, Plan, Position, Progress, Stop};
use crate::store::{Event, EventKind, Lease, SagaRecord, SagaState, SagaStore, Write};

/// One saga being driven by this orchestrator: what its log row says, and its data.
pub(crate) struct Run<D> {
    pub(crate) id: Arc<str>,
    pub(crate) pos: Position,
    pub(crate) data: D,
    pub(crate) lease: Lease,
    pub(crate) reason: Option<String>,
    /// Why a cancel was requested, once known.
    pub(crate) cancel_reason: Option<String>,
    /// A write's lease said a cancel was requested (its reason not read yet).
    pub(crate) cancel_requested: bool,
    pub(crate) deadline: Option<Duration>,
    /// The intent of step 0's first attempt is already in the log (written by `create`).
    pub(crate) intent_written: bool,
}

impl<D: DeserializeOwned> Run<D> {
    /// The run of a claimed record, its position mapped to this definition by `migrate`.
    pub(crate) fn of_record(
        record: SagaRecord,
        migrate: impl Fn(&mut Position) -> Result<()>,
    ) -> Result<Self> {
        let data: D = serde_json::from_str(&record.data)?;
        let progress = Progress::parse(record.progress.as_deref())
            .map_err(|e| Error::corrupt(format!("saga `{}`: {e}", record.id)))?;
        let mut pos = Position {
            state: record.state,
            step: usize::try_from(record.step).unwrap_or(usize::MAX),
            compensating: record.compensating,
            progress,
        };
        migrate(&mut pos)?;
        Ok(Run {
            lease: record.lease(),
            id: record.id.into(),
            pos,
            data,
            reason: record.reason,
            cancel_requested: record.cancel_reason.is_some(),
            cancel_reason: record.cancel_reason,
            deadline: record.deadline,
            intent_written: false,
        })
    }
}

fn step_u32(step: usize) -> u32 {
    u32::try_from(step).unwrap_or(u32::MAX)
}

fn event(step: usize, direction: Direction, kind: EventKind, attempt: u32) -> Event {
    Event {
        step: step_u32(step),
        direction,
        kind,
        attempt,
        error: None,
    }
}

/// How one branch's attempts ended.
enum Ended<T> {
    /// Succeeded at this attempt.
    Ok(u32, T),
    /// Gave up at this attempt: the error, and whether the effect may still land.
    Failed(u32, StepError, bool),
}

impl<D, S> Orchestrator<D, S>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    S: SagaStore,
{
    /// Drives `run` to its end (completed, compensated or stuck), counting the outcome.
    pub(crate) async fn drive(&self, run: Run<D>) -> Result<SagaOutcome<D>> {
        let c = &self.inner.counters;
        match self.drive_plans(run).await {
            Ok(outcome) => {
                self.inner.meters.ended(outcome.state());
                bump(match outcome.state() {
                    SagaState::Completed => &c.completed,
                    SagaState::Compensated => &c.compensated,
                    _ => &c.stuck,
                });
                Ok(outcome)
            }
            Err(e) => {
                if matches!(e, Error::Fenced { .. }) {
                    bump(&c.fenced);
                }
                Err(e)
            }
        }
    }

    async fn drive_plans(&self, run: Run<D>) -> Result<SagaOutcome<D>> {
        let layout = self.inner.saga.layout.clone();
        let shared = Mutex::new(run);
        loop {
            let (plan, stop) = {
                let mut run = shared.lock().await;
                let stop = self.stop_of(&mut run).await?;
                let plan = plan::next(&layout, &run.pos, stop)
                    .map_err(|e| Error::corrupt(format!("saga `{}`: {e}", run.id)))?;
                (plan, stop)
            };
            match plan {
                Plan::Finished => return Ok(outcome(shared.into_inner())),
                Plan::Stop(to) => {
                    let mut run = shared.lock().await;
                    let (kind, reason) = match stop {
                        Some(Stop::Cancelled) => (
                            EventKind::Cancelled,
                            format!("cancelled: {}", run.cancel_reason.as_deref().unwrap_or("")),
                        ),
                        _ => (
                            EventKind::DeadlinePassed,
                            "the saga's deadline passed".to_owned(),
                        ),
                    };
                    let mut stopped = event(run.pos.step, Direction::Forward, kind, 0);
                    stopped.error = Some(reason.clone());
                    run.reason = Some(reason);
                    self.write_to(&mut run, to, None, stopped).await?;
                }
                Plan::Forward(steps) => {
                    {
                        let mut run = shared.lock().await;
                        run.pos = plan::begin_forward(&run.pos, &steps);
                    }
                    let (failed, _) = watch::channel(false);
                    if let [step] = steps[..] {
                        self.forward(&shared, step, false, &failed).await?;
                    } else {
                        let branches = steps
                            .iter()
                            .map(|step| self.forward(&shared, *step, true, &failed));
                        futures::future::try_join_all(branches).await?;
                    }
                }
                Plan::Compensate(steps) => {
                    if let [step] = steps[..] {
                        self.compensate(&shared, step).await?;
                    } else {
                        let branches = steps.iter().map(|step| self.compensate(&shared, *step));
                        futures::future::try_join_all(branches).await?;
                    }
                }
            }
        }
    }

    /// Whether the saga must stop going forward: a cancel requested (its reason read
    /// from the log when a write only flagged it) or the deadline passed.
    async fn stop_of(&self, run: &mut Run<D>) -> Result<Option<Stop>> {
        if run.cancel_requested && run.cancel_reason.is_none() {
            let record = self.inner.store.load(&run.id).await?;
            run.cancel_reason = Some(record.and_then(|r| r.cancel_reason).unwrap_or_default());
        }
        if run.cancel_reason.is_some() {
            return Ok(Some(Stop::Cancelled));
        }
        if run.deadline.is_some_and(|d| self.inner.clock.now() >= d) {
            return Ok(Some(Stop::Deadline));
        }
        Ok(None)
    }

    /// Writes position `to` (with new `data`, if any) and `event`, then moves `run` there.
    async fn write_to(
        &self,
        run: &mut Run<D>,
        to: Position,
        data: Option<&str>,
        event: Event,
    ) -> Result<()> {
        if to.state == SagaState::Completed {
            run.reason = None;
        }
        let progress = to.progress.to_json();
        let write = Write {
            state: to.state,
            step: step_u32(to.step),
            compensating: to.compensating,
            data,
            reason: run.reason.as_deref(),
            progress: &progress,
            definition_version: self.inner.saga.version,
            event,
            lease_ttl: self.inner.lease_ttl,
        };
        run.lease = self.inner.store.write(&run.lease, &write).await?;
        run.cancel_requested |= run.lease.cancel_requested;
        run.pos = to;
        Ok(())
    }

    /// One forward branch: attempts under its policy, then its outcome written. When it
    /// gives up it tells its siblings through `failed` (cancellable ones stop).
    async fn forward(
        &self,
        shared: &Mutex<Run<D>>,
        step: usize,
        in_group: bool,
        failed: &watch::Sender<bool>,
    ) -> Result<()> {
        let saga = &self.inner.saga;
        let def = &saga.steps[step];
        let cancel = (in_group && def.cancellable).then(|| failed.subscribe());
        let ended = self
            .attempts(
                shared,
                def,
                step,
                Direction::Forward,
                cancel,
                |ctx, data| (def.action)(ctx, data),
            )
            .await?;
        self.count(step, Direction::Forward, &ended);
        let mut run = shared.lock().await;
        let layout = &saga.layout;
        match ended {
            Ended::Ok(attempt, output) => {
                let merge = layout
                    .stages
                    .iter()
                    .position(|s| s.first == run.pos.step)
                    .and_then(|si| saga.stages[si].merge.clone());
                let data = match merge {
                    Some(merge) => merge(run.data.clone(), output),
                    None => output,
                };
                let json = serde_json::to_string(&data)?;
                let to = plan::forward_done(layout, &run.pos, step);
                let done = event(step, Direction::Forward, EventKind::Done, attempt);
                self.write_to(&mut run, to, Some(&json), done).await?;
                run.data = data;
            }
            Ended::Failed(attempt, error, in_doubt) => {
                let p = &run.pos.progress;
                if p.failed.is_empty() && p.doubt.is_empty() {
                    run.reason = Some(format!("step `{}` failed: {error}", def.name));
                }
                let to = plan::forward_failed(layout, &run.pos, step, in_doubt);
                let mut gave_up = event(step, Direction::Forward, EventKind::Failed, attempt);
                gave_up.error = Some(error.message().to_owned());
                self.write_to(&mut run, to, None, gave_up).await?;
                failed.send_replace(true);
            }
        }
        Ok(())
    }

    /// One compensation: attempts under its policy, then its outcome written (stuck
    /// when it gives up).
    async fn compensate(&self, shared: &Mutex<Run<D>>, step: usize) -> Result<()> {
        let saga = &self.inner.saga;
        let def = &saga.steps[step];
        let Some(compensation) = def.compensation.clone() else {
            return Err(Error::corrupt(format!(
                "step `{}` has no compensation to run",
                def.name
            )));
        };
        let ended = self
            .attempts(
                shared,
                def,
                step,
                Direction::Compensate,
                None,
                |ctx, data| compensation(ctx, data),
            )
            .await?;
        self.count(step, Direction::Compensate, &ended);
        let mut run = shared.lock().await;
        match ended {
            Ended::Ok(attempt, ()) => {
                bump(&self.inner.counters.compensations_run);
                let to = plan::compensated(&saga.layout, &run.pos, step);
                let done = event(step, Direction::Compensate, EventKind::Done, attempt);
                self.write_to(&mut run, to, None, done).await?;
            }
            Ended::Failed(attempt, error, _) => {
                let after = run.reason.clone().unwrap_or_default();
                run.reason = Some(format!(
                    "compensation of step `{}` failed: {error} (after: {after})",
                    def.name
                ));
                let to = plan::stuck(&run.pos);
                let mut gave_up = event(step, Direction::Compensate, EventKind::Failed, attempt);
                gave_up.error = Some(error.message().to_owned());
                self.write_to(&mut run, to, None, gave_up).await?;
            }
        }
        Ok(())
    }

    /// Runs attempts of one call under its policy: an intent before each (unless
    /// `create` wrote the first), a failed event after each failure that is retried.
    /// Returns how the last attempt ended, with its number; the caller writes it.
    async fn attempts<T>(
        &self,
        shared: &Mutex<Run<D>>,
        def: &StepDef<D>,
        step: usize,
        direction: Direction,
        mut cancel: Option<watch::Receiver<bool>>,
        call: impl Fn(StepContext, D) -> BoxFuture<Result<T, StepError>>,
    ) -> Result<Ended<T>> {
        let inner = &self.inner;
        let policy = match direction {
            Direction::Forward => def.retry,
            Direction::Compensate => def.compensation_retry,
        };
        let mut attempt = 1;
        loop {
            let (ctx, data, lease) = {
                let mut run = shared.lock().await;
                if run.intent_written && step == 0 && direction == Direction::Forward {
                    run.intent_written = false;
                } else {
                    let to = match direction {
                        Direction::Forward => plan::started(&run.pos, step),
                        Direction::Compensate => run.pos.clone(),
                    };
                    let intent = event(step, direction, EventKind::Intent, attempt);
                    self.write_to(&mut run, to, None, intent).await?;
                }
                let ctx = StepContext {
                    saga_id: run.id.clone(),
                    step,
                    step_name: def.name.clone(),
                    direction,
                    attempt,
                };
                (ctx, run.data.clone(), run.lease.clone())
            };
            let started = Instant::now();
            let span = tracing::debug_span!(
                "saga.step",
                sd.name = %inner.saga.name,
                sd.step = %def.name,
                sd.operation = operation_of(direction),
                attempt,
            );
            let attempt_run = self
                .call(&lease, def.timeout, call(ctx, data))
                .instrument(span);
            let result = match cancel.as_mut() {
                None => attempt_run.await?,
                Some(rx) => tokio::select! {
                    result = attempt_run => result?,
                    _ = rx.wait_for(|failed| *failed) => {
                        let dropped = StepError::retryable("dropped: a sibling branch failed");
                        return Ok(Ended::Failed(attempt, dropped, true));
                    }
                },
            };
            let took = started.elapsed();
            inner.counters.observe(took);
            inner.meters.attempted(step, direction, took);
            bump(&inner.counters.attempts);
            let error = match result {
                Ok(value) => return Ok(Ended::Ok(attempt, value)),
                Err(error) => error,
            };
            bump(&inner.counters.failed_attempts);
            if !error.is_retryable() || !policy.allows_retry_after(attempt) {
                let in_doubt = error.is_timeout();
                return Ok(Ended::Failed(attempt, error, in_doubt));
            }
            inner.meters.called(step, direction, Call::Retried);
            tracing::debug!(saga = %lease.id, step = %def.name, %direction, attempt, %error, "saga step attempt failed; retrying");
            {
                let mut run = shared.lock().await;
                let mut failed = event(step, direction, EventKind::Failed, attempt);
                failed.error = Some(error.message().to_owned());
                let same = run.pos.clone();
                self.write_to(&mut run, same, None, failed).await?;
            }
            tokio::time::sleep(policy.random_delay(attempt)).await;
            attempt += 1;
        }
    }

    /// Counts how a call of `step` in `direction` ended (feature `metrics`).
    fn count<T>(&self, step: usize, direction: Direction, ended: &Ended<T>) {
        let how = match ended {
            Ended::Ok(..) => Call::Ok,
            Ended::Failed(..) => Call::Failed,
        };
        self.inner.meters.called(step, direction, how);
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

/// The outcome of a run whose plan is finished.
fn outcome<D>(run: Run<D>) -> SagaOutcome<D> {
    let reason = run.reason.unwrap_or_default();
    match run.pos.state {
        SagaState::Completed => SagaOutcome::Completed(run.data),
        SagaState::Compensated => SagaOutcome::Compensated { reason },
        _ => SagaOutcome::Stuck { reason },
    }
}
