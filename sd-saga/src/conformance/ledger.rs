//! The participants of the test sagas: a ledger of effects, deduped by idempotency key,
//! with faults to inject.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Direction, StepContext, StepError, idempotency_key};

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

#[derive(Debug, Default)]
struct LedgerState {
    calls: HashMap<String, u32>,
    applied: HashSet<String>,
    effects: Vec<(String, usize, Direction)>,
    faults: HashMap<(usize, Direction), Fault>,
    key_faults: HashMap<String, Fault>,
    left: HashMap<String, u32>,
    delays: HashMap<usize, Duration>,
    entered: HashMap<usize, Arc<tokio::sync::Notify>>,
}

/// The participants of every test saga: each call is deduped by its idempotency key, as a
/// real participant would (effects happen at most once per key), and counted.
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

    /// One participant call: counted, failed as a fault says, else applied once per key.
    pub async fn call(&self, ctx: &StepContext) -> Result<(), StepError> {
        let key = ctx.idempotency_key();
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
        *st.calls.entry(key.clone()).or_default() += 1;
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

    /// How many times `(id, step, direction)` reached the participant.
    pub fn calls(&self, id: &str, step: usize, direction: Direction) -> u32 {
        let key = idempotency_key(id, step, direction);
        self.lock().calls.get(&key).copied().unwrap_or(0)
    }

    /// Calls that reached a participant again with a key it had already served.
    pub fn duplicate_calls(&self) -> u32 {
        self.lock()
            .calls
            .values()
            .map(|n| n.saturating_sub(1))
            .sum()
    }
}
