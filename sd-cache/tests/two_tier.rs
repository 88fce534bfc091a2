//! The two-tier cache against a real Redis, with independent instances (each its own
//! connections, subscription and lease): a write waits for an instance that does not
//! acknowledge (until its lease runs out or it acknowledges), typed errors and a cleared
//! memory tier across Redis killed, restarted and frozen, settings, leaving the registry,
//! and write-through. The staleness checker is in `two_tier_staleness.rs`.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;
use sd_cache::{Error, RedisCache, TwoTier};

mod common;
mod two_tier_common;
use common::{Rows, eventually, manager_with_timeout, runtime};
use two_tier_common::{Fleet, instance, on_fleet, until_serving};

/// The server's clock, in milliseconds (the clock leases are written in).
async fn server_ms(admin: &mut ConnectionManager) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(admin).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Registers `ghost` with a lease that runs `lease_ms` past the server's clock, as a live
/// instance would; returns the lease's expiry (server ms).
async fn register_ghost(
    admin: &mut ConnectionManager,
    prefix: &str,
    ghost: &str,
    lease_ms: u64,
) -> u64 {
    let expiry = server_ms(admin).await + lease_ms;
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{prefix}:two-tier:instances"))
        .arg(ghost)
        .arg(expiry)
        .query_async(admin)
        .await
        .unwrap();
    expiry
}

/// An instance registered with a live lease that never acknowledges (a frozen process):
/// the write waits until that lease has run out on the server's clock (the ghost has
/// provably stopped serving from memory by then), then returns; it does not fail or hang.
/// A writer that ignored unacknowledged instances returns at once and fails here.
#[test]
fn a_write_waits_out_an_instance_that_never_acknowledges() {
    on_fleet(2, |Fleet { url, prefix, tiers }| async move {
        let (a, b) = (&tiers[0], &tiers[1]);
        until_serving(&tiers, true).await;
        let mut admin = manager_with_timeout(&url, Duration::from_secs(2)).await;
        let expiry = register_ghost(&mut admin, &prefix, "ghost", 3_000).await;
        assert_eq!(b.get_or_load("k", || async { 1 }).await.unwrap(), 1);
        let started = server_ms(&mut admin).await;
        assert!(
            started < expiry,
            "the ghost's lease is live when the write starts ({started} >= {expiry})"
        );
        tokio::time::timeout(Duration::from_secs(20), a.insert("k", &2))
            .await
            .expect("bounded by the ghost's lease")
            .unwrap();
        let returned = server_ms(&mut admin).await;
        assert!(
            returned >= expiry,
            "the write returned at server time {returned}, before the silent instance's lease ran out at {expiry}"
        );
        assert_eq!(b.get("k").await.unwrap(), Some(2));
    });
}

/// An instance whose lease outlives the test's hang guard acknowledges the write only
/// after it received the announcement: the write returns on that acknowledgement (not on
/// the lease), and not before it was sent.
#[test]
fn a_write_returns_once_a_slow_instance_acknowledges() {
    on_fleet(1, |Fleet { url, prefix, tiers }| async move {
        let a = &tiers[0];
        until_serving(&tiers, true).await;
        let mut admin = manager_with_timeout(&url, Duration::from_secs(2)).await;
        // The ghost listens on the invalidation channel as an instance does.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub
            .subscribe(format!("{prefix}:two-tier"))
            .await
            .unwrap();
        register_ghost(&mut admin, &prefix, "ghost", 120_000).await;
        let acked = Arc::new(AtomicBool::new(false));
        let write = {
            let (a, acked) = (a.clone(), acked.clone());
            tokio::spawn(async move {
                a.insert("k", &2).await.unwrap();
                acked.load(Ordering::SeqCst)
            })
        };
        let mut messages = pubsub.on_message();
        let announcement = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let msg = messages.next().await.expect("the subscription stays up");
                let payload: String = msg.get_payload().unwrap();
                if payload.starts_with("i|") {
                    break payload;
                }
            }
        })
        .await
        .expect("the write is announced");
        // i|writer|seq|key
        let mut parts = announcement.splitn(4, '|').skip(1);
        let (writer, seq, key) = (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        );
        assert_eq!((writer.as_str(), key.as_str()), (a.instance_id(), "k"));
        assert!(!write.is_finished(), "the write waits for the ghost");
        acked.store(true, Ordering::SeqCst);
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{prefix}:two-tier:ack:{writer}"))
            .arg(format!("{seq}|ghost"))
            .query_async(&mut admin)
            .await
            .unwrap();
        let returned_after_ack = tokio::time::timeout(Duration::from_secs(20), write)
            .await
            .expect("the acknowledgement releases the write, long before the ghost's lease")
            .unwrap();
        assert!(
            returned_after_ack,
            "the write returned before the ghost acknowledged"
        );
    });
}

/// Redis killed: typed errors, and reads go to the loader where configured; restarted
/// empty: the memory tier was cleared, so the old value is not served from memory; frozen
/// (SIGSTOP): the memory tier stops serving once the lease lapses, then resumes, cleared.
#[test]
fn redis_killed_restarted_or_frozen_typed_errors_fallback_and_a_cleared_memory_tier() {
    let mut server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let url = server.url();
    let rt = runtime();
    let (strict, lenient) = rt.block_on(async {
        let strict = instance(&url, "tt-fault", false).await;
        let lenient = instance(&url, "tt-fault", true).await;
        until_serving(&[strict.clone(), lenient.clone()], true).await;
        strict.insert("k", &1).await.unwrap();
        assert_eq!(lenient.get_or_load("k", || async { 0 }).await.unwrap(), 1);
        assert_eq!(lenient.get("k").await.unwrap(), Some(1));
        (strict, lenient)
    });
    let resyncs = lenient.resyncs();

    server.kill().unwrap();
    rt.block_on(async {
        until_serving(std::slice::from_ref(&lenient), false).await;
        assert!(matches!(strict.get("k").await, Err(Error::Backend { .. })));
        let err = strict.insert("k", &3).await.unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        assert_eq!(
            lenient.get_or_load("k", || async { 2 }).await.unwrap(),
            2,
            "the loader answers around the dead server"
        );
    });

    server.start_again().unwrap();
    rt.block_on(async {
        until_serving(std::slice::from_ref(&lenient), true).await;
        assert!(lenient.resyncs() > resyncs, "the memory tier was cleared");
        // The restarted server is empty: the loader's value, not the 1 held in memory before.
        assert_eq!(lenient.get_or_load("k", || async { 4 }).await.unwrap(), 4);
        assert_eq!(lenient.get("k").await.unwrap(), Some(4));
    });

    let resyncs = lenient.resyncs();
    server.pause().unwrap();
    rt.block_on(async {
        until_serving(std::slice::from_ref(&lenient), false).await;
        assert!(matches!(strict.get("k").await, Err(Error::Backend { .. })));
        assert_eq!(lenient.get_or_load("k", || async { 5 }).await.unwrap(), 5);
    });
    server.resume().unwrap();
    rt.block_on(async {
        until_serving(std::slice::from_ref(&lenient), true).await;
        assert!(
            lenient.resyncs() > resyncs,
            "cleared again after the freeze"
        );
        assert_eq!(
            lenient.get("k").await.unwrap(),
            Some(4),
            "Redis kept its value"
        );
    });
}

#[test]
fn invalid_settings_fail_at_build_naming_the_field() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    runtime().block_on(async {
        let conn = manager_with_timeout(server.url(), Duration::from_secs(2)).await;
        let client = redis::Client::open(server.url()).unwrap();
        let b = || TwoTier::builder(RedisCache::<u64>::builder("p").ttl(Duration::from_secs(10)));
        for (builder, field) in [
            (b().lease(Duration::from_millis(5)), "lease"),
            (b().local_ttl(Duration::ZERO), "local_ttl"),
            (b().local_ttl(Duration::from_secs(11)), "local_ttl"),
        ] {
            match builder.build(conn.clone(), client.clone()).await {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // On a cluster the shard subscription speaks plain TCP: a Unix-socket (or TLS)
        // client is refused before anything connects.
        let unix = redis::Client::open("redis+unix:///tmp/sd-cache-no-such.sock").unwrap();
        match b().build_on_cluster(conn.clone(), unix).await {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "pubsub"),
            other => panic!("pubsub: {other:?}"),
        }
    });
}

/// A dropped instance leaves the registry, so writers stop waiting for it.
#[test]
fn a_dropped_instance_leaves_the_registry() {
    on_fleet(
        2,
        |Fleet {
             url,
             prefix,
             mut tiers,
         }| async move {
            let b = tiers.pop().unwrap();
            let a = &tiers[0];
            let id = b.instance_id().to_owned();
            let mut admin = manager_with_timeout(&url, Duration::from_secs(2)).await;
            let registry = format!("{prefix}:two-tier:instances");
            let registered = |admin: &mut ConnectionManager| {
                let mut admin = admin.clone();
                let (registry, id) = (registry.clone(), id.clone());
                async move {
                    redis::cmd("HEXISTS")
                        .arg(registry)
                        .arg(id)
                        .query_async::<bool>(&mut admin)
                        .await
                        .unwrap()
                }
            };
            assert!(registered(&mut admin).await);
            drop(b);
            eventually("the registry drops the dropped instance", || {
                let held = registered(&mut admin);
                async move { !held.await }
            })
            .await;
            a.insert("k", &1).await.unwrap();
        },
    );
}

/// Write-through over the two-tier cache: once `write` returns, another instance that held
/// the old value in memory reads the new one.
#[test]
fn write_through_over_two_tier_is_read_fresh_by_another_instance() {
    on_fleet(2, |Fleet { tiers, .. }| async move {
        let (a, b) = (&tiers[0], &tiers[1]);
        until_serving(&tiers, true).await;
        let through = sd_cache::WriteThrough::new(a.clone(), Rows::default());
        through.write("k".to_owned(), 1).await.unwrap();
        assert_eq!(b.get("k").await.unwrap(), Some(1));
        let hits = b.stats().hits;
        assert_eq!(b.get("k").await.unwrap(), Some(1));
        assert_eq!(b.stats().hits, hits + 1, "b holds it in memory");
        through.write("k".to_owned(), 2).await.unwrap();
        assert_eq!(b.get("k").await.unwrap(), Some(2), "not the copy b held");
        through.delete("k".to_owned()).await.unwrap();
        assert_eq!(b.get("k").await.unwrap(), None);
    });
}

/// A memory hit is answered when the call is made: the future is ready on its first poll
/// and small (the Redis read's future is boxed, built only on a miss).
#[test]
fn a_memory_hit_is_a_small_ready_future() {
    use futures::FutureExt;

    on_fleet(1, |Fleet { tiers, .. }| async move {
        let tier = &tiers[0];
        until_serving(&tiers, true).await;
        tier.insert("k", &7).await.unwrap();
        assert_eq!(
            tier.get("k").await.unwrap(),
            Some(7),
            "fills the memory tier"
        );
        let hits = tier.stats().hits;
        let get = tier.get("k");
        assert!(
            std::mem::size_of_val(&get) <= 96,
            "{} bytes",
            std::mem::size_of_val(&get)
        );
        assert_eq!(get.now_or_never().unwrap().unwrap(), Some(7));
        let load = tier.get_or_load("k", || async { 0 });
        assert!(std::mem::size_of_val(&load) <= 96);
        assert_eq!(load.now_or_never().unwrap().unwrap(), 7);
        assert_eq!(tier.stats().hits, hits + 2);
    });
}
