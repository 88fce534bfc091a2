//! The penalty after a limit is exceeded (`penalty` on both builders): a key the limit
//! denies is refused outright for the penalty, whatever its limit would admit meanwhile,
//! on memory (time injected), on a real Redis (server time and given times, batched or
//! not, one server and a cluster, the same decisions as memory) and through the tower
//! layer's `Retry-After`.
#![cfg(all(feature = "redis", feature = "tower"))]
#![allow(clippy::unwrap_used)] // Tests may unwrap (helpers outside #[test] included).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::BodyExt as _;
use redis::aio::ConnectionManager;
use sd_ratelimit::memory::{KeyedLimiter, ManualClock, MemoryLimiterBuilder};
use sd_ratelimit::redis::{RedisLimiter, RedisLimiterBuilder};
use sd_ratelimit::tower::{HeaderKey, RateLimiterLayer, ResponseBody};
use sd_ratelimit::{Clock as _, Decision, Error, Limit, Quota};
use sd_testkit::runtime;
use tower::{Layer as _, ServiceExt as _};

const PENALTY: Duration = Duration::from_secs(60);

/// 10 per second, bursts of 2: refilled within 200 ms, far inside any penalty here.
fn fast_limit() -> Limit {
    Limit::gcra(Quota::per_second(10).unwrap().with_burst(2).unwrap())
}

/// 6 per minute, bursts of 2: full again 20 s after it is emptied, within the penalty,
/// yet a request taken in the block's last second would still show at its end.
fn slow_limit() -> Limit {
    Limit::gcra(Quota::per_minute(6).unwrap().with_burst(2).unwrap())
}

/// A keyed limiter of `limit` with `penalty` on `clock`.
fn keyed(
    limit: Limit,
    clock: &ManualClock,
    penalty: Duration,
) -> KeyedLimiter<String, ManualClock> {
    MemoryLimiterBuilder::new(limit)
        .clock(clock.clone())
        .penalty(penalty)
        .keyed()
        .unwrap()
}

/// A keyed limiter of `limit` with [`PENALTY`] on `clock`, on which `key` has exceeded
/// the burst of 2 (so it is blocked).
fn exceeded(limit: Limit, clock: &ManualClock, key: &str) -> KeyedLimiter<String, ManualClock> {
    let limiter = keyed(limit, clock, PENALTY);
    for _ in 0..3 {
        limiter.check(key).unwrap();
    }
    assert!(limiter.check(key).unwrap().penalty);
    limiter
}

fn is_penalty(d: &Decision, left: Duration) -> bool {
    !d.allowed && d.penalty && d.retry_after == left && d.remaining == 0
}

/// The promise, on any limiter of [`slow_limit`] reached through
/// `check(cost, since_start)`: two admitted, the third denied and blocked for
/// [`PENALTY`]; every request during the block refused although the bucket is full
/// again after 20 s; the block over at its end, with the whole burst left (the
/// refusals, the last a second before, took nothing).
async fn block_then_release<F, Fut>(mut check: F)
where
    F: FnMut(u32, Duration) -> Fut,
    Fut: Future<Output = Result<Decision, Error>>,
{
    let zero = Duration::ZERO;
    for _ in 0..2 {
        let d = check(1, zero).await.unwrap();
        assert!(d.allowed && !d.penalty, "{d:?}");
    }
    let d = check(1, zero).await.unwrap();
    assert!(
        is_penalty(&d, PENALTY),
        "the denial starts the block: {d:?}"
    );
    for s in 1..60 {
        let at = Duration::from_secs(s);
        for cost in [0, 1, 2] {
            let d = check(cost, at).await.unwrap();
            assert!(is_penalty(&d, PENALTY - at), "cost {cost} at {at:?}: {d:?}");
        }
    }
    let d = check(2, PENALTY).await.unwrap();
    assert!(d.allowed && !d.penalty, "the block is over: {d:?}");
}

#[test]
fn memory_refuses_every_request_during_the_block_and_admits_after_it() {
    let rt = runtime();
    let clock = ManualClock::new();
    let builder = MemoryLimiterBuilder::new(slow_limit())
        .clock(clock.clone())
        .penalty(PENALTY);
    let keyed = builder.clone().keyed::<String>().unwrap();
    let start = clock.now();
    rt.block_on(block_then_release(|cost, at| {
        clock.set(start + at);
        std::future::ready(keyed.check_n("a", cost))
    }));
    // Another key was never blocked.
    assert!(keyed.check("b").unwrap().allowed);

    let direct = builder.clone().direct().unwrap();
    let start = clock.now();
    rt.block_on(block_then_release(|cost, at| {
        clock.set(start + at);
        std::future::ready(direct.check_n(cost))
    }));

    // Every algorithm, through the general kernel: blocked after its first denial.
    let token_bucket = Limit::token_bucket()
        .capacity(2)
        .refill_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    for limit in [
        token_bucket,
        Limit::sliding_window(2, Duration::from_secs(1)).unwrap(),
    ] {
        let keyed = builder.clone().keyed::<String>().unwrap();
        let start = clock.now();
        let mut n = 0;
        let denied = loop {
            let d = keyed.check_with("k", &limit, 1).unwrap();
            n += 1;
            if !d.allowed {
                break d;
            }
        };
        assert!(
            n == 3 && is_penalty(&denied, PENALTY),
            "{limit:?}: {denied:?}"
        );
        clock.set(start + Duration::from_secs(30));
        let d = keyed.check_with("k", &limit, 1).unwrap();
        assert!(is_penalty(&d, Duration::from_secs(30)), "{limit:?}: {d:?}");
        clock.set(start + PENALTY);
        assert!(
            keyed.check_with("k", &limit, 2).unwrap().allowed,
            "{limit:?}"
        );
    }
}

#[test]
fn a_blocked_key_is_kept_by_sweeps_and_counts_in_check_all() {
    let clock = ManualClock::new();
    let limiter = exceeded(fast_limit(), &clock, "a");
    // A second later the bucket is full: without its block the key could be forgotten.
    clock.advance(Duration::from_secs(1));
    limiter.sweep();
    assert_eq!(limiter.len(), 1, "the blocked key survived the sweep");
    assert!(limiter.check("a").unwrap().penalty);
    // In a multi-limit check a blocked key refuses the whole request, and the other
    // limit is given back.
    let ip = Limit::gcra(Quota::per_second(1).unwrap());
    let d = limiter
        .check_all(&[("ip", &ip, 1), ("a", &fast_limit(), 1)])
        .unwrap();
    assert!(!d.allowed && d.penalty, "{d:?}");
    assert!(limiter.check_with("ip", &ip, 1).unwrap().allowed);
}

#[test]
fn many_threads_during_a_memory_block_are_all_refused_and_take_nothing() {
    let clock = ManualClock::new();
    let limiter = exceeded(slow_limit(), &clock, "hot");
    // The last second of the block, the bucket long full again.
    clock.advance(PENALTY - Duration::from_secs(1));
    let admitted = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..32 {
            s.spawn(|| {
                for _ in 0..2_000 {
                    let d = limiter.check("hot").unwrap();
                    assert!(d.penalty, "{d:?}");
                    if d.allowed || limiter.allow("hot") {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.into_inner(), 0);
    clock.advance(Duration::from_secs(1));
    assert!(
        limiter.check_n("hot", 2).unwrap().allowed,
        "nothing was taken"
    );
}

#[test]
fn zero_is_no_penalty_shadow_blocks_nothing_and_too_long_is_refused() {
    let clock = ManualClock::new();
    let off = keyed(fast_limit(), &clock, Duration::ZERO);
    let shadow = MemoryLimiterBuilder::new(fast_limit())
        .clock(clock.clone())
        .penalty(PENALTY)
        .shadow(true)
        .keyed::<String>()
        .unwrap();
    for _ in 0..2 {
        off.check("a").unwrap();
        shadow.check("a").unwrap();
    }
    let d = off.check("a").unwrap();
    assert!(!d.allowed && !d.penalty && d.retry_after == Duration::from_millis(100));
    let d = shadow.check("a").unwrap();
    assert!(d.allowed && !d.penalty && shadow.stats().shadow_denied() == 1);
    clock.advance(Duration::from_millis(100));
    assert!(
        off.check("a").unwrap().allowed,
        "no block without a penalty"
    );

    let too_long = Duration::from_secs(100 * 365 * 24 * 3600);
    let memory = MemoryLimiterBuilder::new(fast_limit()).penalty(Duration::MAX);
    let redis = RedisLimiterBuilder::new(fast_limit()).penalty(too_long);
    let errors = [
        memory.clone().keyed::<String>().err(),
        memory.direct().err(),
        runtime().block_on(async {
            let server = sd_testkit::redis().unwrap();
            redis.build(manager(server.url()).await).err()
        }),
    ];
    for e in errors {
        assert!(
            matches!(
                e,
                Some(Error::InvalidConfig {
                    field: "penalty",
                    ..
                })
            ),
            "{e:?}"
        );
    }
}

/// Sends one request of user `mallory`: its `Retry-After` and body.
async fn send<S>(svc: S) -> (Option<http::HeaderValue>, String)
where
    S: tower::Service<
            Request<String>,
            Response = Response<ResponseBody<String>>,
            Error = Infallible,
        >,
{
    let req = Request::builder()
        .header("x-user", "mallory")
        .body(String::new())
        .unwrap();
    let resp = svc.oneshot(req).await.unwrap();
    let retry = resp.headers().get("retry-after").cloned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (retry, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn the_tower_layer_answers_a_penalty_with_its_retry_after() {
    let clock = ManualClock::new();
    let limiter = keyed(fast_limit(), &clock, PENALTY);
    let layer = RateLimiterLayer::new(Arc::new(limiter), HeaderKey::new("x-user").unwrap());
    let svc = layer.layer(tower::service_fn(|_: Request<String>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    }));
    for _ in 0..2 {
        assert_eq!(send(svc.clone()).await.0, None);
    }
    let (retry, body) = send(svc.clone()).await;
    assert_eq!(retry.unwrap(), "60");
    assert!(
        body.contains("blocked as a penalty; retry after 60 s"),
        "{body}"
    );
    // Twenty seconds on, a full bucket, still refused: with the time left.
    clock.advance(Duration::from_secs(20));
    let (retry, _) = send(svc.clone()).await;
    assert_eq!(retry.unwrap(), "40");
    clock.advance(Duration::from_secs(40));
    let ready = svc.clone().ready().await.is_ok();
    assert!(
        ready && send(svc).await.0.is_none(),
        "admitted after the block"
    );
}

async fn manager(url: &str) -> ConnectionManager {
    let timeout = Duration::from_secs(5);
    sd_testkit::redis_manager(url, timeout, timeout).await
}

/// The server's clock (`TIME`), as time since the Unix epoch.
async fn server_now(conn: &mut impl redis::aio::ConnectionLike) -> Duration {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

fn redis_limiter(
    conn: ConnectionManager,
    limit: Limit,
    batch: usize,
) -> RedisLimiter<ConnectionManager> {
    RedisLimiterBuilder::new(limit)
        .prefix(sd_testkit::unique_name("pen"))
        .timeout(Duration::from_secs(5))
        .penalty(PENALTY)
        .batch(batch)
        .build(conn)
        .unwrap()
}

#[test]
fn redis_refuses_every_request_during_the_block_and_admits_after_it() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    runtime().block_on(async {
        let mut conn = manager(server.url()).await;
        let limiter = redis_limiter(conn.clone(), slow_limit(), 1);
        let limit = slow_limit();
        // Given times: the whole minute of the block, exactly.
        let start = server_now(&mut conn).await;
        block_then_release(|cost, at| limiter.check_at("a", &limit, cost, start + at)).await;
        // The block is a key beside the state, expiring with the block.
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{}:b", limiter.redis_key("a")))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((50_000..=60_000).contains(&pttl), "pttl {pttl}");

        // Server time: a short block that ends while the test watches.
        let penalty = Duration::from_millis(400);
        let limiter = RedisLimiterBuilder::new(fast_limit())
            .prefix(sd_testkit::unique_name("pen"))
            .timeout(Duration::from_secs(5))
            .penalty(penalty)
            .build(conn.clone())
            .unwrap();
        // Checks until the first denial (however slow the calls), which starts the block.
        let (before, after) = loop {
            let before = Instant::now();
            let d = limiter.check("b").await.unwrap();
            if !d.allowed {
                assert!(d.penalty && d.retry_after <= penalty, "{d:?}");
                break (before, Instant::now());
            }
        };
        // The bucket refills in 200 ms; the block holds for 400 ms from the denial.
        // Checks answered within 400 ms of `before` were decided inside the block.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut during = 0;
        loop {
            let d = limiter.check("b").await.unwrap();
            let elapsed = before.elapsed();
            if elapsed < penalty {
                assert!(d.penalty && !d.allowed, "{d:?}");
                during += 1;
            }
            if elapsed >= Duration::from_millis(300) {
                break;
            }
        }
        assert!(during > 0, "no check was answered inside the block");
        let over = after + Duration::from_millis(450);
        tokio::time::sleep(over.saturating_duration_since(Instant::now())).await;
        let d = limiter.check_n("b", 2).await.unwrap();
        assert!(d.allowed && !d.penalty, "{d:?}");
    });
}

#[test]
fn many_tasks_during_a_redis_block_are_all_refused_and_take_nothing() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let token_bucket = Limit::token_bucket()
        .capacity(2)
        .refill_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let window = Limit::sliding_window(2, Duration::from_secs(1)).unwrap();
    // gcra.lua and limit.lua, one decision a call and batched.
    let cases = [
        (fast_limit(), 1),
        (fast_limit(), 64),
        (token_bucket, 64),
        (window, 1),
    ];
    runtime().block_on(async {
        let mut conn = manager(server.url()).await;
        for (limit, batch) in cases {
            let limiter = Arc::new(redis_limiter(conn.clone(), limit, batch));
            // Until the first denial, however slow the calls: the block starts there.
            while limiter.check("hot").await.unwrap().allowed {}
            let state = || {
                let mut conn = conn.clone();
                let key = limiter.redis_key("hot");
                async move {
                    let v: Option<String> = redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    v
                }
            };
            let before = state().await;
            let tasks: Vec<_> = (0..200)
                .map(|_| {
                    let limiter = Arc::clone(&limiter);
                    tokio::spawn(async move {
                        let mut refused = 0;
                        for cost in [1, 1, 2, 0, 1] {
                            let d = limiter.check_n("hot", cost).await.unwrap();
                            refused += usize::from(!d.allowed && d.penalty);
                        }
                        refused
                    })
                })
                .collect();
            let mut refused = 0;
            for t in tasks {
                refused += t.await.unwrap();
            }
            assert_eq!(refused, 1_000, "{limit:?} batch {batch}");
            assert_eq!(
                state().await,
                before,
                "{limit:?}: the refusals took nothing"
            );
            let _ = &mut conn;
        }
    });
}

/// A deterministic sequence: (time step in µs, key, cost), dense enough to exceed.
fn requests(seed: u64, len: usize) -> Vec<(u64, usize, u32)> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let r = x >> 11;
            (
                r % 400_000,
                ((r >> 20) % 3) as usize,
                ((r >> 30) % 3) as u32,
            )
        })
        .collect()
}

/// One sequence on memory (time injected) and on `redis` (time passed to the script)
/// with a penalty of 1.5 s, asserting identical decisions, the penalty flag included.
/// Both keys of each call are made persistent (the state and the block expire on
/// Redis's own clock, which a loaded machine moves past the sequence's).
async fn same_as_memory<C>(redis: &RedisLimiter<C>, conn: &mut C, limit: Limit, seed: u64) -> usize
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let penalty = Duration::from_millis(1500);
    let clock = ManualClock::new();
    let memory = MemoryLimiterBuilder::new(limit)
        .clock(clock.clone())
        .penalty(penalty)
        .keyed::<String>()
        .unwrap();
    let epoch = Duration::from_secs(sd_ratelimit::SystemClock.now().as_secs() / 3600 * 3600);
    let keys: Vec<String> = (0..3).map(|_| sd_testkit::unique_name("diff")).collect();
    let (mut t, mut penalties) = (Duration::ZERO, 0);
    for (i, (dt, key, cost)) in requests(seed, 200).into_iter().enumerate() {
        t += Duration::from_micros(dt);
        clock.set(t);
        let ours = memory.check_with(keys[key].as_str(), &limit, cost);
        let theirs = redis.check_at(&keys[key], &limit, cost, epoch + t).await;
        let state = redis.redis_key(&keys[key]);
        let block = format!("{state}:b");
        for k in [state, block] {
            let _: i64 = redis::cmd("PERSIST")
                .arg(k)
                .query_async(conn)
                .await
                .unwrap();
        }
        match (ours, theirs) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "step {i} of {limit:?} at {t:?}");
                penalties += usize::from(a.penalty);
            }
            (Err(Error::InsufficientCapacity { .. }), Err(Error::InsufficientCapacity { .. })) => {}
            (a, b) => panic!("step {i} of {limit:?}: memory {a:?}, redis {b:?}"),
        }
    }
    penalties
}

#[test]
fn redis_and_cluster_penalise_exactly_as_memory() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let cluster = sd_testkit::RedisCluster::start().expect("redis cluster must start");
    let q = Quota::per_second(2).unwrap().with_burst(3).unwrap();
    let limits = [
        Limit::gcra(q),
        Limit::token_bucket()
            .capacity(3)
            .refill_amount(2)
            .refill_interval(Duration::from_secs(1))
            .build()
            .unwrap(),
        Limit::leaky_queue(q.with_burst(1).unwrap(), Duration::from_millis(300)).unwrap(),
        Limit::sliding_window(4, Duration::from_secs(2)).unwrap(),
    ];
    runtime().block_on(async {
        let penalised = |conn| {
            RedisLimiterBuilder::new(limits[0])
                .prefix(sd_testkit::unique_name("pen"))
                .timeout(Duration::from_secs(5))
                .penalty(Duration::from_millis(1500))
                .build(conn)
                .unwrap()
        };
        let mut single_conn = manager(server.url()).await;
        let single = penalised(single_conn.clone());
        let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
        let mut cluster_conn = client.get_async_connection().await.unwrap();
        let clustered = RedisLimiterBuilder::new(limits[0])
            .timeout(Duration::from_secs(5))
            .penalty(Duration::from_millis(1500))
            .build(cluster_conn.clone())
            .unwrap();
        for (n, limit) in limits.into_iter().enumerate() {
            let mut penalties = 0;
            for seed in 1..3u64 {
                penalties +=
                    same_as_memory(&single, &mut single_conn, limit, seed * 31 + n as u64).await;
                penalties +=
                    same_as_memory(&clustered, &mut cluster_conn, limit, seed * 97 + n as u64)
                        .await;
            }
            assert!(
                penalties > 20,
                "{limit:?}: the sequences reach the penalty ({penalties})"
            );
        }
    });
}
