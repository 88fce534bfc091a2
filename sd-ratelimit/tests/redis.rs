//! The Redis backend against real servers: identical decisions to memory on one server
//! and on a cluster, NOSCRIPT, expiry, server time, shadow mode, and each failure
//! policy with Redis killed or frozen mid-run.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // Tests may unwrap (helpers outside #[test] included).

use std::time::Duration;

use redis::aio::ConnectionManager;
use sd_ratelimit::memory::{self, ManualClock};
use sd_ratelimit::redis::{FailurePolicy, RedisLimiter, RedisLimiterBuilder};
use sd_ratelimit::{Clock as _, Decision, Error, Limit, Quota};
use sd_testkit::{eventually, runtime};

async fn manager(url: &str) -> ConnectionManager {
    let timeout = Duration::from_millis(200);
    sd_testkit::redis_manager(url, timeout, timeout).await
}

/// Runs `test` on a connection to the Redis the tests share.
fn on_shared_redis<F, Fut>(test: F)
where
    F: FnOnce(ConnectionManager) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = sd_testkit::redis().expect("redis-server must be installed");
    runtime().block_on(async { test(manager(server.url()).await).await });
}

/// Runs `test` on a connection to a Redis of its own, whose statistics only the test
/// moves.
fn on_own_redis<F, Fut>(test: F)
where
    F: FnOnce(ConnectionManager) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    runtime().block_on(async { test(manager(&server.url()).await).await });
}

/// Zeroes the server's command statistics.
async fn reset_stats(conn: &mut ConnectionManager) {
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .unwrap();
}

/// How many EVALSHA calls the server ran since its statistics were reset, if any.
async fn evalsha_calls(conn: &mut ConnectionManager) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next())
        .map(|n| n.parse().unwrap())
}

fn limits() -> Vec<Limit> {
    let q = Quota::per_second(2).unwrap().with_burst(4).unwrap();
    vec![
        Limit::gcra(q),
        // Intervals are whole microseconds: Redis counts in µs, memory in ns.
        Limit::gcra(Quota::new(4, Duration::from_secs(3)).unwrap()),
        Limit::token_bucket()
            .capacity(5)
            .refill_amount(2)
            .refill_interval(Duration::from_secs(1))
            .build()
            .unwrap(),
        Limit::leaky_queue(q.with_burst(1).unwrap(), Duration::from_millis(1500)).unwrap(),
        Limit::sliding_window(6, Duration::from_secs(2)).unwrap(),
    ]
}

/// A deterministic request sequence: (time step in µs, key, cost).
fn sequence(seed: u64, len: usize) -> Vec<(u64, usize, u32)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..len)
        .map(|_| (next() % 700_000, (next() % 3) as usize, (next() % 4) as u32))
        .collect()
}

/// The server's clock (`TIME`), as time since the Unix epoch.
async fn server_time(conn: &mut impl redis::aio::ConnectionLike) -> Duration {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

/// Runs one sequence on memory (time injected) and on `redis` (time passed to the
/// script), asserting identical decisions.
///
/// Redis expires a key on its own clock, which a loaded machine moves faster than the
/// sequence's injected time: a key written with 500 ms to live could vanish during a
/// stall while the sequence is 100 ms later, and the next decision would see a full
/// bucket that memory does not. So each key is made persistent right after its call
/// (`conn` reaches the same server): a state past its expiry must then read as full,
/// which is what the expiry relies on, and the decisions no longer depend on real time.
async fn same_as_memory<C>(redis: &RedisLimiter<C>, conn: &mut C, limit: Limit, seed: u64)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let clock = ManualClock::new();
    let memory = memory::MemoryLimiterBuilder::new(limit)
        .clock(clock.clone())
        .keyed::<String>()
        .unwrap();
    // An epoch that is a whole number of every tick and window, so both sides agree on
    // window boundaries.
    let epoch = Duration::from_secs(sd_ratelimit::SystemClock.now().as_secs() / 3600 * 3600);
    let keys: Vec<String> = (0..3).map(|_| sd_testkit::unique_name("diff")).collect();
    let mut t = Duration::ZERO;
    for (i, (dt, key, cost)) in sequence(seed, 150).into_iter().enumerate() {
        t += Duration::from_micros(dt);
        clock.set(t);
        let ours = memory.check_with(keys[key].as_str(), &limit, cost);
        let theirs = redis.check_at(&keys[key], &limit, cost, epoch + t).await;
        let _: i64 = redis::cmd("PERSIST")
            .arg(redis.redis_key(&keys[key]))
            .query_async(conn)
            .await
            .unwrap();
        match (ours, theirs) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "step {i} of {limit:?} at {t:?}"),
            (Err(Error::InsufficientCapacity { .. }), Err(Error::InsufficientCapacity { .. })) => {}
            (a, b) => panic!("step {i} of {limit:?}: memory {a:?}, redis {b:?}"),
        }
    }
}

#[test]
fn redis_and_cluster_decide_exactly_as_memory() {
    let server =
        sd_testkit::redis().expect("redis-server must be installed (apt-get install redis-server)");
    let cluster = sd_testkit::RedisCluster::start().expect("redis cluster must start");
    let rt = runtime();
    rt.block_on(async {
        let single = RedisLimiterBuilder::new(limits()[0])
            .prefix(sd_testkit::unique_name("rl"))
            .timeout(Duration::from_secs(5))
            .build(manager(server.url()).await)
            .unwrap();
        let mut single_conn = manager(server.url()).await;
        let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
        let mut cluster_conn = client.get_async_connection().await.unwrap();
        let clustered = RedisLimiterBuilder::new(limits()[0])
            .timeout(Duration::from_secs(5))
            .build(cluster_conn.clone())
            .unwrap();
        for (n, limit) in limits().into_iter().enumerate() {
            for seed in 1..4u64 {
                same_as_memory(&single, &mut single_conn, limit, seed * 7919 + n as u64).await;
                let seed = seed * 104_729 + n as u64;
                same_as_memory(&clustered, &mut cluster_conn, limit, seed).await;
            }
        }
    });
}

#[test]
fn server_time_noscript_expiry_and_all_or_none() {
    on_shared_redis(|mut conn| async move {
        // One request per 10 s, burst of 2: no stall of a loaded machine reaches a unit,
        // so the third call is denied however slow the calls are.
        let unit = Duration::from_secs(10);
        let limit = Limit::gcra(Quota::per_minute(6).unwrap().with_burst(2).unwrap());
        let limiter = RedisLimiterBuilder::new(limit)
            .prefix(sd_testkit::unique_name("rl"))
            .timeout(Duration::from_secs(5))
            .build(conn.clone())
            .unwrap();
        // Server time: each call is bracketed by readings of the server's clock, and the
        // bounds below are derived from them, so they hold for any call time. The first
        // call starts the schedule at t1 in [before_first, after_first].
        let before_first = server_time(&mut conn).await;
        assert!(limiter.check("a").await.unwrap().allowed);
        let after_first = server_time(&mut conn).await;
        assert!(limiter.check("a").await.unwrap().allowed);
        // Time that must show in the answer: a script that misread TIME would not see it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before_third = server_time(&mut conn).await;
        let denied = limiter.check("a").await.unwrap();
        let after_third = server_time(&mut conn).await;
        assert!(!denied.allowed, "{denied:?}");
        // The third call, at t3, may retry at t1 + unit: unit - (t3 - t1) from t3.
        let earliest = unit.saturating_sub(after_third.saturating_sub(before_first));
        let latest = unit.saturating_sub(before_third.saturating_sub(after_first));
        assert!(
            (earliest..=latest).contains(&denied.retry_after),
            "retry after {:?}, server time says {earliest:?}..={latest:?}",
            denied.retry_after
        );
        // The key expires when it is back to full, at t1 + 2 units (to the millisecond
        // Redis keeps expiries in).
        let before_ttl = server_time(&mut conn).await;
        let ttl: i64 = redis::cmd("PTTL")
            .arg(limiter.redis_key("a"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let after_ttl = server_time(&mut conn).await;
        let ms = |t: Duration| i64::try_from(t.as_millis()).unwrap();
        let shortest = ms(before_first + 2 * unit) - ms(after_ttl) - 2;
        let longest = ms(after_first + 2 * unit) - ms(before_ttl) + 2;
        assert!(
            (shortest..=longest).contains(&ttl),
            "pttl {ttl}, server time says {shortest}..={longest}"
        );
        // The server forgets its scripts: the next call still decides (EVAL fallback).
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(limiter.check("b").await.unwrap().allowed);
        // Too big a cost is its own answer.
        assert!(matches!(
            limiter.check_n("b", 3).await,
            Err(Error::InsufficientCapacity {
                cost: 3,
                capacity: 2
            })
        ));
        // All or none: the user limit denies, so the IP limit is not consumed.
        let per_ip = Limit::gcra(Quota::per_second(10).unwrap());
        let per_user = Limit::gcra(Quota::per_hour(1).unwrap());
        let both = [("ip:1", &per_ip, 1), ("user:1", &per_user, 1)];
        assert!(limiter.check_all(&both).await.unwrap().allowed);
        let d = limiter.check_all(&both).await.unwrap();
        assert!(!d.allowed);
        assert!(d.retry_after > Duration::from_secs(3000));
        let ip = limiter.check_with("ip:1", &per_ip, 9).await.unwrap();
        assert!(
            ip.allowed,
            "the denied pair took nothing from the IP limit: {ip:?}"
        );
        // One key twice would be decided from one read: refused, and nothing consumed.
        let twice = [("ip:2", &per_ip, 1), ("ip:2", &per_user, 1)];
        assert!(matches!(
            limiter.check_all(&twice).await,
            Err(Error::DuplicateKey { key }) if key == "ip:2"
        ));
        let fresh = limiter.check_with("ip:2", &per_ip, 10).await.unwrap();
        assert!(fresh.allowed, "the refused call took nothing: {fresh:?}");
    });
}

#[test]
fn leaky_queue_in_redis_reserves_slots_in_order() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let rt = runtime();
    rt.block_on(async {
        let q = Quota::per_second(20).unwrap().with_burst(1).unwrap();
        let limiter =
            RedisLimiterBuilder::new(Limit::leaky_queue(q, Duration::from_secs(1)).unwrap())
                .prefix(sd_testkit::unique_name("rl"))
                .timeout(Duration::from_secs(5))
                .build(manager(server.url()).await)
                .unwrap();
        // Slots 50 ms apart, reserved at the call, in call order (server time, so allow
        // the microseconds that pass between calls).
        for i in 0..4 {
            let d = limiter.until_ready("q", 1).await.unwrap();
            assert!(d.allowed);
            if i > 0 {
                assert!(d.delay <= Duration::from_millis(50), "{d:?}");
            }
        }
        // At one instant (injected, so no call time shifts the slots), calls reserve the
        // slots 50 ms apart in call order up to max_delay (1 s: 21 slots), and are denied
        // after it, not queued forever.
        let limit = Limit::leaky_queue(q, Duration::from_secs(1)).unwrap();
        let now = sd_ratelimit::SystemClock.now();
        let mut delays = vec![];
        for _ in 0..40 {
            let d = limiter.check_at("at-once", &limit, 1, now).await.unwrap();
            if d.allowed {
                delays.push(d.delay);
            }
        }
        let slots: Vec<_> = (0..21).map(|i| Duration::from_millis(50 * i)).collect();
        assert_eq!(delays, slots);
    });
}

#[test]
fn shadow_mode_counts_without_denying() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let rt = runtime();
    rt.block_on(async {
        let limiter = RedisLimiterBuilder::new(Limit::gcra(Quota::per_minute(1).unwrap()))
            .prefix(sd_testkit::unique_name("rl"))
            .shadow(true)
            .timeout(Duration::from_secs(5))
            .build(manager(server.url()).await)
            .unwrap();
        for _ in 0..4 {
            assert!(limiter.check("k").await.unwrap().allowed);
        }
        assert_eq!(limiter.stats().shadow_denied(), 3);
    });
}

/// Checks `n` times; returns how many were admitted.
async fn admitted(
    limiter: &RedisLimiter<ConnectionManager>,
    key: &str,
    n: usize,
) -> (usize, Vec<Decision>) {
    let mut out = vec![];
    for _ in 0..n {
        out.push(limiter.check(key).await.unwrap());
    }
    (out.iter().filter(|d| d.allowed).count(), out)
}

#[test]
fn each_failure_policy_does_what_it_promises_when_redis_dies() {
    failure_policies(1);
}

#[test]
fn each_failure_policy_does_what_it_promises_when_redis_dies_batched() {
    failure_policies(16);
}

fn failure_policies(batch: usize) {
    let mut server = sd_testkit::RedisServer::start().expect("redis-server must be installed");
    let rt = runtime();
    let limit = Limit::gcra(Quota::per_minute(3).unwrap());
    let local = Limit::gcra(Quota::per_minute(1).unwrap());
    let limiters = rt.block_on(async {
        let conn = manager(&server.url()).await;
        [
            FailurePolicy::Open,
            FailurePolicy::Closed,
            FailurePolicy::Local(local),
        ]
        .map(|policy| {
            RedisLimiterBuilder::new(limit)
                .on_failure(policy)
                .batch(batch)
                .timeout(Duration::from_millis(300))
                .build(conn.clone())
                .unwrap()
        })
    });
    let [open, closed, fallback] = &limiters;
    rt.block_on(async {
        // Healthy: Redis decides, 3 per minute.
        for (i, l) in limiters.iter().enumerate() {
            assert_eq!(admitted(l, &format!("healthy{i}"), 5).await.0, 3);
        }
    });
    server.kill().unwrap();
    rt.block_on(async {
        assert_eq!(admitted(open, "down", 5).await.0, 5, "fail open admits");
        let (n, closed_decisions) = admitted(closed, "down", 5).await;
        assert_eq!(n, 0, "fail closed denies");
        assert!(
            closed_decisions
                .iter()
                .all(|d| d.retry_after == Duration::from_secs(1))
        );
        assert_eq!(
            admitted(fallback, "down", 5).await.0,
            1,
            "local fallback: 1 per minute"
        );
        for l in &limiters {
            assert!(l.stats().backend_errors() >= 5);
        }
    });
    server.start_again().unwrap();
    rt.block_on(async {
        // Back: Redis decides again (the connection manager reconnects, the empty server
        // gets the script by EVAL). Calls fail closed until the reconnect.
        eventually("redis is back and fail-closed admits again", || async {
            closed.check("after").await.unwrap().allowed
        })
        .await;
        assert_eq!(admitted(closed, "after", 3).await.0, 2);
    });
    // Frozen rather than dead: the timeout applies the policy.
    server.pause().unwrap();
    rt.block_on(async {
        let errors = open.stats().backend_errors();
        assert!(open.check("frozen").await.unwrap().allowed);
        assert!(!closed.check("frozen").await.unwrap().allowed);
        assert!(open.stats().backend_errors() > errors);
    });
    server.resume().unwrap();
}

/// 64 tasks on one key through the batcher: exactly the burst is admitted, every
/// decision matches what one-at-a-time GCRA allows, and decisions did share scripts.
#[test]
fn batched_decisions_are_exact_under_contention() {
    on_own_redis(|conn| async move {
        let limiter = std::sync::Arc::new(
            RedisLimiterBuilder::new(Limit::gcra(Quota::per_hour(100).unwrap()))
                .batch(32)
                .timeout(Duration::from_secs(10))
                .on_failure(FailurePolicy::Closed)
                .build(conn.clone())
                .unwrap(),
        );
        let mut admin = conn.clone();
        reset_stats(&mut admin).await;
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let mut hot = 0;
                    for i in 0..20 {
                        if limiter.check("hot").await.unwrap().allowed {
                            hot += 1;
                        }
                        // Other keys in the same batches, each under its own burst.
                        let own = limiter.check(&format!("own{t}")).await.unwrap();
                        assert!(own.allowed, "task {t} check {i}: {own:?}");
                        assert_eq!(own.remaining, 100 - 1 - i);
                    }
                    hot
                })
            })
            .collect();
        let mut hot = 0;
        for t in tasks {
            hot += t.await.unwrap();
        }
        assert_eq!(hot, 100, "one key admits exactly its burst");
        assert_eq!(limiter.stats().backend_errors(), 0);
        let calls = evalsha_calls(&mut admin).await.unwrap();
        assert!(calls < 64 * 40, "{calls} scripts for {} decisions", 64 * 40);
    });
}

/// Keys Redis denied are answered locally until they could be admitted: no script runs,
/// the wait shrinks as time passes, other keys and lower costs still go to Redis, and a
/// new limit empties the cache.
#[test]
fn deny_cache_answers_denied_keys_without_a_round_trip() {
    on_own_redis(|conn| async move {
        let limiter = RedisLimiterBuilder::new(Limit::gcra(
            Quota::per_minute(2).unwrap().with_burst(3).unwrap(),
        ))
        .deny_cache(100)
        .timeout(Duration::from_secs(10))
        .build(conn.clone())
        .unwrap();
        let mut admin = conn.clone();
        assert!(limiter.check_n("k", 2).await.unwrap().allowed);
        let first = limiter.check_n("k", 2).await.unwrap();
        assert!(!first.allowed, "Redis denies: one left, two asked");
        reset_stats(&mut admin).await;
        for _ in 0..10 {
            let d = limiter.check_n("k", 2).await.unwrap();
            assert!(!d.allowed);
            assert!(d.retry_after <= first.retry_after && !d.retry_after.is_zero());
            assert_eq!(d.limit, first.limit);
        }
        assert_eq!(
            evalsha_calls(&mut admin).await.unwrap_or(0),
            0,
            "denials answered locally"
        );
        assert_eq!(limiter.stats().denied(), 11);
        // A lower cost is not covered by the cached denial: Redis admits it.
        assert!(limiter.check("k").await.unwrap().allowed);
        // A new limit empties the cache: Redis decides again (room for 90 s of use).
        limiter
            .set_limit(Limit::gcra(
                Quota::per_minute(100).unwrap().with_burst(1000).unwrap(),
            ))
            .unwrap();
        assert!(limiter.check_n("k", 2).await.unwrap().allowed);
        assert_eq!(evalsha_calls(&mut admin).await.unwrap_or(0), 2);
    });
}

#[test]
fn invalid_redis_config_fails_at_construction() {
    on_shared_redis(|conn| async move {
        let limit = Limit::gcra(Quota::per_second(1).unwrap());
        assert!(matches!(
            RedisLimiterBuilder::new(limit).batch(0).build(conn.clone()),
            Err(Error::InvalidConfig { field: "batch", .. })
        ));
        assert!(matches!(
            RedisLimiterBuilder::new(limit)
                .prefix("a{b")
                .build(conn.clone()),
            Err(Error::InvalidConfig {
                field: "prefix",
                ..
            })
        ));
        assert!(matches!(
            RedisLimiterBuilder::new(limit)
                .timeout(Duration::ZERO)
                .build(conn.clone()),
            Err(Error::InvalidConfig {
                field: "timeout",
                ..
            })
        ));
        let huge = Limit::sliding_window(60_000, Duration::from_secs(86_400 * 30)).unwrap();
        assert!(matches!(
            RedisLimiterBuilder::new(huge).build(conn),
            Err(Error::InvalidConfig {
                field: "window",
                ..
            })
        ));
    });
}

/// A new limit whose state would be read differently from what Redis holds (another
/// algorithm, another window) is refused with a typed error; the old limit stays.
#[test]
fn a_limit_that_would_misread_the_state_in_redis_is_refused() {
    on_shared_redis(|conn| async move {
        let window = Limit::sliding_window(2, Duration::from_secs(3600)).unwrap();
        let limiter = RedisLimiterBuilder::new(window).build(conn).unwrap();
        assert!(limiter.check("k").await.unwrap().allowed);
        assert!(limiter.check("k").await.unwrap().allowed);
        for other in [
            Limit::gcra(Quota::per_second(1).unwrap()),
            Limit::sliding_window(2, Duration::from_secs(60)).unwrap(),
        ] {
            assert!(matches!(
                limiter.set_limit(other),
                Err(Error::InvalidConfig { field: "limit", .. })
            ));
        }
        assert!(
            !limiter.check("k").await.unwrap().allowed,
            "still the window"
        );
        limiter
            .set_limit(Limit::sliding_window(3, Duration::from_secs(3600)).unwrap())
            .unwrap();
        assert!(limiter.check("k").await.unwrap().allowed);
        assert!(!limiter.check("k").await.unwrap().allowed);
    });
}
