//! The fenced store the holders of the pause tests write through: `RedisFence` (a Lua
//! script) or `PostgresFence` (a row check in the writing transaction, then the write).

use std::time::Duration;

/// `common::manager` with a response timeout that outlasts the pause: a request in
/// flight when the holder is stopped gets its reply after SIGCONT instead of a timeout.
#[cfg(feature = "redis")]
pub async fn patient_manager(url: &str) -> redis::aio::ConnectionManager {
    sd_testkit::redis_manager(url, Duration::from_secs(3), Duration::from_secs(60)).await
}

#[cfg(feature = "postgres")]
pub async fn pg_pool(url: &str) -> sqlx::PgPool {
    use std::str::FromStr;
    // A holder stopped inside its transaction keeps the fence row locked; the server
    // ends such a session after a second, as production settings do. The testkit's
    // server runs `synchronous_commit=off` for speed, which loses the last commits when
    // it is killed (the grants, and the tokens with them, would be handed out again):
    // these sessions commit durably, as a lock's database must.
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .unwrap()
        .options([
            ("idle_in_transaction_session_timeout", "1000"),
            ("synchronous_commit", "on"),
        ]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap()
}

/// The fenced store every holder writes through.
#[derive(Clone)]
pub enum Fence {
    #[cfg(feature = "redis")]
    Redis(sd_lock::fence::redis::RedisFence<redis::aio::ConnectionManager>),
    #[cfg(feature = "postgres")]
    Postgres(sd_lock::fence::postgres::PostgresFence, sqlx::PgPool),
}

impl Fence {
    /// The fence of `backend` (`postgres`: a fence table in the database at `url`;
    /// any other: `RedisFence` on the Redis at `url` under `prefix`).
    pub async fn open(backend: &str, url: &str, prefix: &str) -> Fence {
        match backend {
            #[cfg(feature = "postgres")]
            "postgres" => {
                let fence = sd_lock::fence::postgres::PostgresFence::new();
                Fence::Postgres(fence, pg_pool(url).await)
            }
            #[cfg(feature = "redis")]
            _ => Fence::Redis(
                sd_lock::fence::redis::RedisFence::builder(patient_manager(url).await)
                    .prefix(format!("{prefix}-fence"))
                    .build()
                    .unwrap(),
            ),
            #[cfg(not(feature = "redis"))]
            other => panic!("no fence for `{other}` without the redis feature"),
        }
    }

    /// Creates what the store needs (the parent, before the child starts).
    #[allow(irrefutable_let_patterns)] // with `postgres` alone, the only variant
    pub async fn prepare(&self) {
        #[cfg(feature = "postgres")]
        if let Fence::Postgres(fence, pool) = self {
            fence.migrate(pool).await.unwrap();
            sd_lock::postgres::PostgresLock::new(pool.clone())
                .migrate()
                .await
                .unwrap();
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS fenced_data (resource text PRIMARY KEY, value text NOT NULL)",
            )
            .execute(pool)
            .await
            .unwrap();
        }
    }

    /// One fenced write of `value` to `resource` with `token`.
    pub async fn write(
        &self,
        resource: &str,
        token: u64,
        value: &str,
    ) -> Result<(), sd_lock::Error> {
        let token = sd_lock::FencingToken(token);
        match self {
            #[cfg(feature = "redis")]
            Fence::Redis(fence) => fence.write(resource, token, value.as_bytes()).await,
            #[cfg(feature = "postgres")]
            Fence::Postgres(fence, pool) => {
                let mut tx = pool.begin().await?;
                fence.check(&mut tx, resource, token).await?;
                sqlx::query(
                    "INSERT INTO fenced_data (resource, value) VALUES ($1, $2) \
                     ON CONFLICT (resource) DO UPDATE SET value = EXCLUDED.value",
                )
                .bind(resource)
                .bind(value)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// The value the store holds at the end (`newest` raises nothing it has not seen).
    pub async fn final_value(&self, resource: &str, newest: u64) -> Option<String> {
        match self {
            #[cfg(feature = "redis")]
            Fence::Redis(fence) => fence
                .read(resource, sd_lock::FencingToken(newest))
                .await
                .unwrap()
                .map(|v| String::from_utf8(v).unwrap()),
            #[cfg(feature = "postgres")]
            Fence::Postgres(_, pool) => {
                let _ = newest;
                sqlx::query_scalar("SELECT value FROM fenced_data WHERE resource = $1")
                    .bind(resource)
                    .fetch_optional(pool)
                    .await
                    .unwrap()
            }
        }
    }
}
