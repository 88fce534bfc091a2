//! The contract suite through a [`BoxStore`] chosen from a configuration string at run
//! time, as a service picks its saga log: `memory`, and a PostgreSQL URL when the
//! `postgres` feature is on.
#![allow(clippy::unwrap_used)]

use sd_saga::{BoxStore, MemoryStore, conformance};

/// The log a configuration string names: `memory`, or a `postgres://` URL (migrated).
async fn store_from(config: &str) -> BoxStore {
    match config {
        "memory" => BoxStore::new(MemoryStore::new()),
        #[cfg(feature = "postgres")]
        url if url.starts_with("postgres://") => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(20)
                .acquire_timeout(std::time::Duration::from_secs(30))
                .connect(url)
                .await
                .unwrap();
            let store = sd_saga::postgres::PostgresStore::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build(pool)
                .unwrap();
            store.migrate().await.unwrap();
            BoxStore::new(store)
        }
        other => panic!("unknown saga log `{other}`"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boxed_log_from_configuration_keeps_the_contract() {
    conformance::run_all(|| store_from("memory")).await;

    // A fresh database per case: the cases reuse saga ids.
    #[cfg(feature = "postgres")]
    {
        let mut databases = Vec::new();
        conformance::run_all(|| {
            let db = sd_testkit::database()
                .expect("a postgres server (install postgresql or set SD_DATABASE_URL)");
            let url = db.url().to_owned();
            databases.push(db);
            async move { store_from(&url).await }
        })
        .await;
        assert_eq!(databases.len(), conformance::CASES.len());
    }
}
