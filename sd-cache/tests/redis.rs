//! The Redis tier against real servers: one loader across independent clients, versions
//! against late loads, negative caching, early refresh on server time, a cluster, and what
//! the cache promises while Redis is killed or frozen.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_cache::clock::FixedRandom;
use sd_cache::redis::{Codec, RedisCache};
use sd_cache::{Error, SharedError};
use tokio::sync::Notify;

mod common;
use common::{Rows, eventually, manager_with_timeout, on_shared_redis, runtime};

#[derive(Debug, thiserror::Error)]
#[error("database down")]
struct DbDown;

/// A connection with generous timeouts: two busy cores serve 1,000 tasks here.
async fn manager(url: &str) -> ConnectionManager {
    manager_with_timeout(url, Duration::from_secs(5)).await
}

/// An independent client ("process"): its own connections and its own in-process state.
async fn client(url: &str, prefix: &str) -> RedisCache<String, ConnectionManager> {
    RedisCache::builder(prefix)
        .ttl(Duration::from_secs(30))
        .notifications(redis::Client::open(url).unwrap())
        .build(manager(url).await)
        .await
        .unwrap()
}

#[test]
fn insert_get_invalidate_round_trip_under_a_hash_tagged_prefix() {
    on_shared_redis("cache", |url, prefix| async move {
        let cache = client(url.as_str(), &prefix).await;
        assert_eq!(cache.data_key("user:1"), format!("{prefix}:{{user:1}}"));
        assert_eq!(cache.get("user:1").await.unwrap(), None);
        cache.insert("user:1", &"ada".to_owned()).await.unwrap();
        assert_eq!(cache.get("user:1").await.unwrap().as_deref(), Some("ada"));
        cache.invalidate("user:1").await.unwrap();
        assert_eq!(cache.get("user:1").await.unwrap(), None);
        assert!(matches!(cache.get("").await, Err(Error::InvalidKey { .. })));
    });
}

/// 1,000 concurrent reads of one missing key, spread over 4 independent clients, run the
/// loader once in total.
#[test]
fn a_thousand_reads_across_four_clients_run_one_loader() {
    on_shared_redis("cache", |url, prefix| async move {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(client(url.as_str(), &prefix).await);
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..1_000 {
            let cache = clients[i % 4].clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load("hot", move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        "value".to_owned()
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "value");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let loads: u64 = clients.iter().map(|c| c.stats().loads).sum();
        assert_eq!(loads, 1);
    });
}

/// A load that began before an invalidation must not store its older value.
#[test]
fn a_load_that_began_before_an_invalidation_is_not_stored() {
    on_shared_redis("cache", |url, prefix| async move {
        let a = client(url.as_str(), &prefix).await;
        let b = client(url.as_str(), &prefix).await;
        let gate = Arc::new(Notify::new());
        let started = Arc::new(Notify::new());
        let load = {
            let (a, gate, started) = (a.clone(), gate.clone(), started.clone());
            tokio::spawn(async move {
                a.get_or_load("k", move || async move {
                    started.notify_one();
                    gate.notified().await;
                    "old".to_owned()
                })
                .await
            })
        };
        started.notified().await;
        b.invalidate("k").await.unwrap();
        gate.notify_one();
        assert_eq!(
            load.await.unwrap().unwrap(),
            "old",
            "the caller gets what it loaded"
        );
        assert_eq!(b.get("k").await.unwrap(), None, "but the store was refused");
    });
}

#[test]
fn not_found_is_cached_for_every_client() {
    on_shared_redis("cache", |url, prefix| async move {
        let a = client(url.as_str(), &prefix).await;
        let b = client(url.as_str(), &prefix).await;
        let calls = Arc::new(AtomicUsize::new(0));
        for cache in [&a, &b, &a, &b] {
            let calls = calls.clone();
            let found = cache
                .try_get_or_load_optional("ghost", move || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<Option<String>, DbDown>(None)
                })
                .await
                .unwrap();
            assert_eq!(found, None);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn a_read_near_expiry_refreshes_in_the_background() {
    on_shared_redis("cache", |url, prefix| async move {
        // The smallest draw reaches 36.7 × delta before expiry: with a 100 ms load and a
        // 2 s TTL every read is inside the window and fires.
        let cache: RedisCache<u32, ConnectionManager> = RedisCache::builder(prefix.as_str())
            .ttl(Duration::from_secs(2))
            .random(FixedRandom(0.0))
            .build(manager(url.as_str()).await)
            .await
            .unwrap();
        let slow = |v: u32| {
            move || async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                v
            }
        };
        assert_eq!(cache.get_or_load("k", slow(1)).await.unwrap(), 1);
        assert_eq!(
            cache.get_or_load("k", slow(2)).await.unwrap(),
            1,
            "current value at once"
        );
        eventually("one early refresh", || {
            std::future::ready(cache.stats().early_refreshes == 1)
        })
        .await;
        eventually("the refreshed value", || async {
            cache.get("k").await.unwrap() == Some(2)
        })
        .await;
    });
}

#[test]
fn an_expired_value_is_served_for_a_bounded_time_when_the_reload_fails() {
    on_shared_redis("cache", |url, prefix| async move {
        let cache: RedisCache<u32, ConnectionManager> = RedisCache::builder(prefix.as_str())
            .ttl(Duration::from_millis(100))
            .stale_if_error(Duration::from_secs(30))
            .early_refresh(false)
            .build(manager(url.as_str()).await)
            .await
            .unwrap();
        cache.insert("k", &7).await.unwrap();
        // Let the server's clock pass the expiry (server time cannot be injected).
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(cache.get("k").await.unwrap(), None);
        let v = cache
            .try_get_or_load("k", || async { Err::<u32, _>(DbDown) })
            .await
            .unwrap();
        assert_eq!(v, 7);
        assert_eq!(cache.stats().stale_served, 1);
    });
}

/// A codec other than JSON: raw UTF-8.
#[derive(Debug)]
struct Utf8;

impl Codec<String> for Utf8 {
    fn encode(&self, value: &String) -> Result<Vec<u8>, SharedError> {
        Ok(value.as_bytes().to_vec())
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, SharedError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| Arc::new(e) as SharedError)
    }
}

#[test]
fn a_custom_codec_round_trips_and_a_foreign_value_is_a_codec_error() {
    on_shared_redis("cache", |url, prefix| async move {
        let raw = RedisCache::builder(prefix.as_str())
            .codec(Utf8)
            .build(manager(url.as_str()).await)
            .await
            .unwrap();
        raw.insert("k", &"not json".to_owned()).await.unwrap();
        assert_eq!(raw.get("k").await.unwrap().as_deref(), Some("not json"));
        let json: RedisCache<String, _> = RedisCache::builder(prefix.as_str())
            .build(manager(url.as_str()).await)
            .await
            .unwrap();
        assert!(matches!(
            json.get("k").await,
            Err(Error::Codec {
                direction: "decode",
                ..
            })
        ));
    });
}

/// The field an `InvalidConfig` names.
fn field<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
    match r {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_settings_fail_at_build_naming_the_field() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    runtime().block_on(async {
        let conn = manager(server.url()).await;
        let b = || RedisCache::<u32>::builder("p");
        assert_eq!(
            field(RedisCache::<u32>::builder("a{b}").build(conn.clone()).await),
            "prefix"
        );
        // sd adds the colon between the prefix and the key: a prefix of its own is refused.
        assert_eq!(
            field(RedisCache::<u32>::builder("app:").build(conn.clone()).await),
            "prefix"
        );
        assert_eq!(
            field(b().lock_ttl(Duration::ZERO).build(conn.clone()).await),
            "lock_ttl"
        );
        assert_eq!(
            field(b().wait_timeout(Duration::ZERO).build(conn.clone()).await),
            "wait_timeout"
        );
        assert_eq!(field(b().ttl(Duration::ZERO).build(conn).await), "ttl");
    });
}

#[test]
fn one_loader_on_a_cluster() {
    let cluster = sd_testkit::RedisCluster::start().expect("redis-server must be installed");
    let urls = cluster.urls();
    let prefix = sd_testkit::unique_name("cache");
    runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..2 {
            let conn = redis::cluster::ClusterClient::new(urls.clone())
                .unwrap()
                .get_async_connection()
                .await
                .unwrap();
            let cache: RedisCache<u64, _> = RedisCache::builder(prefix.as_str())
                .build(conn)
                .await
                .unwrap();
            clients.push(cache);
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let cache = clients[(i % 2) as usize].clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("k{}", i % 10);
                cache
                    .get_or_load(&key, move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        i % 10
                    })
                    .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u64 % 10);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            10,
            "one load per key across both clients"
        );
        clients[0].invalidate("k3").await.unwrap();
        assert_eq!(clients[1].get("k3").await.unwrap(), None);
    });
}

/// Redis killed: typed errors; with `fallback_to_loader` reads go to the loader; frozen:
/// the response timeout turns into the same typed error; back up: caching resumes.
#[test]
fn redis_killed_or_frozen_gives_typed_errors_and_optional_fallback() {
    let mut server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let url = server.url();
    let rt = runtime();
    let (strict, lenient) = rt.block_on(async {
        let strict: RedisCache<u32, _> = RedisCache::builder("fault")
            .build(manager_with_timeout(&url, Duration::from_millis(300)).await)
            .await
            .unwrap();
        let lenient: RedisCache<u32, _> = RedisCache::builder("fault")
            .fallback_to_loader(true)
            .build(manager_with_timeout(&url, Duration::from_millis(300)).await)
            .await
            .unwrap();
        strict.insert("k", &1).await.unwrap();
        (strict, lenient)
    });

    server.kill().unwrap();
    rt.block_on(async {
        assert!(matches!(
            strict.get("k").await,
            Err(Error::Backend {
                operation: "read",
                ..
            })
        ));
        let err = strict.get_or_load("k", || async { 2 }).await.unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        assert!(
            err.to_string().contains("fallback_to_loader"),
            "the message says what to do"
        );
        assert_eq!(lenient.get_or_load("k", || async { 2 }).await.unwrap(), 2);
        assert!(matches!(
            strict.insert("k", &3).await,
            Err(Error::Backend { .. })
        ));
    });

    server.start_again().unwrap();
    rt.block_on(async {
        let (back, _) = sd_testkit::retry_until_ok(Duration::from_millis(100), || {
            strict.get_or_load("k", || async { 4 })
        })
        .await;
        assert_eq!(
            back, 4,
            "an empty restarted server: loaded and cached again"
        );
        assert_eq!(strict.get("k").await.unwrap(), Some(4));
    });

    server.pause().unwrap();
    rt.block_on(async {
        assert!(matches!(strict.get("k").await, Err(Error::Backend { .. })));
        assert_eq!(lenient.get_or_load("k", || async { 5 }).await.unwrap(), 5);
    });
    server.resume().unwrap();
}

#[test]
fn write_through_and_write_behind_keep_the_redis_tier_in_step() {
    on_shared_redis("cache", |url, prefix| async move {
        let tier = |url: String, prefix: String| async move {
            RedisCache::<u32>::builder(prefix)
                .build(manager_with_timeout(&url, Duration::from_millis(300)).await)
                .await
                .unwrap()
        };
        let through = sd_cache::WriteThrough::new(
            tier(url.as_str().into(), prefix.clone()).await,
            Rows::default(),
        );
        through.write("a".to_owned(), 1).await.unwrap();
        let other = tier(url.as_str().into(), prefix.clone()).await;
        assert_eq!(
            other.get("a").await.unwrap(),
            Some(1),
            "another client reads the write"
        );

        let behind = sd_cache::WriteBehind::builder()
            .build(
                tier(url.as_str().into(), prefix.clone()).await,
                Rows::default(),
            )
            .unwrap();
        behind.write("b".to_owned(), 2).await.unwrap();
        assert_eq!(
            other.get("b").await.unwrap(),
            Some(2),
            "cached before it is stored"
        );
        let stats = behind.shutdown().await.unwrap();
        assert_eq!(stats.written, 1);
    });
}

/// A hot entry whose refresh window covers its whole life, read by 200 tasks over 4
/// independent clients while the refresh is held: one refresh across all of them, and
/// reads decided on the old entry after the new one is in place do not load again (the
/// lock is taken against the version the refresh was decided on).
#[test]
fn at_most_one_early_refresh_per_expiry_across_clients() {
    on_shared_redis("cache", |url, prefix| async move {
        let mut clients = Vec::new();
        for _ in 0..4 {
            let cache: RedisCache<u64, ConnectionManager> = RedisCache::builder(prefix.as_str())
                .ttl(Duration::from_secs(60))
                .random(FixedRandom(0.0))
                .notifications(redis::Client::open(url.as_str()).unwrap())
                .build(manager(url.as_str()).await)
                .await
                .unwrap();
            clients.push(cache);
        }
        // An entry written as if its load took 100 s: every read is inside its window.
        let mut admin = manager(url.as_str()).await;
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut admin).await.unwrap();
        let now = secs * 1000 + micros / 1000;
        let _: i64 = redis::cmd("HSET")
            .arg(clients[0].data_key("hot"))
            .arg(&["v", "0", "d", "100000", "n", "0", "ver", "1"])
            .arg("e")
            .arg(now + 60_000)
            .query_async(&mut admin)
            .await
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Reads each reader completed: progress that provably happened, instead of sleeps.
        let done: Arc<Vec<AtomicUsize>> = Arc::new((0..200).map(|_| AtomicUsize::new(0)).collect());
        let mut readers = Vec::new();
        for i in 0..200 {
            let (cache, calls, gate, stop, done) = (
                clients[i % 4].clone(),
                calls.clone(),
                gate.clone(),
                stop.clone(),
                done.clone(),
            );
            readers.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let (calls, gate) = (calls.clone(), gate.clone());
                    cache
                        .get_or_load("hot", move || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            gate.acquire().await.unwrap().forget();
                            1
                        })
                        .await
                        .unwrap();
                    done[i].fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        // Every reader completes `n` more reads after this call (each one started later).
        let every_reader_reads_again = |what: &'static str, n: usize| {
            let done = done.clone();
            let from: Vec<usize> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
            async move {
                eventually(what, || {
                    std::future::ready(
                        done.iter()
                            .zip(&from)
                            .all(|(d, &f)| d.load(Ordering::SeqCst) >= f + n),
                    )
                })
                .await;
            }
        };
        let version = |admin: &ConnectionManager| {
            let (mut admin, key) = (admin.clone(), clients[0].data_key("hot"));
            async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg("ver")
                    .query_async::<String>(&mut admin)
                    .await
                    .unwrap()
            }
        };
        eventually("the one refresh", || {
            std::future::ready(calls.load(Ordering::SeqCst) == 1)
        })
        .await;
        // Readers keep reading (and firing refreshes that find the lock taken) while the
        // refresh holds it, and across the moment the refreshed entry lands: refreshes
        // decided on the old entry must find it replaced and not load again.
        every_reader_reads_again("every reader reads while the refresh is held", 2).await;
        assert_eq!(version(&admin).await, "1", "the refresh has not landed yet");
        gate.add_permits(10_000);
        eventually("the refreshed entry lands", || {
            let v = version(&admin);
            async move { v.await != "1" }
        })
        .await;
        let refreshed = version(&admin).await;
        for c in &clients {
            eventually("every client reads the refreshed entry", || async {
                c.get("hot").await.unwrap() == Some(1)
            })
            .await;
        }
        // The cache reports no signal for a refresh that was decided and then skipped, so
        // wait for events that come after every refresh decided on the old entry was
        // spawned: every reader completes two more reads, each of which started after the
        // refreshed entry landed, through the same connections the refreshes use.
        every_reader_reads_again("every reader reads the refreshed entry twice", 2).await;
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.await.unwrap();
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one refresh across 4 clients"
        );
        assert_eq!(
            version(&admin).await,
            refreshed,
            "no second refresh replaced the refreshed entry"
        );
    });
}

/// A miss must never join an early refresh in flight: a refresh that finds the entry
/// gone (or another process refreshing) answers "skipped", and a miss that joined it was
/// answered "not found" for a key its loader knows. The refresh here is spawned by a hit,
/// the entry is deleted behind it, and a miss follows at once on the same connection;
/// on a current-thread runtime the miss's read is answered before the refresh's.
#[test]
fn a_miss_never_receives_a_skipped_early_refresh() {
    let server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let prefix = sd_testkit::unique_name("cache");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cache: RedisCache<u64, ConnectionManager> = RedisCache::builder(prefix.as_str())
            .ttl(Duration::from_secs(60))
            .random(FixedRandom(0.0))
            .build(manager(&server.url()).await)
            .await
            .unwrap();
        let mut admin = manager(&server.url()).await;
        let loads = Arc::new(AtomicUsize::new(0));
        for round in 0..50u64 {
            // An entry written as if its load took 100 s: a hit always fires a refresh.
            let (secs, micros): (u64, u64) =
                redis::cmd("TIME").query_async(&mut admin).await.unwrap();
            let now = secs * 1000 + micros / 1000;
            let _: i64 = redis::cmd("HSET")
                .arg(cache.data_key("hot"))
                .arg(&["v", "0", "d", "100000", "n", "0"])
                .arg("ver")
                .arg(round + 1)
                .arg("e")
                .arg(now + 60_000)
                .query_async(&mut admin)
                .await
                .unwrap();
            let counted = loads.clone();
            let hit = cache
                .get_or_load("hot", move || async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    7
                })
                .await
                .unwrap();
            assert_eq!(hit, 0, "round {round}: the entry was read");
            // Deleted without yielding, so the spawned refresh has not run yet.
            server.command(&["DEL", &cache.data_key("hot")]).unwrap();
            let counted = loads.clone();
            let missed = cache
                .get_or_load("hot", move || async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    7
                })
                .await;
            assert_eq!(
                missed.unwrap(),
                7,
                "round {round}: a miss is answered by its loader, not by a skipped refresh"
            );
            // The case under test happened: the round's refresh ran after the miss and
            // was skipped (it did not load), rather than running first and refreshing.
            eventually("the round's refresh ends", || {
                let s = cache.stats();
                std::future::ready(s.skipped_refreshes + s.early_refreshes > round)
            })
            .await;
            let s = cache.stats();
            assert_eq!(
                (s.skipped_refreshes, s.early_refreshes),
                (round + 1, 0),
                "round {round}: the refresh was skipped"
            );
        }
        assert!(loads.load(Ordering::SeqCst) >= 50, "every miss loaded");
    });
}
