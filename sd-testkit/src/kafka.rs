//! A Kafka-API broker: `tansu`.
//!
//! No Apache Kafka distribution can be fetched where sd is tested, so the broker is
//! [tansu](https://crates.io/crates/tansu), a Kafka-API broker written in Rust and built
//! from crates.io. What it does and does not do, as checked with tansu 0.6.0:
//!
//! - **Build**: `cargo install --locked tansu --version 0.6.0 --features dynostore,libsql`,
//!   about 12 minutes on two cores. `scripts/test.sh` builds it once into
//!   `~/.cache/sd-tools/tansu-0.6.0` (outside the clone, so later runs reuse it) and
//!   exports `SD_TANSU`. Without `dynostore` the memory engine is refused; `libsql` gives
//!   the SQLite engine.
//! - **Engines**: [`KafkaBroker::start`] runs the memory engine (`memory://tansu/`): ready
//!   at once, and everything is lost when the process dies. [`KafkaBroker::start_durable`]
//!   runs the SQLite engine on a file in the broker's data directory
//!   (`sqlite://data/tansu.db`, relative to the broker's working directory): topics and
//!   records survive `kill -9` and a restart on the same port.
//! - **Topics are not created on first use**: create them with
//!   [`KafkaBroker::create_topic`] (`tansu topic create NAME --partitions N`).
//! - **Works** (with rdkafka 0.38's bundled librdkafka): an idempotent producer with
//!   `acks=all`, consumer groups with several members and rebalances, offset commits.
//! - **Does not**: commit metadata comes back empty, and `EndTxn` is refused, so a Kafka
//!   transaction cannot commit (on every engine). Debian's librdkafka 2.0.2 (kcat,
//!   python3-confluent-kafka) fails the `ApiVersions` handshake against it.
//! - **Known fault of the memory engine: a fetch from inside a batch.** It keeps each
//!   produced batch as one object and answers a fetch with the batches whose *base*
//!   offset is at or above the fetch offset, so a fetch that starts inside a batch gets
//!   none of that batch's remaining records: the partition stalls when no later batch
//!   exists, and those records are skipped when one does. A consumer fetches from inside
//!   a batch after `pause`/`resume`, a `seek`, a rebalance or a restart from a commit.
//!   The SQLite engine stores records one by one and serves any offset, so consumer
//!   tests run on [`KafkaBroker::start_durable`]. (Its `ListOffsets` and watermarks are
//!   only floors too: see sd-outbox's Kafka tests.)
//! - **A member that dies is noticed, its partitions are not moved**: once a member misses
//!   its session timeout the group rebalances among the members that rejoin, but in the
//!   runs checked here the dead member's partitions stayed unassigned until another member
//!   joined. Tests that kill a member start a replacement, as an operator would.
//! - **Known fault of the SQLite engine**: a durable broker killed while an idempotent
//!   producer's sends are timing out, then started again, serves one fresh producer; a
//!   send from the old producer (whose epoch librdkafka raised after the timeouts) then
//!   gets an unknown server error, and from there the storage answers no request, not
//!   even metadata. Killed and restarted with no sends timing out, it works. sd-outbox's
//!   publisher replaces its producer after a delivery times out, so a broker killed and
//!   started again after the delivery timeout meets only a fresh producer; its test
//!   kills the broker that way.
//!
//! Re-check these facts when the tansu version changes.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::process::{self, Process, Spec};

/// The tansu version the testkit is written against (and `scripts/test.sh` builds).
pub const TANSU_VERSION: &str = "0.6.0";

/// The command that builds the broker.
const INSTALL: &str = "cargo install --locked tansu --version 0.6.0 --features dynostore,libsql \
                       --root ~/.cache/sd-tools/tansu-0.6.0";

/// Where a broker keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// `memory://tansu/`: lost when the process dies.
    Memory,
    /// `sqlite://data/tansu.db`: survives `kill -9`.
    Sqlite,
}

/// A tansu broker owned by the test, on a free loopback port in its own directory.
#[derive(Debug)]
pub struct KafkaBroker {
    process: Process,
    program: PathBuf,
}

impl KafkaBroker {
    /// Starts a broker on the memory engine (fast; loses everything when killed) and
    /// waits until it answers a Kafka `ApiVersions` request.
    pub fn start() -> Result<Self> {
        crate::retry_on_port_clash(|| Self::spawn(Engine::Memory))
    }

    /// Starts a broker on the SQLite engine, in a file of its data directory: topics and
    /// records survive [`kill`](Self::kill) and [`start_again`](Self::start_again);
    /// [`restart_clean`](Self::restart_clean) empties it.
    pub fn start_durable() -> Result<Self> {
        crate::retry_on_port_clash(|| Self::spawn(Engine::Sqlite))
    }

    fn spawn(engine: Engine) -> Result<Self> {
        let program = tansu()?;
        let port = crate::ports::free_port()?;
        let dir = process::server_dir("kafka")?;
        let data = dir.join("data");
        process::empty_dir(&data)?;
        let url = format!("tcp://127.0.0.1:{port}");
        let storage = match engine {
            Engine::Memory => "memory://tansu/",
            Engine::Sqlite => "sqlite://data/tansu.db",
        };
        let args: Vec<OsString> = [
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            storage,
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let ready = Arc::new(|port| Ok(api_versions(port).is_some_and(|apis| apis > 0)));
        let process = Process::start(Spec::new(
            "kafka",
            program.clone(),
            args,
            port,
            dir,
            data,
            ready,
        ))?;
        Ok(KafkaBroker { process, program })
    }

    /// `127.0.0.1:PORT`, the `bootstrap.servers` of a client.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.process.port())
    }

    /// Creates `topic` with `partitions` partitions (tansu creates no topic on first use).
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        process::run(
            Command::new(&self.program)
                .arg("topic")
                .arg("create")
                .arg(topic)
                .arg("--partitions")
                .arg(partitions.to_string())
                .arg("--broker")
                .arg(self.broker_url()),
        )
        .map(drop)
    }

    /// The names of the broker's topics, sorted.
    pub fn topics(&self) -> Result<Vec<String>> {
        let listing = process::run(
            Command::new(&self.program)
                .arg("topic")
                .arg("list")
                .arg("--broker")
                .arg(self.broker_url()),
        )?;
        let mut names = topic_names(&listing);
        names.sort();
        Ok(names)
    }

    fn broker_url(&self) -> String {
        format!("tcp://{}", self.bootstrap())
    }
}

crate::fault_controls!(KafkaBroker);

/// The tansu binary: `SD_TANSU`, then the cache `scripts/test.sh` builds it into, then
/// `PATH`.
fn tansu() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SD_TANSU") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::MissingCargoBinary {
                binary: "tansu",
                install: INSTALL,
                searched: format!("SD_TANSU={}", path.display()),
            })
        };
    }
    let cache = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(format!(".cache/sd-tools/tansu-{TANSU_VERSION}/bin"));
    process::find_binary("tansu", "tansu", std::slice::from_ref(&cache)).map_err(|e| match e {
        Error::MissingBinary { searched, .. } => Error::MissingCargoBinary {
            binary: "tansu",
            install: INSTALL,
            searched,
        },
        other => other,
    })
}

/// Sends a Kafka `ApiVersions` request (v0) to `127.0.0.1:port` and returns how many
/// APIs the broker advertises, or `None` when it does not answer one well formed.
pub fn api_versions(port: u16) -> Option<usize> {
    const API_VERSIONS: i16 = 18;
    const CORRELATION: i32 = 0x5d_0001;
    let client = b"sd-testkit";
    let mut request = Vec::new();
    request.extend_from_slice(&API_VERSIONS.to_be_bytes());
    request.extend_from_slice(&0i16.to_be_bytes());
    request.extend_from_slice(&CORRELATION.to_be_bytes());
    request.extend_from_slice(&(client.len() as i16).to_be_bytes());
    request.extend_from_slice(client);
    let mut framed = (request.len() as i32).to_be_bytes().to_vec();
    framed.extend_from_slice(&request);

    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(&framed).ok()?;
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).ok()?;
    let size = usize::try_from(i32::from_be_bytes(size)).ok()?;
    if !(10..=1 << 20).contains(&size) {
        return None;
    }
    let mut body = vec![0u8; size];
    stream.read_exact(&mut body).ok()?;
    parse_api_versions(&body, CORRELATION)
}

/// The number of APIs in an `ApiVersions` v0 response body (after the size), when its
/// correlation id is `correlation` and its error code is 0.
fn parse_api_versions(body: &[u8], correlation: i32) -> Option<usize> {
    let be_i32 = |at: usize| Some(i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?));
    let error = i16::from_be_bytes(body.get(4..6)?.try_into().ok()?);
    if be_i32(0)? != correlation || error != 0 {
        return None;
    }
    let count = usize::try_from(be_i32(6)?).ok()?;
    // Each entry is (api key, min version, max version), three i16.
    (body.len() >= 10 + count * 6).then_some(count)
}

/// The `"name"` fields of `tansu topic list`'s JSON answer, in order.
fn topic_names(listing: &str) -> Vec<String> {
    const FIELD: &str = "\"name\":\"";
    let mut names = Vec::new();
    let mut rest = listing;
    while let Some(at) = rest.find(FIELD) {
        rest = &rest[at + FIELD.len()..];
        let Some(end) = rest.find('"') else { break };
        names.push(rest[..end].to_owned());
        rest = &rest[end..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_answers_are_checked() {
        let mut body = Vec::new();
        body.extend_from_slice(&7i32.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 0, 0, 9, 0, 18, 0, 0, 0, 3]);
        assert_eq!(parse_api_versions(&body, 7), Some(2));
        assert_eq!(parse_api_versions(&body, 8), None, "another correlation id");
        assert_eq!(
            parse_api_versions(&body[..12], 7),
            None,
            "truncated entries"
        );
        body[5] = 35; // UNSUPPORTED_VERSION
        assert_eq!(parse_api_versions(&body, 7), None, "an error code");
        assert_eq!(parse_api_versions(&[], 7), None, "empty");
    }

    #[test]
    fn topic_names_are_read_from_the_listing() {
        let listing = r#"[{"error_code":0,"name":"orders","partitions":[]},{"name":"dlq"}]"#;
        assert_eq!(topic_names(listing), ["orders", "dlq"]);
        assert!(topic_names("[]").is_empty());
    }
}
