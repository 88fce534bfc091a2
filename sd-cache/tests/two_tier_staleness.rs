//! The two-tier staleness checker against a real Redis, with independent instances (each
//! its own connections, subscription and lease): a write that returned is never read stale
//! from another instance's memory tier, under concurrent writes and reads, across dropped
//! subscriptions, and across Redis killed and restarted or frozen and resumed mid-load.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

mod common;
mod two_tier_common;
use common::{manager_with_timeout, runtime};
use two_tier_common::oracle::check_no_stale_reads;
use two_tier_common::{Fleet, Tier, instances, on_fleet, until_serving};

#[test]
fn a_write_that_returned_is_never_read_stale_from_another_instance() {
    on_fleet(
        4,
        |Fleet {
             tiers: instances, ..
         }| async move {
            until_serving(&instances, true).await;
            check_no_stale_reads(instances.clone(), 150, |_| async {}).await;
            let local_hits: u64 = instances.iter().map(|i| i.stats().hits).sum();
            assert!(local_hits > 0, "the memory tier answered reads");
        },
    );
}

/// Every subscription is killed by the server, repeatedly, while writes and reads go on:
/// each instance resyncs (clears its memory tier) and no stale read gets through.
#[test]
fn dropped_subscriptions_resync_and_no_stale_read_gets_through() {
    on_fleet(
        3,
        |Fleet {
             url,
             tiers: instances,
             ..
         }| async move {
            check_no_stale_reads(instances.clone(), 120, move |_| async move {
                let mut admin = manager_with_timeout(&url, Duration::from_secs(2)).await;
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(80)).await;
                    let _: i64 = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg("pubsub")
                        .query_async(&mut admin)
                        .await
                        .unwrap();
                }
            })
            .await;
            for i in &instances {
                assert!(
                    i.resyncs() >= 2,
                    "first lease plus at least one lost subscription"
                );
                until_serving(std::slice::from_ref(i), true).await;
            }
        },
    );
}

/// Independent instances on their own server, half strict and half reading around a dead
/// server with the loader.
async fn instances_on(url: &str, n: usize) -> Vec<Tier> {
    let prefix = sd_testkit::unique_name("two-tier");
    let instances = instances(url, &prefix, n, |i| i % 2 == 1).await;
    until_serving(&instances, true).await;
    instances
}

/// Runs a blocking testkit call on `server` off the runtime's workers.
async fn with_server(
    server: sd_testkit::RedisServer,
    call: fn(&mut sd_testkit::RedisServer) -> sd_testkit::Result<()>,
) -> sd_testkit::RedisServer {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        call(&mut server).unwrap();
        server
    })
    .await
    .unwrap()
}

/// Runs the staleness checker on four instances of a server of their own while `fault`
/// hits that server mid-load and `recover` undoes it: reads and writes fail during the
/// fault, every instance stops serving from memory, then serves again after `recover`.
fn no_stale_read_across(
    fault: fn(&mut sd_testkit::RedisServer) -> sd_testkit::Result<()>,
    recover: fn(&mut sd_testkit::RedisServer) -> sd_testkit::Result<()>,
) {
    let server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let url = server.url();
    runtime().block_on(async {
        let instances = instances_on(&url, 4).await;
        let load = instances.clone();
        // The server lives until the load is over.
        let _server = check_no_stale_reads(load, 150, move |probe| async move {
            probe.fault_begins();
            let server = with_server(server, fault).await;
            probe.until_the_fault_hits(&instances).await;
            let server = with_server(server, recover).await;
            until_serving(&instances, true).await;
            probe.fault_ends();
            server
        })
        .await;
    });
}

/// Redis killed mid-load (its data gone) and started again: no read after a write that
/// returned sees the older value (instances that missed invalidations while unsubscribed
/// resync before serving from memory again).
#[test]
fn no_stale_read_across_redis_killed_and_restarted() {
    no_stale_read_across(
        sd_testkit::RedisServer::kill,
        sd_testkit::RedisServer::start_again,
    );
}

/// Redis frozen (SIGSTOP) mid-load until calls time out and every instance stopped serving
/// from memory, then resumed: no read after a write that returned sees the older value.
#[test]
fn no_stale_read_across_redis_frozen_and_resumed() {
    no_stale_read_across(
        sd_testkit::RedisServer::pause,
        sd_testkit::RedisServer::resume,
    );
}
