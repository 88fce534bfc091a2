//! Leader election in a PostgreSQL table (feature `postgres`).
//!
//! One row per election. Campaign is one statement, `INSERT .. ON CONFLICT DO UPDATE ..
//! WHERE the term is free or expired RETURNING term`, which bumps `term` in the same row
//! write that makes the caller leader: the token comes from the database's transaction
//! order, with no clock assumption. Expiry uses the server's `clock_timestamp()`; renew
//! and resign compare the holder. Guarantees assume commits are durable (see
//! [`crate::semaphore::postgres`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sd_core::TableName;
use sd_core::migrate::{Migration, Migrator};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::election::{Leader, Term, check_ttl, validate, won};
use crate::error::{Error, Result};
use crate::lease::{self, Release, RetryPolicy};
use crate::observe::ElectionMeters;
use crate::postgres::{expiry_after, millis, token};

/// The elections table's migration, written for the default name `sd_lock_leaders`.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 4,
    name: "leaders",
    sql: include_str!("../../migrations/0004_leaders.sql"),
}];

const DEFAULT_TABLE: &str = "sd_lock_leaders";

struct Sql {
    campaign: String,
    observe: String,
    renew: String,
    resign: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        Sql {
            campaign: format!(
                "INSERT INTO {t} AS l (name, holder, value, term, expires_at) \
                 VALUES ($1, $2, $3, 1, {}) ON CONFLICT (name) DO UPDATE \
                 SET holder = EXCLUDED.holder, value = EXCLUDED.value, term = l.term + 1, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE l.holder IS NULL OR l.expires_at <= clock_timestamp() RETURNING term",
                expiry_after("$4")
            ),
            observe: format!(
                "SELECT value, term FROM {t} WHERE name = $1 AND holder IS NOT NULL \
                 AND expires_at > clock_timestamp()"
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = {} WHERE name = $1 AND holder = $2 \
                 AND expires_at > clock_timestamp() RETURNING term",
                expiry_after("$3")
            ),
            resign: format!(
                "WITH old AS (SELECT name, expires_at FROM {t} WHERE name = $1 AND holder = $2 FOR UPDATE) \
                 UPDATE {t} AS l SET holder = NULL, value = NULL, expires_at = NULL FROM old \
                 WHERE l.name = old.name RETURNING old.expires_at > clock_timestamp()"
            ),
        }
    }
}

/// Elections in a PostgreSQL table. Cheap to clone.
#[derive(Clone)]
pub struct PostgresElection {
    pool: PgPool,
    table: TableName,
    sql: Arc<Sql>,
    ttl: Duration,
    retry: RetryPolicy,
    meters: ElectionMeters,
}

impl fmt::Debug for PostgresElection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresElection")
            .field("table", &self.table)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Options of a [`PostgresElection`]; [`build`](Self::build) checks them and names the
/// setter of a value out of range.
#[derive(Debug, Clone)]
pub struct PostgresElectionBuilder {
    pool: PgPool,
    table: String,
    ttl: Duration,
    retry: RetryPolicy,
    name: String,
}

impl PostgresElectionBuilder {
    /// The elections table (default `sd_lock_leaders`): `table` or `schema.table`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long a term lasts unless renewed (default 10 s; 3 ms to 24.8 days).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The retry policy of [`Election::campaign`](crate::election::Election::campaign).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The election instance's name (default `"default"`): the `sd.name` label of its
    /// metrics (feature `metrics`, registered by [`build`](Self::build)) and field of its
    /// spans. Metrics carry no election name: give each election you watch an instance
    /// of its own.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The election, or [`Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<PostgresElection> {
        let table = TableName::parse("table", &self.table)?;
        Ok(PostgresElection {
            pool: self.pool,
            sql: Arc::new(Sql::new(&table.to_string())),
            table,
            ttl: check_ttl(self.ttl, Duration::from_millis(1))?,
            retry: self.retry,
            meters: ElectionMeters::new(&self.name, sd_core::observe::backend::POSTGRES),
        })
    }
}

impl PostgresElection {
    /// Options for elections on `pool`.
    pub fn builder(pool: PgPool) -> PostgresElectionBuilder {
        PostgresElectionBuilder {
            pool,
            table: DEFAULT_TABLE.into(),
            ttl: Duration::from_secs(10),
            retry: lease::default_retry(),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    /// The elections table's migration with the configured name put in.
    pub fn migrator(&self) -> Migrator {
        Migrator::new("sd-lock", MIGRATIONS).name(DEFAULT_TABLE, &self.table)
    }

    /// Creates the elections table if it does not exist; safe from every replica at once.
    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// [`Election::try_campaign`](crate::election::Election::try_campaign).
    pub async fn try_campaign(&self, name: &str, value: &str) -> Result<Term> {
        validate(name, value, self.ttl, Duration::from_millis(1))?;
        let holder = lease::new_holder();
        let start = Instant::now();
        let term: Option<i64> = sqlx::query_scalar(&self.sql.campaign)
            .bind(name)
            .bind(&holder)
            .bind(value)
            .bind(millis(self.ttl))
            .fetch_optional(&self.pool)
            .await?;
        let elapsed = start.elapsed();
        let Some(term) = term else {
            return Err(Error::Held {
                resource: name.to_owned(),
            });
        };
        let token = token(term)?;
        match won(
            name,
            value,
            token,
            self.ttl,
            holder.clone(),
            (start, elapsed),
        ) {
            Some(term) => Ok(term),
            None => {
                let _ = sqlx::query(&self.sql.resign)
                    .bind(name)
                    .bind(&holder)
                    .execute(&self.pool)
                    .await;
                Err(Error::ValidityExhausted {
                    resource: name.to_owned(),
                    ttl: self.ttl,
                    elapsed,
                })
            }
        }
    }

    /// [`Election::observe`](crate::election::Election::observe).
    pub async fn observe(&self, name: &str) -> Result<Option<Leader>> {
        let row: Option<(Option<String>, i64)> = sqlx::query_as(&self.sql.observe)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some((value, term)) => Ok(Some(Leader {
                value: value.unwrap_or_default(),
                token: token(term)?,
            })),
            None => Ok(None),
        }
    }

    /// [`Election::renew`](crate::election::Election::renew).
    pub async fn renew(&self, term: &mut Term) -> Result<()> {
        let start = Instant::now();
        let renewed: Option<i64> = sqlx::query_scalar(&self.sql.renew)
            .bind(term.name())
            .bind(&term.lease.holder)
            .bind(millis(self.ttl))
            .fetch_optional(&self.pool)
            .await?;
        let elapsed = start.elapsed();
        match (renewed, lease::validity(self.ttl, elapsed)) {
            (Some(_), Some(validity)) => {
                term.lease.valid_until = start + elapsed + validity;
                Ok(())
            }
            _ => Err(Error::LeaseExpired {
                resource: term.name().to_owned(),
            }),
        }
    }

    /// [`Election::resign`](crate::election::Election::resign).
    pub async fn resign(&self, term: Term) -> Result<Release> {
        let live: Option<Option<bool>> = sqlx::query_scalar(&self.sql.resign)
            .bind(term.name())
            .bind(&term.lease.holder)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match live {
            Some(Some(true)) => Release::Released,
            _ => Release::Expired,
        })
    }
}

forward_election!([] PostgresElection);
