//! The consumer side: an inbox that records `(consumer, message id)` in the handler's
//! own transaction, so a redelivered event has no second effect.

use std::sync::Arc;
use std::time::Duration;

use sd_core::TableName;
use sd_core::migrate::{Migration, Migrator};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The inbox table's shipped migration, written for the default name `outbox_inbox`.
pub static INBOX_MIGRATIONS: &[Migration] = &[Migration {
    version: 2,
    name: "inbox",
    sql: include_str!("../../migrations/0002_inbox.sql"),
}];

impl InboxBuilder {
    /// An inbox on `pool`; fails with [`Error::InvalidConfig`] naming `table` when the name
    /// is not acceptable.
    pub fn build(self, pool: PgPool) -> Result<Inbox> {
        let name = TableName::parse("table", &self.table)?;
        let migrator =
            Migrator::new("sd-outbox-inbox", INBOX_MIGRATIONS).name("outbox_inbox", &name);
        let insert = format!(
            "INSERT INTO {} (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            self.table
        );
        Ok(Inbox::from_parts(pool, self.table, insert, migrator, ()))
    }
}

/// Records which messages each consumer has handled.
///
/// Call [`Inbox::receive`] first thing in the transaction that applies a message's
/// effects: it returns `true` once per `(consumer, message id)`; on a redelivery it
/// returns `false` and the handler commits (or rolls back) without doing anything. If
/// the handler's transaction rolls back, the record goes with it and the redelivery
/// runs the handler again. A concurrent second delivery waits on the first one's row
/// lock and then sees `false`.
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
    table: String,
    insert: String,
    migrator: Arc<Migrator>,
    /// The inbox reports nothing of its own.
    #[allow(dead_code)]
    meters: (),
}

table_handle! {
    Inbox(()) {
        /// The table name.
        table,
        /// Creates the table if it is missing, through sd-core's [`Migrator`] (one
        /// transaction under an advisory lock, recorded in `sd_migrations`).
        migrate,
        /// The migrator with this inbox's table name, for teams that apply the SQL with
        /// their own tool ([`Migrator::render`]).
        migrator,
    }
    InboxBuilder("outbox_inbox") {
        /// The table (default `outbox_inbox`): `table` or `schema.table`, each part 1 to 48
        /// of `[a-z0-9_]` (sd-core's [`TableName`] rule). `migrate` creates the table, not
        /// the schema: create that first.
        table,
    }
}

impl Inbox {
    /// Options: table `outbox_inbox`.
    pub fn builder() -> InboxBuilder {
        InboxBuilder::default()
    }

    /// Records that `consumer` handles `message_id` in `tx`; `true` the first time,
    /// `false` for a message this consumer already handled (in a committed
    /// transaction).
    pub async fn receive(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool> {
        if consumer.is_empty() || consumer.len() > 255 {
            return Err(Error::invalid("consumer", "must be 1 to 255 bytes"));
        }
        let done = sqlx::query(&self.insert)
            .bind(consumer)
            .bind(message_id)
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes records older than `older_than` (the dedupe window: redeliveries older
    /// than that are no longer recognised); returns how many.
    pub async fn sweep(&self, older_than: Duration) -> Result<u64> {
        let done = sqlx::query(&format!(
            "DELETE FROM {} WHERE received_at < now() - make_interval(secs => $1)",
            self.table
        ))
        .bind(older_than.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
