//! The two-tier cache against a real Redis, with independent instances (each its own
//! connections, subscription and lease): a write that returned is never read stale from
//! another instance's memory tier, under concurrent writes and reads, across dropped
//! subscriptions, with an instance that never acknowledges, and across Redis killed,
//! restarted and frozen.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_cache::{Error, RedisCache, TwoTier};

mod common;
use common::{eventually, manager_with_timeout, runtime};

type Tier = TwoTier<u64, ConnectionManager>;

/// An independent instance ("process"): its own command connection, subscription and lease.
async fn instance(url: &str, prefix: &str, fallback: bool) -> Tier {
    TwoTier::builder(
        RedisCache::builder(prefix)
            .ttl(Duration::from_secs(30))
            .fallback_to_loader(fallback),
    )
    .local_ttl(Duration::from_secs(10))
    .lease(Duration::from_millis(600))
    .build(
        manager_with_timeout(url, Duration::from_secs(2)).await,
        redis::Client::open(url).unwrap(),
    )
    .await
    .unwrap()
}

/// The system of record: one version number per key, written before the cache.
struct Db {
    rows: Vec<AtomicU64>,
    /// The highest version whose cache write (insert or invalidate) has returned.
    committed: Vec<AtomicU64>,
}

/// The checker: writers bump each key's version (store first, then the cache: `insert` or
/// `invalidate` in turn) through rotating instances; readers on every instance note the
/// committed version *before* each read and assert the read is not older. Runs while
/// `disturb` runs alongside.
async fn check_no_stale_reads<D, Fut>(instances: Vec<Tier>, writes_per_key: u64, disturb: D)
where
    D: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    const KEYS: usize = 3;
    let db = Arc::new(Db {
        rows: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
        committed: (0..KEYS).map(|_| AtomicU64::new(0)).collect(),
    });
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..32 {
        let (cache, db, done, reads) = (
            instances[r % instances.len()].clone(),
            db.clone(),
            done.clone(),
            reads.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut i = r;
            while !done.load(Ordering::SeqCst) {
                let k = i % KEYS;
                i += 1;
                let floor = db.committed[k].load(Ordering::SeqCst);
                let key = format!("k{k}");
                let seen = if i % 3 == 0 {
                    cache.get(&key).await.unwrap()
                } else {
                    let db = db.clone();
                    Some(
                        cache
                            .get_or_load(
                                &key,
                                move || async move { db.rows[k].load(Ordering::SeqCst) },
                            )
                            .await
                            .unwrap(),
                    )
                };
                if let Some(seen) = seen {
                    assert!(
                        seen >= floor,
                        "{key}: read {seen} after version {floor} was committed"
                    );
                }
                reads.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let mut writers = Vec::new();
    for k in 0..KEYS {
        let (instances, db) = (instances.clone(), db.clone());
        writers.push(tokio::spawn(async move {
            let key = format!("k{k}");
            for v in 1..=writes_per_key {
                let cache = &instances[(v as usize + k) % instances.len()];
                db.rows[k].store(v, Ordering::SeqCst);
                if v % 2 == 0 {
                    cache.insert(&key, &v).await.unwrap();
                } else {
                    cache.invalidate(&key).await.unwrap();
                }
                db.committed[k].store(v, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    disturb().await;
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_write_that_returned_is_never_read_stale_from_another_instance() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let mut instances = Vec::new();
        for _ in 0..4 {
            instances.push(instance(server.url(), &prefix, false).await);
        }
        for i in &instances {
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
        check_no_stale_reads(instances.clone(), 150, || async {}).await;
        let local_hits: u64 = instances.iter().map(|i| i.stats().hits).sum();
        assert!(local_hits > 0, "the memory tier answered reads");
    });
}

/// Every subscription is killed by the server, repeatedly, while writes and reads go on:
/// each instance resyncs (clears its memory tier) and no stale read gets through.
#[test]
fn dropped_subscriptions_resync_and_no_stale_read_gets_through() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let mut instances = Vec::new();
        for _ in 0..3 {
            instances.push(instance(server.url(), &prefix, false).await);
        }
        let url = server.url().to_owned();
        check_no_stale_reads(instances.clone(), 120, || async move {
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
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
    });
}

/// An instance registered with a live lease that never acknowledges (a frozen process):
/// writes wait for its lease to lapse, then return; they do not fail or hang.
#[test]
fn a_write_waits_out_an_instance_that_never_acknowledges() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let a = instance(server.url(), &prefix, false).await;
        let b = instance(server.url(), &prefix, false).await;
        let mut admin = manager_with_timeout(server.url(), Duration::from_secs(2)).await;
        let now: (u64, u64) = redis::cmd("TIME").query_async(&mut admin).await.unwrap();
        let now_ms = now.0 * 1000 + now.1 / 1000;
        let _: i64 = redis::cmd("HSET")
            .arg(format!("{prefix}:two-tier:instances"))
            .arg("ghost")
            .arg(now_ms + 1_000)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(b.get_or_load("k", || async { 1 }).await.unwrap(), 1);
        tokio::time::timeout(Duration::from_secs(20), a.insert("k", &2))
            .await
            .expect("bounded by the ghost's lease")
            .unwrap();
        assert_eq!(b.get("k").await.unwrap(), Some(2));
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
        for i in [&strict, &lenient] {
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
        strict.insert("k", &1).await.unwrap();
        assert_eq!(lenient.get_or_load("k", || async { 0 }).await.unwrap(), 1);
        assert_eq!(lenient.get("k").await.unwrap(), Some(1));
        (strict, lenient)
    });
    let resyncs = lenient.resyncs();

    server.kill().unwrap();
    rt.block_on(async {
        let l = lenient.clone();
        eventually("not serving from memory", move || {
            std::future::ready(!l.is_serving_local())
        })
        .await;
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
        let l = lenient.clone();
        eventually("serving from memory again", move || {
            std::future::ready(l.is_serving_local())
        })
        .await;
        assert!(lenient.resyncs() > resyncs, "the memory tier was cleared");
        // The restarted server is empty: the loader's value, not the 1 held in memory before.
        assert_eq!(lenient.get_or_load("k", || async { 4 }).await.unwrap(), 4);
        assert_eq!(lenient.get("k").await.unwrap(), Some(4));
    });

    let resyncs = lenient.resyncs();
    server.pause().unwrap();
    rt.block_on(async {
        let l = lenient.clone();
        eventually("not serving from memory", move || {
            std::future::ready(!l.is_serving_local())
        })
        .await;
        assert!(matches!(strict.get("k").await, Err(Error::Backend { .. })));
        assert_eq!(lenient.get_or_load("k", || async { 5 }).await.unwrap(), 5);
    });
    server.resume().unwrap();
    rt.block_on(async {
        let l = lenient.clone();
        eventually("serving from memory again", move || {
            std::future::ready(l.is_serving_local())
        })
        .await;
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
    });
}

/// A dropped instance leaves the registry, so writers stop waiting for it.
#[test]
fn a_dropped_instance_leaves_the_registry() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let a = instance(server.url(), &prefix, false).await;
        let b = instance(server.url(), &prefix, false).await;
        let id = b.instance_id().to_owned();
        let mut admin = manager_with_timeout(server.url(), Duration::from_secs(2)).await;
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
    });
}

/// A store that records what it was given.
#[derive(Default)]
struct Rows(std::sync::Mutex<std::collections::HashMap<String, u64>>);

#[derive(Debug, thiserror::Error)]
#[error("never fails")]
struct Never;

impl sd_cache::Store<String, u64> for Rows {
    type Error = Never;

    async fn write(&self, key: &String, op: &sd_cache::WriteOp<u64>) -> Result<(), Never> {
        let mut rows = self.0.lock().unwrap();
        match op {
            sd_cache::WriteOp::Put(v) => rows.insert(key.clone(), *v),
            sd_cache::WriteOp::Delete => rows.remove(key),
        };
        Ok(())
    }
}

/// Write-through over the two-tier cache: once `write` returns, another instance that held
/// the old value in memory reads the new one.
#[test]
fn write_through_over_two_tier_is_read_fresh_by_another_instance() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("two-tier");
    runtime().block_on(async {
        let a = instance(server.url(), &prefix, false).await;
        let b = instance(server.url(), &prefix, false).await;
        for i in [&a, &b] {
            let i = i.clone();
            eventually("serving from memory", move || {
                std::future::ready(i.is_serving_local())
            })
            .await;
        }
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
