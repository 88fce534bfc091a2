//! A Redis Cluster with one replica per master, and the controls of its failovers.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::redis::{RedisCluster, RedisServer, expect_ok};
use crate::resp::Reply;
use crate::sentinel::{info_field, replica_in_sync as in_sync, role};

/// How long a cluster failover may take before the testkit gives up: the replica needs
/// `cluster-node-timeout` (2 s here) to see its master fail, then an election.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(45);

impl RedisCluster {
    /// Starts six cluster-mode servers: three masters holding the 16384 slots (nodes 0,
    /// 1 and 2) and one replica of each (node `3 + i` replicates node `i`), and waits
    /// until every node reports `cluster_state:ok` and every replica is in sync.
    ///
    /// Failovers change who is master; ask [`Self::masters`] and [`Self::replica_of`]
    /// instead of trusting the start-up layout after one.
    pub fn start_with_replicas() -> Result<Self> {
        let cluster = Self::form(6)?;
        let ids = (0..3)
            .map(|i| cluster.node_id(i))
            .collect::<Result<Vec<_>>>()?;
        for (i, id) in ids.iter().enumerate() {
            // The replica must have heard of its master through the cluster bus first.
            let replica = &cluster.nodes[3 + i];
            cluster.wait_for("a replica to learn its master", || {
                matches!(replica.command(&["CLUSTER", "REPLICATE", id]), Ok(Reply::Status(s)) if s == "OK")
            })?;
        }
        cluster.wait_ok(FAILOVER_TIMEOUT)?;
        for i in 0..3 {
            let master = cluster.nodes[i].port();
            let replica = cluster.nodes[3 + i].port();
            cluster.wait_for("a replica to sync", || in_sync(replica, master))?;
        }
        Ok(cluster)
    }

    /// The cluster node id (`CLUSTER MYID`) of node `index`.
    pub fn node_id(&self, index: usize) -> Result<String> {
        let node = self.node(index)?;
        node.command(&["CLUSTER", "MYID"])?
            .as_text()
            .ok_or_else(|| Error::Protocol {
                server: "redis",
                detail: "CLUSTER MYID gave no text".into(),
            })
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a running master).
    pub fn key_slot(&self, key: &str) -> Result<u16> {
        let node = self.masters().first().copied().ok_or(Error::State {
            action: "find a key's slot",
            reason: "no node of the cluster runs as a master",
        })?;
        match self.nodes[node].command(&["CLUSTER", "KEYSLOT", key])? {
            Reply::Integer(slot) => u16::try_from(slot).map_err(|_| Error::Protocol {
                server: "redis",
                detail: format!("CLUSTER KEYSLOT gave {slot}"),
            }),
            other => Err(Error::Protocol {
                server: "redis",
                detail: format!("CLUSTER KEYSLOT gave {other:?}"),
            }),
        }
    }

    /// The index of the node that holds `key`'s slot now, as `CLUSTER SLOTS` says.
    pub fn master_of(&self, key: &str) -> Result<usize> {
        let slot = i64::from(self.key_slot(key)?);
        let node = self.masters().first().copied().unwrap_or(0);
        // CLUSTER SLOTS: [[start, end, [host, port, id], replicas...], ...]
        let Reply::Array(Some(ranges)) = self.nodes[node].command(&["CLUSTER", "SLOTS"])? else {
            return Err(Error::Protocol {
                server: "redis",
                detail: "CLUSTER SLOTS gave no array".into(),
            });
        };
        for range in ranges {
            let Reply::Array(Some(parts)) = range else {
                continue;
            };
            if let (
                Some(Reply::Integer(start)),
                Some(Reply::Integer(end)),
                Some(Reply::Array(Some(master))),
            ) = (parts.first(), parts.get(1), parts.get(2))
                && (*start..=*end).contains(&slot)
                && let Some(Reply::Integer(port)) = master.get(1)
                && let Some(index) = u16::try_from(*port).ok().and_then(|p| self.node_index(p))
            {
                return Ok(index);
            }
        }
        Err(Error::Protocol {
            server: "redis",
            detail: format!("no node of this cluster holds slot {slot}"),
        })
    }

    /// Indices of the running nodes that say `ROLE` master.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.is_running(i) && role(self.nodes[i].port()).as_deref() == Some("master")
            })
            .collect()
    }

    /// The index of the running node that replicates node `master` with its link up.
    pub fn replica_of(&self, master: usize) -> Option<usize> {
        let port = self.nodes.get(master)?.port();
        (0..self.nodes.len()).find(|&i| self.is_running(i) && in_sync(self.nodes[i].port(), port))
    }

    /// The index of the node on `port`.
    pub fn node_index(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// Sends `CLUSTER FAILOVER` to the replica `replica` (a manual failover: the master
    /// stops writes, the replica catches up and takes over, no write is lost) and waits
    /// until it is master, its old master is its replica in sync, and every running node
    /// reports `cluster_state:ok`.
    pub fn failover(&self, replica: usize) -> Result<()> {
        let node = self.node(replica)?;
        let master_port = info_field(node.port(), "replication", "master_port")
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or(Error::State {
                action: "fail over",
                reason: "the node is not a replica; pick one with replica_of",
            })?;
        expect_ok(node.command(&["CLUSTER", "FAILOVER"])?)?;
        self.wait_for("a cluster failover", || {
            role(node.port()).as_deref() == Some("master") && in_sync(master_port, node.port())
        })?;
        self.wait_running_ok(FAILOVER_TIMEOUT)
    }

    /// Kills master `master` (SIGKILL) and waits until its replica was elected in its
    /// place and every running node reports `cluster_state:ok`. Returns the index of the
    /// new master. The killed node stays down; `start_again` it through
    /// [`Self::nodes_mut`] and it rejoins as a replica ([`Self::wait_replica_of`]).
    pub fn kill_master(&mut self, master: usize) -> Result<usize> {
        let replica = self.replica_of(master).ok_or(Error::State {
            action: "kill a master",
            reason: "the node has no replica in sync; pick one from masters()",
        })?;
        self.nodes[master].kill()?;
        let port = self.nodes[replica].port();
        self.wait_for("a replica to take over from a killed master", || {
            role(port).as_deref() == Some("master")
        })?;
        self.wait_running_ok(FAILOVER_TIMEOUT)?;
        Ok(replica)
    }

    /// Waits until node `node` is a replica of node `master` in sync (after a killed
    /// master was started again).
    pub fn wait_replica_of(&self, node: usize, master: usize) -> Result<()> {
        let (node, master) = (self.node(node)?.port(), self.node(master)?.port());
        self.wait_for("a node to rejoin as a replica", || in_sync(node, master))
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_running_ok(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let ok = (0..self.nodes.len())
                .filter(|&i| self.is_running(i))
                .all(|i| {
                    self.nodes[i]
                        .command(&["CLUSTER", "INFO"])
                        .ok()
                        .and_then(|r| r.as_text())
                        .is_some_and(|info| info.contains("cluster_state:ok"))
                });
            if ok {
                return Ok(());
            }
            self.check_time(started, timeout, "redis cluster")?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_running(&self, index: usize) -> bool {
        self.nodes[index].process().is_running() && !self.nodes[index].process().is_paused()
    }

    fn node(&self, index: usize) -> Result<&RedisServer> {
        self.nodes.get(index).ok_or(Error::State {
            action: "address a cluster node",
            reason: "no node has that index",
        })
    }

    fn wait_for(&self, what: &'static str, mut done: impl FnMut() -> bool) -> Result<()> {
        let started = Instant::now();
        while !done() {
            self.check_time(started, FAILOVER_TIMEOUT, what)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn check_time(&self, started: Instant, timeout: Duration, what: &'static str) -> Result<()> {
        if started.elapsed() <= timeout {
            return Ok(());
        }
        let log = self
            .nodes
            .iter()
            .map(|n| format!("-- node {}:\n{}", n.port(), n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n");
        Err(Error::NotReady {
            server: what,
            port: self.nodes[0].port(),
            waited_ms: started.elapsed().as_millis(),
            log,
        })
    }
}
