//! The contract suite (`sd_saga::conformance`, feature `test-util`) as one test per case,
//! and the random fault plans of the property tests.
#![allow(dead_code, unreachable_pub, unused_imports, clippy::unwrap_used)]

use sd_saga::Direction;
pub use sd_saga::conformance::*;

/// Generates one `#[tokio::test]` per suite case; `$make` is an async fn returning
/// `(store, guard)`.
#[macro_export]
macro_rules! saga_suite {
    ($make:path) => {
        $crate::saga_suite!(@cases $make;
            happy_path_runs_every_step_in_order_and_threads_the_data,
            failure_before_the_pivot_compensates_in_exact_reverse,
            non_retryable_error_fails_at_once,
            compensation_failing_three_times_then_succeeding,
            compensation_always_failing_is_stuck_then_resumed,
            retriable_step_past_the_pivot_is_stuck_then_resumed_forward,
            timed_out_step_is_retried_then_compensated_itself,
            crash_at_every_boundary_then_recover_finishes_every_saga,
            stale_owner_is_fenced_and_exactly_one_progresses,
            heartbeats_keep_a_long_step_owned,
            concurrent_recovers_claim_each_saga_once,
            thousand_sagas_concurrently,
            ids_are_checked_and_unique
        );
    };
    (@cases $make:path; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $make().await;
                sd_saga::conformance::$name(store).await;
            }
        )*
    };
}

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
