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

fn first(a: u32, _: u32) -> u32 {
    a
}

#[test]
fn groups_stay_on_one_side_of_the_pivot_and_versions_and_deadlines_are_checked() {
    let r = |name: &str| Step::retriable(name, ok);
    let err = Saga::builder("s")
        .parallel([c("a"), Step::pivot("p", ok)], first)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::PivotInGroup { step, .. } if step == "p"),
        "{err}"
    );
    assert!(err.to_string().contains("make it a step of its own"));
    // The pivot rules hold per branch: no retriable branch before the pivot, no
    // compensatable one after it.
    let err = Saga::builder("s")
        .parallel([c("a"), r("b")], first)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::RetriableBeforePivot { step, .. } if step == "b"));
    let err = Saga::builder("s")
        .step(Step::pivot("p", ok))
        .parallel([r("a"), c("b")], first)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::CompensatableAfterPivot { step, .. } if step == "b"));
    let err = Saga::builder("s")
        .parallel(Vec::<Step<u32>>::new(), first)
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "parallel",
            ..
        }
    ));
    let err = Saga::builder("s")
        .step(c("a"))
        .version(0)
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "version",
            ..
        }
    ));
    let err = Saga::builder("s")
        .step(c("a"))
        .deadline(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "deadline",
            ..
        }
    ));
    let saga = Saga::builder("s")
        .step(c("a"))
        .parallel([c("b"), c("c")], first)
        .step(Step::pivot("p", ok))
        .parallel([r("d"), r("e")], first)
        .version(3)
        .build()
        .unwrap();
    assert_eq!(saga.groups(), [1..3, 4..6]);
    assert_eq!(saga.version(), 3);
    let forward_only: Vec<bool> = saga.layout.stages.iter().map(|s| s.forward_only).collect();
    assert_eq!(forward_only, [false, false, false, true]);
}
