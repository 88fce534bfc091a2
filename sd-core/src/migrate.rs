//! PostgreSQL migrations, one way for every crate.
//!
//! Each crate ships its schema as numbered SQL files written for its **default table
//! names**, so they apply with `psql -f` as they stand. A [`Migrator`] applies them in
//! order inside one transaction, under one advisory lock (safe to run from every replica
//! at start-up), and records each in the table `sd_migrations` with a checksum of the
//! file: a migration already applied is skipped, and one whose file changed since is
//! refused ([`MigrateError::Changed`]) rather than applied twice.
//!
//! Configured table names are put in by [`Migrator::name`]: the default name is
//! replaced wherever it starts an identifier, so `outbox` becomes `billing.outbox` and
//! the index `outbox_created_idx` becomes `events_created_idx` for a table `events`
//! (derived names take the table's own name, without its schema). Teams whose DDL goes
//! through their own tool (sqlx migrate, refinery, flyway) take the same SQL from
//! [`Migrator::render`] and apply it there.
//!
//! ```
//! use sd_core::migrate::{Migration, Migrator};
//! use sd_core::TableName;
//!
//! static FILES: &[Migration] = &[Migration {
//!     version: 1,
//!     name: "create",
//!     sql: "CREATE TABLE IF NOT EXISTS jobs (id BIGINT);\n\
//!           CREATE INDEX IF NOT EXISTS jobs_id_idx ON jobs (id);",
//! }];
//! let migrator = Migrator::new("sd-example", FILES).name("jobs", &TableName::parse("table", "ops.work")?);
//! let sql = &migrator.render()[0].sql;
//! assert!(sql.contains("CREATE TABLE IF NOT EXISTS ops.work (id BIGINT)"));
//! assert!(sql.contains("work_id_idx ON ops.work"));
//! // migrator.run(&pool).await?;
//! # Ok::<(), sd_core::ConfigError>(())
//! ```

use sha2::{Digest, Sha256};
use sqlx::{Executor as _, PgPool};

use crate::name::TableName;

/// The table that records applied migrations, in the connection's default schema.
pub const LEDGER: &str = "sd_migrations";

/// One shipped SQL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Its number; files apply in ascending order.
    pub version: u32,
    /// A short name (the file name without its number).
    pub name: &'static str,
    /// The SQL, written for the default names.
    pub sql: &'static str,
}

impl Migration {
    /// The SHA-256 of the file as shipped (before names are put in), in hex.
    pub fn checksum(&self) -> String {
        Sha256::digest(self.sql.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A migration with the configured names put in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rendered {
    /// The file's number.
    pub version: u32,
    /// The file's name.
    pub name: &'static str,
    /// The SQL to apply.
    pub sql: String,
}

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// PostgreSQL refused a statement or could not be reached.
    #[error(
        "migration failed in postgres: {0}; check the server is reachable and the role may create tables"
    )]
    Postgres(#[from] sqlx::Error),
    /// A migration was applied earlier from a file that differs from the one shipped now.
    #[error(
        "{component} migration {version} ({name}) for `{target}` was applied from a different file \
         (checksum {applied}, shipped {shipped}); compare the schema with the shipped file and \
         fix the row in `sd_migrations` by hand"
    )]
    Changed {
        /// The crate.
        component: &'static str,
        /// The configured names the schema was applied for.
        target: String,
        /// The migration's number.
        version: u32,
        /// The migration's name.
        name: &'static str,
        /// The checksum recorded when it was applied.
        applied: String,
        /// The checksum of the file shipped now.
        shipped: String,
    },
}

/// Applies one crate's migrations for one set of table names (see the
/// [module docs](self)).
#[derive(Debug, Clone)]
pub struct Migrator {
    component: &'static str,
    migrations: &'static [Migration],
    names: Vec<(&'static str, TableName)>,
}

impl Migrator {
    /// The migrations of `component` (the crate's name), with every table under its
    /// default name.
    pub fn new(component: &'static str, migrations: &'static [Migration]) -> Self {
        Migrator {
            component,
            migrations,
            names: Vec::new(),
        }
    }

    /// Puts `to` wherever the shipped files name the table `default`.
    pub fn name(mut self, default: &'static str, to: &TableName) -> Self {
        self.names.push((default, to.clone()));
        self
    }

    /// What the ledger records these migrations under: the configured names, in the
    /// order given (empty for the defaults).
    pub fn target(&self) -> String {
        self.names
            .iter()
            .map(|(_, to)| to.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every migration with the configured names put in, in order.
    pub fn render(&self) -> Vec<Rendered> {
        let mut migrations = self.migrations.to_vec();
        migrations.sort_by_key(|m| m.version);
        migrations
            .into_iter()
            .map(|m| Rendered {
                version: m.version,
                name: m.name,
                sql: rename(m.sql, &self.names),
            })
            .collect()
    }

    /// Applies every migration not applied yet, in one transaction under one advisory
    /// lock; returns how many it applied. Safe to call from every replica at start-up.
    pub async fn run(&self, pool: &PgPool) -> Result<usize, MigrateError> {
        let target = self.target();
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('sd migrate', 0))")
            .execute(&mut *tx)
            .await?;
        tx.execute(sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS sd_migrations (
                component  TEXT        NOT NULL,
                target     TEXT        NOT NULL,
                version    INTEGER     NOT NULL,
                name       TEXT        NOT NULL,
                checksum   TEXT        NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (component, target, version)
            )",
        ))
        .await?;
        let applied: Vec<(i32, String)> = sqlx::query_as(
            "SELECT version, checksum FROM sd_migrations WHERE component = $1 AND target = $2",
        )
        .bind(self.component)
        .bind(&target)
        .fetch_all(&mut *tx)
        .await?;
        let mut count = 0;
        let mut files = self.migrations.to_vec();
        files.sort_by_key(|m| m.version);
        for file in files {
            let shipped = file.checksum();
            let version = i32::try_from(file.version).unwrap_or(i32::MAX);
            match applied.iter().find(|(v, _)| *v == version) {
                Some((_, sum)) if *sum == shipped => continue,
                Some((_, sum)) => {
                    return Err(MigrateError::Changed {
                        component: self.component,
                        target,
                        version: file.version,
                        name: file.name,
                        applied: sum.clone(),
                        shipped,
                    });
                }
                None => {}
            }
            let sql = rename(file.sql, &self.names);
            tx.execute(sqlx::raw_sql(&sql)).await?;
            sqlx::query(
                "INSERT INTO sd_migrations (component, target, version, name, checksum)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(self.component)
            .bind(&target)
            .bind(version)
            .bind(file.name)
            .bind(&shipped)
            .execute(&mut *tx)
            .await?;
            count += 1;
        }
        tx.commit().await?;
        Ok(count)
    }
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `sql` with each default name replaced where it starts an identifier: by the whole
/// configured name where the identifier is the name alone, by the configured table's own
/// name where a suffix follows (an index, a trigger). Longer defaults are tried first.
fn rename(sql: &str, names: &[(&'static str, TableName)]) -> String {
    let mut names: Vec<_> = names.iter().filter(|(d, _)| !d.is_empty()).collect();
    names.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let starts = i == 0 || !is_ident(bytes[i - 1]);
        let hit = starts
            .then(|| {
                names
                    .iter()
                    .find(|(d, _)| bytes[i..].starts_with(d.as_bytes()))
            })
            .flatten();
        match hit {
            Some((default, to)) => {
                out.push_str(&sql[copied..i]);
                let end = i + default.len();
                if bytes.get(end).copied().is_some_and(is_ident) {
                    out.push_str(to.name());
                } else {
                    out.push_str(&to.to_string());
                }
                i = end;
                copied = end;
            }
            None => i += 1,
        }
    }
    out.push_str(&sql[copied..]);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(s: &str) -> TableName {
        TableName::parse("table", s).unwrap()
    }

    #[test]
    fn names_are_replaced_where_an_identifier_starts() {
        let sql = "CREATE TABLE outbox (id INT);\nCREATE INDEX outbox_id_idx ON outbox (id);\n\
                   SELECT pg_notify('outbox', 'x'); -- my_outbox stays; inbox_outbox too\n\
                   CREATE TABLE outbox_inbox (id INT);";
        let names = [("outbox", t("billing.events")), ("outbox_inbox", t("seen"))];
        let out = rename(sql, &names);
        assert_eq!(
            out,
            "CREATE TABLE billing.events (id INT);\nCREATE INDEX events_id_idx ON billing.events (id);\n\
             SELECT pg_notify('billing.events', 'x'); -- my_outbox stays; inbox_outbox too\n\
             CREATE TABLE seen (id INT);"
        );
        assert_eq!(rename(sql, &[]), sql);
    }

    #[test]
    fn render_orders_by_version_and_checksums_the_shipped_file() {
        static FILES: &[Migration] = &[
            Migration {
                version: 2,
                name: "b",
                sql: "ALTER TABLE t ADD c INT;",
            },
            Migration {
                version: 1,
                name: "a",
                sql: "CREATE TABLE t (id INT);",
            },
        ];
        let m = Migrator::new("x", FILES).name("t", &t("u"));
        let r = m.render();
        assert_eq!((r[0].version, r[1].version), (1, 2));
        assert_eq!(r[0].sql, "CREATE TABLE u (id INT);");
        assert_eq!(m.target(), "u");
        assert_eq!(FILES[1].checksum().len(), 64);
        assert_ne!(FILES[0].checksum(), FILES[1].checksum());
    }
}
