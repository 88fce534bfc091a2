//! The Kafka-API broker (tansu) answers, pauses, dies and comes back as the docs of
//! `sd_testkit::kafka` say: the SQLite engine keeps its topics across `kill -9`, the
//! memory engine keeps nothing.
#![allow(clippy::unwrap_used)]

use sd_testkit::eventually_blocking as eventually;
use sd_testkit::kafka::api_versions;
use sd_testkit::{KafkaBroker, is_alive, is_stopped};

#[test]
fn durable_broker_pauses_survives_kill_and_restarts_clean() {
    let mut kafka = KafkaBroker::start_durable().expect("start tansu");
    kafka.create_topic("orders", 3).unwrap();
    kafka.create_topic("orders-dlq", 1).unwrap();
    assert_eq!(kafka.topics().unwrap(), ["orders", "orders-dlq"]);

    let pid = kafka.pid().unwrap();
    kafka.pause().unwrap();
    eventually("the broker is stopped", || is_stopped(pid));
    assert_eq!(
        api_versions(kafka.port()),
        None,
        "a paused broker answers nothing"
    );
    kafka.resume().unwrap();
    assert!(api_versions(kafka.port()).is_some_and(|apis| apis > 10));

    kafka.kill().unwrap();
    assert!(!is_alive(pid));
    assert_eq!(
        api_versions(kafka.port()),
        None,
        "a killed broker answers nothing"
    );
    kafka.start_again().unwrap();
    assert_eq!(
        kafka.topics().unwrap(),
        ["orders", "orders-dlq"],
        "the SQLite engine keeps its topics across kill -9"
    );

    kafka.restart_clean().unwrap();
    assert!(
        kafka.topics().unwrap().is_empty(),
        "restart_clean empties it"
    );
    let dir = kafka.process().dir().to_owned();
    drop(kafka);
    assert!(!dir.exists(), "dropping the handle removes its directory");
    assert!(!is_alive(pid));
}

#[test]
fn memory_broker_forgets_everything_when_killed() {
    let mut kafka = KafkaBroker::start().expect("start tansu");
    kafka.create_topic("events", 12).unwrap();
    assert_eq!(kafka.topics().unwrap(), ["events"]);
    kafka.kill().unwrap();
    kafka.start_again().unwrap();
    assert!(
        kafka.topics().unwrap().is_empty(),
        "the memory engine keeps nothing"
    );
}

#[test]
fn two_brokers_do_not_share_topics() {
    let a = KafkaBroker::start().expect("start tansu");
    let b = KafkaBroker::start().expect("start tansu");
    assert_ne!(a.port(), b.port());
    a.create_topic("only-in-a", 1).unwrap();
    assert_eq!(a.topics().unwrap(), ["only-in-a"]);
    assert!(b.topics().unwrap().is_empty());
}
