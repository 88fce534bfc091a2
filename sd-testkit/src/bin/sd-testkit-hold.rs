//! Starts the servers named on the command line (`redis`, `postgres`, `nats`, `etcd`,
//! `cluster`), prints `kind pid descendant...` for each server process, then waits for
//! ever. The testkit self-test kills this program with SIGKILL and checks that the
//! servers, and every process they forked, die with it.

use std::any::Any;
use std::io::Write;

use sd_testkit::{EtcdServer, NatsServer, PostgresServer, RedisCluster, RedisServer};

/// The server, boxed to be held until the program is killed, and its process ids.
fn held<T: 'static>(
    server: T,
    pids: impl Fn(&T) -> Vec<Option<u32>>,
) -> (Box<dyn Any>, Vec<Option<u32>>) {
    let pids = pids(&server);
    (Box::new(server), pids)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut holds = Vec::new();
    let mut pids = Vec::new();
    for kind in std::env::args().skip(1) {
        let (server, server_pids) = match kind.as_str() {
            "redis" => held(RedisServer::start()?, |s| vec![s.pid()]),
            "postgres" => held(PostgresServer::start()?, |s| vec![s.pid()]),
            "nats" => held(NatsServer::start()?, |s| vec![s.pid()]),
            "etcd" => held(EtcdServer::start()?, |s| vec![s.pid()]),
            "cluster" => held(RedisCluster::start()?, |c| {
                c.nodes().iter().map(RedisServer::pid).collect()
            }),
            other => return Err(format!("unknown server kind {other:?}").into()),
        };
        holds.push(server);
        pids.extend(server_pids.into_iter().map(|pid| (kind.clone(), pid)));
    }
    let mut out = std::io::stdout().lock();
    for (kind, pid) in pids {
        let pid = pid.ok_or("server not running")?;
        write!(out, "{kind} {pid}")?;
        for child in sd_testkit::descendants(pid) {
            write!(out, " {child}")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}
