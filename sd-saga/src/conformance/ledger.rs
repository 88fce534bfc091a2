//! The participants of the test sagas: every call recorded as it arrived, effects
//! deduped by idempotency key as a real participant would, and faults to inject.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Direction, EventKind, StepContext, StepError, StoredEvent, idempotency_key};

/// How a participant call misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails (retryably) this many times per key, then works.
    Transient(u32),
    /// Refuses for good (non-retryable).
    Permanent,
    /// Fails retryably every time, until the fault is cleared.
    Always,
}

/// One participant call as it arrived, before the participant deduped it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Call {
    /// The saga's id.
    pub saga_id: String,
    /// The step's index.
    pub step: usize,
    /// Forward or compensate.
    pub direction: Direction,
    /// The idempotency key the call carried.
    pub key: String,
    /// The attempt the orchestrator numbered it.
    pub attempt: u32,
}

#[derive(Debug, Default)]
struct LedgerState {
    calls: Vec<Call>,
    applied: HashSet<String>,
    effects: Vec<(String, usize, Direction)>,
    faults: HashMap<(usize, Direction), Fault>,
    key_faults: HashMap<String, Fault>,
    left: HashMap<String, u32>,
    delays: HashMap<usize, Duration>,
    entered: HashMap<usize, Arc<tokio::sync::Notify>>,
    rendezvous: Option<(HashSet<usize>, Arc<tokio::sync::Barrier>)>,
    met: HashSet<String>,
}

/// The participants of every test saga: each call is recorded as it arrived (see
/// [`Ledger::assert_repeats_nothing`]), then deduped by its idempotency key, as a real
/// participant would (effects happen at most once per key).
#[derive(Debug, Default)]
pub struct Ledger {
    state: Mutex<LedgerState>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap()
    }

    /// Sets (or clears) the fault of (step, direction) for every saga.
    pub fn fault(&self, step: usize, direction: Direction, fault: Option<Fault>) {
        let mut st = self.lock();
        match fault {
            Some(f) => st.faults.insert((step, direction), f),
            None => st.faults.remove(&(step, direction)),
        };
    }

    /// Sets the fault of one saga's (step, direction).
    pub fn fault_for(&self, id: &str, step: usize, direction: Direction, fault: Fault) {
        self.lock()
            .key_faults
            .insert(idempotency_key(id, step, direction), fault);
    }

    /// Every forward call of `step` first sleeps `delay` (before its effect).
    pub fn delay(&self, step: usize, delay: Duration) {
        self.lock().delays.insert(step, delay);
    }

    /// Notified whenever a forward call of `step` starts.
    pub fn entered(&self, step: usize) -> Arc<tokio::sync::Notify> {
        self.lock().entered.entry(step).or_default().clone()
    }

    /// The first forward call of each of `steps` waits until all of them have arrived:
    /// they only get past it if they run concurrently (for one saga per ledger).
    pub fn rendezvous(&self, steps: &[usize]) {
        let barrier = Arc::new(tokio::sync::Barrier::new(steps.len()));
        self.lock().rendezvous = Some((steps.iter().copied().collect(), barrier));
    }

    /// One participant call: recorded, failed as a fault says, else applied once per key.
    pub async fn call(&self, ctx: &StepContext) -> Result<(), StepError> {
        let key = ctx.idempotency_key();
        let meet = {
            let mut st = self.lock();
            let forward = ctx.direction() == Direction::Forward;
            match &st.rendezvous {
                Some((steps, barrier)) if forward && steps.contains(&ctx.step()) => {
                    let barrier = barrier.clone();
                    st.met.insert(key.clone()).then_some(barrier)
                }
                _ => None,
            }
        };
        if let Some(barrier) = meet {
            barrier.wait().await;
        }
        let (delay, entered) = {
            let st = self.lock();
            let forward = ctx.direction() == Direction::Forward;
            (
                st.delays.get(&ctx.step()).filter(|_| forward).copied(),
                st.entered.get(&ctx.step()).filter(|_| forward).cloned(),
            )
        };
        if let Some(entered) = entered {
            entered.notify_one();
        }
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut st = self.lock();
        st.calls.push(Call {
            saga_id: ctx.saga_id().to_owned(),
            step: ctx.step(),
            direction: ctx.direction(),
            key: key.clone(),
            attempt: ctx.attempt(),
        });
        let fault = st
            .key_faults
            .get(&key)
            .or_else(|| st.faults.get(&(ctx.step(), ctx.direction())))
            .copied();
        match fault {
            Some(Fault::Permanent) => return Err(StepError::permanent("refused")),
            Some(Fault::Always) => return Err(StepError::retryable("participant down")),
            Some(Fault::Transient(n)) => {
                let left = st.left.entry(key.clone()).or_insert(n);
                if *left > 0 {
                    *left -= 1;
                    return Err(StepError::retryable("flaky"));
                }
            }
            None => {}
        }
        if st.applied.insert(key) {
            st.effects
                .push((ctx.saga_id().to_owned(), ctx.step(), ctx.direction()));
        }
        Ok(())
    }

    /// The effects of saga `id`, in the order they happened (once per key).
    pub fn effects(&self, id: &str) -> Vec<(usize, Direction)> {
        self.lock()
            .effects
            .iter()
            .filter(|(s, _, _)| s == id)
            .map(|(_, step, d)| (*step, *d))
            .collect()
    }

    /// The steps of saga `id` whose forward effect happened, in that order.
    pub fn forward_effects(&self, id: &str) -> Vec<usize> {
        self.effects(id)
            .into_iter()
            .filter(|(_, d)| *d == Direction::Forward)
            .map(|(step, _)| step)
            .collect()
    }

    /// How many times `(id, step, direction)` reached the participant.
    pub fn calls(&self, id: &str, step: usize, direction: Direction) -> u32 {
        let key = idempotency_key(id, step, direction);
        let n = self.lock().calls.iter().filter(|c| c.key == key).count();
        u32::try_from(n).unwrap()
    }

    /// Calls that reached a participant again with a key it had already served.
    pub fn duplicate_calls(&self) -> u32 {
        let st = self.lock();
        let keys: HashSet<&str> = st.calls.iter().map(|c| c.key.as_str()).collect();
        u32::try_from(st.calls.len() - keys.len()).unwrap()
    }

    /// Every call of saga `id`, in the order they arrived, undeduped.
    pub fn raw_calls(&self, id: &str) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.saga_id == id)
            .cloned()
            .collect()
    }

    /// How many calls (of every saga) arrived so far: take it when recovery starts and
    /// pass it to [`assert_repeats_nothing`](Self::assert_repeats_nothing).
    pub fn mark(&self) -> usize {
        self.lock().calls.len()
    }

    /// Whether a retryable fault (transient or always) is set for this call.
    fn retryable_fault(&self, id: &str, step: usize, direction: Direction) -> bool {
        let st = self.lock();
        let key = idempotency_key(id, step, direction);
        let fault = st
            .key_faults
            .get(&key)
            .or_else(|| st.faults.get(&(step, direction)));
        matches!(fault, Some(Fault::Transient(_) | Fault::Always))
    }

    /// Asserts, from the raw calls, the repeats the saga contract allows for saga `id`
    /// recovered by another orchestrator: `before` is the saga's log when recovery
    /// began and `mark` the [`mark`](Self::mark) taken then (after the first
    /// orchestrator stopped).
    ///
    /// - Every call carries the idempotency key of its (saga, step, direction).
    /// - A call whose outcome (`Done`) the log held is never made again.
    /// - A call with no retryable fault set is made at most once by each orchestrator,
    ///   as attempt 1, and only after its intent is in the log; after a final outcome
    ///   (`Done` or `Failed`) never again; so only the call in doubt (an intent without
    ///   an outcome) is repeated, once, by the recovering orchestrator, with the same key.
    ///
    /// # Panics
    /// When a call was repeated beyond that.
    pub fn assert_repeats_nothing(&self, id: &str, before: &[StoredEvent], mark: usize) {
        let calls: Vec<(usize, Call)> = self
            .lock()
            .calls
            .iter()
            .enumerate()
            .filter(|(_, c)| c.saga_id == id)
            .map(|(i, c)| (i, c.clone()))
            .collect();
        let mut by_call: BTreeMap<(usize, Direction), (Vec<Call>, Vec<Call>)> = BTreeMap::new();
        for (i, call) in calls {
            assert_eq!(
                call.key,
                idempotency_key(id, call.step, call.direction),
                "{id}: a call carried another key"
            );
            let (first, recovered) = by_call.entry((call.step, call.direction)).or_default();
            if i < mark { first } else { recovered }.push(call);
        }
        for ((step, direction), (first, recovered)) in by_call {
            let last = before
                .iter()
                .rfind(|e| e.event.step as usize == step && e.event.direction == direction)
                .map(|e| e.event.kind);
            let what = format!("{id}: step {step} {direction}");
            assert!(
                recovered.is_empty() || last != Some(EventKind::Done),
                "{what} was done before recovery and called again: {recovered:?}"
            );
            if self.retryable_fault(id, step, direction) {
                continue;
            }
            for calls in [&first, &recovered] {
                assert!(
                    calls.len() <= 1,
                    "{what} repeated by one orchestrator without a retryable failure: {calls:?}"
                );
                assert!(
                    calls.iter().all(|c| c.attempt == 1),
                    "{what} retried without a retryable failure: {calls:?}"
                );
            }
            assert!(
                first.is_empty() || last.is_some(),
                "{what} called before its intent was in the log: {first:?}"
            );
            assert!(
                recovered.is_empty() || last.is_none() || last == Some(EventKind::Intent),
                "{what} had its final outcome ({last:?}) in the log and was called again: {recovered:?}"
            );
        }
    }
}
