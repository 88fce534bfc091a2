//! The PostgreSQL log: saga instances and their step events in two tables.
//!
//! - **Two statements per step on the happy path.** The intent and the outcome of a step
//!   are each one statement: a data-modifying CTE that updates the instance (guarded by
//!   its version and epoch) and appends the event in the same implicit transaction. The
//!   first step's intent is written by the statement that creates the saga, and the last
//!   step's outcome marks it completed, so an N-step saga that succeeds costs exactly 2N
//!   statements (2N commits). [`PostgresStore::write_statements`] counts them.
//! - **Fencing**: every write carries `WHERE version = $v AND epoch = $e`; a claim bumps
//!   both, so a stale owner's write matches no row and is refused with
//!   [`Error::Fenced`]. Claims of expired leases use `FOR UPDATE SKIP LOCKED`, so two
//!   recovering orchestrators never claim the same saga.
//! - **Server time**: leases expire by the database's `clock_timestamp()`, so skewed
//!   application clocks agree.
//! - **Schema**: [`PostgresStore::migrate`] creates the schema (default `public`), the
//!   instance table (default `sagas`) and the events table (`{table}_events`) through
//!   sd-core's [`Migrator`]: idempotently, under an advisory lock, recorded in the
//!   `sd_migrations` ledger. The SQL ships in `migrations/`, written for the default
//!   names so it applies with `psql` as it stands; [`PostgresStore::migrator`] renders
//!   it with your names for your own migration tool. Nothing is deleted by
//!   itself: call [`PostgresStore::prune_finished`] from a periodic job.
//! - **Metrics** count every saga of the type in one `GROUP BY` query: prune finished
//!   sagas so that stays cheap, and call it at a scrape interval rather than per request.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sd_core::TableName;
use sd_core::deadline::timeout;
use sd_core::migrate::{Migration, Migrator};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};

use crate::definition::Direction;
use crate::error::{Error, Result};
use crate::memory::check_stuck;
use crate::store::{
    Claimant, Event, EventKind, Lease, NewSaga, SagaRecord, SagaState, SagaStore, StoreStats,
    StoredEvent, Write,
};

/// The shipped migrations, written for the default names (schema `public`, tables
/// `sagas` and `sagas_events`).
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create",
        sql: include_str!("../migrations/0001_create.sql"),
    },
    Migration {
        version: 2,
        name: "parallel_deadline_version",
        sql: include_str!("../migrations/0002_parallel_deadline_version.sql"),
    },
];

const COLUMNS: &str = "id, saga_type, state, step, compensating, data::text AS data, version, owner, epoch, reason, \
     progress::text AS progress, cancel_reason, deadline_ms, definition_version";

/// The suffix of the events table's name.
const EVENTS_SUFFIX: &str = "_events";

/// The longest instance table name: its events table and index names stay within
/// sd-core's [`TableName`] rule (48 bytes a part).
const MAX_TABLE: usize = 40;

/// Options of a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresStoreBuilder {
    schema: String,
    table: String,
    timeout: Duration,
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        PostgresStoreBuilder {
            schema: "public".into(),
            table: "sagas".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

impl PostgresStoreBuilder {
    /// The schema (default `public`), created by `migrate` if missing: 1 to 48 of
    /// `[a-z0-9_]` (sd-core's [`TableName`] rule).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The instance table (default `sagas`; the events go to `{table}_events`): 1 to 40
    /// of `[a-z0-9_]`, not starting with a digit, so that the events table's name stays
    /// within sd-core's [`TableName`] rule.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How long one statement may take (default 5 s) before [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A store on `pool`, or [`Error::InvalidConfig`] naming the field out of range.
    pub fn build(self, pool: PgPool) -> Result<PostgresStore> {
        let schema = TableName::parse("schema", &self.schema)?;
        if schema.schema().is_some() {
            return Err(Error::config(
                "schema",
                format!(
                    "`{}` must be one name of [a-z0-9_], without a `.`",
                    self.schema
                ),
            ));
        }
        let events_name = format!("{}{EVENTS_SUFFIX}", self.table);
        let (name, events) = match (
            TableName::parse("table", &self.table),
            TableName::parse("table", &events_name),
        ) {
            (Ok(name), Ok(events)) if name.schema().is_none() && self.table.len() <= MAX_TABLE => {
                (name, events)
            }
            _ => {
                return Err(Error::config(
                    "table",
                    format!(
                        "`{}` must be 1 to {} of [a-z0-9_], not starting with a digit (set the schema with `schema`)",
                        self.table, MAX_TABLE
                    ),
                ));
            }
        };
        if self.timeout.is_zero() {
            return Err(Error::config("timeout", "must be above zero"));
        }
        let table = format!("{schema}.{name}");
        let events_table = format!("{schema}.{events}");
        let sql = Sql::new(&table, &events_table);
        let migrator = Migrator::new("sd-saga", MIGRATIONS)
            .name("public", &schema)
            .name("sagas", &name)
            .name("sagas_events", &events);
        Ok(PostgresStore {
            pool,
            table,
            events: events_table,
            timeout: self.timeout,
            sql: Arc::new(sql),
            migrator: Arc::new(migrator),
            writes: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// Every statement, built once per store.
#[derive(Debug)]
struct Sql {
    create: String,
    write: String,
    renew: String,
    claim_expired: String,
    claim_stuck: String,
    cancel: String,
    load: String,
    events: String,
    stats: String,
    prune: String,
}

/// `$n` seconds from now, with `$n` in milliseconds.
fn from_now(param: &str) -> String {
    format!("clock_timestamp() + make_interval(secs => {param}::float8 / 1000)")
}

impl Sql {
    fn new(t: &str, e: &str) -> Self {
        let lease_1 = from_now("$5");
        let create = format!(
            "WITH s AS (
                INSERT INTO {t} (id, saga_type, state, step, compensating, data, version, owner, epoch, lease_until,
                    progress, deadline_ms, definition_version)
                VALUES ($1, $2, 'running', 0, false, $3::jsonb, 1, $4, 1, {lease_1}, $6::jsonb, $7, $8)
                ON CONFLICT (id) DO NOTHING
                RETURNING id, version, epoch)
             INSERT INTO {e} (saga_id, version, epoch, step, direction, kind, attempt)
             SELECT id, version, epoch, 0, 'forward', 'intent', 1 FROM s
             RETURNING version"
        );
        // $1 id, $2 version, $3 epoch, $4 state, $5 step, $6 compensating, $7 data,
        // $8 reason, $9 keep the lease, $10 lease ms, $11.. the event, $16 progress,
        // $17 definition version.
        let lease_10 = from_now("$10");
        let write = format!(
            "WITH s AS (
                UPDATE {t} SET state = $4, step = $5, compensating = $6,
                    data = COALESCE($7::jsonb, data), reason = $8, version = version + 1,
                    progress = $16::jsonb, definition_version = $17,
                    owner = CASE WHEN $9 THEN owner END,
                    lease_until = CASE WHEN $9 THEN {lease_10} END,
                    updated_at = clock_timestamp()
                WHERE id = $1 AND version = $2 AND epoch = $3
                RETURNING id, version, epoch, cancel_reason IS NOT NULL AS cancel),
             ev AS (
                INSERT INTO {e} (saga_id, version, epoch, step, direction, kind, attempt, error)
                SELECT id, version, epoch, $11, $12, $13, $14, $15 FROM s)
             SELECT version, cancel FROM s"
        );
        let lease_4 = from_now("$4");
        let renew = format!(
            "UPDATE {t} SET lease_until = {lease_4}
             WHERE id = $1 AND epoch = $2 AND owner = $3 AND state IN ('running', 'compensating')"
        );
        let claim_expired = format!(
            "UPDATE {t} AS s SET owner = $2, epoch = s.epoch + 1, version = s.version + 1,
                 lease_until = {lease_4}, updated_at = clock_timestamp()
             FROM (SELECT id FROM {t}
                   WHERE saga_type = $1 AND state IN ('running', 'compensating')
                     AND lease_until <= clock_timestamp()
                   ORDER BY lease_until LIMIT $3
                   FOR UPDATE SKIP LOCKED) AS c
             WHERE s.id = c.id
             RETURNING s.id, s.saga_type, s.state, s.step, s.compensating, s.data::text AS data,
                 s.version, s.owner, s.epoch, s.reason, s.progress::text AS progress,
                 s.cancel_reason, s.deadline_ms, s.definition_version"
        );
        let claim_stuck = format!(
            "WITH s AS (
                UPDATE {t} SET owner = $3, epoch = epoch + 1, version = version + 1,
                    state = CASE WHEN compensating THEN 'compensating' ELSE 'running' END,
                    lease_until = {lease_4}, updated_at = clock_timestamp()
                WHERE id = $1 AND saga_type = $2 AND state = 'stuck'
                RETURNING {COLUMNS}),
             ev AS (
                INSERT INTO {e} (saga_id, version, epoch, step, direction, kind, attempt)
                SELECT id, version, epoch, step,
                    CASE WHEN compensating THEN 'compensate' ELSE 'forward' END, 'resumed', 0
                FROM s)
             SELECT * FROM s"
        );
        let cancel = format!(
            "UPDATE {t} SET cancel_reason = $2, updated_at = clock_timestamp()
             WHERE id = $1 AND state IN ('running', 'compensating') AND cancel_reason IS NULL
             RETURNING {COLUMNS}"
        );
        let load = format!("SELECT {COLUMNS} FROM {t} WHERE id = $1");
        let events = format!(
            "SELECT version, epoch, step, direction, kind, attempt, error FROM {e}
             WHERE saga_id = $1 ORDER BY version"
        );
        let stats = format!(
            "SELECT state, count(*)::bigint AS n,
                 (EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)) * 1000)::float8 AS age_ms
             FROM {t} WHERE saga_type = $1 GROUP BY state"
        );
        let prune = format!(
            "WITH gone AS (
                DELETE FROM {t}
                WHERE state IN ('completed', 'compensated')
                  AND updated_at <= clock_timestamp() - make_interval(secs => $1::float8 / 1000)
                RETURNING id),
             events AS (DELETE FROM {e} WHERE saga_id IN (SELECT id FROM gone))
             SELECT count(*)::bigint FROM gone"
        );
        Sql {
            prune,
            create,
            write,
            renew,
            claim_expired,
            claim_stuck,
            cancel,
            load,
            events,
            stats,
        }
    }
}

/// The log in two PostgreSQL tables; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: String,
    events: String,
    timeout: Duration,
    sql: Arc<Sql>,
    migrator: Arc<Migrator>,
    writes: Arc<AtomicU64>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table)
            .field("events", &self.events)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn to_u64(field: &str, n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| Error::corrupt(format!("negative {field}")))
}

fn to_u32(field: &str, n: i32) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::corrupt(format!("negative {field}")))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn record(row: &PgRow) -> Result<SagaRecord> {
    let state: String = row.try_get("state")?;
    Ok(SagaRecord {
        id: row.try_get("id")?,
        saga_type: row.try_get("saga_type")?,
        state: SagaState::parse(&state)?,
        step: to_u32("step", row.try_get("step")?)?,
        compensating: row.try_get("compensating")?,
        data: row.try_get("data")?,
        version: to_u64("version", row.try_get("version")?)?,
        owner: row.try_get("owner")?,
        epoch: to_u64("epoch", row.try_get("epoch")?)?,
        reason: row.try_get("reason")?,
        progress: row.try_get("progress")?,
        cancel_reason: row.try_get("cancel_reason")?,
        deadline: row
            .try_get::<Option<i64>, _>("deadline_ms")?
            .map(|ms| to_u64("deadline_ms", ms).map(Duration::from_millis))
            .transpose()?,
        definition_version: to_u32("definition_version", row.try_get("definition_version")?)?,
    })
}

impl PostgresStore {
    /// Options: schema `public`, table `sagas`, 5 s timeout.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema-qualified instance table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The schema-qualified events table.
    pub fn events_table(&self) -> &str {
        &self.events
    }

    /// How many write statements this store (and its clones) has sent: create, intent,
    /// outcome, renew and claim statements, each one implicit transaction.
    pub fn write_statements(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Creates the schema, the tables and their indexes if they are missing; safe to call
    /// from every replica at start-up. The shipped [`MIGRATIONS`] are applied by sd-core's
    /// [`Migrator`] (one transaction under an advisory lock, recorded in `sd_migrations`).
    pub async fn migrate(&self) -> Result<()> {
        self.migrator.run(&self.pool).await?;
        Ok(())
    }

    /// The migrator with this store's names, for teams that apply the SQL with their own
    /// tool ([`Migrator::render`]).
    pub fn migrator(&self) -> &Migrator {
        &self.migrator
    }

    /// Deletes Completed and Compensated sagas (and their events) last written at least
    /// `older_than` ago, in one statement; returns how many. Stuck and live sagas are
    /// kept. Run it from a periodic job; the crate deletes nothing by itself.
    pub async fn prune_finished(&self, older_than: Duration) -> Result<u64> {
        let query = sqlx::query_scalar::<_, i64>(&self.sql.prune)
            .bind(ms(older_than))
            .fetch_one(&self.pool);
        to_u64("count", self.timed(query).await?)
    }

    async fn timed<T>(&self, f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T> {
        let span = tracing::debug_span!(
            "saga.postgres",
            sd.backend = sd_core::observe::backend::POSTGRES
        );
        Ok(timeout(self.timeout, span, f).await??)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// The refusal of a write that matched no row: fenced, or the saga is gone.
    async fn refused(&self, lease: &Lease) -> Error {
        match self.load(&lease.id).await {
            Ok(None) => Error::NotFound {
                id: lease.id.clone(),
            },
            _ => lease.fenced(),
        }
    }
}

impl SagaStore for PostgresStore {
    async fn create(&self, saga: &NewSaga<'_>) -> Result<Lease> {
        self.wrote();
        let query = sqlx::query(&self.sql.create)
            .bind(saga.id)
            .bind(saga.saga_type)
            .bind(saga.data)
            .bind(saga.owner)
            .bind(ms(saga.lease_ttl))
            .bind(saga.progress)
            .bind(
                saga.deadline
                    .map(|d| to_i64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
            )
            .bind(to_i32(saga.definition_version))
            .fetch_optional(&self.pool);
        match self.timed(query).await? {
            Some(_) => Ok(Lease {
                id: saga.id.to_owned(),
                owner: saga.owner.to_owned(),
                epoch: 1,
                version: 1,
                cancel_requested: false,
            }),
            None => Err(Error::AlreadyExists {
                id: saga.id.to_owned(),
            }),
        }
    }

    async fn write(&self, lease: &Lease, write: &Write<'_>) -> Result<Lease> {
        self.wrote();
        let e = &write.event;
        let query = sqlx::query(&self.sql.write)
            .bind(&lease.id)
            .bind(to_i64(lease.version))
            .bind(to_i64(lease.epoch))
            .bind(write.state.as_str())
            .bind(to_i32(write.step))
            .bind(write.compensating)
            .bind(write.data)
            .bind(write.reason)
            .bind(write.state.is_live())
            .bind(ms(write.lease_ttl))
            .bind(to_i32(e.step))
            .bind(e.direction.as_str())
            .bind(e.kind.as_str())
            .bind(to_i32(e.attempt))
            .bind(e.error.as_deref())
            .bind(write.progress)
            .bind(to_i32(write.definition_version))
            .fetch_optional(&self.pool);
        match self.timed(query).await? {
            Some(row) => Ok(Lease {
                version: to_u64("version", row.try_get("version")?)?,
                cancel_requested: row.try_get("cancel")?,
                ..lease.clone()
            }),
            None => Err(self.refused(lease).await),
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<()> {
        self.wrote();
        let query = sqlx::query(&self.sql.renew)
            .bind(&lease.id)
            .bind(to_i64(lease.epoch))
            .bind(&lease.owner)
            .bind(ms(ttl))
            .execute(&self.pool);
        if self.timed(query).await?.rows_affected() == 1 {
            Ok(())
        } else {
            Err(self.refused(lease).await)
        }
    }

    async fn claim_expired(&self, by: &Claimant<'_>, limit: usize) -> Result<Vec<SagaRecord>> {
        self.wrote();
        let query = sqlx::query(&self.sql.claim_expired)
            .bind(by.saga_type)
            .bind(by.owner)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(ms(by.lease_ttl))
            .fetch_all(&self.pool);
        self.timed(query).await?.iter().map(record).collect()
    }

    async fn claim_stuck(&self, by: &Claimant<'_>, id: &str) -> Result<SagaRecord> {
        self.wrote();
        let query = sqlx::query(&self.sql.claim_stuck)
            .bind(id)
            .bind(by.saga_type)
            .bind(by.owner)
            .bind(ms(by.lease_ttl))
            .fetch_optional(&self.pool);
        if let Some(row) = self.timed(query).await? {
            return record(&row);
        }
        match self.load(id).await? {
            None => Err(Error::NotFound { id: id.to_owned() }),
            Some(r) => {
                check_stuck(&r, by.saga_type)?;
                // Stuck a moment ago, claimed by someone else since.
                Err(Error::NotStuck {
                    id: id.to_owned(),
                    state: r.state,
                })
            }
        }
    }

    async fn cancel(&self, id: &str, reason: &str) -> Result<SagaRecord> {
        self.wrote();
        let query = sqlx::query(&self.sql.cancel)
            .bind(id)
            .bind(reason)
            .fetch_optional(&self.pool);
        if let Some(row) = self.timed(query).await? {
            return record(&row);
        }
        self.load(id)
            .await?
            .ok_or_else(|| Error::NotFound { id: id.to_owned() })
    }

    async fn load(&self, id: &str) -> Result<Option<SagaRecord>> {
        let query = sqlx::query(&self.sql.load)
            .bind(id)
            .fetch_optional(&self.pool);
        self.timed(query).await?.as_ref().map(record).transpose()
    }

    async fn events(&self, id: &str) -> Result<Vec<StoredEvent>> {
        let query = sqlx::query(&self.sql.events).bind(id).fetch_all(&self.pool);
        let rows = self.timed(query).await?;
        rows.iter()
            .map(|row| {
                let direction: String = row.try_get("direction")?;
                let kind: String = row.try_get("kind")?;
                Ok(StoredEvent {
                    version: to_u64("version", row.try_get("version")?)?,
                    epoch: to_u64("epoch", row.try_get("epoch")?)?,
                    event: Event {
                        step: to_u32("step", row.try_get("step")?)?,
                        direction: Direction::parse(&direction).ok_or_else(|| {
                            Error::corrupt(format!("unknown direction `{direction}`"))
                        })?,
                        kind: EventKind::parse(&kind)?,
                        attempt: to_u32("attempt", row.try_get("attempt")?)?,
                        error: row.try_get("error")?,
                    },
                })
            })
            .collect()
    }

    async fn stats(&self, saga_type: &str) -> Result<StoreStats> {
        let query = sqlx::query(&self.sql.stats)
            .bind(saga_type)
            .fetch_all(&self.pool);
        let rows = self.timed(query).await?;
        let mut stats = StoreStats {
            by_state: SagaState::ALL.into_iter().map(|s| (s, 0)).collect(),
            oldest_unfinished_age: None,
        };
        for row in &rows {
            let state = SagaState::parse(&row.try_get::<String, _>("state")?)?;
            let n = to_u64("count", row.try_get("n")?)?;
            if let Some(slot) = stats.by_state.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = n;
            }
            if !state.is_final() {
                let age_ms: f64 = row.try_get("age_ms")?;
                let age = Duration::from_secs_f64(age_ms.max(0.0) / 1000.0);
                stats.oldest_unfinished_age =
                    Some(stats.oldest_unfinished_age.map_or(age, |o| o.max(age)));
            }
        }
        Ok(stats)
    }
}
