//! Leader election on Redis, PostgreSQL and etcd: the shared contract, one leader at a
//! time under contention (a fenced register), and the builders' checks.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use sd_lock::conformance;

use common::refused;

/// The shared tests of a backend module with a `with_election(ttl, f)`.
macro_rules! suite {
    ($ttl:expr, $tasks:expr, $terms:expr) => {
        #[test]
        fn contract() {
            with_election($ttl, |election, _| async move {
                conformance::election_contract(&election, "contract", $ttl).await;
            });
        }

        #[test]
        fn campaign_outwaits_a_renewing_leader() {
            with_election($ttl, |election, _| async move {
                conformance::campaign_outwaits_a_renewing_leader(&election, "patient", $ttl).await;
            });
        }

        #[test]
        fn one_leader_at_a_time() {
            with_election(Duration::from_secs(10), |election, _| async move {
                conformance::one_leader_at_a_time(election, "leader", $tasks, $terms).await;
            });
        }
    };
}

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;
    use sd_lock::election::redis::RedisElection;

    fn with_election<F, Fut>(ttl: Duration, f: F)
    where
        F: FnOnce(RedisElection<::redis::aio::ConnectionManager>, String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let server = sd_testkit::redis().expect("redis-server");
        let url = server.url().to_owned();
        common::runtime().block_on(async {
            let election = RedisElection::builder(common::manager(&url).await)
                .prefix(sd_testkit::unique_name("leader"))
                .ttl(ttl)
                .retry(common::backoff(
                    Duration::from_micros(500),
                    Duration::from_millis(5),
                ))
                .build()
                .unwrap();
            f(election, url).await;
        });
    }

    suite!(Duration::from_secs(1), 8, 25);

    #[test]
    fn builder_checks_every_field() {
        with_election(Duration::from_secs(1), |_, url| async move {
            let conn = common::manager(&url).await;
            let b = || RedisElection::builder(conn.clone());
            refused("ttl", b().ttl(Duration::from_millis(2)).build());
            refused("prefix", b().prefix("a}").build());
            refused("timeout", b().timeout(Duration::ZERO).build());
        });
    }
}

#[cfg(feature = "postgres")]
mod on_postgres {
    use super::*;
    use sd_lock::election::postgres::PostgresElection;

    fn with_election<F, Fut>(ttl: Duration, f: F)
    where
        F: FnOnce(PostgresElection, sqlx::PgPool) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let db = sd_testkit::database().expect("postgres");
        common::runtime().block_on(async {
            let pool = common::pg_pool(db.url()).await;
            let election = PostgresElection::builder(pool.clone())
                .ttl(ttl)
                .retry(common::backoff(
                    Duration::from_micros(500),
                    Duration::from_millis(5),
                ))
                .build()
                .unwrap();
            election.migrate().await.unwrap();
            f(election, pool).await;
        });
    }

    suite!(Duration::from_secs(1), 8, 25);

    #[test]
    fn builder_checks_every_field() {
        with_election(Duration::from_secs(1), |_, pool| async move {
            let b = || PostgresElection::builder(pool.clone());
            refused("ttl", b().ttl(Duration::ZERO).build());
            refused("table", b().table("no-dashes").build());
        });
    }
}

#[cfg(feature = "etcd")]
mod on_etcd {
    use super::*;
    use sd_lock::election::etcd::EtcdElection;

    fn with_election<F, Fut>(ttl: Duration, f: F)
    where
        F: FnOnce(EtcdElection, etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let server = sd_testkit::etcd().expect("etcd");
        common::runtime().block_on(async {
            let client = etcd_client::Client::connect([server.url()], None)
                .await
                .unwrap();
            let election = EtcdElection::builder(client.clone())
                .prefix(format!("{}/", sd_testkit::unique_name("election")))
                .ttl(ttl)
                .build()
                .unwrap();
            f(election, client).await;
        });
    }

    // etcd keeps a lease at least its minimum (about 2 s): the contract uses 3 s.
    suite!(Duration::from_secs(3), 4, 10);

    #[test]
    fn builder_checks_every_field() {
        with_election(Duration::from_secs(3), |_, client| async move {
            let b = || EtcdElection::builder(client.clone());
            refused("ttl", b().ttl(Duration::from_millis(500)).build());
            refused("prefix", b().prefix("").build());
            refused("timeout", b().timeout(Duration::ZERO).build());
        });
    }
}
