//! Feature `metrics`: each step call is counted once under its outcome (ok, failed) and
//! each retried attempt once, each compensation likewise, each attempt's time once, and
//! each saga once by how it ended (completed, compensated, stuck), with the documented
//! names and labels, on the memory and PostgreSQL logs.
#![cfg(all(feature = "metrics", feature = "postgres"))]
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use std::time::Duration;

use sd_core::observe::{Capture, label, operation, outcome};
use sd_saga::postgres::PostgresStore;
use sd_saga::{
    MemoryStore, Orchestrator, RetryPolicy, Saga, SagaOutcome, SagaStore, Step, StepError,
};
use serde::{Deserialize, Serialize};

const STEPS: &str = "sd.saga.steps";
const COMPENSATIONS: &str = "sd.saga.compensations";
const STEP_DURATION: &str = "sd.saga.step.duration";
const SAGAS: &str = "sd.saga.sagas";

/// What the steps of one order do.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Order {
    /// The charge fails once (retried), then for good.
    decline: bool,
    /// Releasing the stock fails for good (the saga is left stuck).
    stuck: bool,
}

/// Reserve (compensatable), charge (the pivot), ship (retriable).
fn saga() -> Saga<Order> {
    let quick = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(1))
        .build()
        .unwrap();
    Saga::<Order>::builder("order")
        .retry(quick)
        .compensation_retry(quick)
        .step(Step::compensatable(
            "reserve",
            |_ctx, order: Order| async move { Ok(order) },
            |_ctx, order: Order| async move {
                if order.stuck {
                    Err(StepError::permanent("the warehouse is gone"))
                } else {
                    Ok(())
                }
            },
        ))
        .step(Step::pivot("charge", |ctx, order: Order| async move {
            match (order.decline, ctx.attempt()) {
                (false, _) => Ok(order),
                (true, 1) => Err(StepError::retryable("the bank timed out")),
                (true, _) => Err(StepError::permanent("card declined")),
            }
        }))
        .step(Step::retriable("ship", |_ctx, order: Order| async move {
            Ok(order)
        }))
        .build()
        .unwrap()
}

/// A completed order, a compensated one and a stuck one.
async fn drive<S: SagaStore>(orchestrator: &Orchestrator<Order, S>) {
    let run = |id: &'static str, decline, stuck| orchestrator.run(id, Order { decline, stuck });
    assert!(matches!(
        run("o1", false, false).await.unwrap(),
        SagaOutcome::Completed(_)
    ));
    assert!(matches!(
        run("o2", true, false).await.unwrap(),
        SagaOutcome::Compensated { .. }
    ));
    assert!(matches!(
        run("o3", true, true).await.unwrap(),
        SagaOutcome::Stuck { .. }
    ));
}

fn assert_counted(capture: &Capture) {
    let calls = |name, step, o| {
        capture.counter(
            name,
            &[
                (label::NAME, "order"),
                (label::STEP, step),
                (label::OUTCOME, o),
            ],
        )
    };
    // Three reservations, one shipment; the charge passed once, and each declined
    // order's charge was retried once, then gave up.
    assert_eq!(calls(STEPS, "reserve", outcome::OK), 3);
    assert_eq!(calls(STEPS, "charge", outcome::OK), 1);
    assert_eq!(calls(STEPS, "charge", outcome::RETRIED), 2);
    assert_eq!(calls(STEPS, "charge", outcome::FAILED), 2);
    assert_eq!(calls(STEPS, "ship", outcome::OK), 1);
    assert_eq!(calls(STEPS, "reserve", outcome::FAILED), 0);
    // One reservation released, one release that gave up at once (permanent).
    assert_eq!(calls(COMPENSATIONS, "reserve", outcome::OK), 1);
    assert_eq!(calls(COMPENSATIONS, "reserve", outcome::FAILED), 1);
    assert_eq!(calls(COMPENSATIONS, "reserve", outcome::RETRIED), 0);
    // One sample per attempt.
    let attempts = |step, op| {
        capture
            .samples(
                STEP_DURATION,
                &[
                    (label::NAME, "order"),
                    (label::STEP, step),
                    (label::OPERATION, op),
                ],
            )
            .len()
    };
    assert_eq!(attempts("reserve", operation::STEP), 3);
    assert_eq!(attempts("charge", operation::STEP), 5);
    assert_eq!(attempts("ship", operation::STEP), 1);
    assert_eq!(attempts("reserve", operation::COMPENSATE), 2);
    for o in [outcome::COMPLETED, outcome::COMPENSATED, outcome::STUCK] {
        let sagas = capture.counter(SAGAS, &[(label::NAME, "order"), (label::OUTCOME, o)]);
        assert_eq!(sagas, 1, "{o}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn memory_steps_compensations_and_sagas_are_counted() {
    let capture = Capture::new();
    let orchestrator = capture.build(|| {
        Orchestrator::builder(saga(), MemoryStore::new())
            .build()
            .unwrap()
    });
    runtime().block_on(drive(&orchestrator));
    assert_counted(&capture);
}

#[test]
fn postgres_steps_compensations_and_sagas_are_counted() {
    let db = sd_testkit::database().expect("postgres must be installed");
    let capture = Capture::new();
    runtime().block_on(async {
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        let store = PostgresStore::builder()
            .table("metrics_sagas")
            .build(pool)
            .unwrap();
        store.migrate().await.unwrap();
        let orchestrator = capture.build(|| Orchestrator::builder(saga(), store).build().unwrap());
        drive(&orchestrator).await;
    });
    assert_counted(&capture);
}
