//! The semaphore on every backend: the shared contract, the bound under contention
//! (many tasks, a fenced register per slot), and the builders' checks.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use sd_lock::conformance;
use sd_lock::semaphore::memory::MemorySemaphore;

fn fast_retry() -> sd_lock::RetryPolicy {
    common::backoff(Duration::from_micros(500), Duration::from_millis(5))
}

/// The shared tests of a backend module with a `with_semaphore(permits, f)`: the
/// contract with a `ttl`, and the bound with `tasks` tasks of `sections` sections.
macro_rules! suite {
    ($ttl:expr, $bound:ident, $tasks:expr, $sections:expr) => {
        #[test]
        fn contract() {
            with_semaphore(3, |sem, _| async move {
                conformance::semaphore_contract(&sem, "contract", $ttl).await;
            });
        }

        #[test]
        fn $bound() {
            with_semaphore(3, |sem, _| async move {
                let ttl = Duration::from_secs(10);
                conformance::semaphore_bound(sem, "bound", $tasks, $sections, ttl).await;
            });
        }
    };
}

use common::refused;

#[tokio::test(start_paused = true)]
async fn memory_contract() {
    let sem = MemorySemaphore::builder().permits(3).build().unwrap();
    conformance::semaphore_contract(&sem, "contract", Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_bound_16_tasks_3_permits() {
    let sem = MemorySemaphore::builder()
        .permits(3)
        .retry(fast_retry())
        .build()
        .unwrap();
    let report = conformance::semaphore_bound(sem, "bound", 16, 100, Duration::from_secs(10)).await;
    assert_eq!(report.sections, 1600);
}

#[test]
fn memory_builder_checks_permits() {
    for bad in [0, sd_lock::semaphore::MAX_PERMITS + 1] {
        refused("permits", MemorySemaphore::builder().permits(bad).build());
    }
}

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;
    use sd_lock::semaphore::redis::RedisSemaphore;

    fn with_semaphore<F, Fut>(permits: u32, f: F)
    where
        F: FnOnce(RedisSemaphore<::redis::aio::ConnectionManager>, String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let server = sd_testkit::redis().expect("redis-server");
        let url = server.url().to_owned();
        common::runtime().block_on(async {
            let sem = RedisSemaphore::builder(common::manager(&url).await)
                .permits(permits)
                .prefix(sd_testkit::unique_name("sem"))
                .retry(fast_retry())
                .build()
                .unwrap();
            f(sem, url).await;
        });
    }

    suite!(Duration::from_secs(1), bound_16_tasks_3_permits, 16, 50);

    #[test]
    fn cancelled_acquire_leaves_nothing() {
        with_semaphore(1, |sem, _| async move {
            conformance::cancelled_semaphore_acquire_leaves_nothing(sem, "cancel", true).await;
        });
    }

    #[test]
    fn builder_checks_every_field() {
        with_semaphore(1, |_, url| async move {
            let conn = common::manager(&url).await;
            for (field, built) in [
                (
                    "permits",
                    RedisSemaphore::builder(conn.clone()).permits(0).build(),
                ),
                (
                    "prefix",
                    RedisSemaphore::builder(conn.clone()).prefix("a{b").build(),
                ),
                (
                    "timeout",
                    RedisSemaphore::builder(conn.clone())
                        .timeout(Duration::ZERO)
                        .build(),
                ),
            ] {
                refused(field, built);
            }
        });
    }
}

#[cfg(feature = "postgres")]
mod on_postgres {
    use super::*;
    use sd_lock::semaphore::postgres::PostgresSemaphore;

    fn with_semaphore<F, Fut>(permits: u32, f: F)
    where
        F: FnOnce(PostgresSemaphore, sqlx::PgPool) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let db = sd_testkit::database().expect("postgres");
        common::runtime().block_on(async {
            let pool = common::pg_pool(db.url()).await;
            let sem = PostgresSemaphore::builder(pool.clone())
                .permits(permits)
                .retry(fast_retry())
                .build()
                .unwrap();
            sem.migrate().await.unwrap();
            f(sem, pool).await;
        });
    }

    suite!(Duration::from_secs(1), bound_16_tasks_3_permits, 16, 50);

    #[test]
    fn cancelled_acquire_leaves_nothing() {
        with_semaphore(1, |sem, _| async move {
            conformance::cancelled_semaphore_acquire_leaves_nothing(sem, "cancel", true).await;
        });
    }

    #[test]
    fn builder_checks_every_field_and_migrates_twice() {
        with_semaphore(2, |sem, pool| async move {
            sem.migrate().await.unwrap();
            for (field, built) in [
                (
                    "permits",
                    PostgresSemaphore::builder(pool.clone()).permits(0).build(),
                ),
                (
                    "table",
                    PostgresSemaphore::builder(pool.clone())
                        .table("Bad-Name")
                        .build(),
                ),
            ] {
                refused(field, built);
            }
        });
    }
}

#[cfg(feature = "etcd")]
mod on_etcd {
    use super::*;
    use sd_lock::semaphore::etcd::EtcdSemaphore;

    fn with_semaphore<F, Fut>(permits: u32, f: F)
    where
        F: FnOnce(EtcdSemaphore, etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let server = sd_testkit::etcd().expect("etcd");
        common::runtime().block_on(async {
            let client = etcd_client::Client::connect([server.url()], None)
                .await
                .unwrap();
            let sem = EtcdSemaphore::builder(client.clone())
                .permits(permits)
                .prefix(format!("{}/", sd_testkit::unique_name("sem")))
                .retry(common::backoff(
                    Duration::from_millis(1),
                    Duration::from_millis(10),
                ))
                .build()
                .unwrap();
            f(sem, client).await;
        });
    }

    // etcd keeps a lease at least its minimum (about 2 s): the contract uses 3 s.
    suite!(Duration::from_secs(3), bound_8_tasks_3_permits, 8, 20);

    #[test]
    fn builder_checks_every_field() {
        with_semaphore(1, |_, client| async move {
            for (field, built) in [
                (
                    "permits",
                    EtcdSemaphore::builder(client.clone()).permits(0).build(),
                ),
                ("prefix", EtcdSemaphore::builder(client).prefix("").build()),
            ] {
                refused(field, built);
            }
        });
    }
}
