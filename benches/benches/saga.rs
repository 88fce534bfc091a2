//! sd-saga: steps per second of a 5-step saga (3 compensatable, pivot, retriable) through
//! the memory log and the PostgreSQL log, beside the same 5 participant calls made in a
//! plain sequence with no saga, so the log's cost is a ratio from one run. Two kinds of
//! participant: a no-op (the orchestrator's own cost shows) and one INSERT into a
//! PostgreSQL table per call (a participant doing a local write, as real ones do).
//!
//! After the groups it counts the PostgreSQL writes per step two ways: the store's
//! statement counter and the transaction ids the server assigned around 200 sagas.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sd_saga::postgres::PostgresStore;
use sd_saga::{MemoryStore, Orchestrator, Saga, SagaOutcome, SagaStore, Step, StepContext};
use sqlx::PgPool;
use tokio::runtime::Runtime;

type Data = u64;
const STEPS: u64 = 5;

/// What a step calls: nothing, or one INSERT keyed by the idempotency key.
#[derive(Clone)]
enum Participant {
    Noop(Arc<AtomicU64>),
    Insert(PgPool),
}

impl Participant {
    async fn call(&self, key: String) {
        match self {
            Participant::Noop(n) => {
                n.fetch_add(1, Ordering::Relaxed);
            }
            Participant::Insert(pool) => {
                sqlx::query("INSERT INTO effects (key) VALUES ($1) ON CONFLICT DO NOTHING")
                    .bind(key)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
    }
}

fn saga(p: &Participant) -> Saga<Data> {
    let action = |p: Participant| {
        move |ctx: StepContext, data: Data| {
            let p = p.clone();
            async move {
                p.call(ctx.idempotency_key()).await;
                Ok(data + 1)
            }
        }
    };
    let undo = |p: Participant| {
        move |ctx: StepContext, _: Data| {
            let p = p.clone();
            async move {
                p.call(ctx.idempotency_key()).await;
                Ok(())
            }
        }
    };
    let mut b = Saga::builder("bench");
    for i in 0..3 {
        b = b.step(Step::compensatable(
            format!("c{i}"),
            action(p.clone()),
            undo(p.clone()),
        ));
    }
    b.step(Step::pivot("pivot", action(p.clone())))
        .step(Step::retriable("after", action(p.clone())))
        .build()
        .unwrap()
}

async fn plain(p: &Participant, id: &str) -> Data {
    let mut data = 0;
    for step in 0..STEPS {
        p.call(format!("{id}/{step}/forward")).await;
        data += 1;
    }
    data
}

async fn run<S: SagaStore>(orch: &Orchestrator<Data, S>, id: String) {
    let outcome = orch.run(id, 0).await.unwrap();
    assert_eq!(outcome, SagaOutcome::Completed(STEPS));
}

fn group(c: &mut Criterion, rt: &Runtime, name: &str, p: &Participant, pg: &PostgresStore) {
    let mut g = c.benchmark_group(format!("saga/{name}"));
    g.throughput(Throughput::Elements(STEPS));
    let seq = AtomicU64::new(0);
    let id = || format!("{name}-{}", seq.fetch_add(1, Ordering::Relaxed));
    g.bench_function("plain_sequence", |b| {
        b.iter(|| rt.block_on(plain(p, &id())))
    });
    let memory = Orchestrator::builder(saga(p), MemoryStore::new())
        .build()
        .unwrap();
    g.bench_function("memory_log", |b| b.iter(|| rt.block_on(run(&memory, id()))));
    let postgres = Orchestrator::builder(saga(p), pg.clone()).build().unwrap();
    g.bench_function("postgres_log", |b| {
        b.iter(|| rt.block_on(run(&postgres, id())))
    });
    g.finish();
}

async fn store(url: &str, max: u32) -> PostgresStore {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .unwrap();
    let store = PostgresStore::builder().build(pool).unwrap();
    store.migrate().await.unwrap();
    store
}

/// The server's next transaction id: every transaction that writes takes one, at once
/// (no statistics flush to wait for). This query takes one too.
async fn next_xid(admin: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Writes per step over 200 sagas, counted by the store and by the transaction ids the
/// server handed out meanwhile (the bench's own server, so nothing else writes).
async fn count_writes(url: &str) {
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    let p = Participant::Noop(Arc::new(AtomicU64::new(0)));
    let pg = store(url, 4).await;
    let orch = Orchestrator::builder(saga(&p), pg.clone()).build().unwrap();
    run(&orch, "warm-up".into()).await;
    let sagas = 200;
    let before = next_xid(&admin).await;
    let statements = pg.write_statements();
    for i in 0..sagas {
        run(&orch, format!("count-{i}")).await;
    }
    let statements = pg.write_statements() - statements;
    let xids = next_xid(&admin).await - before - 1;
    let steps = (sagas * STEPS) as f64;
    println!(
        "saga/postgres writes per step over {sagas} sagas of {STEPS} steps: {:.3} statements (store counter), {:.3} write transactions (server transaction ids)",
        statements as f64 / steps,
        xids as f64 / steps
    );
}

fn bench(c: &mut Criterion) {
    let rt = sd_testkit::runtime_with(1);
    let db = sd_testkit::database().expect("a postgres server");
    let pg = rt.block_on(store(db.url(), 4));
    rt.block_on(async {
        sqlx::query("CREATE TABLE effects (key TEXT PRIMARY KEY)")
            .execute(pg.pool())
            .await
            .unwrap();
    });
    let noop = Participant::Noop(Arc::new(AtomicU64::new(0)));
    group(c, &rt, "noop_steps", &noop, &pg);
    let insert = Participant::Insert(pg.pool().clone());
    group(c, &rt, "insert_steps", &insert, &pg);
    rt.block_on(count_writes(db.url()));
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
