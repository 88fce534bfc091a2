//! The contract suite's helpers (`sd_saga::conformance`, feature `test-util`; its cases
//! run one test each through `sd_saga::saga_suite!`) and the random fault plans of the
//! property tests.
#![allow(dead_code, unreachable_pub, unused_imports, clippy::unwrap_used)]

use sd_saga::Direction;
pub use sd_saga::conformance::*;

/// One step's faults in a random plan: transient forward failures, a permanent refusal,
/// transient compensation failures.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub forward: u32,
    pub refuse: bool,
    pub compensate: u32,
}

pub fn faults() -> impl proptest::strategy::Strategy<Value = Faults> {
    use proptest::prelude::*;
    (0u32..5, prop::bool::weighted(0.15), 0u32..5).prop_map(|(forward, refuse, compensate)| {
        Faults {
            forward,
            refuse,
            compensate,
        }
    })
}

/// The saga of the random plans: 3 compensatable steps, the pivot, 2 retriable steps.
pub const KINDS: &str = "CCCPRR";

/// 3 forward attempts before the pivot, 6 after it and for compensations (so the at
/// most 4 transient failures of a plan give up only before the pivot).
pub fn random_shape() -> Shape {
    Shape {
        kinds: KINDS,
        forward: fast(3),
        retriable: fast(6),
        compensation: fast(6),
        ..Shape::default()
    }
}

/// Installs a random plan's faults for saga `id`.
pub fn apply(ledger: &Ledger, id: &str, plan: &[Faults]) {
    for (step, f) in plan.iter().enumerate() {
        let retriable = KINDS.as_bytes()[step] == b'R';
        if f.refuse && !retriable {
            ledger.fault_for(id, step, Direction::Forward, Fault::Permanent);
        } else if f.forward > 0 {
            ledger.fault_for(id, step, Direction::Forward, Fault::Transient(f.forward));
        }
        if f.compensate > 0 {
            ledger.fault_for(
                id,
                step,
                Direction::Compensate,
                Fault::Transient(f.compensate),
            );
        }
    }
}

/// The two sagas the prune tests start from, run on `store`: "done" is refused at step 1
/// and compensated, "stuck" fails at step 4 every time and is left stuck. Returns the
/// orchestrator that ran them.
pub async fn done_and_stuck<S: sd_saga::SagaStore + Clone>(
    store: S,
) -> sd_saga::Orchestrator<Data, S> {
    let ledger = std::sync::Arc::new(Ledger::default());
    ledger.fault(4, Direction::Forward, Some(Fault::Always));
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "a");
    ledger.fault_for("done", 1, Direction::Forward, Fault::Permanent);
    assert_eq!(
        orch.run("done", vec![]).await.unwrap().state(),
        sd_saga::SagaState::Compensated
    );
    assert_eq!(
        orch.run("stuck", vec![]).await.unwrap().state(),
        sd_saga::SagaState::Stuck
    );
    orch
}
