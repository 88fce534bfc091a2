//! Redlock against real independent masters: the shared suite, quorum with masters
//! killed, a master restarted empty.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{manager, runtime};

use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_lock::conformance;
use sd_lock::redlock::{NodeFailure, Redlock, RedlockBuilder};
use sd_lock::{Error, Lock, Release};
use sd_testkit::RedisServer;

async fn redlock(servers: &[RedisServer]) -> Redlock<ConnectionManager> {
    let mut masters = Vec::new();
    for s in servers {
        masters.push((s.url(), manager(&s.url()).await));
    }
    Redlock::new(masters).unwrap()
}

fn exists(server: &RedisServer, key: &str) -> bool {
    matches!(
        server.command(&["EXISTS", key]).unwrap(),
        sd_testkit::resp::Reply::Integer(1)
    )
}

#[test]
fn mutual_exclusion_32_tasks_200_sections_on_3_masters() {
    let servers = RedisServer::start_many(3).expect("redis-server");
    runtime().block_on(async {
        let lock = redlock(&servers).await.with_retry(common::backoff(
            Duration::from_micros(200),
            Duration::from_millis(3),
        ));
        common::every_section_lands(lock, 32, 200).await;
    });
}

#[test]
fn contract_on_5_masters() {
    let servers = RedisServer::start_many(5).expect("redis-server");
    runtime().block_on(async {
        let lock = redlock(&servers).await;
        assert_eq!(lock.quorum(), 3);
        // A TTL of 2 s gives each master a 100 ms timeout: enough on a loaded CI machine.
        conformance::contract(&lock, "contract", Duration::from_secs(2)).await;
        conformance::cancelled_acquire_leaves_nothing(&lock, "cancel", true).await;
    });
}

#[test]
fn two_masters_down_still_acquires_three_down_fails_cleanly() {
    let mut servers = RedisServer::start_many(5).expect("redis-server");
    let rt = runtime();
    let lock = rt.block_on(redlock(&servers));
    let ttl = Duration::from_secs(2);
    servers[0].kill().unwrap();
    servers[1].kill().unwrap();
    rt.block_on(async {
        let lease = lock.try_acquire("q", ttl).await.unwrap();
        let key = lock.key("q");
        for s in &servers[2..] {
            assert!(exists(s, &key));
        }
        assert_eq!(lock.release(lease).await.unwrap(), Release::Released);
    });
    servers[2].kill().unwrap();
    rt.block_on(async {
        // Two live masters grant it, short of the quorum: the attempt must release
        // them before it returns, and name the three that failed.
        match lock.try_acquire("q", ttl).await {
            Err(Error::NoQuorum {
                acquired,
                needed,
                failures,
                ..
            }) => {
                assert_eq!((acquired, needed), (2, 3));
                let down: Vec<_> = failures.iter().map(NodeFailure::node).collect();
                assert_eq!(down.len(), 3);
                for s in &servers[..3] {
                    assert!(down.contains(&s.url().as_str()), "{down:?}");
                }
                for f in &failures {
                    assert!(
                        matches!(f, NodeFailure::Failed { .. } | NodeFailure::TimedOut { .. }),
                        "{f}"
                    );
                }
            }
            other => panic!("expected no quorum, got {other:?}"),
        }
        let key = lock.key("q");
        for s in &servers[3..] {
            assert!(!exists(s, &key), "partial key left on {}", s.url());
        }
        // `acquire` gives up within its wait with the last no-quorum report.
        match lock.acquire("q", ttl, Duration::from_millis(300)).await {
            Err(Error::WaitTimeout { last, .. }) => {
                assert!(matches!(*last, Error::NoQuorum { .. }));
            }
            other => panic!("expected a wait timeout, got {other:?}"),
        }
        for s in &servers[3..] {
            assert!(!exists(s, &key), "partial key left on {}", s.url());
        }
    });
}

/// Script calls (`EVALSHA` and `EVAL`) a server has run so far.
fn script_calls(server: &RedisServer) -> u64 {
    let info = server
        .command(&["INFO", "commandstats"])
        .unwrap()
        .as_text()
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A miss where every master answered "held by another" set nothing, so it sends no
/// release; a miss with some grants releases them, leaving the other holder's keys.
#[test]
fn a_miss_releases_only_what_it_may_have_set() {
    let servers = RedisServer::start_many(3).expect("redis-server");
    runtime().block_on(async {
        let lock = redlock(&servers).await;
        let ttl = Duration::from_secs(5);
        let held = lock.try_acquire("busy", ttl).await.unwrap();
        let before: Vec<u64> = servers.iter().map(script_calls).collect();
        match lock.try_acquire("busy", ttl).await {
            Err(Error::NoQuorum {
                acquired: 0,
                failures,
                ..
            }) => assert!(
                failures
                    .iter()
                    .all(|f| matches!(f, NodeFailure::Held { .. }))
            ),
            other => panic!("expected a miss on every master, got {other:?}"),
        }
        let after: Vec<u64> = servers.iter().map(script_calls).collect();
        assert_eq!(
            before, after,
            "a release was sent for a miss that set nothing"
        );

        // Another holder on two masters only: ours is granted on the third, short of
        // the quorum, and must be released there.
        let key = lock.key("split");
        for s in &servers[..2] {
            s.command(&["SET", &key, "someone-else", "PX", "5000"])
                .unwrap();
        }
        assert!(matches!(
            lock.try_acquire("split", ttl).await,
            Err(Error::NoQuorum { acquired: 1, .. })
        ));
        assert!(
            !exists(&servers[2], &key),
            "the lone grant was not released"
        );
        for s in &servers[..2] {
            assert!(exists(s, &key), "another holder's key was touched");
        }
        assert_eq!(lock.release(held).await.unwrap(), Release::Released);
    });
}

/// The documented weakness: masters that restart empty within a TTL forget the lease.
/// One empty restart is absorbed by the quorum; three let a second holder in while the
/// first is still valid. The token still increases, so the fence refuses the first
/// holder's writes.
#[test]
fn masters_restarted_empty() {
    let mut servers = RedisServer::start_many(5).expect("redis-server");
    let rt = runtime();
    let lock = rt.block_on(redlock(&servers));
    let ttl = Duration::from_secs(30);
    let a = rt.block_on(lock.try_acquire("r", ttl)).unwrap();
    servers[0].restart_clean().unwrap();
    rt.block_on(async {
        // 4 of 5 still hold A's key: B cannot get 3.
        for _ in 0..3 {
            match lock.try_acquire("r", ttl).await {
                Err(Error::NoQuorum { acquired, .. }) => assert!(acquired <= 1),
                other => panic!("B got the lock with one master lost: {other:?}"),
            }
        }
    });
    servers[1].restart_clean().unwrap();
    servers[2].restart_clean().unwrap();
    rt.block_on(async {
        let b = lock
            .acquire("r", ttl, Duration::from_secs(10))
            .await
            .expect("three empty masters grant B the lock");
        assert!(
            a.is_valid(),
            "A is still within its validity: two holders at once"
        );
        assert!(b.token() > a.token());
        let register = sd_lock::fence::FencedRegister::new(0);
        register.write(b.token(), 1).unwrap();
        assert!(matches!(
            register.write(a.token(), 2),
            Err(Error::StaleToken { .. })
        ));
        assert_eq!(lock.release(b).await.unwrap(), Release::Released);
    });
}

#[test]
fn bad_configuration_is_typed() {
    let servers = RedisServer::start_many(1).expect("redis-server");
    runtime().block_on(async {
        let empty: Vec<(String, ConnectionManager)> = Vec::new();
        assert!(matches!(
            Redlock::new(empty),
            Err(Error::InvalidConfig {
                field: "masters",
                ..
            })
        ));
        let field = |b: RedlockBuilder<ConnectionManager>| match b.build() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let conn = manager(&servers[0].url()).await;
        let b = || Redlock::builder([("a", conn.clone())]);
        assert_eq!(field(b().timeout_factor(0.0)), "timeout_factor");
        assert_eq!(field(b().timeout_factor(f64::NAN)), "timeout_factor");
        assert_eq!(field(b().node_timeout(Duration::ZERO)), "node_timeout");
        assert_eq!(field(b().prefix("a{b")), "prefix");
        assert_eq!(field(b().prefix("lock:")), "prefix");
        let lock = redlock(&servers).await;
        assert_eq!(
            lock.node_timeout(Duration::from_secs(10)),
            Duration::from_millis(500)
        );
    });
}
