//! Feature `metrics`: every decision is counted once under its outcome, with the
//! documented name and labels, on memory and on Redis (healthy, killed, frozen).
#![cfg(all(feature = "metrics", feature = "redis"))]
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use std::time::Duration;

use sd_core::observe::{Capture, backend, label, outcome};
use sd_ratelimit::memory::{ManualClock, MemoryLimiterBuilder};
use sd_ratelimit::redis::{FailurePolicy, RedisLimiterBuilder};
use sd_ratelimit::{Limit, Quota};
use sd_testkit::runtime;

const DECISIONS: &str = "sd.ratelimit.decisions";
const BACKEND_DURATION: &str = "sd.ratelimit.backend.duration";

fn decisions(capture: &Capture, name: &str, backend: &str, outcome: &str) -> u64 {
    capture.counter(
        DECISIONS,
        &[
            (label::NAME, name),
            (label::BACKEND, backend),
            (label::OUTCOME, outcome),
        ],
    )
}

#[test]
fn memory_decisions_are_counted_by_outcome_on_every_path() {
    let capture = Capture::new();
    let clock = ManualClock::new();
    let quota = Limit::gcra(Quota::per_second(10).unwrap().with_burst(3).unwrap());
    let keyed = capture.build(|| {
        MemoryLimiterBuilder::new(quota)
            .name("login")
            .clock(clock.clone())
            .keyed::<String>()
            .unwrap()
    });
    for _ in 0..5 {
        keyed.check("203.0.113.7").unwrap();
    }
    // `allow` on a known key takes the fast path, which builds no decision.
    assert!(!keyed.allow("203.0.113.7"));
    let count = |o| decisions(&capture, "login", backend::MEMORY, o);
    // A memory decision is counted on a stripe of the thread's own and published in steps
    // of 64 per thread; `publish` brings every count up to date.
    assert_eq!((count(outcome::ALLOWED), count(outcome::DENIED)), (0, 0));
    sd_core::observe::publish();
    assert_eq!((count(outcome::ALLOWED), count(outcome::DENIED)), (3, 3));
    assert_eq!(count(outcome::SHADOW_DENIED), 0);

    let shadow = capture.build(|| {
        MemoryLimiterBuilder::new(quota)
            .name("dark")
            .shadow(true)
            .clock(clock.clone())
            .direct()
            .unwrap()
    });
    for _ in 0..5 {
        assert!(shadow.check().unwrap().allowed);
    }
    drop(shadow); // Dropping the limiter publishes too.
    let count = |o| decisions(&capture, "dark", backend::MEMORY, o);
    assert_eq!(
        (
            count(outcome::ALLOWED),
            count(outcome::SHADOW_DENIED),
            count(outcome::DENIED)
        ),
        (3, 2, 0)
    );

    // Many threads denying at once: each publishes its steps as it goes.
    let busy = capture.build(|| {
        MemoryLimiterBuilder::new(quota)
            .name("busy")
            .clock(clock.clone())
            .direct()
            .unwrap()
    });
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| (0..1_000).for_each(|_| drop(busy.check())));
        }
    });
    let count = |o| decisions(&capture, "busy", backend::MEMORY, o);
    let denied = count(outcome::DENIED);
    assert!(
        denied <= 3_997 && 3_997 - denied < 4 * 64,
        "{denied} in steps"
    );
    sd_core::observe::publish();
    assert_eq!(
        (count(outcome::ALLOWED), count(outcome::DENIED)),
        (3, 3_997)
    );
}

#[test]
fn redis_decisions_and_each_failure_policy_are_counted() {
    let mut server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let rt = runtime();
    let capture = Capture::new();
    let limit = Limit::gcra(Quota::per_minute(2).unwrap());
    let [open, closed, local] = rt.block_on(async {
        let timeout = Duration::from_millis(200);
        let conn = sd_testkit::redis_manager(&server.url(), timeout, timeout).await;
        [
            ("open", FailurePolicy::Open),
            ("closed", FailurePolicy::Closed),
            ("local", FailurePolicy::Local(limit)),
        ]
        .map(|(name, policy)| {
            capture.build(|| {
                RedisLimiterBuilder::new(limit)
                    .name(name)
                    .on_failure(policy)
                    .timeout(Duration::from_millis(300))
                    .build(conn.clone())
                    .unwrap()
            })
        })
    });
    rt.block_on(async {
        for _ in 0..3 {
            open.check("k").await.unwrap();
        }
    });
    let count = |name, o| decisions(&capture, name, backend::REDIS, o);
    assert_eq!(count("open", outcome::ALLOWED), 2);
    assert_eq!(count("open", outcome::DENIED), 1);
    let trips = capture.samples(BACKEND_DURATION, &[(label::NAME, "open")]);
    assert_eq!(trips.len(), 3, "one round trip a decision");
    assert!(trips.iter().all(|s| *s > 0.0 && *s < 60.0), "{trips:?}");

    server.pause().unwrap();
    rt.block_on(async {
        assert!(open.check("frozen").await.unwrap().allowed);
        assert!(!closed.check("frozen").await.unwrap().allowed);
        assert!(local.check("frozen").await.unwrap().allowed);
    });
    server.resume().unwrap();
    assert_eq!(count("open", outcome::FAIL_OPEN), 1);
    assert_eq!(count("closed", outcome::FAIL_CLOSED), 1);
    assert_eq!(count("local", outcome::FALLBACK), 1);
    // The fallback limiter's own decision is counted on memory under the same name (in
    // steps, so published first).
    sd_core::observe::publish();
    assert_eq!(
        decisions(&capture, "local", backend::MEMORY, outcome::ALLOWED),
        1
    );
    // A failed decision is counted once: the limit made none.
    assert_eq!(count("open", outcome::ALLOWED), 2);
    assert_eq!(count("closed", outcome::DENIED), 0);
}
