//! The PostgreSQL backend: durable records, and completion inside the caller's
//! transaction.
//!
//! - **One statement per state change**: a claim is a single `INSERT .. ON CONFLICT DO
//!   UPDATE .. RETURNING` that takes the key, takes an abandoned one over (epoch + 1), or
//!   returns the row as it is (in flight, completed with its response, or another
//!   fingerprint). Complete, release and extend are one `UPDATE`/`DELETE` guarded by
//!   the claim's token, epoch and a live lock. A replay is the claim's answer. A
//!   duplicate waiting for the request in flight ([`Store::poll_claim`]) reads the row
//!   with one `SELECT`, which writes nothing and does not wait on a transaction that
//!   holds the row, and claims only once the row is no longer in flight.
//! - **Server time**: `clock_timestamp()` of the database, read once per claim.
//! - **Your transaction**: [`PostgresStore::complete_in`] stores the response in the
//!   transaction that writes your business rows, so both commit or neither does; a
//!   crash before the commit leaves the key in flight until its lock expires, and the
//!   retry runs on a clean slate.
//! - **Schema**: [`PostgresStore::migrate`] creates the table (name configurable,
//!   default `idempotency_keys`) and its expiry index through sd-core's `Migrator`
//!   (versioned, recorded in `sd_migrations`, safe from every replica at once);
//!   `migrations/0001_create.sql` applies with `psql` as it stands. [`Store::sweep`] deletes expired rows (run
//!   [`run_sweeper`](crate::run_sweeper)); it never deletes a live claim.

use crate::observe::{Meters, Op};
use sd_core::observe::backend;
use std::time::Duration;

use sd_core::TableName;
use sd_core::deadline::timeout;
use sd_core::migrate::{Migration, Migrator};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row as _, Transaction};

use crate::error::{Error, Result};
use crate::store::{
    Claim, ClaimOutcome, Fingerprint, Store, StoredResponse, call_timeout, in_flight_expiry,
    new_token, ttl_ms,
};

/// The table's migration, written for the default name `idempotency_keys`.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "create",
    sql: include_str!("../migrations/0001_create.sql"),
}];

const DEFAULT_TABLE: &str = "idempotency_keys";

const TAKE: &str = "(r.expires_at <= EXCLUDED.created_at OR (r.state = 'in_flight' \
     AND r.lock_expires_at <= EXCLUDED.created_at AND r.fingerprint = EXCLUDED.fingerprint))";

/// Options of a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresStoreBuilder {
    table: String,
    timeout: Duration,
    name: String,
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        PostgresStoreBuilder {
            table: DEFAULT_TABLE.into(),
            timeout: Duration::from_secs(2),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }
}

impl PostgresStoreBuilder {
    /// The table (default `idempotency_keys`): `table` or `schema.table`, each part 1 to
    /// 48 of `[a-z0-9_]` (sd's one rule, `TableName`), checked by [`build`](Self::build).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long one statement may take (default 2 s) before [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The store's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// A store on `pool`.
    pub fn build(self, pool: PgPool) -> Result<PostgresStore> {
        let table = TableName::parse("table", &self.table)?;
        let timeout = call_timeout(self.timeout)?;
        let claim_sql = claim_sql(&table.to_string());
        let peek_sql = format!(
            "SELECT fingerprint, state, response, {LOCK_LEFT_MS} FROM {table}
             WHERE scope = $1 AND key = $2 AND expires_at > clock_timestamp()"
        );
        Ok(PostgresStore {
            pool,
            table,
            timeout,
            claim_sql,
            peek_sql,
            meters: Meters::new(&self.name, backend::POSTGRES),
            name: self.name,
        })
    }
}

fn claim_sql(t: &str) -> String {
    let set =
        |col: &str, taken: &str| format!("{col} = CASE WHEN {TAKE} THEN {taken} ELSE r.{col} END");
    let sets = [
        set("fingerprint", "EXCLUDED.fingerprint"),
        set("state", "'in_flight'"),
        set("epoch", "r.epoch + 1"),
        set("token", "EXCLUDED.token"),
        set("lock_expires_at", "EXCLUDED.lock_expires_at"),
        set("expires_at", "EXCLUDED.expires_at"),
        set("response", "NULL"),
        set("created_at", "EXCLUDED.created_at"),
    ]
    .join(",\n    ");
    format!(
        "INSERT INTO {t} AS r (scope, key, fingerprint, state, epoch, token, lock_expires_at, expires_at, created_at)
SELECT $1, $2, $3, 'in_flight', 1, $4,
       c.now + make_interval(secs => $5::float8 / 1000),
       c.now + make_interval(secs => $6::float8 / 1000),
       c.now
FROM (SELECT clock_timestamp() AS now) AS c
ON CONFLICT (scope, key) DO UPDATE SET
    {sets}
RETURNING token, epoch, fingerprint, state, response, {LOCK_LEFT_MS}"
    )
}

/// The column of the lock's time left in milliseconds (NULL when completed).
const LOCK_LEFT_MS: &str = "GREATEST(0, CEIL(EXTRACT(EPOCH FROM (lock_expires_at - clock_timestamp())) * 1000))::BIGINT AS lock_left_ms";

/// What a live row this request does not hold answers: a mismatch, the stored response,
/// or in flight (at least 1 ms left).
fn answer(row: &PgRow, fingerprint: &Fingerprint) -> Result<ClaimOutcome> {
    let stored_fp: Vec<u8> = row.try_get("fingerprint")?;
    if stored_fp.as_slice() != fingerprint.as_bytes() {
        return Ok(ClaimOutcome::Mismatch);
    }
    let state: String = row.try_get("state")?;
    match state.as_str() {
        "completed" => {
            let response: Option<Vec<u8>> = row.try_get("response")?;
            let response =
                response.ok_or_else(|| Error::corrupt("completed row without a response"))?;
            Ok(ClaimOutcome::Completed(StoredResponse::from_bytes(
                &response,
            )?))
        }
        "in_flight" => Ok(ClaimOutcome::InFlight {
            retry_after: Duration::from_millis(lock_left_ms(row)?.max(1)),
        }),
        other => Err(Error::corrupt(format!("unknown state `{other}`"))),
    }
}

fn lock_left_ms(row: &PgRow) -> Result<u64> {
    let left: Option<i64> = row.try_get("lock_left_ms")?;
    Ok(u64::try_from(left.unwrap_or(0)).unwrap_or(0))
}

/// Records in a PostgreSQL table; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: TableName,
    timeout: Duration,
    claim_sql: String,
    peek_sql: String,
    meters: Meters,
    name: String,
}

impl PostgresStore {
    /// Options: table `idempotency_keys`, 2 s timeout.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table name.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The migration with the configured table name put in, for teams whose DDL goes
    /// through their own tool ([`Migrator::render`]).
    pub fn migrator(&self) -> Migrator {
        Migrator::new("sd-idempotency", MIGRATIONS).name(DEFAULT_TABLE, &self.table)
    }

    /// Creates the table and its index if they are missing (through sd-core's
    /// [`Migrator`], recorded in `sd_migrations`); safe to call from every replica at
    /// start-up.
    pub async fn migrate(&self) -> Result<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    async fn timed<T>(&self, op: Op, f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T> {
        let span = tracing::debug_span!(
            "idempotency.postgres",
            sd.name = %self.name,
            sd.backend = backend::POSTGRES,
            sd.operation = op.name(),
        );
        let start = std::time::Instant::now();
        let reply = timeout(self.timeout, span, f).await;
        self.meters.called(op, start);
        Ok(reply??)
    }

    /// Completes `claim` with `response` through `executor` (the pool, or the caller's
    /// transaction).
    async fn complete_on<'c, E>(
        &self,
        executor: E,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<()>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        let retention = ttl_ms("retention", retention)?;
        let sql = format!(
            "UPDATE {} SET state = 'completed', response = $5, lock_expires_at = NULL,
                 expires_at = clock_timestamp() + make_interval(secs => $6::float8 / 1000)
             WHERE {}",
            self.table, HOLDER
        );
        let query = sqlx::query(&sql)
            .bind(&claim.scope)
            .bind(&claim.key)
            .bind(token_i64(claim.token))
            .bind(epoch_i64(claim.epoch))
            .bind(response.to_bytes()?)
            .bind(retention as f64);
        let done = self.timed(Op::Complete, query.execute(executor)).await?;
        held(done.rows_affected(), claim)
    }

    /// The claim's answer from the row the claim statement returned.
    fn claim_row(
        &self,
        row: sqlx::postgres::PgRow,
        scope: &str,
        key: &str,
        token: u64,
        fingerprint: &Fingerprint,
    ) -> Result<ClaimOutcome> {
        let got_token: i64 = row.try_get("token")?;
        let epoch: i64 = row.try_get("epoch")?;
        if got_token == token_i64(token) {
            return Ok(ClaimOutcome::Claimed(Claim {
                scope: scope.to_owned(),
                key: key.to_owned(),
                epoch: u64::try_from(epoch).map_err(|_| Error::corrupt("negative epoch"))?,
                token,
            }));
        }
        answer(&row, fingerprint)
    }

    /// [`Store::complete`] inside `tx`: the response commits with your own writes, or
    /// neither does. The row stays locked until `tx` ends.
    pub async fn complete_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<()> {
        self.complete_on(&mut **tx, claim, response, retention)
            .await
    }
}

/// The guard of every holder-only statement: $1 scope, $2 key, $3 token, $4 epoch.
const HOLDER: &str = "scope = $1 AND key = $2 AND token = $3 AND epoch = $4 \
     AND state = 'in_flight' AND lock_expires_at > clock_timestamp()";

fn held(rows: u64, claim: &Claim) -> Result<()> {
    if rows == 1 { Ok(()) } else { Err(claim.lost()) }
}

fn token_i64(token: u64) -> i64 {
    // Tokens are below 2^63 (see `new_token`).
    i64::try_from(token).unwrap_or(i64::MAX)
}

fn epoch_i64(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

/// Milliseconds from now until an in-flight record locked for `ttl` may be deleted.
fn grace_ms(ttl: u64) -> u64 {
    in_flight_expiry(ttl, ttl)
}

impl Store for PostgresStore {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<ClaimOutcome> {
        let ttl = ttl_ms("lock_ttl", lock_ttl)?;
        let token = new_token();
        let query = sqlx::query(&self.claim_sql)
            .bind(scope)
            .bind(key)
            .bind(fingerprint.as_bytes().as_slice())
            .bind(token_i64(token))
            .bind(ttl as f64)
            .bind(grace_ms(ttl) as f64)
            .fetch_one(&self.pool);
        let answer = self.claim_row(
            self.timed(Op::Claim, query).await?,
            scope,
            key,
            token,
            fingerprint,
        );
        self.meters.claimed(&answer);
        answer
    }

    async fn poll_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<ClaimOutcome> {
        let query = sqlx::query(&self.peek_sql)
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool);
        if let Some(row) = self.timed(Op::Claim, query).await? {
            match answer(&row, fingerprint)? {
                ClaimOutcome::InFlight { .. } if lock_left_ms(&row)? == 0 => {}
                outcome => {
                    let outcome = Ok(outcome);
                    self.meters.claimed(&outcome);
                    return outcome;
                }
            }
        }
        // Absent, expired, or in flight with a lapsed lock: the claim decides.
        self.claim(scope, key, fingerprint, lock_ttl).await
    }
    async fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<()> {
        self.complete_on(&self.pool, claim, response, retention)
            .await
    }

    async fn release(&self, claim: &Claim) -> Result<()> {
        let sql = format!("DELETE FROM {} WHERE {HOLDER}", self.table);
        let query = sqlx::query(&sql)
            .bind(&claim.scope)
            .bind(&claim.key)
            .bind(token_i64(claim.token))
            .bind(epoch_i64(claim.epoch))
            .execute(&self.pool);
        held(self.timed(Op::Release, query).await?.rows_affected(), claim)
    }

    async fn extend(&self, claim: &Claim, lock_ttl: Duration) -> Result<()> {
        let ttl = ttl_ms("lock_ttl", lock_ttl)?;
        let sql = format!(
            "UPDATE {} SET lock_expires_at = clock_timestamp() + make_interval(secs => $5::float8 / 1000),
                 expires_at = clock_timestamp() + make_interval(secs => $6::float8 / 1000)
             WHERE {HOLDER}",
            self.table
        );
        let query = sqlx::query(&sql)
            .bind(&claim.scope)
            .bind(&claim.key)
            .bind(token_i64(claim.token))
            .bind(epoch_i64(claim.epoch))
            .bind(ttl as f64)
            .bind(grace_ms(ttl) as f64)
            .execute(&self.pool);
        held(self.timed(Op::Extend, query).await?.rows_affected(), claim)
    }

    async fn sweep(&self) -> Result<u64> {
        let sql = format!(
            "DELETE FROM {} WHERE expires_at <= clock_timestamp()",
            self.table
        );
        let query = sqlx::query(&sql).execute(&self.pool);
        Ok(self.timed(Op::Sweep, query).await?.rows_affected())
    }
}
