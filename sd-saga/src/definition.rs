//! Saga definitions: steps over typed data, their kinds, and the checks made when a saga
//! is built.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::plan::{Layout, Stage};
use sd_core::RetryPolicy;

/// A boxed `Send` future, as steps return them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

type Action<D> = Arc<dyn Fn(StepContext, D) -> BoxFuture<Result<D, StepError>> + Send + Sync>;
type Compensation<D> =
    Arc<dyn Fn(StepContext, D) -> BoxFuture<Result<(), StepError>> + Send + Sync>;
/// Folds a parallel branch's output into the saga data.
pub(crate) type Merge<D> = Arc<dyn Fn(D, D) -> D + Send + Sync>;
/// Maps a step index of an older definition version to this one's.
pub(crate) type Migration = Arc<dyn Fn(usize) -> Option<usize> + Send + Sync>;

/// Which way a step call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The step's action.
    Forward,
    /// The step's compensation (its logical undo).
    Compensate,
}

impl Direction {
    /// `forward` or `compensate`, as written in the log and in idempotency keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Compensate => "compensate",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "forward" => Some(Direction::Forward),
            "compensate" => Some(Direction::Compensate),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The three kinds of step (microservices.io's saga classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Before the pivot; undone by its compensation when a later step fails.
    Compensatable,
    /// The point of no return: once it succeeds the saga only goes forward. If it fails,
    /// the steps before it are compensated; it is never compensated itself.
    Pivot,
    /// After the pivot; retried until it succeeds, never compensated. If it still fails
    /// when its policy runs out, the saga is left [`Stuck`](crate::SagaState::Stuck).
    Retriable,
}

/// What one call of a step's action or compensation knows: which saga, which step, which
/// attempt, and the idempotency key the participant dedupes by.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub(crate) saga_id: Arc<str>,
    pub(crate) step: usize,
    pub(crate) step_name: Arc<str>,
    pub(crate) direction: Direction,
    pub(crate) attempt: u32,
}

impl StepContext {
    /// The saga's id.
    pub fn saga_id(&self) -> &str {
        &self.saga_id
    }

    /// The step's index in the definition, from 0.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The step's name.
    pub fn step_name(&self) -> &str {
        &self.step_name
    }

    /// Forward (the action) or compensate.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The attempt, from 1; it restarts at 1 when another orchestrator recovers the saga.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// `{saga id}/{step index}/{direction}`: the same for every attempt of this call, on
    /// every orchestrator, so a participant that stores the keys it has served runs each
    /// effect once. Parse it from the right: the id may contain `/`.
    pub fn idempotency_key(&self) -> String {
        idempotency_key(&self.saga_id, self.step, self.direction)
    }
}

/// The idempotency key of (saga id, step index, direction); see
/// [`StepContext::idempotency_key`].
pub fn idempotency_key(saga_id: &str, step: usize, direction: Direction) -> String {
    format!("{saga_id}/{step}/{}", direction.as_str())
}

/// A step's failure: retryable (the default for transient faults) or not (a business
/// refusal, which is final at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    message: String,
    retryable: bool,
    timed_out: bool,
}

impl StepError {
    /// A transient failure: the step is tried again under its policy.
    pub fn retryable(message: impl fmt::Display) -> Self {
        StepError {
            message: message.to_string(),
            retryable: true,
            timed_out: false,
        }
    }

    /// A final failure: no retry. Before the pivot the saga compensates at once; after it
    /// the saga is left stuck.
    pub fn permanent(message: impl fmt::Display) -> Self {
        StepError {
            message: message.to_string(),
            retryable: false,
            timed_out: false,
        }
    }

    pub(crate) fn timed_out(after: Duration) -> Self {
        StepError {
            message: format!("attempt timed out after {after:?}"),
            retryable: true,
            timed_out: true,
        }
    }

    /// True for a transient failure.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// True when the attempt ran out of its timeout: its effect may still land.
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

/// One step of a saga; make one with [`Step::compensatable`], [`Step::pivot`] or
/// [`Step::retriable`].
pub struct Step<D> {
    name: String,
    kind: StepKind,
    action: Action<D>,
    compensation: Option<Compensation<D>>,
    policies: Policies,
    cancellable: bool,
}

/// The policies a step may set, and a saga may set for every step that sets none.
#[derive(Debug, Clone, Copy, Default)]
struct Policies {
    retry: Option<RetryPolicy>,
    compensation_retry: Option<RetryPolicy>,
    timeout: Option<Duration>,
}

/// The per-attempt timeout of a step when neither it nor its saga sets one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes the `retry`, `compensation_retry` and `timeout` setters that [`Step`] and
/// [`SagaBuilder`] share (each with its own docs): each sets its field of `self.policies`.
macro_rules! policy_setters {
    (
        $(#[$retry:meta])* retry,
        $(#[$compensation_retry:meta])* compensation_retry,
        $(#[$timeout:meta])* timeout $(,)?
    ) => {
        $(#[$retry])*
        pub fn retry(mut self, policy: RetryPolicy) -> Self {
            self.policies.retry = Some(policy);
            self
        }

        $(#[$compensation_retry])*
        pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
            self.policies.compensation_retry = Some(policy);
            self
        }

        $(#[$timeout])*
        pub fn timeout(mut self, timeout: Duration) -> Self {
            self.policies.timeout = Some(timeout);
            self
        }
    };
}

impl<D> fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("retry", &self.policies.retry)
            .field("compensation_retry", &self.policies.compensation_retry)
            .field("timeout", &self.policies.timeout)
            .finish_non_exhaustive()
    }
}

fn boxed_action<D, A, F>(action: A) -> Action<D>
where
    A: Fn(StepContext, D) -> F + Send + Sync + 'static,
    F: Future<Output = Result<D, StepError>> + Send + 'static,
{
    Arc::new(move |ctx, data| Box::pin(action(ctx, data)))
}

impl<D: Send + 'static> Step<D> {
    fn new(name: impl Into<String>, kind: StepKind, action: Action<D>) -> Self {
        Step {
            name: name.into(),
            kind,
            action,
            compensation: None,
            policies: Policies::default(),
            cancellable: false,
        }
    }

    /// In a parallel group: when a sibling branch fails for good, an attempt of this step
    /// still running is dropped instead of awaited. Its effect may still land, so its
    /// compensation runs as if it had succeeded (the participant sees the compensation's
    /// key and should refuse the forward call if it arrives late). Outside a group, or
    /// for a step without a compensation, it changes nothing.
    pub fn cancellable(mut self) -> Self {
        self.cancellable = true;
        self
    }

    /// A step before the pivot: `action` returns the saga data for the next steps (with,
    /// say, the reservation id it got); `compensation` undoes it when a later step fails
    /// and gets the data as the last completed step left it (this step's own additions
    /// included).
    pub fn compensatable<A, F, C, G>(name: impl Into<String>, action: A, compensation: C) -> Self
    where
        A: Fn(StepContext, D) -> F + Send + Sync + 'static,
        F: Future<Output = Result<D, StepError>> + Send + 'static,
        C: Fn(StepContext, D) -> G + Send + Sync + 'static,
        G: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let mut step = Step::new(name, StepKind::Compensatable, boxed_action(action));
        step.compensation = Some(Arc::new(move |ctx, data| Box::pin(compensation(ctx, data))));
        step
    }

    /// The pivot: the point of no return.
    pub fn pivot<A, F>(name: impl Into<String>, action: A) -> Self
    where
        A: Fn(StepContext, D) -> F + Send + Sync + 'static,
        F: Future<Output = Result<D, StepError>> + Send + 'static,
    {
        Step::new(name, StepKind::Pivot, boxed_action(action))
    }

    /// A step after the pivot, retried until it succeeds (default policy
    /// [`RetryPolicy::persistent`]).
    pub fn retriable<A, F>(name: impl Into<String>, action: A) -> Self
    where
        A: Fn(StepContext, D) -> F + Send + Sync + 'static,
        F: Future<Output = Result<D, StepError>> + Send + 'static,
    {
        Step::new(name, StepKind::Retriable, boxed_action(action))
    }

    policy_setters! {
        /// The retry policy of the action (default: the saga's, else [`RetryPolicy::default`]
        /// for compensatable and pivot steps and [`RetryPolicy::persistent`] for retriable
        /// ones).
        retry,
        /// The retry policy of the compensation (default: the saga's, else
        /// [`RetryPolicy::persistent`]).
        compensation_retry,
        /// How long one attempt may run (default: the saga's, else 30 s). An attempt that
        /// runs out counts as a retryable failure.
        timeout,
    }
}

/// A step with every default resolved.
pub(crate) struct StepDef<D> {
    pub(crate) name: Arc<str>,
    pub(crate) kind: StepKind,
    pub(crate) action: Action<D>,
    pub(crate) compensation: Option<Compensation<D>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) cancellable: bool,
}

/// How a stage's branch outputs become the saga data.
pub(crate) struct StageDef<D> {
    /// `None` for a single step (its output is the data); a parallel group's merge.
    pub(crate) merge: Option<Merge<D>>,
}

/// A checked saga definition: its name (the saga type in the log) and its steps.
/// Cheap to clone.
pub struct Saga<D> {
    pub(crate) name: Arc<str>,
    pub(crate) steps: Arc<[StepDef<D>]>,
    /// One per stage of `layout`.
    pub(crate) stages: Arc<[StageDef<D>]>,
    pub(crate) layout: Arc<Layout>,
    pub(crate) version: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) migrations: Arc<BTreeMap<u32, Migration>>,
}

impl<D> Clone for Saga<D> {
    fn clone(&self) -> Self {
        Saga {
            name: self.name.clone(),
            steps: self.steps.clone(),
            stages: self.stages.clone(),
            layout: self.layout.clone(),
            version: self.version,
            deadline: self.deadline,
            migrations: self.migrations.clone(),
        }
    }
}

impl<D> fmt::Debug for Saga<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<_> = self
            .steps
            .iter()
            .map(|s| (s.name.as_ref(), s.kind))
            .collect();
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &steps)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<D: Send + 'static> Saga<D> {
    /// A builder for the saga named `name` (the saga type in the log; one orchestrator
    /// per name).
    pub fn builder(name: impl Into<String>) -> SagaBuilder<D> {
        SagaBuilder {
            name: name.into(),
            items: Vec::new(),
            policies: Policies::default(),
            version: 1,
            deadline: None,
            migrations: BTreeMap::new(),
        }
    }

    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The steps' names and kinds, in order.
    pub fn steps(&self) -> impl Iterator<Item = (&str, StepKind)> {
        self.steps.iter().map(|s| (s.name.as_ref(), s.kind))
    }

    /// The definition version stored with every saga it starts (default 1).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The parallel groups, as the step indices of each (a single step is no group).
    pub fn groups(&self) -> Vec<std::ops::Range<usize>> {
        self.layout
            .stages
            .iter()
            .zip(self.stages.iter())
            .filter(|(_, def)| def.merge.is_some())
            .map(|(s, _)| s.first..s.first + s.undoable.len())
            .collect()
    }
}

/// A step, or a parallel group of steps with its merge.
enum Item<D> {
    Single(Step<D>),
    Group(Vec<Step<D>>, Merge<D>),
}

/// Builds a [`Saga`]; [`build`](Self::build) rejects a definition that breaks the pivot
/// rules.
pub struct SagaBuilder<D> {
    name: String,
    items: Vec<Item<D>>,
    policies: Policies,
    version: u32,
    deadline: Option<Duration>,
    migrations: BTreeMap<u32, Migration>,
}

impl<D> fmt::Debug for SagaBuilder<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaBuilder")
            .field("name", &self.name)
            .field("items", &self.items.len())
            .field("version", &self.version)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<D: Send + 'static> SagaBuilder<D> {
    /// Appends a step.
    pub fn step(mut self, step: Step<D>) -> Self {
        self.items.push(Item::Single(step));
        self
    }

    /// Appends a parallel group: its steps run concurrently, each from the saga data as
    /// it stands when the branch starts, and the saga moves on once all of them
    /// succeeded. Each branch's output is folded into the data with `merge(data,
    /// output)` as the branch finishes (so in the order they finish). If one fails for
    /// good, the others are awaited (or dropped, if [`Step::cancellable`]) and every
    /// branch that completed is compensated, in any order, then the steps before the
    /// group in reverse. A group holds compensatable steps (before the pivot) or
    /// retriable ones (after it), never the pivot.
    pub fn parallel<I, M>(mut self, steps: I, merge: M) -> Self
    where
        I: IntoIterator<Item = Step<D>>,
        M: Fn(D, D) -> D + Send + Sync + 'static,
    {
        self.items
            .push(Item::Group(steps.into_iter().collect(), Arc::new(merge)));
        self
    }

    /// The definition version (default 1), stored with every saga started under it. A
    /// saga is recovered or resumed only by an orchestrator of the same version, unless
    /// a [`migration`](Self::migration) from the saga's version is registered; otherwise
    /// [`Error::DefinitionVersion`]. Raise it when a change moves, removes or regroups
    /// steps that running sagas may be at.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Lets this definition take over sagas started under version `from`: `step_map`
    /// maps a step index of that version to this one's (`None`: that position cannot be
    /// continued, and such a saga is refused with [`Error::DefinitionVersion`]). The data
    /// is kept as it is. Idempotency keys carry step indices, so keep the index of every
    /// step that may be in flight.
    pub fn migration<F>(mut self, from: u32, step_map: F) -> Self
    where
        F: Fn(usize) -> Option<usize> + Send + Sync + 'static,
    {
        self.migrations.insert(from, Arc::new(step_map));
        self
    }

    /// A deadline for every saga of this definition, counted from its start on the
    /// orchestrator's clock and stored with the saga: past it, no new forward step
    /// starts (those running are awaited) and the saga compensates. Once the pivot
    /// succeeded the saga only goes forward, so the deadline no longer applies.
    pub fn deadline(mut self, within: Duration) -> Self {
        self.deadline = Some(within);
        self
    }

    policy_setters! {
        /// The retry policy of every forward step that sets none.
        retry,
        /// The retry policy of every compensation that sets none.
        compensation_retry,
        /// The per-attempt timeout of every step that sets none (default 30 s).
        timeout,
    }

    /// The saga, or the first problem: no steps, an empty or repeated step name, a second
    /// pivot, a compensatable step after the pivot, a retriable step before it, a
    /// parallel group that is empty or holds the pivot, a zero timeout or version.
    pub fn build(self) -> Result<Saga<D>> {
        let saga = self.name;
        if saga.is_empty() || saga.len() > 100 {
            return Err(Error::config(
                "name",
                "the saga name must be 1 to 100 bytes",
            ));
        }
        if self.items.is_empty() {
            return Err(Error::NoSteps { saga });
        }
        if self.version == 0 {
            return Err(Error::config("version", "must be at least 1"));
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(Error::config("deadline", "must be above zero"));
        }
        let mut names = HashSet::new();
        let mut pivot: Option<String> = None;
        let mut steps = Vec::new();
        let mut layout = Vec::with_capacity(self.items.len());
        let mut stages = Vec::with_capacity(self.items.len());
        for item in self.items {
            let (group, merge) = match item {
                Item::Single(step) => (vec![step], None),
                Item::Group(group, merge) => {
                    if group.is_empty() {
                        return Err(Error::config(
                            "parallel",
                            "a parallel group needs at least one step",
                        ));
                    }
                    if let Some(p) = group.iter().find(|s| s.kind == StepKind::Pivot) {
                        return Err(Error::PivotInGroup {
                            saga,
                            step: p.name.clone(),
                        });
                    }
                    (group, Some(merge))
                }
            };
            let first = steps.len();
            let mut undoable = Vec::with_capacity(group.len());
            for step in group {
                check_step(&saga, &step, &mut names, &mut pivot)?;
                undoable.push(step.compensation.is_some());
                steps.push(resolve(step, self.policies)?);
            }
            layout.push(Stage {
                first,
                undoable,
                forward_only: false,
            });
            stages.push(StageDef { merge });
        }
        // Past the pivot's stage, only forward.
        if let Some(p) = steps.iter().position(|s| s.kind == StepKind::Pivot) {
            for stage in layout.iter_mut().filter(|s| s.first > p) {
                stage.forward_only = true;
            }
        }
        Ok(Saga {
            name: saga.into(),
            steps: steps.into(),
            stages: stages.into(),
            layout: Arc::new(Layout { stages: layout }),
            version: self.version,
            deadline: self.deadline,
            migrations: Arc::new(self.migrations),
        })
    }
}

/// The checks of one step: a unique, non-empty name and the pivot rules.
fn check_step<D>(
    saga: &str,
    step: &Step<D>,
    names: &mut HashSet<String>,
    pivot: &mut Option<String>,
) -> Result<()> {
    let saga = saga.to_owned();
    if step.name.is_empty() {
        return Err(Error::StepConfig {
            step: step.name.clone(),
            field: "name",
            reason: "must not be empty".into(),
        });
    }
    if !names.insert(step.name.clone()) {
        return Err(Error::DuplicateStep {
            saga,
            step: step.name.clone(),
        });
    }
    match (step.kind, pivot.clone()) {
        (StepKind::Compensatable, Some(p)) => Err(Error::CompensatableAfterPivot {
            saga,
            step: step.name.clone(),
            pivot: p,
        }),
        (StepKind::Retriable, None) => Err(Error::RetriableBeforePivot {
            saga,
            step: step.name.clone(),
        }),
        (StepKind::Pivot, Some(first)) => Err(Error::SecondPivot {
            saga,
            step: step.name.clone(),
            first,
        }),
        (StepKind::Pivot, None) => {
            *pivot = Some(step.name.clone());
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The step with every default resolved.
fn resolve<D>(step: Step<D>, saga_wide: Policies) -> Result<StepDef<D>> {
    let own = step.policies;
    let timeout = own.timeout.or(saga_wide.timeout).unwrap_or(DEFAULT_TIMEOUT);
    if timeout.is_zero() {
        return Err(Error::StepConfig {
            step: step.name,
            field: "timeout",
            reason: "must be above zero".into(),
        });
    }
    let default_retry = match step.kind {
        StepKind::Retriable => RetryPolicy::persistent(),
        _ => RetryPolicy::default(),
    };
    Ok(StepDef {
        name: step.name.into(),
        kind: step.kind,
        action: step.action,
        compensation: step.compensation,
        retry: own.retry.or(saga_wide.retry).unwrap_or(default_retry),
        compensation_retry: own
            .compensation_retry
            .or(saga_wide.compensation_retry)
            .unwrap_or_else(RetryPolicy::persistent),
        timeout,
        cancellable: step.cancellable,
    })
}

#[cfg(test)]
#[path = "definition_tests.rs"]
mod tests;
