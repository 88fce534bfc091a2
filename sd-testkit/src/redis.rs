//! Redis: one server, N independent servers (for Redlock), and a three-master cluster.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process::{self, Process, Spec};
use crate::resp::{self, Reply};

/// Options for a Redis server.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Keep data on disk (append-only file, fsync on every write), so
    /// [`Process::restart`] brings the data back. Off by default: a restart then empties
    /// the server, as a cache node that lost its memory.
    pub persistent: bool,
    /// Start the server in cluster mode (used by [`RedisCluster`]).
    cluster: bool,
}

impl RedisOptions {
    /// Options with persistence on.
    pub fn persistent() -> Self {
        RedisOptions {
            persistent: true,
            ..Self::default()
        }
    }
}

/// A `redis-server` owned by the test, on a free loopback port.
#[derive(Debug)]
pub struct RedisServer {
    process: Process,
}

impl RedisServer {
    /// Starts a Redis server with default options (no persistence).
    pub fn start() -> Result<Self> {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a Redis server with `options`.
    pub fn start_with(options: RedisOptions) -> Result<Self> {
        crate::retry_on_port_clash(|| Self::spawn(&options))
    }

    /// Starts `n` independent servers (the N masters of Redlock).
    pub fn start_many(n: usize) -> Result<Vec<Self>> {
        (0..n).map(|_| Self::start()).collect()
    }

    fn spawn(options: &RedisOptions) -> Result<Self> {
        let program = process::find_binary("redis-server", "redis-server", &[])?;
        let port = crate::ports::free_port()?;
        let dir = process::server_dir("redis")?;
        let data = dir.join("data");
        process::empty_dir(&data)?;
        let mut args: Vec<OsString> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--save",
            "",
            "--logfile",
            "",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push("--dir".into());
        args.push(data.clone().into());
        let flag = |on: bool| if on { "yes" } else { "no" };
        args.extend(["--appendonly".into(), flag(options.persistent).into()]);
        if options.persistent {
            args.extend(["--appendfsync".into(), "always".into()]);
        }
        if options.cluster {
            let bus = crate::ports::free_port()?;
            for arg in [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus.to_string(),
            ] {
                args.push(arg.into());
            }
        }
        let ready = Arc::new(|port| Ok(ping(port)));
        let process = Process::start(Spec {
            refuse_clean_restart: options.cluster.then_some(
                "a cluster node that loses its nodes.conf comes back as a new node without \
                 slots that does not know its cluster; use kill or stop, then start_again \
                 (or restart), which keep nodes.conf, or start a new RedisCluster",
            ),
            ..Spec::new("redis", program, args, port, dir, data, ready)
        })?;
        Ok(RedisServer { process })
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.process.port())
    }

    /// Sends one command with the testkit's small RESP client.
    pub fn command(&self, args: &[&str]) -> Result<Reply> {
        resp::command(self.port(), args)
    }
}

crate::fault_controls!(RedisServer);

/// Whether a Redis server answers `PING` on `port`.
fn ping(port: u16) -> bool {
    matches!(resp::command(port, &["PING"]), Ok(Reply::Status(s)) if s == "PONG")
}

/// A Redis Cluster of three masters, no replicas, with all 16384 slots assigned.
///
/// Fault controls work on single nodes through [`RedisCluster::nodes_mut`]. A node keeps
/// its cluster configuration (`nodes.conf`, in its data directory) across `stop`/`kill`
/// and `start_again` or `restart`, so it rejoins with its slots; its keys are gone, as
/// persistence is off. `restart_clean` on a node is refused with [`Error::State`]: a node
/// without its `nodes.conf` is a stranger to the cluster and its slots stay unserved.
#[derive(Debug)]
pub struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-mode servers, assigns the slots, joins them and waits until
    /// every node reports `cluster_state:ok`.
    pub fn start() -> Result<Self> {
        let cluster = Self::form(3)?;
        cluster.wait_ok(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Starts `n` cluster-mode servers, gives the 16384 slots to the first three and
    /// introduces every node to the first; the caller waits for the cluster to settle.
    pub(crate) fn form(n: usize) -> Result<Self> {
        let options = RedisOptions {
            persistent: false,
            cluster: true,
        };
        let nodes = (0..n)
            .map(|_| crate::retry_on_port_clash(|| RedisServer::spawn(&options)))
            .collect::<Result<Vec<_>>>()?;
        let ranges = [("0", "5460"), ("5461", "10922"), ("10923", "16383")];
        for (node, (from, to)) in nodes.iter().zip(ranges) {
            expect_ok(node.command(&["CLUSTER", "ADDSLOTSRANGE", from, to])?)?;
        }
        for node in &nodes[1..] {
            let bus = cluster_bus_port(node)?;
            expect_ok(nodes[0].command(&[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &node.port().to_string(),
                &bus.to_string(),
            ])?)?;
        }
        Ok(RedisCluster { nodes })
    }

    /// Waits until every node answers, reports `cluster_state:ok` and knows every other
    /// node. A node that is stopped, killed or paused cannot answer, so this times
    /// out ([`Error::NotReady`]) until it runs again.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let ok = self.nodes.iter().all(|n| {
                n.command(&["CLUSTER", "INFO"])
                    .ok()
                    .and_then(|r| r.as_text())
                    .is_some_and(|info| {
                        info.contains("cluster_state:ok")
                            && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
                    })
            });
            if ok {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(Error::NotReady {
                    server: "redis cluster",
                    port: self.nodes[0].port(),
                    waited_ms: started.elapsed().as_millis(),
                    log: self.nodes[0].log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:PORT` of every node (the seed list for a cluster client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, for fault injection on one of them.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes, mutable, for fault injection on one of them.
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}

fn cluster_bus_port(node: &RedisServer) -> Result<u16> {
    let reply = node.command(&["CONFIG", "GET", "cluster-port"])?;
    let bad = |detail: String| Error::Protocol {
        server: "redis",
        detail,
    };
    match reply {
        Reply::Array(Some(items)) if items.len() == 2 => items[1]
            .as_text()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| bad(format!("cluster-port is {:?}", items[1]))),
        other => Err(bad(format!("CONFIG GET cluster-port gave {other:?}"))),
    }
}

pub(crate) fn expect_ok(reply: Reply) -> Result<()> {
    match reply {
        Reply::Status(s) if s == "OK" => Ok(()),
        other => Err(Error::Protocol {
            server: "redis",
            detail: format!("expected OK, got {other:?}"),
        }),
    }
}

/// A redis-rs `ConnectionManager` to `url` that gives up on connecting after `connect`
/// and on each reply after `response` (a hang guard, and how a paused or killed server
/// turns into a typed error), and retries a lost connection once.
///
/// # Panics
/// If `url` is not a Redis URL or no server answers there: the test cannot run.
pub async fn redis_manager(
    url: &str,
    connect: Duration,
    response: Duration,
) -> ::redis::aio::ConnectionManager {
    let config = ::redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect))
        .set_response_timeout(Some(response))
        .set_number_of_retries(1);
    ::redis::Client::open(url)
        .unwrap_or_else(|e| panic!("{url} is not a redis url: {e}"))
        .get_connection_manager_with_config(config)
        .await
        .unwrap_or_else(|e| panic!("no redis answers at {url}: {e}"))
}
