//! NATS with JetStream.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::process::{self, Process, Spec};

/// A `nats-server -js` owned by the test, with its JetStream store in its own directory.
#[derive(Debug)]
pub struct NatsServer {
    process: Process,
}

impl NatsServer {
    /// Starts a NATS server with JetStream and waits until it greets clients.
    pub fn start() -> Result<Self> {
        crate::retry_on_port_clash(Self::spawn)
    }

    fn spawn() -> Result<Self> {
        let program = process::find_binary("nats-server", "nats-server", &[])?;
        let port = crate::ports::free_port()?;
        let dir = process::server_dir("nats")?;
        let data = dir.join("jetstream");
        process::empty_dir(&data)?;
        let mut args: Vec<OsString> = ["-js", "-a", "127.0.0.1", "-p", &port.to_string()]
            .iter()
            .map(OsString::from)
            .collect();
        args.push("-sd".into());
        args.push(data.clone().into());
        let ready =
            Arc::new(|port| Ok(info(port).is_some_and(|i| i.contains("\"jetstream\":true"))));
        let process = Process::start(Spec::new("nats", program, args, port, dir, data, ready))?;
        Ok(NatsServer { process })
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port())
    }
}

crate::fault_controls!(NatsServer);

/// The `INFO {...}` line a NATS server greets each client with.
pub fn info(port: u16) -> Option<String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.starts_with("INFO ").then_some(line)
}
