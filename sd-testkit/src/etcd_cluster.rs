//! A three-member etcd cluster, with controls on one member or on the leader.

use std::ffi::OsString;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::http;
use crate::process::{self, Process, Spec};

/// How long an election may take before the testkit gives up (etcd's election timeout
/// is 1 s; a loaded machine stretches it).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(45);

/// One member of an [`EtcdCluster`].
#[derive(Debug)]
pub struct EtcdMember {
    process: Process,
}

impl EtcdMember {
    /// `http://127.0.0.1:PORT`, the member's client endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port())
    }
}

crate::fault_controls!(EtcdMember);

/// A three-member etcd cluster (`m0`, `m1`, `m2`) on loopback ports, each member in its
/// own directory. Two members make a quorum: kill or pause one (the leader, say) and
/// the other two elect a leader and keep serving.
///
/// ```no_run
/// let mut etcd = sd_testkit::EtcdCluster::start()?;
/// let old = etcd.kill_leader()?; // waits until the two others elected a leader
/// assert_ne!(etcd.leader()?, old);
/// etcd.members_mut()[old].start_again()?; // rejoins with its data
/// etcd.wait_healthy()?;
/// # Ok::<(), sd_testkit::Error>(())
/// ```
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    ids: Vec<String>,
}

impl EtcdCluster {
    /// Starts three members, waits until each reports healthy, and learns their ids.
    pub fn start() -> Result<Self> {
        let program = process::find_binary("etcd", "etcd-server", &[])?;
        let token = format!("sd-{:x}", crate::nonce());
        // Every port is chosen before the first member starts: each must name all peers.
        let ports = (0..3)
            .map(|_| Ok((crate::ports::free_port()?, crate::ports::free_port()?)))
            .collect::<Result<Vec<(u16, u16)>>>()?;
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, peer))| spawn(&program, i, client, peer, &initial, &token))
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = EtcdCluster {
            members,
            ids: Vec::new(),
        };
        cluster.wait_healthy()?;
        cluster.ids = (0..3)
            .map(|i| {
                status(cluster.members[i].port())
                    .map(|(id, _)| id)
                    .ok_or_else(|| Error::Protocol {
                        server: "etcd",
                        detail: "a healthy member gave no status".into(),
                    })
            })
            .collect::<Result<_>>()?;
        Ok(cluster)
    }

    /// The client endpoint of every member, the list a client connects with.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::url).collect()
    }

    /// The members, for their ports and state.
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// The members, mutable, to kill, pause or restart one of them.
    pub fn members_mut(&mut self) -> &mut [EtcdMember] {
        &mut self.members
    }

    /// The index of the current leader, as a majority of the answering members name it.
    pub fn leader(&self) -> Result<usize> {
        self.wait_leader(ELECTION_TIMEOUT)
    }

    /// Kills the leader (SIGKILL) and waits until the other two elected a new one;
    /// returns the index of the killed member.
    pub fn kill_leader(&mut self) -> Result<usize> {
        let old = self.leader()?;
        self.members[old].kill()?;
        self.wait_leader(ELECTION_TIMEOUT)?;
        Ok(old)
    }

    /// Pauses the leader (SIGSTOP) and waits until the other two elected a new one;
    /// returns the index of the paused member, to [`EtcdMember::resume`] it later.
    pub fn pause_leader(&mut self) -> Result<usize> {
        let old = self.leader()?;
        self.members[old].pause()?;
        self.wait_leader(ELECTION_TIMEOUT)?;
        Ok(old)
    }

    /// Waits until every running member reports healthy (it sees a leader) and they
    /// agree on one.
    pub fn wait_healthy(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let healthy = self.answering().all(|i| {
                http::request(self.members[i].port(), "GET", "/health", None)
                    .is_ok_and(|(status, body)| status == 200 && body.contains("\"true\""))
            });
            if healthy && self.wait_leader(Duration::ZERO).is_ok() {
                return Ok(());
            }
            self.check_time(started, ELECTION_TIMEOUT, "etcd cluster")?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` until a majority of the three members name the same leader
    /// and that leader runs; returns its index.
    fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let started = Instant::now();
        loop {
            let named: Vec<String> = self
                .answering()
                .filter_map(|i| status(self.members[i].port()).map(|(_, leader)| leader))
                .collect();
            let agreed = named
                .iter()
                .find(|l| named.iter().filter(|m| m == l).count() >= 2);
            if let Some(leader) = agreed
                && let Some(index) = self.ids.iter().position(|id| id == leader)
                && self.answering().any(|i| i == index)
            {
                return Ok(index);
            }
            // Before the ids are known (start-up), agreement is all that is asked.
            if agreed.is_some() && self.ids.is_empty() {
                return Ok(0);
            }
            self.check_time(started, timeout, "etcd leader election")?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Indices of the members that run and are not paused.
    fn answering(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(|&i| {
            let p = self.members[i].process();
            p.is_running() && !p.is_paused()
        })
    }

    fn check_time(&self, started: Instant, timeout: Duration, what: &'static str) -> Result<()> {
        if started.elapsed() <= timeout {
            return Ok(());
        }
        let log = self
            .members
            .iter()
            .map(|m| format!("-- member {}:\n{}", m.port(), m.log_tail()))
            .collect::<Vec<_>>()
            .join("\n");
        Err(Error::NotReady {
            server: what,
            port: self.members[0].port(),
            waited_ms: started.elapsed().as_millis(),
            log,
        })
    }
}

/// Starts member `m{index}`. It is ready once its client port accepts connections:
/// etcd answers requests only once a quorum formed, which needs the members after it.
fn spawn(
    program: &std::path::Path,
    index: usize,
    client: u16,
    peer: u16,
    initial: &str,
    token: &str,
) -> Result<EtcdMember> {
    let dir = process::server_dir("etcd")?;
    let data = dir.join("data");
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut args: Vec<OsString> = vec!["--data-dir".into(), data.clone().into()];
    for (flag, value) in [
        ("--name", format!("m{index}")),
        ("--listen-client-urls", client_url.clone()),
        ("--advertise-client-urls", client_url),
        ("--listen-peer-urls", peer_url.clone()),
        ("--initial-advertise-peer-urls", peer_url),
        ("--initial-cluster", initial.to_owned()),
        ("--initial-cluster-token", token.to_owned()),
        ("--initial-cluster-state", "new".to_owned()),
        ("--logger", "zap".to_owned()),
        ("--log-level", "warn".to_owned()),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    let ready = Arc::new(|port| Ok(TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let process = Process::start(Spec {
        refuse_clean_restart: Some(
            "a member that lost its data directory is a stranger to its cluster; kill or \
             stop it, then start_again, or start a new EtcdCluster",
        ),
        // etcd creates its data directory itself and refuses one it did not make.
        reset: Arc::new(|_| Ok(())),
        ..Spec::new(
            "etcd",
            program.to_path_buf(),
            args,
            client,
            dir,
            data,
            ready,
        )
    })?;
    Ok(EtcdMember { process })
}

/// (member id, leader id) from a member's `/v3/maintenance/status`.
fn status(port: u16) -> Option<(String, String)> {
    let (code, body) = http::request(port, "POST", "/v3/maintenance/status", Some("{}")).ok()?;
    if code != 200 {
        return None;
    }
    let field = |name: &str| {
        let start = body.find(&format!("\"{name}\":\""))? + name.len() + 4;
        let len = body[start..].find('"')?;
        Some(body[start..start + len].to_owned())
    };
    Some((field("member_id")?, field("leader")?))
}
