//! Finding the master through the Sentinels, and watching them for a switch.

use std::sync::Arc;

use redis::aio::MultiplexedConnection;
use redis::{
    ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value,
};

use super::{Shared, Topology};

impl Shared {
    /// Asks one Sentinel for the master, connects to it and checks it says `master`.
    pub(super) async fn ask_sentinel(
        &self,
        sentinel: &ConnectionInfo,
        name: &str,
        master: &ConnectionInfo,
    ) -> RedisResult<(MultiplexedConnection, String)> {
        let mut conn = self.open_to(sentinel.clone()).await?;
        let (host, port) = named_master(&mut conn, name).await?;
        let address = format!("{host}:{port}");
        let mut conn = self
            .open_to(master.clone().set_addr(ConnectionAddr::Tcp(host, port)))
            .await?;
        // A Sentinel may still name the old master for a moment after a promotion, and
        // a master that restarted may not have been turned into a replica yet.
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        let is_master = match role.first() {
            Some(Value::BulkString(r)) => r == b"master",
            Some(Value::SimpleString(r)) => r == "master",
            _ => false,
        };
        if is_master {
            Ok((conn, address))
        } else {
            Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ReadOnly),
                "the node the sentinel named is not a master (yet)",
                address,
            )))
        }
    }
}

/// The master `name` as a Sentinel names it.
async fn named_master(conn: &mut MultiplexedConnection, name: &str) -> RedisResult<(String, u16)> {
    let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(name)
        .query_async(conn)
        .await?;
    addr.ok_or_else(|| {
        RedisError::from((
            ErrorKind::MasterNameNotFoundBySentinel,
            "the sentinel does not know the master name",
            name.to_owned(),
        ))
    })
}

/// For a Sentinel topology, starts a task that asks a Sentinel every `check_interval`
/// which node is master and moves the connection when the answer differs from the node
/// in use. The task ends when the last clone of the connection is dropped.
pub(super) fn watch(shared: &Arc<Shared>) {
    let Topology::Sentinel {
        sentinels, name, ..
    } = &shared.client.topology
    else {
        return;
    };
    let (sentinels, name) = (sentinels.clone(), name.clone());
    let interval = shared.client.check_interval;
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut asking: Option<MultiplexedConnection> = None;
        let mut next = 0;
        loop {
            tokio::time::sleep(interval).await;
            let Some(shared) = weak.upgrade() else {
                return;
            };
            if asking.is_none() {
                let sentinel = sentinels[next % sentinels.len()].clone();
                next += 1;
                asking = shared.open_to(sentinel).await.ok();
            }
            let Some(conn) = asking.as_mut() else {
                continue;
            };
            let named = match named_master(conn, &name).await {
                Ok((host, port)) => format!("{host}:{port}"),
                Err(_) => {
                    asking = None;
                    continue;
                }
            };
            let current = shared
                .lock()
                .as_ref()
                .map(|c| (c.generation, c.address.clone()));
            if let Some((generation, address)) = current
                && address != named
            {
                tracing::info!(from = %address, to = %named, "redis sentinels switched the master");
                shared.forget(generation);
                if let Err(e) = shared.reconnect_now(generation).await {
                    tracing::debug!(error = %e, "redis reconnect after a switch failed");
                }
            }
        }
    });
}
