//! The checkout example, run on memory and on Redis (two servers, sharded) + PostgreSQL
//! started by the testkit; its summary must show every promise kept.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../checkout/app/mod.rs"]
mod app;

use app::{Config, Summary};

/// The promises of the checkout, checked on the summary of one run.
fn assert_kept(summary: &Summary) {
    println!("{summary}");
    assert!(summary.problems.is_empty(), "{:#?}", summary.problems);
    let config = Config::memory();
    assert_eq!(
        summary.orders,
        config.load.clients * config.load.orders_per_client,
        "every order answered"
    );
    // No oversold stock: per SKU, held by placed orders + left = what there was.
    assert!(summary.stock_ok(), "{:?}", summary.stock);
    // The reservation that stalled past its lease was refused by its stale token.
    assert!(summary.stale_tokens >= 1);
    // Declined cards and missing stock end in compensated sagas, and only those.
    assert!(summary.placed > 0);
    assert!(summary.declined > 0 && summary.compensated > 0);
    assert_eq!(summary.placed + summary.failed, summary.orders);
    assert_eq!(summary.compensated as usize, summary.failed);
    // Every OrderPlaced relayed once and handled once by each consumer.
    assert_eq!(summary.events_relayed, summary.placed);
    assert!(summary.deliveries.values().all(|n| *n == summary.placed));
    // The first 3 publishes lost their acks: redelivered, and dropped by each consumer.
    assert!(summary.redeliveries_dropped > 0);
    assert!(summary.events_published > summary.events_relayed);
    // Every duplicate send got the stored answer (each key ran once).
    assert!(summary.duplicates_sent > 0);
    assert_eq!(summary.duplicates_absorbed, summary.duplicates_sent);
    // The payment provider saw calls, never more at once than the semaphore's permits.
    assert!(summary.provider_peak >= 1);
    assert!(summary.provider_peak <= u64::from(app::PROVIDER_CALLS));
    // The cache answered most reads.
    assert!(summary.cache_hits > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkout_on_memory() {
    let summary = app::run(&Config::memory()).await.unwrap();
    assert_kept(&summary);
    assert!(summary.shard_keys.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkout_on_redis_and_postgres() {
    let redis = sd_testkit::RedisServer::start_many(2).expect("redis-server");
    let db = sd_testkit::database().expect("postgres");
    let config = Config::on(redis.iter().map(|r| r.url()).collect(), db.url());
    let summary = app::run(&config).await.unwrap();
    assert_kept(&summary);
    // sd-hashring put cache and lease keys on both servers.
    assert_eq!(summary.shard_keys.len(), 2);
    assert!(
        summary.shard_keys.iter().all(|n| *n > 0),
        "{:?}",
        summary.shard_keys
    );
}

/// One of the two Redis servers (cache and lease shards) frozen with SIGSTOP for a second
/// mid-burst: calls to it wait or fail and are retried, and no promise breaks. The probe
/// shows the freeze met the load: calls to the frozen server were in flight at its end,
/// or failed during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkout_with_a_redis_server_paused() {
    let mut redis = sd_testkit::RedisServer::start_many(2).expect("redis-server");
    let db = sd_testkit::database().expect("postgres");
    let config = Config::on(redis.iter().map(|r| r.url()).collect(), db.url());
    let probe = config.probe.clone();
    // When the fault starts is a choice, not a check: the probe says whether it met load.
    let fault = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (_, failed_before) = probe.read(1);
        redis[1].pause().unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let (waiting, failed_after) = probe.read(1);
        redis[1].resume().unwrap();
        (redis, waiting, failed_after - failed_before)
    });
    let summary = app::run(&config).await.unwrap();
    let (_servers, waiting, failed) = fault.await.unwrap();
    assert_kept(&summary);
    assert!(
        waiting + failed > 0,
        "the frozen server saw no call during its freeze (in flight at its end: {waiting}, failed during it: {failed})"
    );
    println!(
        "frozen server: {waiting} calls waiting at the end of the freeze, {failed} failed during it"
    );
}
