//! Fencing guards for the protected resource: accept an operation only when its token is
//! not older than the newest the resource has seen.
//!
//! The rule (Kleppmann's fencing tokens; Redisson's `RFencedLock`: "greater or equal"):
//! the resource remembers the largest token it has seen. An operation with a smaller
//! token is refused with [`Error::StaleToken`]; an equal or larger one is accepted and
//! raises the mark. Equal is accepted so one holder can write several times.
//!
//! Fence **reads** too when a holder reads, computes and writes back: otherwise a stale
//! holder that writes before the new holder's first write is accepted and the new
//! holder's read-modify-write loses it. [`FencedRegister::read`] raises the mark.
//!
//! - [`FencedRegister`]: a value in memory behind the rule.
//! - `redis::RedisFence` (feature `redis`): a Lua script over a hash `{token, value}`.
//! - `postgres::PostgresFence` (feature `postgres`): a one-row check inside the
//!   caller's transaction, before its writes.

use std::sync::{Mutex, MutexGuard};

use sd_core::observe::backend;

use crate::error::{Error, Result};
use crate::lease::FencingToken;
use crate::observe::FenceMeters;

/// A value guarded by fencing tokens (in memory).
#[derive(Debug)]
pub struct FencedRegister<T> {
    inner: Mutex<(Option<FencingToken>, T)>,
    meters: FenceMeters,
}

impl<T: Default> Default for FencedRegister<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> FencedRegister<T> {
    /// A register holding `value`, no token seen yet.
    pub fn new(value: T) -> Self {
        FencedRegister {
            inner: Mutex::new((None, value)),
            meters: FenceMeters::new(sd_core::observe::DEFAULT_NAME, backend::MEMORY),
        }
    }

    /// Names the register (default `"default"`): the `sd.name` label of its refusals
    /// (feature `metrics`, registered again with the recorder installed now).
    pub fn with_name(mut self, name: &str) -> Self {
        self.meters = FenceMeters::new(name, backend::MEMORY);
        self
    }

    fn inner(&self) -> MutexGuard<'_, (Option<FencingToken>, T)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(mark: &mut Option<FencingToken>, token: FencingToken) -> Result<()> {
        match *mark {
            Some(current) if token < current => Err(Error::StaleToken { token, current }),
            _ => {
                *mark = Some(token);
                Ok(())
            }
        }
    }

    /// Raises the mark to `token` without touching the value, or refuses a stale token.
    pub fn check(&self, token: FencingToken) -> Result<()> {
        self.meters.checked(Self::admit(&mut self.inner().0, token))
    }

    /// Replaces the value if `token` is not stale.
    pub fn write(&self, token: FencingToken, value: T) -> Result<()> {
        let mut inner = self.inner();
        self.meters.checked(Self::admit(&mut inner.0, token))?;
        inner.1 = value;
        Ok(())
    }

    /// Applies `f` to the value if `token` is not stale, and returns what `f` returns.
    pub fn update<R>(&self, token: FencingToken, f: impl FnOnce(&mut T) -> R) -> Result<R> {
        let mut inner = self.inner();
        self.meters.checked(Self::admit(&mut inner.0, token))?;
        Ok(f(&mut inner.1))
    }

    /// The newest token seen.
    pub fn last_token(&self) -> Option<FencingToken> {
        self.inner().0
    }
}

impl<T: Clone> FencedRegister<T> {
    /// Reads the value if `token` is not stale, raising the mark to `token`.
    pub fn read(&self, token: FencingToken) -> Result<T> {
        let mut inner = self.inner();
        self.meters.checked(Self::admit(&mut inner.0, token))?;
        Ok(inner.1.clone())
    }

    /// The value, without a token (for observers, not for holders).
    pub fn peek(&self) -> T {
        self.inner().1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_tokens_are_refused_equal_ones_accepted() {
        let r = FencedRegister::new(0);
        r.write(FencingToken(33), 1).unwrap();
        r.write(FencingToken(33), 2).unwrap();
        assert_eq!(r.read(FencingToken(34)).unwrap(), 2);
        let err = r.write(FencingToken(33), 3).unwrap_err();
        assert!(matches!(
            err,
            Error::StaleToken {
                token: FencingToken(33),
                current: FencingToken(34)
            }
        ));
        assert_eq!(r.peek(), 2);
        assert_eq!(r.last_token(), Some(FencingToken(34)));
    }
}

/// The fenced register in Redis (feature `redis`).
#[cfg(feature = "redis")]
pub mod redis {
    use ::redis::aio::ConnectionLike;
    use sd_core::KeyPrefix;
    use sd_core::redis::Script;

    use tracing::Instrument as _;

    use crate::error::{Error, Result};
    use crate::lease::FencingToken;
    use crate::observe::FenceMeters;

    static FENCE: Script = Script::new(include_str!("redis/fence.lua"));

    /// A register per resource in a Redis hash `{token, value}`, guarded by one Lua
    /// script: an operation whose token is older than the newest seen is refused with
    /// [`Error::StaleToken`]; reads raise the mark too.
    ///
    /// Put the data the lock protects in it, or copy the script's check into your own
    /// script before its writes. Keys are `{prefix}:{{resource}}` (default prefix
    /// `fence`).
    ///
    /// ```no_run
    /// # async fn run(lease: sd_lock::Lease) -> Result<(), Box<dyn std::error::Error>> {
    /// use sd_lock::fence::redis::RedisFence;
    ///
    /// let conn = redis::Client::open("redis://127.0.0.1/")?.get_connection_manager().await?;
    /// let fence = RedisFence::builder(conn).prefix("billing-fence").build()?;
    /// fence.write(lease.resource(), lease.token(), b"new state").await?; // or StaleToken
    /// # Ok(()) }
    /// ```
    #[derive(Debug, Clone)]
    pub struct RedisFence<C> {
        conn: C,
        prefix: KeyPrefix,
        meters: FenceMeters,
    }

    /// Options of a [`RedisFence`]; [`build`](Self::build) checks them.
    #[derive(Debug, Clone)]
    pub struct RedisFenceBuilder<C> {
        conn: C,
        prefix: String,
        name: String,
    }

    impl<C: ConnectionLike + Clone + Send + Sync> RedisFenceBuilder<C> {
        /// The key prefix (default `fence`): keys are `{prefix}:{{resource}}`, sd adds the
        /// colon. No `{`, `}` or trailing `:`.
        pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
            self.prefix = prefix.into();
            self
        }

        /// The fence's name (default `"default"`): the `sd.name` label of its refusals
        /// (feature `metrics`, registered by [`build`](Self::build)) and field of its
        /// spans.
        pub fn name(mut self, name: impl Into<String>) -> Self {
            self.name = name.into();
            self
        }

        /// The fence, or [`Error::InvalidConfig`] naming `prefix`.
        pub fn build(self) -> Result<RedisFence<C>> {
            Ok(RedisFence {
                prefix: KeyPrefix::parse("prefix", &self.prefix)?,
                conn: self.conn,
                meters: FenceMeters::new(&self.name, sd_core::observe::backend::REDIS),
            })
        }
    }

    impl<C: ConnectionLike + Clone + Send + Sync> RedisFence<C> {
        /// A fence on `conn` with prefix `fence`.
        pub fn new(conn: C) -> Self {
            RedisFence {
                conn,
                prefix: KeyPrefix::parse("prefix", "fence").expect("`fence` is a valid prefix"),
                meters: FenceMeters::new(
                    sd_core::observe::DEFAULT_NAME,
                    sd_core::observe::backend::REDIS,
                ),
            }
        }

        /// Options for a fence on `conn`.
        pub fn builder(conn: C) -> RedisFenceBuilder<C> {
            RedisFenceBuilder {
                conn,
                prefix: "fence".into(),
                name: sd_core::observe::DEFAULT_NAME.into(),
            }
        }

        /// The hash key of `resource`.
        pub fn key(&self, resource: &str) -> String {
            self.prefix.tagged(resource)
        }

        async fn run(
            &self,
            resource: &str,
            token: FencingToken,
            op: &str,
            value: &[u8],
        ) -> Result<Option<Vec<u8>>> {
            if resource.is_empty() {
                return Err(Error::EmptyResource);
            }
            let mut conn = self.conn.clone();
            let reply: Vec<Option<Vec<u8>>> = FENCE
                .call(1)
                .arg(self.key(resource))
                .arg(token.0)
                .arg(op)
                .arg(value)
                .invoke(&mut conn)
                .instrument(self.meters.span())
                .await?;
            let bad = Error::UnexpectedReply {
                reason: "the fence script returned an unknown shape",
            };
            self.meters.checked(match reply.as_slice() {
                [Some(tag), value] if tag == b"ok" => Ok(value.clone()),
                [Some(tag), Some(newest)] if tag == b"stale" => {
                    let current = std::str::from_utf8(newest)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or(bad)?;
                    Err(Error::StaleToken {
                        token,
                        current: FencingToken(current),
                    })
                }
                [Some(tag)] if tag == b"ok" => Ok(None),
                _ => Err(bad),
            })
        }

        /// Raises the resource's mark to `token`, or refuses a stale token.
        pub async fn check(&self, resource: &str, token: FencingToken) -> Result<()> {
            self.run(resource, token, "check", b"").await.map(drop)
        }

        /// Stores `value` if `token` is not stale.
        pub async fn write(&self, resource: &str, token: FencingToken, value: &[u8]) -> Result<()> {
            self.run(resource, token, "set", value).await.map(drop)
        }

        /// Reads the value if `token` is not stale, raising the mark to `token`.
        pub async fn read(&self, resource: &str, token: FencingToken) -> Result<Option<Vec<u8>>> {
            self.run(resource, token, "get", b"").await
        }
    }
}

/// The fence in PostgreSQL (feature `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres {
    use std::sync::Arc;

    use sqlx::{PgConnection, PgPool};

    use tracing::Instrument as _;

    use crate::error::{Error, Result};
    use crate::lease::FencingToken;
    use crate::observe::FenceMeters;
    use sd_core::TableName;
    use sd_core::migrate::{Migration, Migrator};

    const DEFAULT_TABLE: &str = "sd_lock_fence";

    /// The fence table's migration, written for the default name `sd_lock_fence`.
    pub static MIGRATIONS: &[Migration] = &[Migration {
        version: 2,
        name: "fence",
        sql: include_str!("../migrations/0002_fence.sql"),
    }];

    /// Options of a [`PostgresFence`]; [`build`](Self::build) checks them.
    #[derive(Debug, Clone)]
    pub struct PostgresFenceBuilder {
        table: String,
        name: String,
    }

    impl PostgresFenceBuilder {
        /// The fence table (default `sd_lock_fence`): `table` or `schema.table`, each
        /// part 1 to 48 of `[a-z0-9_]` (sd-core's `TableName` rule).
        pub fn table(mut self, table: impl Into<String>) -> Self {
            self.table = table.into();
            self
        }

        /// The fence's name (default `"default"`): the `sd.name` label of its refusals
        /// (feature `metrics`, registered by [`build`](Self::build)) and field of its
        /// spans.
        pub fn name(mut self, name: impl Into<String>) -> Self {
            self.name = name.into();
            self
        }

        /// The fence, or [`Error::InvalidConfig`] naming `table`.
        pub fn build(self) -> Result<PostgresFence> {
            Ok(PostgresFence::with_sql(
                TableName::parse("table", &self.table)?,
                &self.name,
            ))
        }
    }

    /// A fence table (default `sd_lock_fence`): the newest token each resource accepted.
    ///
    /// Call [`PostgresFence::check`] inside the transaction that writes the protected
    /// rows, before the writes. It raises the resource's token or fails with
    /// [`Error::StaleToken`]; the row stays locked until the transaction ends, so a
    /// newer holder's transaction waits for this one and an older one is refused.
    ///
    /// ```no_run
    /// # async fn run(pool: sqlx::PgPool, lease: sd_lock::Lease) -> Result<(), Box<dyn std::error::Error>> {
    /// use sd_lock::fence::postgres::PostgresFence;
    ///
    /// let fence = PostgresFence::new();
    /// fence.migrate(&pool).await?;
    /// let mut tx = pool.begin().await?;
    /// fence.check(&mut tx, lease.resource(), lease.token()).await?; // StaleToken: roll back
    /// sqlx::query("UPDATE accounts SET balance = balance - 30 WHERE id = 7").execute(&mut *tx).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    #[derive(Debug, Clone)]
    pub struct PostgresFence {
        table: TableName,
        check_sql: Arc<str>,
        current_sql: Arc<str>,
        meters: FenceMeters,
    }

    impl Default for PostgresFence {
        fn default() -> Self {
            Self::with_sql(
                TableName::parse("table", DEFAULT_TABLE).expect("the default table name is valid"),
                sd_core::observe::DEFAULT_NAME,
            )
        }
    }

    impl PostgresFence {
        /// A fence in table `sd_lock_fence`.
        pub fn new() -> Self {
            Self::default()
        }

        fn with_sql(t: TableName, name: &str) -> Self {
            PostgresFence {
                check_sql: format!(
                    "INSERT INTO {t} AS f (resource, token) VALUES ($1, $2) \
                     ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token \
                     WHERE f.token <= EXCLUDED.token RETURNING token"
                )
                .into(),
                current_sql: format!("SELECT token FROM {t} WHERE resource = $1").into(),
                table: t,
                meters: FenceMeters::new(name, sd_core::observe::backend::POSTGRES),
            }
        }

        /// Options for a fence table.
        pub fn builder() -> PostgresFenceBuilder {
            PostgresFenceBuilder {
                table: DEFAULT_TABLE.into(),
                name: sd_core::observe::DEFAULT_NAME.into(),
            }
        }

        /// The fence table's migration with the configured name put in, for teams whose
        /// DDL goes through their own tool.
        pub fn migrator(&self) -> Migrator {
            Migrator::new("sd-lock", MIGRATIONS).name(DEFAULT_TABLE, &self.table)
        }

        /// Creates the fence table if it does not exist (through [`Migrator`], recorded in
        /// `sd_migrations`); safe to run from every replica at once.
        pub async fn migrate(&self, pool: &PgPool) -> Result<()> {
            self.migrator().run(pool).await?;
            Ok(())
        }

        /// Admits `token` for `resource` in the caller's transaction, or refuses a stale
        /// one. Tokens above `i64::MAX` are refused as invalid.
        pub async fn check(
            &self,
            conn: &mut PgConnection,
            resource: &str,
            token: FencingToken,
        ) -> Result<()> {
            let checked = self
                .check_token(conn, resource, token)
                .instrument(self.meters.span())
                .await;
            self.meters.checked(checked)
        }

        async fn check_token(
            &self,
            conn: &mut PgConnection,
            resource: &str,
            token: FencingToken,
        ) -> Result<()> {
            if resource.is_empty() {
                return Err(Error::EmptyResource);
            }
            let t = i64::try_from(token.0).map_err(|_| Error::InvalidConfig {
                field: "token",
                reason: "above i64::MAX, which a PostgreSQL bigint cannot hold".into(),
            })?;
            let accepted: Option<i64> = sqlx::query_scalar(&self.check_sql)
                .bind(resource)
                .bind(t)
                .fetch_optional(&mut *conn)
                .await?;
            if accepted.is_some() {
                return Ok(());
            }
            let current: i64 = sqlx::query_scalar(&self.current_sql)
                .bind(resource)
                .fetch_one(&mut *conn)
                .await?;
            Err(Error::StaleToken {
                token,
                current: FencingToken(u64::try_from(current).unwrap_or(0)),
            })
        }
    }
}
