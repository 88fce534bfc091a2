//! Where a batch writes its marks: the ordered relay's connection or a hand-begun transaction, in simple-query round trips.

use super::*;

/// Where [`Inner::publish`] writes its marks: the ordered relay's own connection
/// (autocommit) or a parallel batch's transaction.
pub(super) enum Marks<'a> {
    Conn(&'a mut PgConnection),
    Tx(&'a mut HandTx),
}

impl Marks<'_> {
    /// The connection to run statements on.
    pub(super) fn conn(&mut self) -> &mut PgConnection {
        match self {
            Marks::Conn(conn) => conn,
            Marks::Tx(tx) => &mut tx.conn,
        }
    }

    /// Ends the batch: runs the published mark over `ids` (if any) and commits when
    /// there is a transaction, in one round trip where it can.
    pub(super) async fn done(&mut self, mark: Option<(&str, &[uuid::Uuid])>) -> Result<()> {
        match self {
            Marks::Conn(conn) => {
                if let Some((sql, ids)) = mark {
                    sqlx::query(sql).bind(ids).execute(&mut **conn).await?;
                }
                Ok(())
            }
            Marks::Tx(tx) => tx.finish(mark).await,
        }
    }
}

/// A pooled connection in a transaction begun by hand (`BEGIN` travels with the lane
/// claim). Dropped while still open (an error, a timeout, an abort), the connection is
/// closed rather than returned to the pool mid-transaction; the server rolls back.
pub(super) struct HandTx {
    pub(super) conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    pub(super) open: bool,
}

impl HandTx {
    /// Commits, with the published mark in the same round trip when there is one.
    pub(super) async fn finish(&mut self, mark: Option<(&str, &[uuid::Uuid])>) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        match mark {
            Some((sql, ids)) if !ids.is_empty() => {
                // Ids are UUIDs we read ourselves: their text form is safe as a literal.
                let list: Vec<String> = ids.iter().map(uuid::Uuid::to_string).collect();
                let sql = sql.replace("$1", &format!("'{{{}}}'::uuid[]", list.join(",")));
                raw_execute(&mut self.conn, format!("{sql}; COMMIT")).await?;
            }
            _ => {
                raw_execute(&mut self.conn, "COMMIT".to_owned()).await?;
            }
        }
        self.open = false;
        Ok(())
    }
}

impl Drop for HandTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// A query string without arguments goes over the simple-query protocol, which takes
// several statements at once (`raw_sql` futures would trip the higher-ranked `Send`
// check of the spawned relay).

/// Runs `BEGIN` and the lane claim in one simple-query round trip.
pub(super) fn claim_lanes(conn: &mut PgConnection, sql: String) -> BoxFuture<'_, Result<Vec<i16>>> {
    Box::pin(async move {
        let rows = sqlx::Executor::fetch_all(conn, sql.as_str()).await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get::<i16, _>(0))
            .collect::<Result<Vec<_>, _>>()?)
    })
}

/// Runs statements without parameters in one simple-query round trip.
fn raw_execute(conn: &mut PgConnection, sql: String) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        sqlx::Executor::execute(conn, sql.as_str()).await?;
        Ok(())
    })
}
