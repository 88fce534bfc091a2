//! The tour, run as CI runs it (memory, no server) and on Redis + PostgreSQL started by
//! the testkit: every fact its scenarios state must hold (it counts the ones that do not).
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../tour.rs"]
mod tour;

#[test]
fn tour_on_memory() {
    assert_eq!(tour::run(None, None), 0, "see the lines marked !!");
}

#[test]
fn tour_on_redis_and_postgres() {
    let redis = sd_testkit::redis().expect("redis-server");
    let db = sd_testkit::database().expect("postgres");
    let failures = tour::run(Some(redis.url().to_owned()), Some(db.url().to_owned()));
    assert_eq!(failures, 0, "see the lines marked !!");
}
