//! The behaviour suite on the PostgreSQL log (crash injection at every write boundary,
//! fencing, concurrent recovery, 1,000 sagas), the two-statements-per-step budget,
//! configuration checks, and PostgreSQL stopped, killed or paused in the middle of 100
//! sagas.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use sd_saga::postgres::PostgresStore;
use sd_saga::{Direction, Error, Orchestrator, SagaState};
use sd_testkit::TestDatabase;
use sqlx::postgres::PgPoolOptions;
use suite::{Ledger, Shape, expected, orchestrator, recover_all, saga};

async fn store_on(url: &str, timeout: Duration) -> PostgresStore {
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .unwrap();
    let store = PostgresStore::builder()
        .schema("saga_log")
        .table("order_sagas")
        .timeout(timeout)
        .build(pool)
        .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn postgres() -> (PostgresStore, TestDatabase) {
    let db = sd_testkit::database()
        .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
    let store = store_on(db.url(), Duration::from_secs(30)).await;
    (store, db)
}

sd_saga::saga_suite!(postgres);

/// Differential: the same random plans on the memory and the PostgreSQL logs give the
/// same outcome, the same effects and the same event log.
#[test]
fn memory_and_postgres_record_the_same_events() {
    use proptest::test_runner::{Config, TestRunner};
    let rt = sd_testkit::runtime();
    let db = sd_testkit::database().expect("a postgres server");
    let pg = rt.block_on(store_on(db.url(), Duration::from_secs(30)));
    let seq = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config::with_cases(32));
    let plans = proptest::collection::vec(suite::faults(), suite::KINDS.len());
    runner
        .run(&plans, |plan| {
            let id = format!(
                "d-{}",
                seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            rt.block_on(async {
                let mut seen = Vec::new();
                for memory in [true, false] {
                    let ledger = Arc::new(Ledger::default());
                    suite::apply(&ledger, &id, &plan);
                    let def = saga(&ledger, &suite::random_shape());
                    let (outcome, events) = if memory {
                        let orch = orchestrator(&def, sd_saga::MemoryStore::new(), "m");
                        (
                            orch.run(id.clone(), vec![]).await.unwrap(),
                            orch.events(&id).await.unwrap(),
                        )
                    } else {
                        let orch = orchestrator(&def, pg.clone(), "p");
                        (
                            orch.run(id.clone(), vec![]).await.unwrap(),
                            orch.events(&id).await.unwrap(),
                        )
                    };
                    let events: Vec<_> = events.into_iter().map(|e| (e.version, e.event)).collect();
                    seen.push((outcome, events, ledger.effects(&id)));
                }
                proptest::prop_assert_eq!(&seen[0], &seen[1]);
                Ok(())
            })
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_costs_two_statements_per_step() {
    let (store, db) = postgres().await;
    let ledger = Arc::new(Ledger::default());
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store.clone(), "a");
    let before = store.write_statements();
    let sagas = 20;
    for i in 0..sagas {
        let outcome = orch.run(format!("w-{i}"), vec![]).await.unwrap();
        assert_eq!(outcome.state(), SagaState::Completed);
    }
    let steps = sagas * 5;
    assert_eq!(store.write_statements() - before, 2 * steps as u64);
    // The log holds exactly that: one event row per statement.
    let events = db
        .psql("SELECT count(*) FROM saga_log.order_sagas_events")
        .unwrap();
    assert_eq!(events.trim(), (2 * steps).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_only_finished_sagas_and_their_events() {
    let (store, db) = postgres().await;
    let orch = suite::done_and_stuck(store.clone()).await;
    assert_eq!(
        store
            .prune_finished(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.prune_finished(Duration::ZERO).await.unwrap(), 1);
    assert!(orch.get("done").await.unwrap().is_none());
    assert!(orch.events("done").await.unwrap().is_empty());
    assert_eq!(
        orch.get("stuck").await.unwrap().unwrap().state,
        SagaState::Stuck
    );
    let left = db
        .psql("SELECT count(DISTINCT saga_id) FROM saga_log.order_sagas_events")
        .unwrap();
    assert_eq!(left.trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_and_timeouts_fail_at_construction() {
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let field = |b: sd_saga::postgres::PostgresStoreBuilder| match b.build(pool.clone()) {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    let b = PostgresStore::builder;
    assert_eq!(field(b().table("Sagas")), "table");
    assert_eq!(field(b().table("sagas; drop table x")), "table");
    assert_eq!(field(b().table("t".repeat(41))), "table");
    assert_eq!(field(b().schema("1abc")), "schema");
    assert_eq!(field(b().schema("")), "schema");
    assert_eq!(field(b().timeout(Duration::ZERO)), "timeout");
    let ok = b().schema("ops").table("sagas").build(pool).unwrap();
    assert_eq!(ok.table(), "ops.sagas");
    assert_eq!(ok.events_table(), "ops.sagas_events");
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Clean shutdown, then start again.
    Stop,
    /// SIGKILL (a crash), then start again on the same data.
    Kill,
    /// SIGSTOP for longer than the store timeout, then SIGCONT: statements sent before
    /// the pause may still commit after the client gave up on them.
    Pause,
}

/// PostgreSQL goes away while 100 sagas are in the middle of a step and comes back later:
/// every run that hit the outage fails with a store error and leaves its saga where the
/// log has it; a new orchestrator's recover() finishes every saga, each effect once.
async fn outage_mid_flight(outage: Outage) {
    let server = sd_testkit::PostgresServer::start().expect("a postgres server");
    let db = server.create_database().unwrap();
    // Commits must reach the OS before they are acknowledged for a kill to lose nothing
    // (the testkit runs the server with synchronous_commit=off); fsync stays off.
    let url = format!("{}?options=-c%20synchronous_commit%3Don", db.url());
    let store = store_on(&url, Duration::from_secs(2)).await;
    let ledger = Arc::new(Ledger::default());
    ledger.delay(2, Duration::from_secs(1));
    let entered = ledger.entered(2);
    let def = saga(&ledger, &Shape::default());
    let a = orchestrator(&def, store.clone(), "a");
    let ids: Vec<String> = (0..100).map(|i| format!("r-{i}")).collect();
    let runs: Vec<_> = ids
        .iter()
        .map(|id| {
            let a = a.clone();
            let id = id.clone();
            tokio::spawn(async move { a.run(id, vec![]).await })
        })
        .collect();
    // The outage starts once sagas are inside step 2.
    entered.notified().await;
    let mut server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        match outage {
            Outage::Stop => server.stop().unwrap(),
            Outage::Kill => server.kill().unwrap(),
            // The testkit stops the backends too (they run in sessions of their own).
            Outage::Pause => server.pause().unwrap(),
        }
        server
    })
    .await
    .unwrap();
    let mut failed = 0;
    for run in runs {
        match run.await.unwrap() {
            Ok(outcome) => assert_eq!(outcome.state(), SagaState::Completed),
            Err(e) => {
                assert!(e.is_store_failure(), "{e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "the outage hit sagas in flight");
    server = tokio::task::spawn_blocking(move || {
        match outage {
            Outage::Stop | Outage::Kill => server.start_again().unwrap(),
            Outage::Pause => server.resume().unwrap(),
        }
        server
    })
    .await
    .unwrap();
    let b: Orchestrator<_, _> = orchestrator(&def, store.clone(), "b");
    // Every call is recorded raw: the contract allows repeating only the call each saga
    // had in doubt when the outage hit, once, with the same key.
    let (logs, mark) = suite::logs_before_recovery(&b, &ledger, &ids).await;
    recover_all(&b, &ids).await;
    if matches!(outage, Outage::Stop | Outage::Kill) {
        // (A paused server may still commit an outcome its client gave up on.)
        assert!(
            ledger.duplicate_calls() > 0,
            "the outage left calls in doubt, which recovery repeated"
        );
    }
    let mut finished = 0;
    for (id, before) in ids.iter().zip(&logs) {
        ledger.assert_repeats_nothing(id, before, mark);
        match b.get(id).await.unwrap() {
            Some(r) => {
                assert_eq!(r.state, SagaState::Completed, "{id}");
                assert_eq!(ledger.effects(id), expected(5, 0), "{id}");
                finished += 1;
            }
            // Its create never reached the database: it never started.
            None => assert!(ledger.effects(id).is_empty(), "{id}"),
        }
    }
    assert!(finished > 0);
    drop(db);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_flight_loses_and_repeats_nothing() {
    outage_mid_flight(Outage::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_flight_loses_and_repeats_nothing() {
    outage_mid_flight(Outage::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_paused_mid_flight_loses_and_repeats_nothing() {
    outage_mid_flight(Outage::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_migration_applies_with_psql_as_it_stands() {
    let db = sd_testkit::database()
        .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
    // Written for the default names (public.sagas, public.sagas_events): no templates.
    db.psql(include_str!("../migrations/0001_create.sql"))
        .unwrap();
    let pool = PgPoolOptions::new().connect(db.url()).await.unwrap();
    let store = PostgresStore::builder().build(pool.clone()).unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sd_migrations WHERE component = 'sd-saga'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(applied, 2);
    let ledger = Arc::new(Ledger::default());
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store.clone(), "a");
    let outcome = orch.run("m-1", vec![]).await.unwrap();
    assert_eq!(outcome.state(), SagaState::Completed);
    // Configured names are put in by the migrator, the schema included.
    let custom = PostgresStore::builder()
        .schema("ops")
        .table("order_sagas")
        .build(pool)
        .unwrap();
    let sql = &custom.migrator().render()[0].sql;
    assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS ops;"));
    assert!(sql.contains("CREATE TABLE IF NOT EXISTS ops.order_sagas ("));
    assert!(sql.contains("order_sagas_live_idx ON ops.order_sagas"));
    assert!(sql.contains("CREATE TABLE IF NOT EXISTS ops.order_sagas_events ("));
}

/// Rows written by the previous schema (only the first migration, no progress, version
/// or deadline columns) by an orchestrator that then died: after `migrate()` they are
/// recovered by the current code, forward, compensating, and stopped by a cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_the_previous_schema_still_recover() {
    let db = sd_testkit::database()
        .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
    db.psql(include_str!("../migrations/0001_create.sql"))
        .unwrap();
    // As the previous code wrote them: "old-run" died inside step 2 (its intent logged),
    // "old-comp" while compensating step 1, "old-cancel" inside step 2 too.
    let row = |id: &str, state: &str, step: i32, comp: bool, data: &str| {
        format!(
            "INSERT INTO public.sagas (id, saga_type, state, step, compensating, data, version, owner, epoch, lease_until)
             VALUES ('{id}', 'order', '{state}', {step}, {comp}, '{data}', 3, 'old', 1, clock_timestamp() - interval '1 minute');
             INSERT INTO public.sagas_events (saga_id, version, epoch, step, direction, kind, attempt)
             VALUES ('{id}', 3, 1, {step}, '{}', 'intent', 1);",
            if comp { "compensate" } else { "forward" }
        )
    };
    db.psql(&row("old-run", "running", 2, false, r#"["s0", "s1"]"#))
        .unwrap();
    db.psql(&row("old-comp", "compensating", 1, true, r#"["s0", "s1"]"#))
        .unwrap();
    db.psql(&row("old-cancel", "running", 2, false, r#"["s0", "s1"]"#))
        .unwrap();
    let pool = PgPoolOptions::new().connect(db.url()).await.unwrap();
    let store = PostgresStore::builder().build(pool).unwrap();
    store.migrate().await.unwrap();
    let ledger = Arc::new(Ledger::default());
    let orch = orchestrator(&saga(&ledger, &Shape::default()), store, "new");
    let record = orch.get("old-run").await.unwrap().unwrap();
    assert_eq!((record.definition_version, record.progress), (1, None));
    orch.cancel("old-cancel", "customer asked").await.unwrap();
    let ids = ["old-run", "old-comp", "old-cancel"].map(String::from);
    recover_all(&orch, &ids).await;
    let state = |id: &'static str| {
        let orch = orch.clone();
        async move { orch.get(id).await.unwrap().unwrap().state }
    };
    assert_eq!(state("old-run").await, SagaState::Completed);
    assert_eq!(
        ledger.effects("old-run"),
        [2, 3, 4].map(|s| (s, Direction::Forward))
    );
    assert_eq!(state("old-comp").await, SagaState::Compensated);
    assert_eq!(
        ledger.effects("old-comp"),
        [1, 0].map(|s| (s, Direction::Compensate))
    );
    // The step in flight when the old orchestrator died may have run: it is awaited (run
    // again with its key), then everything done is undone.
    assert_eq!(state("old-cancel").await, SagaState::Compensated);
    assert_eq!(
        ledger.effects("old-cancel"),
        [
            (2, Direction::Forward),
            (2, Direction::Compensate),
            (1, Direction::Compensate),
            (0, Direction::Compensate)
        ]
    );
}
