//! Real servers for sd's tests: Redis (one, N independent, a three-master cluster with or
//! without a replica per master, or a primary and replica behind three Sentinels),
//! PostgreSQL (a throwaway cluster, a fresh database per test), NATS with JetStream, etcd
//! and a Kafka-API broker ([`KafkaBroker`], tansu: see [`kafka`] for what it does and does
//! not), each on a free loopback port in its own directory, with fault controls.
//!
//! # Guarantees
//!
//! - **Nothing outlives the test binary.** Each server is forked, with
//!   `PR_SET_PDEATHSIG = SIGKILL`, by one thread that lives as long as the binary, and
//!   runs in its own process group. Dropping a handle stops the server and everything it
//!   forked and removes its directory; if the test binary panics or is killed with
//!   `SIGKILL`, the kernel kills the servers; directories left by killed binaries are
//!   swept by the next run.
//! - **Nothing is skipped.** A missing server binary is an [`Error::MissingBinary`] that
//!   names the Debian package to install; tests call `.expect(..)` on it and fail.
//! - **Tests do not see each other.** Every Redis, NATS and etcd handle from the
//!   functions below is a server of its own (or, with an `SD_*_URL`, a shared server in
//!   which the test must use [`unique_name`]); every [`database`] is a new database.
//!
//! # Servers given by the environment
//!
//! [`redis`], [`database`], [`nats`] and [`etcd`] use `SD_REDIS_URL`, `SD_DATABASE_URL`,
//! `SD_NATS_URL` and `SD_ETCD_URL` when they are set, instead of starting a server. Fault
//! tests start their own servers with [`RedisServer::start`] and friends, always.
//!
//! # Fault controls
//!
//! Every server type has `pause` (SIGSTOP to its process group), `resume` (SIGCONT),
//! `stop` (clean shutdown), `kill` (SIGKILL to the group, as a crash), `start_again` (same
//! port, same data), `restart` (stop then start) and `restart_clean` (kill, wipe the data,
//! start empty on the same port; refused for a [`RedisCluster`] node, which could not
//! rejoin its cluster).
//!
//! ```no_run
//! let mut redis = sd_testkit::RedisServer::start()?;
//! redis.pause()?; // clients now time out
//! redis.resume()?;
//! redis.kill()?; // crash
//! redis.start_again()?; // same port; empty, since persistence is off by default
//! # Ok::<(), sd_testkit::Error>(())
//! ```
// Spawning with a parent-death signal needs `pre_exec` and `prctl`; every unsafe block
// carries its safety argument.
#![allow(unsafe_code)]

mod error;
mod etcd;
mod etcd_cluster;
pub mod http;
pub mod kafka;
mod nats;
mod ports;
mod postgres;
mod process;
mod redis;
mod redis_cluster;
pub mod resp;
mod sentinel;
mod wait;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use crate::error::{Error, Result};
pub use crate::etcd::EtcdServer;
pub use crate::etcd_cluster::{EtcdCluster, EtcdMember};
pub use crate::kafka::KafkaBroker;
pub use crate::nats::{NatsServer, info as nats_info};
pub use crate::postgres::{PostgresServer, TestDatabase};
pub use crate::process::{Process, descendants, is_alive, is_stopped, live_group_members};
pub use crate::redis::{RedisCluster, RedisOptions, RedisServer, redis_manager};
pub use crate::sentinel::{RedisSentinelGroup, SentinelServer};
pub use crate::wait::{
    HANG_GUARD, eventually, eventually_blocking, retry_until_ok, runtime, runtime_with,
};

/// Bumped when the layout of cached templates changes.
const CACHE_FORMAT: u32 = 1;

/// Delegates the fault controls of [`Process`] to a server type with a `process` field.
macro_rules! fault_controls {
    ($server:ty) => {
        impl $server {
            /// The server process, for its pid, directory and state.
            pub fn process(&self) -> &$crate::Process {
                &self.process
            }
            /// The port clients connect to; it stays the same across restarts.
            pub fn port(&self) -> u16 {
                self.process.port()
            }
            /// The server's process id, or `None` while it is stopped.
            pub fn pid(&self) -> Option<u32> {
                self.process.pid()
            }
            /// Freezes the server with SIGSTOP (clients hang until [`Self::resume`]).
            pub fn pause(&mut self) -> $crate::Result<()> {
                self.process.pause()
            }
            /// Resumes a paused server with SIGCONT.
            pub fn resume(&mut self) -> $crate::Result<()> {
                self.process.resume()
            }
            /// Stops the server cleanly.
            pub fn stop(&mut self) -> $crate::Result<()> {
                self.process.stop()
            }
            /// Kills the server and everything it forked with SIGKILL, as a crash.
            pub fn kill(&mut self) -> $crate::Result<()> {
                self.process.kill()
            }
            /// Starts a stopped or killed server again on the same port with its data.
            pub fn start_again(&mut self) -> $crate::Result<()> {
                self.process.start_again()
            }
            /// Stops and starts the server on the same port, keeping its data.
            pub fn restart(&mut self) -> $crate::Result<()> {
                self.process.restart()
            }
            /// Kills the server, wipes its data and starts it empty on the same port.
            pub fn restart_clean(&mut self) -> $crate::Result<()> {
                self.process.restart_clean()
            }
            /// The last lines of the server's log.
            pub fn log_tail(&self) -> String {
                self.process.log_tail()
            }
        }
    };
}
pub(crate) use fault_controls;

/// Retries a fresh start when the server died at once: another process may have taken
/// the free port between the probe and the server's bind.
pub(crate) fn retry_on_port_clash<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        match start() {
            Err(Error::Exited { .. }) if attempt < 2 => attempt += 1,
            other => return other,
        }
    }
}

/// A number that differs between calls and between processes.
pub(crate) fn nonce() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A name no other test (in this or another process) gets: `{prefix}-{pid}-{n}-{nonce}`.
/// Use it for key prefixes, stream names and schemas on shared servers.
pub fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        nonce() & 0xffff_ffff
    )
}

fn env_url(var: &'static str) -> Result<Option<String>> {
    match std::env::var(var) {
        Ok(url) if url.trim().is_empty() => Err(Error::Env {
            var,
            reason: "empty; unset it to let the testkit start a server".into(),
        }),
        Ok(url) => Ok(Some(url)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::Env {
            var,
            reason: "not valid UTF-8".into(),
        }),
    }
}

macro_rules! env_or_owned {
    ($(#[$doc:meta])* $fn:ident, $handle:ident, $server:ty, $var:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $handle {
            url: String,
            server: Option<$server>,
        }

        impl $handle {
            /// The URL to connect to.
            pub fn url(&self) -> &str {
                &self.url
            }
            /// The server this handle started, or `None` when it came from the environment.
            pub fn server(&self) -> Option<&$server> {
                self.server.as_ref()
            }
        }

        #[doc = concat!("The server at `", $var, "` when it is set; otherwise a new one that stops when the handle drops.")]
        pub fn $fn() -> Result<$handle> {
            if let Some(url) = env_url($var)? {
                return Ok($handle { url, server: None });
            }
            let server = <$server>::start()?;
            Ok($handle { url: server.url(), server: Some(server) })
        }
    };
}

env_or_owned!(
    /// A Redis server for one test.
    redis, Redis, RedisServer, "SD_REDIS_URL"
);
env_or_owned!(
    /// A NATS (JetStream) server for one test.
    nats, Nats, NatsServer, "SD_NATS_URL"
);
env_or_owned!(
    /// An etcd server for one test.
    etcd, Etcd, EtcdServer, "SD_ETCD_URL"
);

/// The PostgreSQL server shared by the tests of this binary, started on first use.
static SHARED_POSTGRES: Mutex<Option<PostgresServer>> = Mutex::new(None);

/// A fresh, empty database for one test, dropped with the handle.
///
/// It lives on the server at `SD_DATABASE_URL` when that is set; otherwise on a
/// PostgreSQL server that this test binary starts on first use and shares between its
/// tests (each in its own database), stopped when the binary exits.
pub fn database() -> Result<TestDatabase> {
    if let Some(url) = env_url("SD_DATABASE_URL")? {
        return TestDatabase::create(&url, &postgres::psql_binary()?);
    }
    let mut shared = SHARED_POSTGRES.lock().unwrap_or_else(|e| e.into_inner());
    if shared.is_none() {
        *shared = Some(PostgresServer::start()?);
        register_exit_hook();
    }
    match shared.as_ref() {
        Some(server) => server.create_database(),
        None => Err(Error::State {
            action: "create a database",
            reason: "the shared server is gone",
        }),
    }
}

/// Stops the shared PostgreSQL server when the test binary exits normally (panicking
/// tests included), so its directory is removed too. A killed binary relies on the
/// parent-death signal instead.
fn register_exit_hook() {
    extern "C" fn stop_shared() {
        if let Ok(mut shared) = SHARED_POSTGRES.lock() {
            drop(shared.take());
        }
    }
    // SAFETY: `stop_shared` is a plain `extern "C" fn()` that stays valid for the life of
    // the program; atexit only stores the pointer. Registering it twice is harmless.
    unsafe {
        libc::atexit(stop_shared);
    }
}
