//! The PostgreSQL backend (feature `postgres`): a leases table whose `epoch` is the
//! fencing token, and advisory locks for callers that want them.
//!
//! - **Leases**: one row per resource. Acquire is one statement,
//!   `INSERT .. ON CONFLICT DO UPDATE .. WHERE the lease is free or expired RETURNING
//!   epoch`, which bumps `epoch` in the same row write that grants the lease: the token
//!   comes from the database's own transaction order, so it is strictly increasing per
//!   resource with no clock assumption. Expiry uses the server's `clock_timestamp()`.
//!   Release and extend compare the holder's random value. Rows stay after release so
//!   the epoch keeps growing.
//! - **Advisory locks**: [`PostgresLock::try_lock_xact`] (transaction-scoped, the
//!   default: freed at commit or rollback, works behind transaction-mode poolers) and
//!   [`PostgresLock::try_lock_session`] (session-scoped, on a dedicated connection,
//!   freed by [`SessionLock::release`] or when the connection drops). Both bump the same
//!   `epoch` for a fencing token. A dropped connection frees a session lock silently:
//!   fence the writes.
//! - Schema: [`PostgresLock::migrate`] creates the table (default `sd_lock_leases`;
//!   name configurable, optionally schema-qualified) through sd-core's `Migrator`:
//!   versioned, recorded in `sd_migrations`, safe when replicas run it at once.
//!   `migrations/0001_leases.sql` applies with `psql` as it stands.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::time::Instant;

use sd_core::TableName;
use sd_core::migrate::{Migration, Migrator};

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Lease, Release, RetryPolicy};
use crate::observe::Meters;

/// The leases table's migration, written for the default name `sd_lock_leases`.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "leases",
    sql: include_str!("../migrations/0001_leases.sql"),
}];

const DEFAULT_TABLE: &str = "sd_lock_leases";

pub(crate) fn millis(ttl: Duration) -> i64 {
    i64::try_from(lease::ceil_millis(ttl)).unwrap_or(i64::MAX)
}

/// The SQL for "`ms_param` milliseconds from now" on the server's clock.
pub(crate) fn expiry_after(ms_param: &str) -> String {
    format!("clock_timestamp() + make_interval(secs => {ms_param}::float8 / 1000.0)")
}

pub(crate) fn token(epoch: i64) -> Result<FencingToken> {
    u64::try_from(epoch)
        .map(FencingToken)
        .map_err(|_| Error::UnexpectedReply {
            reason: "negative epoch in the leases table",
        })
}

/// Runs `sql`, one `pg_try_advisory_*lock` call on `$1` answering whether it took the
/// lock, on `conn`; [`Error::Held`] when another transaction or session has it.
async fn try_advisory(conn: &mut PgConnection, sql: &'static str, resource: &str) -> Result<()> {
    let got: bool = sqlx::query_scalar(sql)
        .bind(resource)
        .fetch_one(&mut *conn)
        .await?;
    if got {
        Ok(())
    } else {
        Err(Error::Held {
            resource: resource.to_owned(),
        })
    }
}

struct Sql {
    acquire: String,
    extend: String,
    release: String,
    bump: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        let expiry = expiry_after("$3");
        Sql {
            acquire: format!(
                "INSERT INTO {t} AS l (resource, holder, epoch, expires_at) VALUES ($1, $2, 1, {expiry}) \
                 ON CONFLICT (resource) DO UPDATE \
                 SET holder = EXCLUDED.holder, epoch = l.epoch + 1, expires_at = EXCLUDED.expires_at \
                 WHERE l.holder IS NULL OR l.expires_at <= clock_timestamp() \
                 RETURNING epoch"
            ),
            extend: format!(
                "UPDATE {t} SET expires_at = {expiry} \
                 WHERE resource = $1 AND holder = $2 AND expires_at > clock_timestamp() RETURNING epoch"
            ),
            release: format!(
                "WITH old AS (SELECT resource, expires_at FROM {t} WHERE resource = $1 AND holder = $2 FOR UPDATE) \
                 UPDATE {t} AS l SET holder = NULL, expires_at = NULL FROM old \
                 WHERE l.resource = old.resource RETURNING old.expires_at > clock_timestamp()"
            ),
            bump: format!(
                "INSERT INTO {t} AS l (resource, epoch) VALUES ($1, 1) \
                 ON CONFLICT (resource) DO UPDATE SET epoch = l.epoch + 1 RETURNING epoch"
            ),
        }
    }
}

/// Leases in a PostgreSQL table. Cheap to clone.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::{Lock, postgres::PostgresLock};
///
/// let lock = PostgresLock::builder(pool).table("jobs.leases").build()?;
/// lock.migrate().await?;
/// let lease = lock.try_acquire("invoice:9", Duration::from_secs(30)).await?;
/// // ... pass lease.token() to the fenced writes ...
/// let _ = lock.release(lease).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresLock {
    pool: PgPool,
    table: TableName,
    sql: Arc<Sql>,
    retry: RetryPolicy,
    meters: Meters,
}

impl fmt::Debug for PostgresLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLock")
            .field("table", &self.table)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Options of a [`PostgresLock`]; [`build`](Self::build) checks them and names the
/// setter of a value out of range.
#[derive(Debug, Clone)]
pub struct PostgresLockBuilder {
    pool: PgPool,
    table: String,
    retry: RetryPolicy,
    name: String,
}

impl PostgresLockBuilder {
    /// The leases table (default `sd_lock_leases`): `table` or `schema.table`, each part
    /// 1 to 48 of `[a-z0-9_]` (sd-core's `TableName` rule).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The retry policy of [`crate::Lock::acquire`] (default
    /// [`lease::default_retry`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The lock's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`, registered by [`build`](Self::build)) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The lock, or [`Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<PostgresLock> {
        let table = TableName::parse("table", &self.table)?;
        Ok(PostgresLock {
            pool: self.pool,
            sql: Arc::new(Sql::new(&table.to_string())),
            table,
            retry: self.retry,
            meters: Meters::new(&self.name, sd_core::observe::backend::POSTGRES),
        })
    }
}

impl PostgresLock {
    /// Leases in table `sd_lock_leases` on `pool`, with the default retry policy.
    pub fn new(pool: PgPool) -> Self {
        PostgresLock {
            pool,
            table: TableName::parse("table", DEFAULT_TABLE)
                .expect("the default table name is valid"),
            sql: Arc::new(Sql::new(DEFAULT_TABLE)),
            retry: lease::default_retry(),
            meters: Meters::unnamed(sd_core::observe::backend::POSTGRES),
        }
    }

    /// Options for leases on `pool`.
    pub fn builder(pool: PgPool) -> PostgresLockBuilder {
        PostgresLockBuilder {
            pool,
            table: DEFAULT_TABLE.into(),
            retry: lease::default_retry(),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    /// The same lock with another retry policy for [`crate::Lock::acquire`].
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The leases table's migration with the configured name put in, for teams whose
    /// DDL goes through their own tool ([`Migrator::render`]).
    pub fn migrator(&self) -> Migrator {
        Migrator::new("sd-lock", MIGRATIONS).name(DEFAULT_TABLE, &self.table)
    }

    /// Creates the leases table if it does not exist (through [`Migrator`], recorded in
    /// `sd_migrations`); safe to run from every replica at once.
    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// [`crate::Lock::try_acquire`].
    ///
    /// The statement runs in a task of its own: if this future is dropped, the task
    /// still finishes, and a lease it got is released right after. (Releasing from the
    /// dropped future instead could overtake the statement still in flight.)
    pub async fn try_acquire(&self, resource: &str, ttl: Duration) -> Result<Lease> {
        lease::validate(resource, ttl, Duration::from_millis(1))?;
        let owned = resource.to_owned();
        lease::acquire_in_task(self, move |this| async move {
            this.acquire_once(&owned, ttl).await
        })
        .await
    }

    async fn acquire_once(&self, resource: &str, ttl: Duration) -> Result<Lease> {
        let holder = lease::new_holder();
        let start = Instant::now();
        let epoch: Option<i64> = sqlx::query_scalar(&self.sql.acquire)
            .bind(resource)
            .bind(&holder)
            .bind(millis(ttl))
            .fetch_optional(&self.pool)
            .await?;
        let elapsed = start.elapsed();
        let Some(epoch) = epoch else {
            return Err(Error::Held {
                resource: resource.to_owned(),
            });
        };
        let Some(validity) = lease::validity(ttl, elapsed) else {
            let _ = self.release_holder(resource, &holder).await;
            return Err(Error::ValidityExhausted {
                resource: resource.to_owned(),
                ttl,
                elapsed,
            });
        };
        Ok(Lease {
            resource: resource.to_owned(),
            token: token(epoch)?,
            ttl,
            valid_until: start + elapsed + validity,
            holder,
            handle: 0,
        })
    }

    async fn release_holder(&self, resource: &str, holder: &str) -> Result<Release> {
        let live: Option<Option<bool>> = sqlx::query_scalar(&self.sql.release)
            .bind(resource)
            .bind(holder)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match live {
            Some(Some(true)) => Release::Released,
            _ => Release::Expired,
        })
    }

    /// [`crate::Lock::extend`].
    pub async fn extend(&self, lease: &mut Lease, ttl: Duration) -> Result<()> {
        lease::validate_ttl(ttl, Duration::from_millis(1))?;
        let start = Instant::now();
        let epoch: Option<i64> = sqlx::query_scalar(&self.sql.extend)
            .bind(&lease.resource)
            .bind(&lease.holder)
            .bind(millis(ttl))
            .fetch_optional(&self.pool)
            .await?;
        let elapsed = start.elapsed();
        match (epoch, lease::validity(ttl, elapsed)) {
            (Some(_), Some(validity)) => {
                lease.valid_until = start + elapsed + validity;
                lease.ttl = ttl;
                Ok(())
            }
            _ => Err(Error::LeaseExpired {
                resource: lease.resource.clone(),
            }),
        }
    }

    /// [`crate::Lock::release`].
    pub async fn release(&self, lease: Lease) -> Result<Release> {
        self.release_holder(&lease.resource, &lease.holder).await
    }

    /// Takes the transaction-scoped advisory lock on `resource` inside the caller's
    /// transaction (`&mut *tx`), and returns a fresh fencing token from the leases
    /// table. The lock is freed when the transaction ends; [`Error::Held`] when another
    /// transaction has it. Keys are `hashtextextended(resource, 0)`: distinct names can
    /// collide (rarely), which only makes them share a lock.
    ///
    /// Counted as one acquisition of this lock (feature `metrics`), in a `lock.call`
    /// span.
    pub async fn try_lock_xact(
        &self,
        conn: &mut PgConnection,
        resource: &str,
    ) -> Result<FencingToken> {
        lease::validate(resource, Duration::from_secs(1), Duration::ZERO)?;
        self.meters
            .try_acquire(self.lock_xact(conn, resource))
            .await
    }

    async fn lock_xact(&self, conn: &mut PgConnection, resource: &str) -> Result<FencingToken> {
        try_advisory(
            conn,
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
            resource,
        )
        .await?;
        let epoch: i64 = sqlx::query_scalar(&self.sql.bump)
            .bind(resource)
            .fetch_one(&mut *conn)
            .await?;
        token(epoch)
    }

    /// Takes the session-scoped advisory lock on `resource` on a dedicated pooled
    /// connection, with a fencing token. Hold the [`SessionLock`] as long as the work
    /// runs; [`Error::Held`] when another session has it.
    ///
    /// Counted as one acquisition of this lock (feature `metrics`), in a `lock.call`
    /// span.
    pub async fn try_lock_session(&self, resource: &str) -> Result<SessionLock> {
        lease::validate(resource, Duration::from_secs(1), Duration::ZERO)?;
        self.meters.try_acquire(self.lock_session(resource)).await
    }

    async fn lock_session(&self, resource: &str) -> Result<SessionLock> {
        let mut conn = self.pool.acquire().await?;
        // The connection closes if this future is dropped half-way (the lock with it).
        conn.close_on_drop();
        try_advisory(
            &mut conn,
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            resource,
        )
        .await?;
        let epoch: i64 = sqlx::query_scalar(&self.sql.bump)
            .bind(resource)
            .fetch_one(&self.pool)
            .await?;
        Ok(SessionLock {
            conn: Some(conn),
            resource: resource.to_owned(),
            token: token(epoch)?,
            meters: self.meters.clone(),
        })
    }
}

/// A session-scoped advisory lock on its own connection.
///
/// Dropping it without [`SessionLock::release`] closes the connection (in the
/// background), which frees the lock: a pooled connection never goes back to the pool
/// still holding it.
pub struct SessionLock {
    conn: Option<PoolConnection<Postgres>>,
    resource: String,
    token: FencingToken,
    meters: Meters,
}

impl fmt::Debug for SessionLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLock")
            .field("resource", &self.resource)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl SessionLock {
    /// The resource.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The backend process id of the holding connection (to watch or terminate it).
    pub async fn backend_pid(&mut self) -> Result<i32> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(Error::LeaseExpired {
                resource: self.resource.clone(),
            });
        };
        Ok(sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut **conn)
            .await?)
    }

    /// Unlocks. [`Release::Expired`] when the session no longer held it (the connection
    /// dropped in between).
    pub async fn release(mut self) -> Result<Release> {
        let meters = self.meters.clone();
        meters.release(self.unlock()).await
    }

    async fn unlock(&mut self) -> Result<Release> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(Release::Expired);
        };
        let unlocked: Result<bool, sqlx::Error> =
            sqlx::query_scalar("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                .bind(&self.resource)
                .fetch_one(&mut *conn)
                .await;
        match unlocked {
            // The connection still closes on drop: a session that held a lock is not
            // handed to another user of the pool.
            Ok(true) => Ok(Release::Released),
            Ok(false) => Ok(Release::Expired),
            // The session is gone, and its locks with it.
            Err(sqlx::Error::Io(_) | sqlx::Error::Protocol(_)) => Ok(Release::Expired),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("57P01") => {
                Ok(Release::Expired)
            }
            Err(e) => Err(e.into()),
        }
    }
}

forward_lock!([] PostgresLock, retry: retry, meters: meters);
