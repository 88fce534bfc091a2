//! `FailoverConnection` against real failovers: a Sentinel group promoted by command and
//! by a crash (with the crashed master started again, empty, as a stale master), a
//! Redis Cluster failed over by `CLUSTER FAILOVER` and by a killed master, and a single
//! server restarted. A writer keeps writing through each; the oracle reads the final
//! master and counts acknowledged writes that are missing.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sd_core::failover::{FailoverConnection, FailoverError};
use sd_testkit::{RedisCluster, RedisSentinelGroup, RedisServer};

/// One write as the writer saw it.
struct Write {
    key: String,
    started: Instant,
    /// When its reply (or its last error) came back.
    finished: Instant,
    acked: bool,
}

/// Writes `SET {tag}w{i} i` in a loop until `stop`, one at a time.
async fn writer(
    mut conn: FailoverConnection,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("w{i}");
        let started = Instant::now();
        let result: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&key)
            .arg(i)
            .query_async(&mut conn)
            .await;
        if let Err(e) = &result {
            eprintln!("write {key} failed: {e}");
        }
        writes.push(Write {
            key,
            started,
            finished: Instant::now(),
            acked: result.is_ok(),
        });
        done.fetch_add(1, Ordering::Relaxed);
        i += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    writes
}

/// Acknowledged writes missing on the final master: (those in flight during one of the
/// fault `windows`, those begun and finished outside every window).
async fn lost(
    writes: &[Write],
    conn: &mut FailoverConnection,
    windows: &[(Instant, Instant)],
) -> (usize, usize) {
    let (mut inside, mut outside) = (0, 0);
    for w in writes.iter().filter(|w| w.acked) {
        let value: Option<String> = redis::cmd("GET")
            .arg(&w.key)
            .query_async(conn)
            .await
            .unwrap();
        if value.is_none() {
            if windows
                .iter()
                .any(|(from, to)| w.started <= *to && w.finished >= *from)
            {
                inside += 1;
            } else {
                outside += 1;
                if let Some((origin, _)) = windows.first() {
                    eprintln!(
                        "lost outside every window: {} begun {:?} and finished {:?} after the first fault",
                        w.key,
                        w.started.saturating_duration_since(*origin),
                        w.finished.saturating_duration_since(*origin),
                    );
                }
            }
        }
    }
    (inside, outside)
}

/// Waits until every replica of the master on `port` has every write the master
/// acknowledged before this call; returns when the wait began.
async fn wait_for_every_replica(port: u16) -> Instant {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    // WAIT may block for its whole 30 s: longer than the default response timeout.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(35)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.unwrap();
    let replicas = match role.get(2) {
        Some(redis::Value::Array(r)) => r.len(),
        other => panic!("ROLE of the master lists its replicas: {other:?}"),
    };
    assert!(replicas > 0, "the master has replicas");
    let synced = Instant::now();
    let acked: usize = redis::cmd("WAIT")
        .arg(replicas)
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, replicas, "every replica caught up within 30 s");
    synced
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[test]
fn sentinel_connection_follows_a_forced_failover_and_a_crash_never_the_stale_master() {
    let group = RedisSentinelGroup::start().expect("start a sentinel group");
    let runtime = sd_testkit::runtime();
    runtime.block_on(async move {
        let urls = group.sentinel_urls();
        let client = FailoverConnection::builder()
            .sentinel(urls, group.master_name())
            .build()
            .unwrap();
        let conn = client.connect().await.unwrap();
        let first = group.master_port().unwrap();
        assert_eq!(conn.address(), Some(format!("127.0.0.1:{first}")));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let writing = tokio::spawn(writer(conn.clone(), stop.clone(), done.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;

        // A forced promotion. The Sentinels switch to the replica at once but demote
        // the old master only seconds later; until then it takes writes that its
        // demotion discards, whoever sends them. The connection leaves it within a check
        // interval (500 ms) of the switch; how long that took is printed, not asserted
        // (a loaded machine delays any timer). What is asserted: once the old master is
        // demoted (the group settled), nothing acknowledged is lost.
        let group = Arc::new(std::sync::Mutex::new(group));
        let g = group.clone();
        let forced = Instant::now();
        let second = blocking(move || g.lock().unwrap().start_failover().unwrap()).await;
        let switched = Instant::now();
        // The old master becomes a replica in sync. On a loaded machine the Sentinels may
        // fail over once more meanwhile (the new master missed their pings).
        let g = group.clone();
        let settled = blocking(move || {
            g.lock()
                .unwrap()
                .wait_settled_on_any(Duration::from_secs(45))
                .unwrap()
        })
        .await;
        if settled != second {
            println!("the Sentinels failed over a second time, to {settled}");
        }
        let mut windows = vec![(forced, Instant::now())];
        let moved = conn.reconnects();
        println!(
            "forced failover: switch after {:?}, group settled {:?} later, the connection \
             moved {moved} time(s) by then",
            switched - forced,
            windows[0].1 - switched,
        );
        assert!(
            moved >= 1,
            "the connection left the old master by its demotion"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;

        // A crash; the old master comes back at once, empty and still a master, until
        // the Sentinels turn it into a replica: a connection that trusted its old
        // address would write there and lose it all.
        // Redis replicates asynchronously, so a crash loses what the master acknowledged
        // and had not yet sent to its replicas. `WAIT` for every replica marks the point
        // before which nothing can be lost: every write acknowledged before it was sent
        // is on every replica when it answers.
        let synced = wait_for_every_replica(settled).await;
        let g = group.clone();
        let crashed = Instant::now();
        let third = blocking(move || {
            let mut g = g.lock().unwrap();
            let third = g.kill_master_only().unwrap();
            let old = g.node_index(settled).unwrap();
            g.nodes_mut()[old].start_again().unwrap();
            third
        })
        .await;
        windows.push((crashed, Instant::now()));
        assert_ne!(third, settled);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        let writes = writing.await.unwrap();
        let g = group.clone();
        let last = blocking(move || {
            g.lock()
                .unwrap()
                .wait_settled_on_any(Duration::from_secs(45))
                .unwrap()
        })
        .await;
        if last != third {
            // Failed over again after the writer stopped: the restarted node had synced
            // every write by then, so the check below still reads them all.
            println!("the Sentinels failed over again after the crash, to {last}");
        }

        let mut check = client.connect().await.unwrap();
        assert_eq!(check.address(), Some(format!("127.0.0.1:{last}")));
        // A dead master acknowledges nothing: of the crash, only writes acknowledged
        // after the replicas were last known in sync and before the kill may be lost. A
        // write begun after the kill and lost went to the crashed master restarted
        // empty, a stale master.
        let allowed = [windows[0], (synced, windows[1].0)];
        let (lost_inside, lost_outside) = lost(&writes, &mut check, &allowed).await;
        let failed = writes.iter().filter(|w| !w.acked).count();
        println!(
            "sentinel: {} writes, {failed} failed, {} reconnects, acknowledged and lost: \
             {lost_inside} in flight during a failover (forced: {:?}, crash: {:?}), \
             {lost_outside} outside",
            writes.len(),
            conn.reconnects(),
            windows[0].1 - windows[0].0,
            windows[1].1 - windows[1].0,
        );
        assert_eq!(failed, 0, "every write got through within failover_timeout");
        assert_eq!(
            lost_outside, 0,
            "a write outside the forced failover's window or begun after the crash was lost"
        );
        assert!(conn.reconnects() >= 2, "the connection moved twice");
        assert_eq!(conn.address(), Some(format!("127.0.0.1:{third}")));
    });
}

#[test]
fn cluster_connection_follows_cluster_failover_and_a_killed_master() {
    let cluster = RedisCluster::start_with_replicas().expect("start a cluster");
    let runtime = sd_testkit::runtime();
    runtime.block_on(async move {
        let client = FailoverConnection::builder()
            .cluster(cluster.urls())
            .build()
            .unwrap();
        let conn = client.connect().await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let writing = tokio::spawn(writer(conn.clone(), stop.clone(), done.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;

        let cluster = Arc::new(std::sync::Mutex::new(cluster));
        let c = cluster.clone();
        let forced = Instant::now();
        blocking(move || c.lock().unwrap().failover(3).unwrap()).await;
        let mut windows = vec![(forced, Instant::now())];
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = cluster.clone();
        let crashed = Instant::now();
        blocking(move || c.lock().unwrap().kill_master(1).unwrap()).await;
        let recovered = Instant::now();
        windows.push((crashed, recovered));
        // A write in flight when the master died may hang until its timeout: wait for
        // the writer to get 50 more writes done rather than for a guessed time.
        let at = done.load(Ordering::Relaxed);
        sd_testkit::eventually("50 writes after both failovers", || async {
            done.load(Ordering::Relaxed) >= at + 50
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let writes = writing.await.unwrap();

        let mut check = client.connect().await.unwrap();
        let (lost_inside, lost_outside) = lost(&writes, &mut check, &windows).await;
        let failed = writes.iter().filter(|w| !w.acked).count();
        println!(
            "cluster: {} writes, {failed} failed, acknowledged and lost: {lost_inside} begun \
             during a failover (manual: {:?}, crash: {:?}), {lost_outside} outside",
            writes.len(),
            windows[0].1 - windows[0].0,
            windows[1].1 - windows[1].0,
        );
        assert_eq!(failed, 0, "every write got through within failover_timeout");
        assert_eq!(lost_outside, 0, "a write outside a failover was lost");
        let after: Vec<&Write> = writes.iter().filter(|w| w.started > recovered).collect();
        assert!(!after.is_empty(), "the writer wrote after the failovers");
        assert!(
            after.iter().all(|w| w.acked),
            "writes begun after the failovers went through"
        );
    });
}

#[test]
fn server_connection_survives_a_restart_and_build_checks_its_settings() {
    let mut server = RedisServer::start().expect("start redis");
    let runtime = sd_testkit::runtime();
    let client = FailoverConnection::builder()
        .server(server.url())
        .build()
        .unwrap();
    let mut conn = runtime.block_on(client.connect()).unwrap();
    runtime.block_on(async {
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
    });
    server.kill().unwrap();
    server.start_again().unwrap();
    runtime.block_on(async {
        let n: i64 = redis::cmd("INCR")
            .arg("k")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 1, "the restarted server is empty and answers");
        assert_eq!(conn.reconnects(), 1);
        // Script errors are the caller's, not a failover: returned at once.
        let err = redis::cmd("EVAL")
            .arg("return redis.call('NOPE')")
            .arg(0)
            .query_async::<()>(&mut conn)
            .await
            .unwrap_err();
        assert!(!err.is_io_error(), "{err}");
    });
    server.kill().unwrap();
    let dead = FailoverConnection::builder()
        .server(server.url())
        .failover_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = runtime.block_on(dead.connect()).unwrap_err();
    assert!(
        matches!(
            err,
            FailoverError::Backend { .. } | FailoverError::Timeout { .. }
        ),
        "{err}"
    );
}
