//! `Migrator` against a real PostgreSQL: applies once, renames tables, runs concurrently
//! from many callers, refuses a changed file.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

use sd_core::TableName;
use sd_core::migrate::{MigrateError, Migration, Migrator};
use sqlx::PgPool;

static V1: Migration = Migration {
    version: 1,
    name: "create",
    sql: "CREATE TABLE IF NOT EXISTS jobs (id BIGINT PRIMARY KEY, body TEXT);
          CREATE INDEX IF NOT EXISTS jobs_body_idx ON jobs (body);",
};
static V2: Migration = Migration {
    version: 2,
    name: "add_state",
    sql: "ALTER TABLE jobs ADD COLUMN state TEXT NOT NULL DEFAULT 'new';",
};
static BOTH: &[Migration] = &[V1, V2];

async fn pool(db: &sd_testkit::TestDatabase) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(db.url())
        .await
        .unwrap()
}

async fn columns(pool: &PgPool, schema: &str, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn applies_each_file_once_for_each_set_of_names() {
    let db = sd_testkit::database().expect("postgres");
    let pool = pool(&db).await;
    let default = Migrator::new("sd-test", BOTH);
    assert_eq!(default.run(&pool).await.unwrap(), 2);
    assert_eq!(default.run(&pool).await.unwrap(), 0);
    assert_eq!(
        columns(&pool, "public", "jobs").await,
        ["id", "body", "state"]
    );

    sqlx::query("CREATE SCHEMA ops")
        .execute(&pool)
        .await
        .unwrap();
    let renamed = Migrator::new("sd-test", BOTH)
        .name("jobs", &TableName::parse("table", "ops.work").unwrap());
    assert_eq!(renamed.run(&pool).await.unwrap(), 2);
    assert_eq!(columns(&pool, "ops", "work").await, ["id", "body", "state"]);
    let index = count(
        &pool,
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'work_body_idx'",
    )
    .await;
    assert_eq!(index, 1);
    let ledger = count(&pool, "SELECT count(*) FROM sd_migrations").await;
    assert_eq!(ledger, 4);
}

#[tokio::test]
async fn concurrent_callers_apply_once() {
    let db = sd_testkit::database().expect("postgres");
    let pool = pool(&db).await;
    let runs = (0..12).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move { Migrator::new("sd-test", BOTH).run(&pool).await.unwrap() })
    });
    let applied: usize = futures_sum(runs).await;
    assert_eq!(applied, 2, "every file applied by exactly one caller");
}

/// The count a `SELECT count(*) ...` query returns.
async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn futures_sum(handles: impl Iterator<Item = tokio::task::JoinHandle<usize>>) -> usize {
    let mut sum = 0;
    for handle in handles.collect::<Vec<_>>() {
        sum += handle.await.unwrap();
    }
    sum
}

#[tokio::test]
async fn a_changed_file_is_refused_and_nothing_is_applied() {
    static EDITED: &[Migration] = &[
        Migration {
            version: 1,
            name: "create",
            sql: "CREATE TABLE IF NOT EXISTS jobs (id BIGINT PRIMARY KEY);",
        },
        V2,
    ];
    let db = sd_testkit::database().expect("postgres");
    let pool = pool(&db).await;
    Migrator::new("sd-test", &BOTH[..1])
        .run(&pool)
        .await
        .unwrap();
    let err = Migrator::new("sd-test", EDITED)
        .run(&pool)
        .await
        .unwrap_err();
    match err {
        MigrateError::Changed { version, name, .. } => assert_eq!((version, name), (1, "create")),
        other => panic!("{other:?}"),
    }
    // Version 2 was not applied either: the whole run is one transaction.
    assert_eq!(columns(&pool, "public", "jobs").await, ["id", "body"]);
}

#[tokio::test]
async fn the_rendered_sql_applies_with_psql_as_the_shipped_file_does() {
    let db = sd_testkit::database().expect("postgres");
    let pool = pool(&db).await;
    for m in Migrator::new("sd-test", BOTH).render() {
        sqlx::raw_sql(&m.sql).execute(&pool).await.unwrap();
    }
    assert_eq!(
        columns(&pool, "public", "jobs").await,
        ["id", "body", "state"]
    );
}
