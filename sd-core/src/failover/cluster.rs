//! The cluster mode: redis-rs's cluster connection, retried through a failover and
//! replaced when it keeps failing.

use std::sync::{Arc, Mutex};

use redis::aio::ConnectionLike;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionInfo, RedisResult};

use super::{FailoverClient, Reply, Request, follows_failover};
use crate::deadline::Deadline;

/// A cluster connection shared by clones, and how to make a new one.
#[derive(Clone)]
pub(super) struct Cluster {
    client: ClusterClient,
    settings: FailoverClient,
    /// The connection in use and its generation.
    current: Arc<Mutex<(ClusterConnection, u64)>>,
    /// Held while a new connection is made, so one failover makes one.
    replacing: Arc<tokio::sync::Mutex<()>>,
}

impl Cluster {
    pub(super) async fn connect(
        settings: &FailoverClient,
        nodes: Vec<ConnectionInfo>,
    ) -> RedisResult<Cluster> {
        // redis-rs retries once itself; the loop in `call` does the rest, with backoff
        // and a bound, and replaces a connection whose slot map stays stale.
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(settings.connect_timeout)
            .response_timeout(settings.response_timeout)
            .retries(1)
            .build()?;
        let conn = client.get_async_connection().await?;
        Ok(Cluster {
            client,
            settings: settings.clone(),
            current: Arc::new(Mutex::new((conn, 0))),
            replacing: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Sends `request`; redis-rs follows `MOVED`/`ASK`. A call that fails while a
    /// replica takes over (a dead node's connection, a timeout, `CLUSTERDOWN`,
    /// `TRYAGAIN`) is retried within `failover_timeout`; from the second failure on,
    /// the connection is replaced by one that reads the slot map afresh.
    pub(super) async fn call(&self, request: Request<'_>) -> RedisResult<Reply> {
        let deadline = Deadline::after(self.settings.failover_timeout);
        let retry = self.settings.retry;
        let mut attempt = 1;
        loop {
            let (mut conn, generation) = self.lock().clone();
            let result = match request {
                Request::One(cmd) => conn.req_packed_command(cmd).await.map(Reply::One),
                Request::Many(pipeline, offset, count) => conn
                    .req_packed_commands(pipeline, offset, count)
                    .await
                    .map(Reply::Many),
            };
            match result {
                Err(e) if follows_failover(&e) || e.is_cluster_error() => {
                    let wait = retry.random_delay(attempt);
                    if !retry.allows_retry_after(attempt) || deadline.remaining() <= wait {
                        return Err(e);
                    }
                    tokio::time::sleep(wait).await;
                    if attempt >= 2 {
                        self.replace(generation).await;
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Makes a new connection unless another call already replaced `generation`.
    async fn replace(&self, generation: u64) {
        let _one_at_a_time = self.replacing.lock().await;
        if self.lock().1 != generation {
            return;
        }
        match self.client.get_async_connection().await {
            Ok(conn) => {
                tracing::info!("redis cluster connection replaced after a failover");
                *self.lock() = (conn, generation + 1);
            }
            Err(e) => tracing::debug!(error = %e, "redis cluster reconnect failed"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (ClusterConnection, u64)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}
