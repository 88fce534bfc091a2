//! Starts the servers named on the command line, prints `kind pid` for each, then waits
//! for ever. The testkit self-test kills this program with SIGKILL and checks that the
//! servers die with it.

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut holds: Vec<Box<dyn std::any::Any>> = Vec::new();
    let mut out = std::io::stdout().lock();
    for kind in std::env::args().skip(1) {
        let pid = match kind.as_str() {
            "redis" => {
                let s = sd_testkit::RedisServer::start()?;
                let pid = s.pid();
                holds.push(Box::new(s));
                pid
            }
            "postgres" => {
                let s = sd_testkit::PostgresServer::start()?;
                let pid = s.pid();
                holds.push(Box::new(s));
                pid
            }
            other => return Err(format!("unknown server kind {other:?}").into()),
        };
        writeln!(out, "{kind} {}", pid.ok_or("server not running")?)?;
    }
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}
