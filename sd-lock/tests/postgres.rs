//! The PostgreSQL backend against a real server: the shared suite, migrations, the
//! advisory-lock variant (a dropped connection frees the lock) and the fence table.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::runtime;
use sd_lock::conformance;
use sd_lock::fence::postgres::PostgresFence;
use sd_lock::postgres::PostgresLock;
use sd_lock::{Error, FencingToken, Lock as _, Release};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(8)
        .connect(url)
        .await
        .unwrap()
}

/// Runs `f` with a migrated lock on a fresh database.
fn with_lock<F, Fut>(f: F)
where
    F: FnOnce(PostgresLock, PgPool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let db = sd_testkit::database().expect("postgres");
    runtime().block_on(async {
        let pool = pool(db.url()).await;
        let lock = PostgresLock::new(pool.clone());
        lock.migrate().await.unwrap();
        f(lock, pool).await;
    });
}

#[test]
fn mutual_exclusion_32_tasks_200_sections() {
    with_lock(|lock, _| async move {
        let lock = lock.with_retry(common::backoff(
            Duration::from_micros(500),
            Duration::from_millis(5),
        ));
        common::every_section_lands(lock, 32, 200).await;
    });
}

#[test]
fn contract() {
    with_lock(|lock, _| async move {
        // Server time is the point here, so no paused clock: a lease long enough for
        // the steps that must land inside it on a loaded two-core machine.
        conformance::contract(&lock, "contract", Duration::from_secs(2)).await;
    });
}

#[test]
fn cancelled_acquire_leaves_nothing() {
    with_lock(|lock, _| async move {
        conformance::cancelled_acquire_leaves_nothing(&lock, "cancel", true).await;
    });
}

#[test]
fn migrate_is_idempotent_and_the_table_name_configurable() {
    with_lock(|lock, pool| async move {
        lock.migrate().await.unwrap();
        let custom = PostgresLock::builder(pool.clone())
            .table("public.my_leases")
            .build()
            .unwrap();
        let (a, b) = tokio::join!(custom.migrate(), custom.migrate());
        a.unwrap();
        b.unwrap();
        let lease = custom
            .try_acquire("r", Duration::from_secs(5))
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.my_leases")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(custom.release(lease).await.unwrap(), Release::Released);
        for bad in [
            "",
            "a b",
            "x;drop table t",
            "1abc",
            "a.b.c",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(
                    PostgresLock::builder(pool.clone()).table(bad).build(),
                    Err(Error::InvalidConfig { field: "table", .. })
                ),
                "{bad}"
            );
        }
    });
}

/// The advisory variant: another session cannot take it; when the holder's connection
/// drops (terminated by the server, as on a network failure), the lock is free.
#[test]
fn dropped_connection_frees_the_session_lock() {
    with_lock(|lock, pool| async move {
        let mut held = lock.try_lock_session("job").await.unwrap();
        assert!(matches!(
            lock.try_lock_session("job").await,
            Err(Error::Held { .. })
        ));
        let pid = held.backend_pid().await.unwrap();
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(killed);
        // The server frees the session's locks as it ends the backend.
        let next = loop {
            match lock.try_lock_session("job").await {
                Ok(next) => break next,
                Err(Error::Held { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        };
        assert!(next.token() > held.token());
        assert_eq!(held.release().await.unwrap(), Release::Expired);
        assert_eq!(next.release().await.unwrap(), Release::Released);
        // Dropping a session lock without release closes its connection: free again.
        drop(lock.try_lock_session("job").await.unwrap());
        let again = loop {
            match lock.try_lock_session("job").await {
                Ok(l) => break l,
                Err(Error::Held { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(again.release().await.unwrap(), Release::Released);
    });
}

#[test]
fn transaction_lock_is_freed_at_commit() {
    with_lock(|lock, pool| async move {
        let mut tx = pool.begin().await.unwrap();
        let t1 = lock.try_lock_xact(&mut tx, "job").await.unwrap();
        let mut other = pool.begin().await.unwrap();
        assert!(matches!(
            lock.try_lock_xact(&mut other, "job").await,
            Err(Error::Held { .. })
        ));
        other.rollback().await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let t2 = lock.try_lock_xact(&mut tx, "job").await.unwrap();
        assert!(t2 > t1);
        tx.rollback().await.unwrap();
    });
}

#[test]
fn fence_table_refuses_older_tokens() {
    with_lock(|lock, pool| async move {
        let fence = PostgresFence::new();
        fence.migrate(&pool).await.unwrap();
        fence.migrate(&pool).await.unwrap();
        sqlx::query("CREATE TABLE account (id int PRIMARY KEY, balance int)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO account VALUES (7, 100)")
            .execute(&pool)
            .await
            .unwrap();
        let ttl = Duration::from_millis(200);
        let a = lock.try_acquire("account:7", ttl).await.unwrap();
        // A pauses past its TTL; B waits for the server to expire it (no fixed sleep to
        // guess), takes over and writes through the fence.
        let b = lock
            .acquire("account:7", ttl, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!a.is_valid());
        let mut tx = pool.begin().await.unwrap();
        fence.check(&mut tx, "account:7", b.token()).await.unwrap();
        sqlx::query("UPDATE account SET balance = balance - 30 WHERE id = 7")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        // A wakes up: its transaction is refused before it writes.
        let mut tx = pool.begin().await.unwrap();
        match fence.check(&mut tx, "account:7", a.token()).await {
            Err(Error::StaleToken { token, current }) => {
                assert_eq!((token, current), (a.token(), b.token()));
            }
            other => panic!("stale token accepted: {other:?}"),
        }
        tx.rollback().await.unwrap();
        let balance: i32 = sqlx::query_scalar("SELECT balance FROM account WHERE id = 7")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(balance, 70);
        let mut tx = pool.begin().await.unwrap();
        assert!(matches!(
            fence.check(&mut tx, "x", FencingToken(u64::MAX)).await,
            Err(Error::InvalidConfig { field: "token", .. })
        ));
    });
}
