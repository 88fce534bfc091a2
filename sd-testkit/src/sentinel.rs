//! Redis Sentinel: a primary, one replica and three Sentinels watching them, with
//! controls that force a failover or crash the master and wait for its successor.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result, io_err};
use crate::process::{self, Process, Spec};
use crate::redis::RedisServer;
use crate::resp::{self, Reply};

/// How long a promotion may take before the testkit gives up: Sentinel needs
/// `down-after-milliseconds` (1 s here) to see a crash, then an election and a
/// promotion; a loaded machine stretches each step.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a forced failover may take before it is asked for again: more than twice
/// `failover-timeout`, after which the Sentinels have given it up.
const FORCED_FAILOVER_RETRY: Duration = Duration::from_secs(10);

/// The name the Sentinels monitor the master under.
const MASTER_NAME: &str = "sdmaster";

/// One `redis-server --sentinel` process, on a free loopback port.
#[derive(Debug)]
pub struct SentinelServer {
    process: Process,
}

impl SentinelServer {
    fn spawn(name: &str, master_port: u16) -> Result<Self> {
        let program = process::find_binary("redis-server", "redis-server", &[])?;
        let port = crate::ports::free_port()?;
        let dir = process::server_dir("sentinel")?;
        let data = dir.join("data");
        process::empty_dir(&data)?;
        // Sentinel rewrites its configuration file (what it learnt of replicas, peers and
        // the current master), so the file lives in the data directory and is kept
        // across restarts.
        let conf = data.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\nlogfile \"\"\n\
             dir {dir}\n\
             sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 4000\n\
             sentinel parallel-syncs {name} 1\n",
            dir = data.display(),
        );
        std::fs::write(&conf, text).map_err(io_err(format!("writing {}", conf.display())))?;
        let args: Vec<OsString> = vec![conf.into(), "--sentinel".into()];
        let ready = Arc::new(|port| Ok(ping(port)));
        let process = Process::start(Spec {
            refuse_clean_restart: Some(
                "a sentinel keeps what it watches in its configuration file; kill or stop \
                 it, then start_again, or start a new RedisSentinelGroup",
            ),
            // Keep the configuration file: it is the sentinel's only state.
            reset: Arc::new(|_| Ok(())),
            ..Spec::new("redis-sentinel", program, args, port, dir, data, ready)
        })?;
        Ok(SentinelServer { process })
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

crate::fault_controls!(SentinelServer);

/// A Redis primary with one replica, watched by three Sentinels (quorum 2) under the
/// master name [`RedisSentinelGroup::master_name`].
///
/// The Sentinels see a crash after 1 s (`down-after-milliseconds 1000`) and give up a
/// stuck failover after 4 s (`failover-timeout 4000`). Persistence is off: a master
/// that is killed and started again comes back empty, and the Sentinels turn it into a
/// replica of the new master.
///
/// ```no_run
/// let mut group = sd_testkit::RedisSentinelGroup::start()?;
/// let before = group.master_port()?;
/// let after = group.failover()?; // SENTINEL FAILOVER, waits for the promotion
/// assert_ne!(before, after);
/// let again = group.kill_master()?; // a crash; waits until the replica took over
/// assert_eq!(again, before);
/// # Ok::<(), sd_testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct RedisSentinelGroup {
    name: String,
    nodes: Vec<RedisServer>,
    sentinels: Vec<SentinelServer>,
}

impl RedisSentinelGroup {
    /// Starts the primary and its replica, waits until the replica is in sync, starts
    /// three Sentinels and waits until each knows the replica and the two other
    /// Sentinels (so a failover can be forced at once).
    pub fn start() -> Result<Self> {
        let name = MASTER_NAME.to_owned();
        let primary = RedisServer::start()?;
        let replica = RedisServer::start()?;
        replica_of(&replica, primary.port())?;
        let sentinels = (0..3)
            .map(|_| crate::retry_on_port_clash(|| SentinelServer::spawn(&name, primary.port())))
            .collect::<Result<Vec<_>>>()?;
        let group = RedisSentinelGroup {
            name,
            nodes: vec![primary, replica],
            sentinels,
        };
        group.wait_settled(primary_port(&group), FAILOVER_TIMEOUT)?;
        Ok(group)
    }

    /// The name the Sentinels know the master by (`SENTINEL get-master-addr-by-name`).
    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// `redis://127.0.0.1:PORT` of each Sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(SentinelServer::url).collect()
    }

    /// The Sentinels, for their ports and logs.
    pub fn sentinels(&self) -> &[SentinelServer] {
        &self.sentinels
    }

    /// The data nodes (the first started as the primary, the second as its replica).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The data nodes, mutable, for fault injection on one of them.
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// The port of the master as the first Sentinel that answers reports it.
    pub fn master_port(&self) -> Result<u16> {
        self.sentinels
            .iter()
            .find_map(|s| sentinel_master(s.port()))
            .ok_or_else(|| Error::Protocol {
                server: "redis-sentinel",
                detail: "no sentinel named a master".into(),
            })
    }

    /// The index in [`Self::nodes`] of the node on `port`.
    pub fn node_index(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// Forces a failover (`SENTINEL FAILOVER`, no agreement needed), waits until every
    /// Sentinel names the replica as master, the replica says `ROLE` master and the old
    /// master says it is a replica in sync, and returns the new master's port.
    pub fn failover(&self) -> Result<u16> {
        let new = self.start_failover()?;
        self.wait_settled(new, FAILOVER_TIMEOUT)?;
        Ok(new)
    }

    /// Forces a failover and returns as soon as every Sentinel names the new master
    /// (its port). The old master is still a master then, taking writes its demotion
    /// (seconds later) discards; [`Self::wait_settled`] waits for that demotion.
    ///
    /// A forced failover the Sentinels abort (the promotion took longer than
    /// `failover-timeout`, as on a loaded machine) is asked for again.
    pub fn start_failover(&self) -> Result<u16> {
        let old = self.master_port()?;
        let started = Instant::now();
        loop {
            let reply = self.sentinels[0].command(&["SENTINEL", "FAILOVER", &self.name])?;
            if let Reply::Error(e) = reply
                && !e.starts_with("INPROG")
            {
                return Err(Error::Protocol {
                    server: "redis-sentinel",
                    detail: format!("SENTINEL FAILOVER refused: {e}"),
                });
            }
            match self.wait_new_master(old, FORCED_FAILOVER_RETRY) {
                Err(Error::NotReady { .. }) if started.elapsed() < FAILOVER_TIMEOUT => continue,
                done => return done,
            }
        }
    }

    /// Kills the current master (SIGKILL), waits until the Sentinels promoted the
    /// replica, starts the old master again (empty) and waits until the group settles
    /// with one master and the other node its replica in sync. Returns the master's port
    /// then: the new one, or the restarted node when the Sentinels failed over a second
    /// time (on a loaded machine the just-promoted master can miss their pings for
    /// `down-after-milliseconds` while it syncs the restarted node; that node has synced
    /// from it by then, so the second promotion keeps what was replicated).
    pub fn kill_master(&mut self) -> Result<u16> {
        let new = self.kill_master_only()?;
        let old = self
            .nodes
            .iter_mut()
            .find(|n| n.port() != new)
            .ok_or(Error::State {
                action: "restart the old master",
                reason: "the group has no second node",
            })?;
        old.start_again()?;
        self.wait_settled_on_any(FAILOVER_TIMEOUT)
    }

    /// Kills the current master (SIGKILL) and waits until the Sentinels promoted the
    /// replica; the old master stays down (start it with [`Self::nodes_mut`]).
    /// Returns the new master's port.
    pub fn kill_master_only(&mut self) -> Result<u16> {
        let old = self.master_port()?;
        let index = self.node_index(old).ok_or(Error::State {
            action: "kill the master",
            reason: "the sentinels name a master that is not in this group",
        })?;
        self.nodes[index].kill()?;
        self.wait_new_master(old, FAILOVER_TIMEOUT)
    }

    /// Waits until every running Sentinel names a master other than `old` and that node
    /// answers `ROLE` as master; returns its port.
    pub fn wait_new_master(&self, old: u16, timeout: Duration) -> Result<u16> {
        let started = Instant::now();
        loop {
            let named: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .filter(|s| s.process().is_running())
                .map(|s| sentinel_master(s.port()))
                .collect();
            if let Some(Some(new)) = named.first()
                && *new != old
                && named.iter().all(|n| *n == Some(*new))
                && role(*new).as_deref() == Some("master")
            {
                return Ok(*new);
            }
            self.check_time(started, timeout, "redis sentinel failover")?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the node on `master` is master, every other running node is its
    /// replica with the link up, and every running Sentinel names `master`, knows the
    /// replicas and the two other Sentinels.
    pub fn wait_settled(&self, master: u16, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        while !self.settled(master) {
            self.check_time(started, timeout, "redis sentinel group")?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Like [`Self::wait_settled`] on whichever node the Sentinels name; returns its port.
    /// On a loaded machine the Sentinels may fail over again while the group settles
    /// (a just-promoted master that misses their pings for `down-after-milliseconds`):
    /// compare the port returned with the one expected to see it.
    pub fn wait_settled_on_any(&self, timeout: Duration) -> Result<u16> {
        let started = Instant::now();
        loop {
            let named = self
                .sentinels
                .iter()
                .find(|s| s.process().is_running())
                .and_then(|s| sentinel_master(s.port()));
            if let Some(master) = named
                && self.settled(master)
            {
                return Ok(master);
            }
            self.check_time(started, timeout, "redis sentinel group")?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node on `master` is master, every other running node its replica with the
    /// link up, and every running Sentinel names `master` and knows the others.
    fn settled(&self, master: u16) -> bool {
        let replicas = self.nodes.len() - 1;
        role(master).as_deref() == Some("master")
            && self
                .nodes
                .iter()
                .filter(|n| n.port() != master && n.process().is_running())
                .all(|n| replica_in_sync(n.port(), master))
            && self
                .sentinels
                .iter()
                .filter(|s| s.process().is_running())
                .all(|s| sentinel_settled(s.port(), &self.name, master, replicas))
    }

    fn check_time(&self, started: Instant, timeout: Duration, what: &'static str) -> Result<()> {
        if started.elapsed() <= timeout {
            return Ok(());
        }
        let log = self
            .sentinels
            .iter()
            .map(|s| format!("-- sentinel {}:\n{}", s.port(), s.log_tail()))
            .collect::<Vec<_>>()
            .join("\n");
        Err(Error::NotReady {
            server: what,
            port: self.sentinels[0].port(),
            waited_ms: started.elapsed().as_millis(),
            log,
        })
    }
}

fn primary_port(group: &RedisSentinelGroup) -> u16 {
    group.nodes[0].port()
}

/// Makes `replica` a replica of the server on `master` and waits for its link.
fn replica_of(replica: &RedisServer, master: u16) -> Result<()> {
    crate::redis::expect_ok(replica.command(&["REPLICAOF", "127.0.0.1", &master.to_string()])?)?;
    let started = Instant::now();
    while !replica_in_sync(replica.port(), master) {
        if started.elapsed() > process::READY_TIMEOUT {
            return Err(Error::NotReady {
                server: "redis replica",
                port: replica.port(),
                waited_ms: started.elapsed().as_millis(),
                log: replica.log_tail(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether a Redis server answers `PING` on `port`.
fn ping(port: u16) -> bool {
    matches!(resp::command(port, &["PING"]), Ok(Reply::Status(s)) if s == "PONG")
}

/// The first element of `ROLE` on `port`: `master`, `slave` or `sentinel`.
pub(crate) fn role(port: u16) -> Option<String> {
    match resp::command(port, &["ROLE"]).ok()? {
        Reply::Array(Some(items)) => items.first()?.as_text(),
        _ => None,
    }
}

/// One `field:value` line of `INFO section` on `port`.
pub(crate) fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let info = resp::command(port, &["INFO", section]).ok()?.as_text()?;
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// Whether the server on `port` is a replica of `master` with its link up.
pub(crate) fn replica_in_sync(port: u16, master: u16) -> bool {
    info_field(port, "replication", "role").as_deref() == Some("slave")
        && info_field(port, "replication", "master_port") == Some(master.to_string())
        && info_field(port, "replication", "master_link_status").as_deref() == Some("up")
}

/// The master port a Sentinel names for [`MASTER_NAME`].
fn sentinel_master(sentinel: u16) -> Option<u16> {
    let reply = resp::command(
        sentinel,
        &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
    )
    .ok()?;
    match reply {
        Reply::Array(Some(items)) if items.len() == 2 => items[1].as_text()?.parse().ok(),
        _ => None,
    }
}

/// Whether a Sentinel names `master`, sees `replicas` healthy replicas and two peers.
fn sentinel_settled(sentinel: u16, name: &str, master: u16, replicas: usize) -> bool {
    if sentinel_master(sentinel) != Some(master) {
        return false;
    }
    let healthy = |reply: Option<Reply>| -> usize {
        match reply {
            Some(Reply::Array(Some(entries))) => entries
                .iter()
                .filter(|e| {
                    let fields = match e {
                        Reply::Array(Some(f)) => f,
                        _ => return false,
                    };
                    let flags = fields
                        .chunks(2)
                        .find(|kv| kv[0].as_text().as_deref() == Some("flags"))
                        .and_then(|kv| kv.get(1)?.as_text())
                        .unwrap_or_default();
                    !flags.contains("down") && !flags.contains("disconnected")
                })
                .count(),
            _ => 0,
        }
    };
    let known_replicas = healthy(resp::command(sentinel, &["SENTINEL", "REPLICAS", name]).ok());
    let peers = healthy(resp::command(sentinel, &["SENTINEL", "SENTINELS", name]).ok());
    known_replicas >= replicas && peers >= 2
}
