//! A Redis connection that follows failover: one type for a single server, a primary
//! behind Redis Sentinel, or a Redis Cluster, that every sd Redis backend takes.
//!
//! [`FailoverConnection`] implements redis-rs's async `ConnectionLike + Clone`, so it
//! goes wherever a `MultiplexedConnection` or a `ConnectionManager` goes. Clones share
//! one connection and one view of who the master is.
//!
//! | mode | how the server is found | what makes it look again |
//! |---|---|---|
//! | [`server`](FailoverConnectionBuilder::server) | the URL | a broken connection |
//! | [`sentinel`](FailoverConnectionBuilder::sentinel) | `SENTINEL get-master-addr-by-name`, asked of each Sentinel in turn, then `ROLE` on the answer | a broken connection; `READONLY`, `LOADING` or `MASTERDOWN` replies; a Sentinel naming another master (asked every [`check_interval`](FailoverConnectionBuilder::check_interval)) |
//! | [`cluster`](FailoverConnectionBuilder::cluster) | redis-rs's cluster client (slot map from `CLUSTER SLOTS`) | `MOVED`/`ASK` (redis-rs follows them); broken connections, `CLUSTERDOWN`, `TRYAGAIN` while a replica takes over (retried here) |
//!
//! # What it promises across a failover
//!
//! - **It does not keep writing to a demoted master.** Once the Sentinels name a new
//!   master, the connection moves within one `check_interval` (500 ms by default),
//!   even while the old master still runs as a master (the Sentinels demote it seconds
//!   later, discarding what it took meanwhile). Its answers (`READONLY`) or its closed
//!   connection make the connection ask the Sentinels again too, and a node is used
//!   only after it answers `ROLE` with `master`, so a crashed master that restarts
//!   empty, still a master, gets no writes. redis-rs's own Sentinel client resolves the master when a
//!   connection is made, so a connection made before the failover keeps talking to the
//!   old address.
//! - **Calls wait for the new master, within a bound.** A call that meets a failover
//!   is sent again, with the [`RetryPolicy`] backoff, until it succeeds or
//!   [`failover_timeout`](FailoverConnectionBuilder::failover_timeout) (10 s by
//!   default) has passed since it began; then the last error is returned.
//! - **A retried command may run twice.** A reply lost with its connection (the master
//!   crashed after running the command) cannot be told from a command never run, so it
//!   is sent again. Replies that say the command did not run (`READONLY`, `LOADING`,
//!   `MASTERDOWN`, a refused connection) are exact. Redis replicates asynchronously: a
//!   write acknowledged by a master that then crashed may be missing on the new master.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sd_core::failover::FailoverConnection;
//!
//! let mut conn = FailoverConnection::builder()
//!     .sentinel(["redis://127.0.0.1:26379", "redis://127.0.0.1:26380"], "mymaster")
//!     .build()?
//!     .connect()
//!     .await?;
//! let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut conn).await?;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

mod cluster;
mod sentinel;

use crate::deadline::Deadline;
use crate::retry::RetryPolicy;

crate::error_enum! {
    /// What can go wrong building or connecting a [`FailoverConnection`].
    #[derive(Debug, thiserror::Error)]
    pub enum FailoverError {
        /// Redis (a server, a Sentinel or a cluster node) failed.
        #[error("redis failed: {source}; check that the servers run and the urls are right")]
        Backend {
            /// Always `"redis"`.
            backend: &'static str,
            /// The client's error.
            #[source]
            source: crate::BoxError,
        },
        /// Connecting took longer than `failover_timeout`.
        #[error("no connection within {after:?}; check that the servers run, or raise `failover_timeout`")]
        Timeout {
            /// The limit that passed.
            after: Duration,
        },
        /// No Sentinel named a master that answers as one.
        #[error(
            "none of the {sentinels} sentinels named a master for `{name}` that answers as \
             one; check the master name and that the sentinels and the master run"
        )]
        NoMaster {
            /// How many Sentinels were asked.
            sentinels: usize,
            /// The master name that was asked for.
            name: String,
        },
    }
}

crate::impl_core_errors!(FailoverError; Backend from redis);

/// Where the data lives, as the builder was told.
#[derive(Debug, Clone)]
enum Topology {
    Server(ConnectionInfo),
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        name: String,
        master: ConnectionInfo,
    },
    Cluster(Vec<ConnectionInfo>),
}

/// Builds a [`FailoverClient`]; name exactly one of `server`, `sentinel` or `cluster`.
#[derive(Debug, Clone)]
pub struct FailoverConnectionBuilder {
    server: Option<String>,
    sentinel: Option<(Vec<String>, String)>,
    master_url: Option<String>,
    cluster: Option<Vec<String>>,
    connect_timeout: Duration,
    response_timeout: Duration,
    failover_timeout: Duration,
    check_interval: Duration,
    retry: RetryPolicy,
}

impl Default for FailoverConnectionBuilder {
    fn default() -> Self {
        FailoverConnectionBuilder {
            server: None,
            sentinel: None,
            master_url: None,
            cluster: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            failover_timeout: Duration::from_secs(10),
            check_interval: Duration::from_millis(500),
            retry: RetryPolicy::builder()
                .initial_interval(Duration::from_millis(50))
                .max_interval(Duration::from_secs(1))
                .unlimited_attempts()
                .build()
                .unwrap_or_default(),
        }
    }
}

impl FailoverConnectionBuilder {
    /// One Redis server at `url` (`redis://[:password@]host:port[/db]`).
    pub fn server(mut self, url: impl Into<String>) -> Self {
        self.server = Some(url.into());
        self
    }

    /// A master found through the Sentinels at `sentinels` under `master_name`.
    pub fn sentinel<I, S>(mut self, sentinels: I, master_name: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sentinel = Some((
            sentinels.into_iter().map(Into::into).collect(),
            master_name.into(),
        ));
        self
    }

    /// With [`sentinel`](Self::sentinel): the credentials and database for the master,
    /// as a URL whose host and port are ignored (`redis://:secret@master/2`).
    pub fn master_url(mut self, url: impl Into<String>) -> Self {
        self.master_url = Some(url.into());
        self
    }

    /// A Redis Cluster, seeded with the nodes at `urls` (any of them will do).
    pub fn cluster<I, S>(mut self, urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cluster = Some(urls.into_iter().map(Into::into).collect());
        self
    }

    /// With [`sentinel`](Self::sentinel): how often a Sentinel is asked which node is
    /// master (500 ms by default). A forced failover leaves the old master a master,
    /// answering writes that the promotion will discard, until the Sentinels demote it
    /// several seconds later; this check moves the connection within one interval of
    /// the Sentinels' switch.
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// How long opening one connection may take (1 s by default).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one reply may take before the connection counts as broken (2 s by
    /// default): how a paused or partitioned master is noticed.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long one call keeps retrying through a failover before it returns the last
    /// error (10 s by default).
    pub fn failover_timeout(mut self, timeout: Duration) -> Self {
        self.failover_timeout = timeout;
        self
    }

    /// The backoff between retries (50 ms doubling to 1 s, 20 % jitter, attempts bounded
    /// by [`failover_timeout`](Self::failover_timeout), by default).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Checks the settings; connects nothing yet.
    pub fn build(self) -> Result<FailoverClient, FailoverError> {
        let named = [
            self.server.is_some(),
            self.sentinel.is_some(),
            self.cluster.is_some(),
        ];
        if named.iter().filter(|n| **n).count() != 1 {
            return Err(FailoverError::config(
                "server",
                "name exactly one of `server`, `sentinel` or `cluster`",
            ));
        }
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
            ("failover_timeout", self.failover_timeout),
            ("check_interval", self.check_interval),
        ] {
            if value.is_zero() {
                return Err(FailoverError::config(field, "must be above zero"));
            }
        }
        let topology = if let Some(url) = self.server {
            Topology::Server(parse("server", &url)?)
        } else if let Some((urls, name)) = self.sentinel {
            if urls.is_empty() {
                return Err(FailoverError::config(
                    "sentinel",
                    "give at least one sentinel url",
                ));
            }
            if name.is_empty() {
                return Err(FailoverError::config(
                    "sentinel",
                    "the master name is empty",
                ));
            }
            let sentinels = urls
                .iter()
                .map(|u| parse("sentinel", u))
                .collect::<Result<_, _>>()?;
            let master = parse(
                "master_url",
                self.master_url.as_deref().unwrap_or("redis://master"),
            )?;
            Topology::Sentinel {
                sentinels,
                name,
                master,
            }
        } else {
            let urls = self.cluster.unwrap_or_default();
            if urls.is_empty() {
                return Err(FailoverError::config(
                    "cluster",
                    "give at least one node url",
                ));
            }
            Topology::Cluster(
                urls.iter()
                    .map(|u| parse("cluster", u))
                    .collect::<Result<_, _>>()?,
            )
        };
        if self.master_url.is_some() && !matches!(topology, Topology::Sentinel { .. }) {
            return Err(FailoverError::config(
                "master_url",
                "only a sentinel setup takes a master url; put credentials in the server url",
            ));
        }
        Ok(FailoverClient {
            topology,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            failover_timeout: self.failover_timeout,
            check_interval: self.check_interval,
            retry: self.retry,
        })
    }
}

fn parse(field: &'static str, url: &str) -> Result<ConnectionInfo, FailoverError> {
    url.into_connection_info()
        .map_err(|e| FailoverError::config(field, format!("{url:?} is not a redis url: {e}")))
}

/// Checked settings, ready to [`connect`](Self::connect); cheap to clone.
#[derive(Debug, Clone)]
pub struct FailoverClient {
    topology: Topology,
    connect_timeout: Duration,
    response_timeout: Duration,
    failover_timeout: Duration,
    check_interval: Duration,
    retry: RetryPolicy,
}

impl FailoverClient {
    /// Connects: to the server, to the master the Sentinels name (checked with `ROLE`),
    /// or to the cluster. Fails at once if that cannot be done now.
    pub async fn connect(&self) -> Result<FailoverConnection, FailoverError> {
        let span = tracing::debug_span!("redis.connect");
        crate::deadline::timeout(self.failover_timeout, span, self.connect_now()).await?
    }

    async fn connect_now(&self) -> Result<FailoverConnection, FailoverError> {
        if let Topology::Cluster(nodes) = &self.topology {
            let cluster = cluster::Cluster::connect(self, nodes.clone()).await?;
            return Ok(FailoverConnection {
                inner: Inner::Cluster(Box::new(cluster)),
            });
        }
        let shared = Arc::new(Shared {
            client: self.clone(),
            current: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        });
        if let Err(e) = shared.reconnect_now(0).await {
            return Err(match &self.topology {
                Topology::Sentinel {
                    sentinels, name, ..
                } if matches!(
                    e.kind(),
                    ErrorKind::MasterNameNotFoundBySentinel
                        | ErrorKind::Server(ServerErrorKind::ReadOnly)
                ) =>
                {
                    FailoverError::NoMaster {
                        sentinels: sentinels.len(),
                        name: name.clone(),
                    }
                }
                _ => e.into(),
            });
        }
        sentinel::watch(&shared);
        Ok(FailoverConnection {
            inner: Inner::Direct(shared),
        })
    }
}

/// A Redis connection that follows failover; see the [module docs](self).
///
/// Made by [`FailoverConnection::builder`] → [`FailoverConnectionBuilder::build`] →
/// [`FailoverClient::connect`]. Clones share the connection.
#[derive(Clone)]
pub struct FailoverConnection {
    inner: Inner,
}

impl std::fmt::Debug for FailoverConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Cluster(_) => f.write_str("FailoverConnection(cluster)"),
            Inner::Direct(shared) => f
                .debug_struct("FailoverConnection")
                .field("master", &shared.address())
                .field("reconnects", &shared.reconnects.load(Ordering::Relaxed))
                .finish(),
        }
    }
}

#[derive(Clone)]
enum Inner {
    Direct(Arc<Shared>),
    Cluster(Box<cluster::Cluster>),
}

impl FailoverConnection {
    /// A builder; name one of `server`, `sentinel` or `cluster`.
    pub fn builder() -> FailoverConnectionBuilder {
        FailoverConnectionBuilder::default()
    }

    /// `host:port` of the server this connection sends to now; `None` for a cluster
    /// (each key goes to its slot's master) or while reconnecting.
    pub fn address(&self) -> Option<String> {
        match &self.inner {
            Inner::Direct(shared) => shared.address(),
            Inner::Cluster(_) => None,
        }
    }

    /// How many times this connection (and its clones) connected again after the first
    /// time; always 0 for a cluster, whose client reconnects on its own.
    pub fn reconnects(&self) -> u64 {
        match &self.inner {
            Inner::Direct(shared) => shared.reconnects.load(Ordering::Relaxed),
            Inner::Cluster(_) => 0,
        }
    }
}

/// What clones of a non-cluster connection share.
struct Shared {
    client: FailoverClient,
    /// The connection in use, its generation and its `host:port`.
    current: Mutex<Option<Current>>,
    /// Held while connecting, so a failover makes one new connection, not one per call.
    reconnect: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    reconnects: AtomicU64,
}

#[derive(Clone)]
struct Current {
    conn: MultiplexedConnection,
    generation: u64,
    address: String,
}

/// One call, as the trait hands it over.
#[derive(Clone, Copy)]
enum Request<'a> {
    One(&'a Cmd),
    Many(&'a Pipeline, usize, usize),
}

enum Reply {
    One(Value),
    Many(Vec<Value>),
}

impl Shared {
    fn address(&self) -> Option<String> {
        self.lock().as_ref().map(|c| c.address.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request`, reconnecting and retrying through a failover within the bound.
    async fn call(&self, request: Request<'_>) -> RedisResult<Reply> {
        let deadline = Deadline::after(self.client.failover_timeout);
        let mut attempt = 1;
        let mut reconnect_error = None;
        loop {
            let current = self.lock().clone();
            let result = match current {
                Some(mut current) => match request {
                    Request::One(cmd) => current
                        .conn
                        .req_packed_command(cmd)
                        .await
                        .map(Reply::One)
                        .map_err(|e| (e, Some(current.generation))),
                    Request::Many(pipeline, offset, count) => current
                        .conn
                        .req_packed_commands(pipeline, offset, count)
                        .await
                        .map(Reply::Many)
                        .map_err(|e| (e, Some(current.generation))),
                },
                None => Err((
                    reconnect_error.take().unwrap_or_else(|| {
                        RedisError::from((ErrorKind::Io, "not connected to the master"))
                    }),
                    None,
                )),
            };
            let (error, generation) = match result {
                Ok(reply) => return Ok(reply),
                Err(failed) => failed,
            };
            if !follows_failover(&error) {
                return Err(error);
            }
            if let Some(generation) = generation {
                self.forget(generation);
            }
            let wait = self.client.retry.random_delay(attempt);
            if !self.client.retry.allows_retry_after(attempt) || deadline.remaining() <= wait {
                return Err(error);
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
            // A failed reconnect is one more failed attempt; the loop decides.
            if let Err(e) = self.reconnect_now(generation.unwrap_or(0)).await {
                tracing::debug!(error = %e, attempt, "redis reconnect failed");
                reconnect_error = Some(e);
            }
        }
    }

    /// Drops the connection of `generation` if it is still the current one.
    fn forget(&self, generation: u64) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            *current = None;
        }
    }

    /// Connects again unless another call already replaced the connection of
    /// `generation`.
    async fn reconnect_now(&self, generation: u64) -> RedisResult<()> {
        let _one_at_a_time = self.reconnect.lock().await;
        if self
            .lock()
            .as_ref()
            .is_some_and(|c| c.generation > generation)
        {
            return Ok(());
        }
        let (conn, address) = self.open().await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if generation > 1 {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(master = %address, "redis connection moved to the master");
        }
        *self.lock() = Some(Current {
            conn,
            generation,
            address,
        });
        Ok(())
    }

    /// Opens a connection to the server, or to the master the Sentinels name.
    async fn open(&self) -> RedisResult<(MultiplexedConnection, String)> {
        match &self.client.topology {
            Topology::Server(info) => {
                let conn = self.open_to(info.clone()).await?;
                Ok((conn, info.addr().to_string()))
            }
            Topology::Sentinel {
                sentinels,
                name,
                master,
            } => {
                let mut last = None;
                for sentinel in sentinels {
                    match self.ask_sentinel(sentinel, name, master).await {
                        Ok(found) => return Ok(found),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| RedisError::from((ErrorKind::Io, "no sentinel to ask"))))
            }
            Topology::Cluster(_) => Err(RedisError::from((
                ErrorKind::Client,
                "a cluster connection does not reconnect here",
            ))),
        }
    }

    async fn open_to(&self, info: ConnectionInfo) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.client.connect_timeout))
            .set_response_timeout(Some(self.client.response_timeout));
        Client::open(info)?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

/// Whether `error` means the master moved, is gone or is not answering: connect again
/// (asking the Sentinels) and retry.
fn follows_failover(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Io
            | ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
            )
    ) || error.is_unrecoverable_error()
        || error.is_timeout()
        || error.is_connection_dropped()
}

impl FailoverConnection {
    async fn send(&mut self, request: Request<'_>) -> RedisResult<Reply> {
        match &mut self.inner {
            Inner::Cluster(cluster) => cluster.call(request).await,
            Inner::Direct(shared) => shared.call(request).await,
        }
    }
}

impl ConnectionLike for FailoverConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            Ok(match self.send(Request::One(cmd)).await? {
                Reply::One(value) => value,
                Reply::Many(mut values) => values.pop().unwrap_or(Value::Nil),
            })
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            Ok(
                match self.send(Request::Many(pipeline, offset, count)).await? {
                    Reply::Many(values) => values,
                    Reply::One(value) => vec![value],
                },
            )
        })
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Cluster(_) => 0,
            Inner::Direct(shared) => match &shared.client.topology {
                Topology::Server(info) => info.redis_settings().db(),
                Topology::Sentinel { master, .. } => master.redis_settings().db(),
                Topology::Cluster(_) => 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(builder: FailoverConnectionBuilder) -> &'static str {
        match builder.build().unwrap_err() {
            FailoverError::InvalidConfig { field, .. } => field,
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn build_refuses_what_cannot_work_naming_the_setter() {
        let b = FailoverConnection::builder;
        assert_eq!(refused(b()), "server");
        assert_eq!(
            refused(b().server("redis://a").cluster(["redis://b"])),
            "server"
        );
        assert_eq!(refused(b().server("http://a")), "server");
        assert_eq!(refused(b().sentinel(Vec::<String>::new(), "m")), "sentinel");
        assert_eq!(refused(b().sentinel(["redis://s"], "")), "sentinel");
        assert_eq!(refused(b().cluster(Vec::<String>::new())), "cluster");
        assert_eq!(
            refused(b().server("redis://a").master_url("redis://:pw@x")),
            "master_url"
        );
        assert_eq!(
            refused(b().server("redis://a").failover_timeout(Duration::ZERO)),
            "failover_timeout"
        );
        assert!(
            b().sentinel(["redis://s"], "m")
                .master_url("redis://:pw@x/2")
                .build()
                .is_ok()
        );
        assert!(b().cluster(["redis://a", "redis://b"]).build().is_ok());
    }

    #[test]
    fn failover_replies_are_retried_and_script_errors_are_not() {
        let readonly = RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "x"));
        assert!(follows_failover(&readonly));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(follows_failover(&io));
        let script = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "x"));
        assert!(!follows_failover(&script));
    }
}
