//! The outbox table on PostgreSQL: [`Outbox::enqueue`] in the caller's transaction,
//! dead letters, retention, and the [`Relay`] that publishes rows.
//!
//! - **Schema**: [`Outbox::migrate`] creates the table (default `outbox`), its indexes,
//!   a `{table}_lanes` table of 64 rows for parallel relays and a statement trigger
//!   that sends `NOTIFY {table}` at commit. It runs sd-core's [`Migrator`]: idempotent,
//!   under an advisory lock, recorded in `sd_migrations`, so every replica may call it at
//!   start-up. The SQL is in `migrations/0001_outbox.sql`, written for the default name
//!   (it applies with `psql` as it stands); [`Outbox::migrator`] renders it for your
//!   own migration tool.
//! - **Columns**: `id uuid, aggregatetype, aggregateid, type, payload jsonb` as
//!   Debezium's Outbox Event Router expects, plus `payload_bytes` (byte payloads),
//!   `headers jsonb`, `seq` (insertion order), `txid xid8` (the writing transaction),
//!   `status` (the enum `{table}_status`: `pending`, `published`, `dead`),
//!   `attempts`, `next_attempt_at`, `last_error`, `created_at`, `published_at`.
//! - **Enqueue** is one `INSERT` on the caller's transaction: the event exists if and
//!   only if the business rows commit.

/// Writes what an [`Outbox`] and an [`Inbox`] share: the builder (its one option, the
/// table name, with its default), `from_parts`, which the builder's `build` ends with,
/// and the public `table`, `migrate` and `migrator`, each with the docs the type gives.
macro_rules! table_handle {
    (
        $ty:ident($meters:ty) {
            $(#[$table:meta])* table,
            $(#[$migrate:meta])* migrate,
            $(#[$migrator:meta])* migrator $(,)?
        }
        $builder:ident($default:literal) {
            $(#[$setter:meta])* table $(,)?
        }
    ) => {
        #[doc = concat!("Options of an [`", stringify!($ty), "`].")]
        #[derive(Debug, Clone)]
        pub struct $builder {
            table: String,
        }

        impl Default for $builder {
            fn default() -> Self {
                $builder {
                    table: $default.into(),
                }
            }
        }

        impl $builder {
            $(#[$setter])*
            pub fn table(mut self, table: impl Into<String>) -> Self {
                self.table = table.into();
                self
            }
        }

        impl $ty {
            fn from_parts(
                pool: PgPool,
                table: String,
                insert: String,
                migrator: Migrator,
                meters: $meters,
            ) -> Self {
                $ty {
                    pool,
                    table,
                    insert,
                    migrator: Arc::new(migrator),
                    meters,
                }
            }

            $(#[$table])*
            pub fn table(&self) -> &str {
                &self.table
            }

            $(#[$migrate])*
            pub async fn migrate(&self) -> Result<()> {
                self.migrator.run(&self.pool).await?;
                Ok(())
            }

            $(#[$migrator])*
            pub fn migrator(&self) -> &Migrator {
                &self.migrator
            }
        }
    };
}

mod inbox;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use sd_core::TableName;
use sd_core::migrate::{Migration, Migrator};
use sqlx::{PgPool, Postgres, Row as _, Transaction};
use uuid::Uuid;

pub use self::inbox::{INBOX_MIGRATIONS, Inbox, InboxBuilder};
pub use self::relay::{Metrics, Mode, Relay, RelayBuilder, RelayHandle};
use crate::error::{Error, Result};
use crate::message::{Event, Headers, Message, Payload, new_id};

/// The outbox table's shipped migration, written for the default name `outbox`.
pub static MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "outbox",
    sql: include_str!("../migrations/0001_outbox.sql"),
}];

/// The number of lanes parallel relays share (rows of `{table}_lanes`).
pub const LANES: i16 = 64;

/// The lane of a row aliased `o`: a hash of its aggregate type and id, 0 to 63. The
/// pending rows' lane index is on this expression (written without the alias), so a
/// producer that inserts rows with plain SQL needs no lane of its own.
pub(crate) const LANE: &str =
    "((hashtextextended(o.aggregatetype || chr(31) || o.aggregateid, 0) & 63)::smallint)";

/// Checks a one-part table name (sd-core's [`TableName`] rule, without a schema).
pub(crate) fn one_part(field: &'static str, value: &str) -> Result<TableName> {
    let table = TableName::parse(field, value)?;
    if table.schema().is_some() {
        return Err(Error::config(
            field,
            format!(
                "`{value}` must be a name without a schema (its lanes, type and trigger are \
                 named after it); put the schema first in the connection's `search_path`"
            ),
        ));
    }
    Ok(table)
}

impl OutboxBuilder {
    /// An outbox on `pool`; fails with [`Error::InvalidConfig`] naming `table` when the name
    /// is not acceptable.
    pub fn build(self, pool: PgPool) -> Result<Outbox> {
        let name = one_part("table", &self.table)?;
        let migrator = Migrator::new("sd-outbox", MIGRATIONS).name("outbox", &name);
        let insert = format!(
            "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload, payload_bytes, headers) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            self.table
        );
        let meters = crate::observe::OutboxMeters::new(&self.table);
        Ok(Outbox::from_parts(
            pool, self.table, insert, migrator, meters,
        ))
    }
}

/// The outbox table; cheap to clone. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Outbox {
    pool: PgPool,
    table: String,
    insert: String,
    migrator: Arc<Migrator>,
    meters: crate::observe::OutboxMeters,
}

table_handle! {
    Outbox(crate::observe::OutboxMeters) {
        /// The table name (also the NOTIFY channel).
        table,
        /// Creates the table, its indexes, the lanes and the notify trigger if missing,
        /// through sd-core's [`Migrator`] (one transaction under an advisory lock, recorded
        /// in `sd_migrations`); safe to call from every replica at start-up.
        migrate,
        /// The migrator with this outbox's table name, for teams that apply the SQL with
        /// their own tool ([`Migrator::render`]).
        migrator,
    }
    OutboxBuilder("outbox") {
        /// The table (default `outbox`): 1 to 48 of `[a-z0-9_]`, not starting with a digit
        /// (sd-core's [`TableName`] rule), without a schema. It is also the NOTIFY channel.
        table,
    }
}

/// Counts read from the table; see [`Outbox::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Rows waiting to be published (retries included).
    pub backlog: u64,
    /// Dead-lettered rows.
    pub dead: u64,
    /// Published rows not yet swept.
    pub published: u64,
    /// Age of the oldest pending row (relay lag), or `None` when nothing waits.
    pub oldest_pending_age: Option<Duration>,
}

/// A dead-lettered event: kept in the table with why it died, until
/// [`Outbox::redrive`] sends it back to the relay or [`Outbox::purge_dead`] deletes it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The event (its `attempts` count the failures).
    pub event: Event,
    /// The last publish error.
    pub last_error: Option<String>,
}

impl Outbox {
    /// Options: table `outbox`.
    pub fn builder() -> OutboxBuilder {
        OutboxBuilder::default()
    }

    /// An outbox on `pool` with the default table `outbox`.
    pub fn new(pool: PgPool) -> Result<Outbox> {
        Self::builder().build(pool)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes `message` in `tx`, the caller's transaction: it is published if and only
    /// if `tx` commits. Returns the event id (the dedupe key consumers see).
    ///
    /// With feature `otel`, the current `tracing` span's W3C trace context goes into the
    /// headers (`traceparent`, `tracestate`) unless the message carries a `traceparent`
    /// already; see the [crate docs](crate#traces).
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: Message,
    ) -> Result<Uuid> {
        message.validate()?;
        #[cfg(feature = "otel")]
        let message = message.with_current_trace();
        let id = new_id();
        let (json, bytes) = match message.payload {
            Payload::Json(value) => (Some(value), None),
            Payload::Bytes(bytes) => (None, Some(bytes)),
        };
        let headers = serde_json::Value::Object(
            message
                .headers
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect(),
        );
        sqlx::query(&self.insert)
            .bind(id)
            .bind(message.aggregate_type)
            .bind(message.aggregate_id)
            .bind(message.event_type)
            .bind(json)
            .bind(bytes)
            .bind(headers)
            .execute(&mut **tx)
            .await?;
        self.meters.enqueued();
        Ok(id)
    }

    /// Backlog, dead letters, retained published rows and the age of the oldest
    /// pending row, in one query.
    pub async fn stats(&self) -> Result<Stats> {
        let row = sqlx::query(&format!(
            // One subquery per status, so each reads only its own partial index (or the
            // pending rows) rather than the whole table with its retained rows.
            "SELECT (SELECT count(*) FROM {t} WHERE status = 'pending') AS backlog,
                    (SELECT count(*) FROM {t} WHERE status = 'dead') AS dead,
                    (SELECT count(*) FROM {t} WHERE status = 'published') AS published,
                    (SELECT (EXTRACT(EPOCH FROM (clock_timestamp() - min(created_at))) * 1000)::float8
                     FROM {t} WHERE status = 'pending') AS age_ms",
            t = self.table
        ))
        .fetch_one(&self.pool)
        .await?;
        let count = |name: &str| -> Result<u64> {
            Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or(0))
        };
        let age: Option<f64> = row.try_get("age_ms")?;
        Ok(Stats {
            backlog: count("backlog")?,
            dead: count("dead")?,
            published: count("published")?,
            oldest_pending_age: age.map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0)),
        })
    }

    /// Up to `limit` dead-lettered events, oldest first.
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS}, last_error FROM {} WHERE status = 'dead' ORDER BY seq LIMIT $1",
            self.table
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    event: event_from_row(row)?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    /// Sends the dead-lettered event `id` back to the relay with a fresh attempt count.
    /// Returns false when no dead letter has that id. It is published after the events
    /// now pending in its lane or transaction order, so it may arrive after later
    /// events of its aggregate.
    pub async fn redrive(&self, id: Uuid) -> Result<bool> {
        let done = sqlx::query(&format!(
            "UPDATE {} SET status = 'pending', attempts = 0, next_attempt_at = NULL
             WHERE id = $1 AND status = 'dead'",
            self.table
        ))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// [`Self::redrive`] for every dead letter; returns how many.
    pub async fn redrive_all(&self) -> Result<u64> {
        let done = sqlx::query(&format!(
            "UPDATE {} SET status = 'pending', attempts = 0, next_attempt_at = NULL
             WHERE status = 'dead'",
            self.table
        ))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Deletes the dead letter `id` for good; returns false when there was none.
    pub async fn purge_dead(&self, id: Uuid) -> Result<bool> {
        let done = sqlx::query(&format!(
            "DELETE FROM {} WHERE id = $1 AND status = 'dead'",
            self.table
        ))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes published rows older than `older_than`, in chunks of 10,000; returns
    /// how many. Pending and dead rows are never touched.
    pub async fn sweep(&self, older_than: Duration) -> Result<u64> {
        let sql = format!(
            "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE status = 'published'
                 AND published_at < now() - make_interval(secs => $1) LIMIT 10000)",
            t = self.table
        );
        let mut total = 0;
        loop {
            let done = sqlx::query(&sql)
                .bind(older_than.as_secs_f64())
                .execute(&self.pool)
                .await?;
            total += done.rows_affected();
            if done.rows_affected() < 10_000 {
                return Ok(total);
            }
        }
    }
}

/// The columns [`event_from_row`] reads.
pub(crate) const EVENT_COLUMNS: &str =
    "id, aggregatetype, aggregateid, type, payload, payload_bytes, headers, attempts";

pub(crate) fn event_from_row(row: &sqlx::postgres::PgRow) -> Result<Event> {
    let json: Option<serde_json::Value> = row.try_get("payload")?;
    let bytes: Option<Vec<u8>> = row.try_get("payload_bytes")?;
    let payload = match (json, bytes) {
        (Some(value), _) => Payload::Json(value),
        (None, Some(bytes)) => Payload::Bytes(bytes),
        (None, None) => Payload::Json(serde_json::Value::Null),
    };
    let headers = match row.try_get::<serde_json::Value, _>("headers")? {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => Headers::new(),
    };
    Ok(Event {
        id: row.try_get("id")?,
        aggregate_type: row.try_get("aggregatetype")?,
        aggregate_id: row.try_get("aggregateid")?,
        event_type: row.try_get("type")?,
        payload,
        headers,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
    })
}
