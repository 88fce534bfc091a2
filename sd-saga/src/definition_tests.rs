//! Unit tests of the definition checks.
#![allow(clippy::unwrap_used)]
use super::*;

fn ok(_: StepContext, d: u32) -> BoxFuture<Result<u32, StepError>> {
    Box::pin(async move { Ok(d) })
}
fn undo(_: StepContext, _: u32) -> BoxFuture<Result<(), StepError>> {
    Box::pin(async { Ok(()) })
}
fn c(name: &str) -> Step<u32> {
    Step::compensatable(name, ok, undo)
}

#[test]
fn the_pivot_rules_are_checked_when_built() {
    let err = Saga::<u32>::builder("s").build().unwrap_err();
    assert!(matches!(err, Error::NoSteps { saga } if saga == "s"));
    let err = Saga::builder("s")
        .step(c("a"))
        .step(Step::pivot("p", ok))
        .step(c("b"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::CompensatableAfterPivot { step, pivot, .. } if step == "b" && pivot == "p"),
        "{err}"
    );
    assert!(err.to_string().contains("`b` comes after the pivot `p`"));
    let err = Saga::builder("s")
        .step(c("a"))
        .step(Step::retriable("r", ok))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::RetriableBeforePivot { step, .. } if step == "r"));
    let err = Saga::builder("s")
        .step(Step::pivot("p", ok))
        .step(Step::pivot("q", ok))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::SecondPivot { step, first, .. } if step == "q" && first == "p"));
    let err = Saga::builder("s")
        .step(c("a"))
        .step(c("a"))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateStep { step, .. } if step == "a"));
    let err = Saga::builder("s")
        .step(c("a").timeout(Duration::ZERO))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::StepConfig { field: "timeout", step, .. } if step == "a"));
    let saga = Saga::builder("s")
        .step(c("a"))
        .step(Step::pivot("p", ok))
        .step(Step::retriable("r", ok))
        .build()
        .unwrap();
    let kinds: Vec<_> = saga.steps().map(|(_, k)| k).collect();
    assert_eq!(
        kinds,
        [
            StepKind::Compensatable,
            StepKind::Pivot,
            StepKind::Retriable
        ]
    );
}

#[test]
fn keys_differ_by_step_and_direction() {
    assert_eq!(
        idempotency_key("order-1", 2, Direction::Compensate),
        "order-1/2/compensate"
    );
    assert_ne!(
        idempotency_key("a", 1, Direction::Forward),
        idempotency_key("a", 1, Direction::Compensate)
    );
}
