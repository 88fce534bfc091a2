//! Server processes: spawning with a parent-death signal, fault controls, clean-up.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use crate::error::{Error, Result, io_err};

/// How long a server may take to become ready before the testkit gives up.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before the testkit kills the server.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

type ReadyFn = Arc<dyn Fn(u16) -> Result<bool> + Send + Sync>;
type ResetFn = Arc<dyn Fn(&Path) -> Result<()> + Send + Sync>;

/// What a server is started with; kept so it can be started again on the same port.
pub(crate) struct Spec {
    pub(crate) kind: &'static str,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    /// Run as this (uid, gid) instead of the current user (PostgreSQL refuses root).
    pub(crate) run_as: Option<(u32, u32)>,
    /// The port clients use.
    pub(crate) port: u16,
    /// The directory that holds everything of this server; removed on drop.
    pub(crate) dir: PathBuf,
    /// The data directory, wiped by [`Process::restart_clean`].
    pub(crate) data: PathBuf,
    /// The signal that asks the server to stop at once but cleanly.
    pub(crate) stop_signal: i32,
    /// Returns `Ok(true)` once the server answers on `port`.
    pub(crate) ready: ReadyFn,
    /// Puts the data directory back to its state before the first start.
    pub(crate) reset: ResetFn,
    /// Why [`Process::restart_clean`] is refused for this server, if it is: a Redis
    /// Cluster node that lost its `nodes.conf` cannot rejoin its cluster.
    pub(crate) refuse_clean_restart: Option<&'static str>,
}

impl Spec {
    /// A server of `kind` that runs as the current user, stops on `SIGTERM`, has its data
    /// directory emptied by [`Process::restart_clean`] and allows it; set the fields that
    /// differ with struct update syntax (`Spec { reset, ..Spec::new(..) }`).
    pub(crate) fn new(
        kind: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
        port: u16,
        dir: PathBuf,
        data: PathBuf,
        ready: ReadyFn,
    ) -> Spec {
        Spec {
            kind,
            program,
            args,
            run_as: None,
            port,
            dir,
            data,
            stop_signal: libc::SIGTERM,
            ready,
            reset: Arc::new(empty_dir),
            refuse_clean_restart: None,
        }
    }
}

/// One running (or stopped, or paused) server process, with fault controls.
///
/// The server runs in its own process group, so pausing or killing it reaches every
/// process it forked (PostgreSQL's backends, for one). It is started from a thread that
/// lives as long as the test binary, with `PR_SET_PDEATHSIG = SIGKILL`, so it dies with
/// the test binary even when that binary is killed with `SIGKILL`. Dropping the handle
/// stops the server and removes its directory.
pub struct Process {
    spec: Spec,
    child: Option<Child>,
    paused: bool,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("kind", &self.spec.kind)
            .field("port", &self.spec.port)
            .field("pid", &self.pid())
            .field("paused", &self.paused)
            .field("dir", &self.spec.dir)
            .finish()
    }
}

impl Process {
    /// Starts the server described by `spec` and waits until it is ready.
    pub(crate) fn start(spec: Spec) -> Result<Self> {
        let mut process = Process {
            spec,
            child: None,
            paused: false,
        };
        process.start_again()?;
        Ok(process)
    }

    /// The kind of server ("redis", "postgres", ...).
    pub fn kind(&self) -> &'static str {
        self.spec.kind
    }

    /// The port clients connect to; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// The process id of the server, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory holding the server's data, configuration and log.
    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    /// Whether the server process is running (it may be paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the server is paused with `SIGSTOP`.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The last lines the server wrote to its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.spec.dir.join("server.log"))
    }

    /// Freezes the server and every process it forked (`SIGSTOP` to its process group).
    /// Clients see a server that accepts nothing and answers nothing, as during a long
    /// GC pause or a network partition.
    pub fn pause(&mut self) -> Result<()> {
        self.set_paused(true)
    }

    /// Lets a paused server run again (`SIGCONT` to its process group).
    pub fn resume(&mut self) -> Result<()> {
        self.set_paused(false)
    }

    /// Pauses (`SIGSTOP`) or resumes (`SIGCONT`) the running server's process group;
    /// refuses to pause a paused server or to resume one that is not paused.
    fn set_paused(&mut self, paused: bool) -> Result<()> {
        let (action, signal, reason) = if paused {
            ("pause", libc::SIGSTOP, "the server is already paused")
        } else {
            ("resume", libc::SIGCONT, "the server is not paused")
        };
        let pid = self.running_pid(action)?;
        if self.paused == paused {
            return Err(Error::State { action, reason });
        }
        signal_tree(pid, signal)?;
        self.paused = paused;
        Ok(())
    }

    /// Stops the server cleanly and waits for every process of it to exit.
    pub fn stop(&mut self) -> Result<()> {
        self.running_pid("stop")?;
        self.shut_down(true)
    }

    /// Kills the server and every process it forked with `SIGKILL`, as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        self.running_pid("kill")?;
        self.shut_down(false)
    }

    /// Starts a stopped or killed server again on the same port, keeping its data.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(Error::State {
                action: "start",
                reason: "the server is already running; stop or kill it first",
            });
        }
        let child = spawn(&self.spec)?;
        self.child = Some(child);
        self.paused = false;
        self.wait_ready()
    }

    /// Stops the server (if it runs) and starts it again on the same port with its data.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.shut_down(true)?;
        }
        self.start_again()
    }

    /// Kills the server (if it runs), throws its data away and starts it again, empty, on
    /// the same port: a machine replaced after a disk loss.
    ///
    /// Refused with [`Error::State`] (and the server left as it is) for a server that
    /// could not come back from it, such as a Redis Cluster node.
    pub fn restart_clean(&mut self) -> Result<()> {
        if let Some(reason) = self.spec.refuse_clean_restart {
            return Err(Error::State {
                action: "restart clean",
                reason,
            });
        }
        if self.child.is_some() {
            self.shut_down(false)?;
        }
        (self.spec.reset)(&self.spec.data)?;
        self.start_again()
    }

    fn running_pid(&self, action: &'static str) -> Result<u32> {
        self.pid().ok_or(Error::State {
            action,
            reason: "the server is not running",
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(Error::Exited {
                    server: self.spec.kind,
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if (self.spec.ready)(self.spec.port)? {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let log = self.log_tail();
                let _ = self.shut_down(false);
                return Err(Error::NotReady {
                    server: self.spec.kind,
                    port: self.spec.port,
                    waited_ms: started.elapsed().as_millis(),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn shut_down(&mut self, graceful: bool) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        // Collected now: once the leader is gone its children belong to init.
        let tree = descendants(pid);
        if self.paused {
            let _ = signal_tree(pid, libc::SIGCONT);
            self.paused = false;
        }
        let mut exited = false;
        if graceful && signal_pid(pid, self.spec.stop_signal).is_ok() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if !exited {
            let _ = signal_group(pid, libc::SIGKILL);
            for &p in &tree {
                let _ = signal_pid(p, libc::SIGKILL);
            }
            child
                .wait()
                .map_err(io_err(format!("waiting for {} to exit", self.spec.kind)))?;
        }
        // Whatever the leader forked dies with it: kill stragglers and wait for them.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !live_group_members(pid).is_empty() || tree.iter().any(|&p| is_alive(p)) {
            let _ = signal_group(pid, libc::SIGKILL);
            for &p in tree.iter().filter(|&&p| is_alive(p)) {
                let _ = signal_pid(p, libc::SIGKILL);
            }
            if Instant::now() > deadline {
                return Err(Error::State {
                    action: "stop",
                    reason: "processes of the server's group are still alive after SIGKILL",
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.shut_down(true);
        let _ = fs::remove_dir_all(&self.spec.dir);
    }
}

fn signal_pid(pid: u32, signal: i32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| Error::State {
        action: "signal",
        reason: "pid out of range",
    })?;
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a child we spawned
    // and have not reaped, so it cannot name an unrelated recycled process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io_err(format!("kill({pid}, {signal})"))(
            io::Error::last_os_error(),
        ))
    }
}

/// Sends `signal` to the process group led by `pid` (servers are group leaders).
fn signal_group(pid: u32, signal: i32) -> Result<()> {
    let pgid = libc::pid_t::try_from(pid).map_err(|_| Error::State {
        action: "signal",
        reason: "pid out of range",
    })?;
    // SAFETY: as in `signal_pid`; a negative pid addresses the process group that the
    // server leads (we put it in its own group when spawning it).
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io_err(format!("kill(-{pgid}, {signal})"))(
            io::Error::last_os_error(),
        ))
    }
}

/// Pids of the processes in process group `pgid` that are alive (zombies do not count).
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            proc_stat(pid).is_some_and(|(state, pgrp)| state != 'Z' && state != 'X' && pgrp == pgid)
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Whether process `pid` is stopped by a signal (state `T`).
pub fn is_stopped(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state == 'T')
}

/// (state, process group) of `pid`, from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    proc_stat_full(pid).map(|(state, _, pgrp)| (state, pgrp))
}

/// (state, parent pid, process group) of `pid`, from /proc/PID/stat.
fn proc_stat_full(pid: u32) -> Option<(char, u32, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// Pids of every live process descended from `pid` (children, their children, ...),
/// whatever their process group: PostgreSQL's backends call `setsid`, so signalling the
/// postmaster's group alone would leave open connections answering during a pause.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let (state, ppid, _) = proc_stat_full(p)?;
            (state != 'Z' && state != 'X').then_some((p, ppid))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, _) in parents.iter().filter(|(_, ppid)| *ppid == parent) {
            found.push(child);
            frontier.push(child);
        }
    }
    found
}

/// Sends `signal` to the server's process group and to every descendant outside it.
fn signal_tree(pid: u32, signal: i32) -> Result<()> {
    let tree = descendants(pid);
    signal_group(pid, signal)?;
    for child in tree {
        // A child may have exited in between: nothing to signal then.
        let _ = signal_pid(child, signal);
    }
    Ok(())
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `spec` from the spawner thread.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. Test harnesses run each test on its own thread, and a server shared by several
/// tests must not die when the first of them returns; so every server is forked by one
/// thread that lives until the test binary exits.
fn spawn(spec: &Spec) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let spawned = std::thread::Builder::new()
            .name("sd-testkit-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            });
        // If the thread could not start, `rx` is gone and `spawn` reports it below.
        let _ = spawned;
        Mutex::new(tx)
    });

    let log_path = spec.dir.join("server.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(format!("opening {}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(io_err("duplicating the log file handle"))?;

    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0);
    if let Some((uid, gid)) = spec.run_as {
        command.uid(uid).gid(gid);
    }
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid) on plain integers; it allocates
    // nothing and takes no lock. std applies uid/gid before running it, which matters:
    // a credential change clears the parent-death signal.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The test binary may have died between fork and prctl: then nobody would
            // ever kill this server, so do not start it.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("test binary exited during spawn"));
            }
            Ok(())
        });
    }

    let (tx, rx) = mpsc::channel();
    sender
        .lock()
        .map_err(|_| Error::State {
            action: "spawn",
            reason: "the spawner lock is poisoned",
        })?
        .send((command, tx))
        .map_err(|_| Error::State {
            action: "spawn",
            reason: "the spawner thread is gone",
        })?;
    rx.recv()
        .map_err(|_| Error::State {
            action: "spawn",
            reason: "the spawner thread did not answer",
        })?
        .map_err(io_err(format!("starting {}", spec.program.display())))
}

/// The last 30 lines of a log file.
pub(crate) fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The root of every server directory: `$SD_TESTKIT_DIR` or `$TMPDIR/sd-testkit`.
pub(crate) fn root_dir() -> Result<PathBuf> {
    static SWEPT: OnceLock<()> = OnceLock::new();
    let root = std::env::var_os("SD_TESTKIT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sd-testkit"));
    fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
    SWEPT.get_or_init(|| sweep(&root));
    Ok(root)
}

/// Whether a user other than the owner can enter `dir`: every ancestor must be
/// searchable (`o+x`). A server run as `postgres` under root needs this.
pub(crate) fn searchable_by_others(dir: &Path) -> bool {
    dir.ancestors()
        .all(|p| fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// Removes directories left by test binaries that died (their pid is in the name).
fn sweep(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let mut parts = name.rsplitn(3, '-');
        let (_seq, pid) = (parts.next(), parts.next());
        if parts
            .next()
            .is_some_and(|kind| !kind.starts_with("template"))
            && let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok())
            && !is_alive(pid)
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A new directory for one server: `<root>/<kind>-<pid>-<seq>`, readable by all so a
/// server running as another user (postgres) can reach its own subdirectory.
pub(crate) fn server_dir(kind: &str) -> Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = root_dir()?.join(format!("{kind}-{}-{seq}", std::process::id()));
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod {}", dir.display())))?;
    Ok(dir)
}

/// Empties a directory, keeping the directory itself.
pub(crate) fn empty_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io_err(format!("removing {}", dir.display())))?;
    }
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))
}

/// Finds `binary` on `PATH` or in `extra` directories; a missing binary names its package.
pub(crate) fn find_binary(
    binary: &'static str,
    package: &'static str,
    extra: &[PathBuf],
) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(extra.iter().cloned());
    for sbin in [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
    ] {
        dirs.push(PathBuf::from(sbin));
    }
    for dir in &dirs {
        let candidate = dir.join(binary);
        if candidate
            .metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return Ok(candidate);
        }
    }
    Err(Error::MissingBinary {
        binary,
        package,
        searched: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":"),
    })
}

/// Runs a helper command to completion; a non-zero exit becomes [`Error::Command`].
pub(crate) fn run(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {shown}")))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(text)
    } else {
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Err(Error::Command {
            command: shown,
            output: text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_parent_makes_a_directory_unreachable_for_others() {
        let parent = std::env::temp_dir().join(format!("sd-closed-{}", std::process::id()));
        let child = parent.join("inner");
        fs::create_dir_all(&child).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(searchable_by_others(&child));
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!searchable_by_others(&child));
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_missing_binary_names_its_package() {
        let err = find_binary("sd-no-such-server", "sd-no-such-package", &[]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::MissingBinary { .. }));
        assert!(
            message.contains("apt-get install -y sd-no-such-package"),
            "{message}"
        );
    }

    #[test]
    fn proc_stat_parses_names_with_parentheses() {
        let (state, pgrp) = proc_stat(std::process::id()).expect("own stat");
        assert_ne!(state, 'Z');
        assert!(pgrp > 0);
        assert!(is_alive(std::process::id()));
    }
}
