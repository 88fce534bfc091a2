//! The PostgreSQL semaphore (feature `postgres`): one row per slot, a transaction a
//! grant.
//!
//! - **Acquire** is one transaction: bump the resource's token counter (row `slot = -1`,
//!   which also queues concurrent grants on one resource behind each other), read the
//!   slots' expiry times and the server's `clock_timestamp()`, apply
//!   [`free_slot`], and write the chosen slot's holder,
//!   token and expiry. When every permit is held it rolls back. Tokens come from the
//!   database's transaction order: strictly increasing per resource, no clock
//!   assumption.
//! - **Renew** and **release** are one statement each, comparing the holder's random
//!   value. Rows stay after release.
//! - Guarantees assume commits are durable. With `synchronous_commit = off` a crash of
//!   the server can lose the last grants, and their tokens are then handed out again
//!   (the fence table, in the same database, loses its marks with them).
//! - Schema: [`PostgresSemaphore::migrate`] creates the table (default
//!   `sd_lock_permits`) through sd-core's `Migrator`; `migrations/0003_permits.sql`
//!   applies with `psql` as it stands.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sd_core::TableName;
use sd_core::migrate::{Migration, Migrator};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, Release, RetryPolicy};
use crate::observe::{Meters, SEMAPHORE};
use crate::postgres::{expiry_after, millis, token};
use crate::semaphore::{
    Permit, check_permits, finish_grant, free_slot, full, grant_in_task, granted,
};

/// The permits table's migration, written for the default name `sd_lock_permits`.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 3,
    name: "permits",
    sql: include_str!("../../migrations/0003_permits.sql"),
}];

const DEFAULT_TABLE: &str = "sd_lock_permits";

struct Sql {
    bump: String,
    slots: String,
    grant: String,
    renew: String,
    release: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        let micros = |at: &str| format!("floor(extract(epoch FROM {at}) * 1000000)::int8");
        Sql {
            bump: format!(
                "INSERT INTO {t} AS p (resource, slot, epoch) VALUES ($1, -1, 1) \
                 ON CONFLICT (resource, slot) DO UPDATE SET epoch = p.epoch + 1 RETURNING epoch"
            ),
            slots: format!(
                "SELECT slot, {}, {} FROM {t} \
                 WHERE resource = $1 AND slot >= 0 AND holder IS NOT NULL",
                micros("expires_at"),
                micros("(SELECT clock_timestamp())"),
            ),
            grant: format!(
                "INSERT INTO {t} AS p (resource, slot, holder, epoch, expires_at) \
                 VALUES ($1, $2, $3, $4, {}) ON CONFLICT (resource, slot) DO UPDATE \
                 SET holder = EXCLUDED.holder, epoch = EXCLUDED.epoch, expires_at = EXCLUDED.expires_at",
                expiry_after("$5")
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = {} WHERE resource = $1 AND slot = $2 \
                 AND holder = $3 AND expires_at > clock_timestamp() RETURNING slot",
                expiry_after("$4")
            ),
            release: format!(
                "WITH old AS (SELECT resource, slot, expires_at FROM {t} \
                 WHERE resource = $1 AND slot = $2 AND holder = $3 FOR UPDATE) \
                 UPDATE {t} AS p SET holder = NULL, expires_at = NULL FROM old \
                 WHERE p.resource = old.resource AND p.slot = old.slot \
                 RETURNING old.expires_at > clock_timestamp()"
            ),
        }
    }
}

/// Permits in a PostgreSQL table. Cheap to clone.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::semaphore::{Semaphore, postgres::PostgresSemaphore};
///
/// let exports = PostgresSemaphore::builder(pool).permits(3).build()?;
/// exports.migrate().await?;
/// let permit = exports.try_acquire("exports", Duration::from_secs(60)).await?;
/// let _ = exports.release(permit).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresSemaphore {
    pool: PgPool,
    table: TableName,
    sql: Arc<Sql>,
    permits: u32,
    retry: RetryPolicy,
    meters: Meters,
}

impl fmt::Debug for PostgresSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSemaphore")
            .field("table", &self.table)
            .field("permits", &self.permits)
            .finish_non_exhaustive()
    }
}

/// Options of a [`PostgresSemaphore`]; [`build`](Self::build) checks them and names
/// the setter of a value out of range.
#[derive(Debug, Clone)]
pub struct PostgresSemaphoreBuilder {
    pool: PgPool,
    table: String,
    permits: u32,
    retry: RetryPolicy,
    name: String,
}

impl PostgresSemaphoreBuilder {
    /// How many holders a resource may have at once (default 1; 1 to
    /// [`MAX_PERMITS`](crate::semaphore::MAX_PERMITS)).
    pub fn permits(mut self, permits: u32) -> Self {
        self.permits = permits;
        self
    }

    /// The permits table (default `sd_lock_permits`): `table` or `schema.table`, each
    /// part 1 to 48 of `[a-z0-9_]`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The retry policy of [`Semaphore::acquire`](crate::semaphore::Semaphore::acquire)
    /// (default [`lease::default_retry`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The semaphore's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`, registered by [`build`](Self::build)) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The semaphore, or [`Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<PostgresSemaphore> {
        let table = TableName::parse("table", &self.table)?;
        Ok(PostgresSemaphore {
            pool: self.pool,
            sql: Arc::new(Sql::new(&table.to_string())),
            table,
            permits: check_permits(self.permits)?,
            retry: self.retry,
            meters: Meters::of(&SEMAPHORE, &self.name, sd_core::observe::backend::POSTGRES),
        })
    }
}

impl PostgresSemaphore {
    /// Options for permits on `pool`.
    pub fn builder(pool: PgPool) -> PostgresSemaphoreBuilder {
        PostgresSemaphoreBuilder {
            pool,
            table: DEFAULT_TABLE.into(),
            permits: 1,
            retry: lease::default_retry(),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    /// The permits table's migration with the configured name put in.
    pub fn migrator(&self) -> Migrator {
        Migrator::new("sd-lock", MIGRATIONS).name(DEFAULT_TABLE, &self.table)
    }

    /// Creates the permits table if it does not exist; safe from every replica at once.
    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// [`Semaphore::try_acquire`](crate::semaphore::Semaphore::try_acquire).
    pub async fn try_acquire(&self, resource: &str, ttl: Duration) -> Result<Permit> {
        lease::validate(resource, ttl, Duration::from_millis(1))?;
        let (this, owned) = (self.clone(), resource.to_owned());
        grant_in_task(self, async move { this.acquire_once(&owned, ttl).await }).await
    }

    async fn acquire_once(&self, resource: &str, ttl: Duration) -> Result<Permit> {
        let holder = lease::new_holder();
        let start = Instant::now();
        let mut tx = self.pool.begin().await?;
        let epoch: i64 = sqlx::query_scalar(&self.sql.bump)
            .bind(resource)
            .fetch_one(&mut *tx)
            .await?;
        let rows: Vec<(i32, Option<i64>, i64)> = sqlx::query_as(&self.sql.slots)
            .bind(resource)
            .fetch_all(&mut *tx)
            .await?;
        let now = rows.first().map_or(0, |r| r.2);
        let held = rows.iter().filter_map(|&(slot, expires, _)| {
            Some((u32::try_from(slot).ok()?, expires.unwrap_or(i64::MIN)))
        });
        let Some(slot) = free_slot(held, self.permits, &now) else {
            tx.rollback().await?;
            return Err(full(resource, self.permits));
        };
        sqlx::query(&self.sql.grant)
            .bind(resource)
            .bind(i32::try_from(slot).unwrap_or(i32::MAX))
            .bind(&holder)
            .bind(epoch)
            .bind(millis(ttl))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let elapsed = start.elapsed();
        let permit = granted(resource, slot, token(epoch)?, ttl, holder);
        finish_grant(permit, start, elapsed, |p| self.release(p)).await
    }

    /// [`Semaphore::renew`](crate::semaphore::Semaphore::renew).
    pub async fn renew(&self, permit: &mut Permit, ttl: Duration) -> Result<()> {
        lease::validate_ttl(ttl, Duration::from_millis(1))?;
        let start = Instant::now();
        let renewed: Option<i32> = sqlx::query_scalar(&self.sql.renew)
            .bind(permit.resource())
            .bind(i32::try_from(permit.slot).unwrap_or(i32::MAX))
            .bind(&permit.lease.holder)
            .bind(millis(ttl))
            .fetch_optional(&self.pool)
            .await?;
        let elapsed = start.elapsed();
        match (renewed, lease::validity(ttl, elapsed)) {
            (Some(_), Some(validity)) => {
                permit.lease.valid_until = start + elapsed + validity;
                permit.lease.ttl = ttl;
                Ok(())
            }
            _ => Err(Error::LeaseExpired {
                resource: permit.resource().to_owned(),
            }),
        }
    }

    /// [`Semaphore::release`](crate::semaphore::Semaphore::release).
    pub async fn release(&self, permit: Permit) -> Result<Release> {
        let live: Option<Option<bool>> = sqlx::query_scalar(&self.sql.release)
            .bind(permit.resource())
            .bind(i32::try_from(permit.slot).unwrap_or(i32::MAX))
            .bind(&permit.lease.holder)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match live {
            Some(Some(true)) => Release::Released,
            _ => Release::Expired,
        })
    }
}

forward_semaphore!([] PostgresSemaphore);
