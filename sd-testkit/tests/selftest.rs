//! The testkit's self-test: every kind of server starts, answers, survives pause/resume,
//! kill/restart, and leaves no process behind.
#![allow(clippy::unwrap_used)] // a failed step in a self-test is a test failure

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sd_testkit::resp::Reply;
use sd_testkit::{
    EtcdServer, NatsServer, PostgresServer, RedisCluster, RedisOptions, RedisServer, descendants,
    is_alive, is_stopped, live_group_members,
};

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when a connection to `port` gets no answer to `request` within 300 ms.
fn hangs(port: u16, request: &[u8]) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
}

fn text(reply: Reply) -> Option<String> {
    reply.as_text()
}

#[test]
fn redis_answers_pauses_restarts_and_leaves_nothing() {
    let mut redis = RedisServer::start().expect("start redis");
    let port = redis.port();
    assert_eq!(
        redis.command(&["PING"]).unwrap(),
        Reply::Status("PONG".into())
    );
    assert_eq!(
        redis.command(&["SET", "k", "v"]).unwrap(),
        Reply::Status("OK".into())
    );
    assert_eq!(
        text(redis.command(&["GET", "k"]).unwrap()).as_deref(),
        Some("v")
    );

    let pid = redis.pid().unwrap();
    redis.pause().unwrap();
    eventually("the server is stopped", || is_stopped(pid));
    assert!(hangs(port, b"PING\r\n"), "a paused redis must not answer");
    assert!(redis.pause().is_err(), "pausing twice is refused");
    redis.resume().unwrap();
    assert_eq!(
        redis.command(&["PING"]).unwrap(),
        Reply::Status("PONG".into())
    );

    redis.kill().unwrap();
    assert!(!is_alive(pid));
    assert!(
        redis.command(&["PING"]).is_err(),
        "a killed redis refuses connections"
    );
    redis.start_again().unwrap();
    assert_eq!(redis.port(), port, "restarts keep the port");
    assert_ne!(redis.pid(), Some(pid));
    assert_eq!(
        redis.command(&["GET", "k"]).unwrap(),
        Reply::Bulk(None),
        "without persistence a restarted redis is empty"
    );

    let dir = redis.process().dir().to_path_buf();
    let pid = redis.pid().unwrap();
    drop(redis);
    assert!(!is_alive(pid), "dropping the handle stops the server");
    assert!(
        !dir.exists(),
        "dropping the handle removes the server's directory"
    );
}

#[test]
fn persistent_redis_keeps_data_across_restart_and_clean_restart_wipes_it() {
    let mut redis = RedisServer::start_with(RedisOptions::persistent()).expect("start redis");
    redis.command(&["SET", "durable", "yes"]).unwrap();
    redis.kill().unwrap();
    redis.start_again().unwrap();
    assert_eq!(
        text(redis.command(&["GET", "durable"]).unwrap()).as_deref(),
        Some("yes")
    );
    redis.restart().unwrap();
    assert_eq!(
        text(redis.command(&["GET", "durable"]).unwrap()).as_deref(),
        Some("yes")
    );
    redis.restart_clean().unwrap();
    assert_eq!(
        redis.command(&["GET", "durable"]).unwrap(),
        Reply::Bulk(None)
    );
}

#[test]
fn independent_redis_servers_do_not_share_data() {
    let servers = RedisServer::start_many(3).expect("start redis");
    servers[0].command(&["SET", "only-here", "1"]).unwrap();
    assert_eq!(
        servers[1].command(&["GET", "only-here"]).unwrap(),
        Reply::Bulk(None)
    );
    assert_eq!(
        servers[2].command(&["GET", "only-here"]).unwrap(),
        Reply::Bulk(None)
    );
}

/// Sends a command to the cluster, following one MOVED redirection.
fn cluster_command(cluster: &RedisCluster, args: &[&str]) -> (u16, Reply) {
    let first = cluster.nodes()[0].port();
    match sd_testkit::resp::command(first, args).unwrap() {
        Reply::Error(e) if e.starts_with("MOVED") => {
            let target = e.split_whitespace().nth(2).unwrap();
            let port: u16 = target.rsplit(':').next().unwrap().parse().unwrap();
            (port, sd_testkit::resp::command(port, args).unwrap())
        }
        reply => (first, reply),
    }
}

#[test]
fn redis_cluster_is_ok_and_routes_keys_to_all_three_masters() {
    let mut cluster = RedisCluster::start().expect("start redis cluster");
    for node in cluster.nodes() {
        let info = text(node.command(&["CLUSTER", "INFO"]).unwrap()).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    }
    let mut owners = std::collections::HashSet::new();
    for i in 0..30 {
        let key = format!("key-{i}");
        let (port, reply) = cluster_command(&cluster, &["SET", &key, &i.to_string()]);
        assert_eq!(reply, Reply::Status("OK".into()));
        owners.insert(port);
        let (_, reply) = cluster_command(&cluster, &["GET", &key]);
        assert_eq!(text(reply), Some(i.to_string()));
    }
    assert_eq!(owners.len(), 3, "30 keys land on all three masters");

    // A master that is paused and resumed rejoins; the cluster is ok again.
    cluster.nodes_mut()[1].pause().unwrap();
    cluster.nodes_mut()[1].resume().unwrap();
    cluster.wait_ok(Duration::from_secs(30)).unwrap();
    let pids: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.pid()).collect();
    assert_eq!(pids.len(), 3);
    drop(cluster);
    assert!(pids.iter().all(|&p| !is_alive(p)));
}

#[test]
fn postgres_answers_pauses_restarts_and_leaves_nothing() {
    let mut pg = PostgresServer::start().expect("start postgres");
    assert_eq!(pg.psql("SELECT 40 + 2").unwrap().trim(), "42");
    let db = pg.create_database().unwrap();
    db.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
        .unwrap();
    assert_eq!(db.psql("SELECT v FROM t").unwrap().trim(), "7");

    let pid = pg.pid().unwrap();
    // A session open across the pause: its backend is a descendant in its own session.
    let mut session = Command::new("psql")
        .args(["-X", "-q", "-At", "-h", "127.0.0.1", "-p"])
        .arg(pg.port().to_string())
        .args(["-U", "postgres", "-d", "postgres"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the session's backend runs", || descendants(pid).len() >= 6);
    pg.pause().unwrap();
    eventually("the server and every backend are stopped", || {
        is_stopped(pid) && descendants(pid).into_iter().all(is_stopped)
    });
    // A startup packet gets no answer from a frozen postmaster.
    assert!(hangs(pg.port(), &[0, 0, 0, 8, 4, 210, 22, 47]));
    pg.resume().unwrap();
    assert!(descendants(pid).into_iter().all(|p| !is_stopped(p)));
    assert_eq!(db.psql("SELECT v FROM t").unwrap().trim(), "7");

    let tree = descendants(pid);
    assert!(!tree.is_empty(), "postgres runs background processes");
    pg.kill().unwrap();
    assert!(
        live_group_members(pid).is_empty() && !tree.iter().any(|&p| is_alive(p)),
        "kill reaches the backends too"
    );
    drop(session.stdin.take());
    let _ = session.kill();
    let _ = session.wait();
    assert!(db.psql("SELECT 1").is_err());
    pg.start_again().unwrap();
    assert_eq!(
        db.psql("SELECT v FROM t").unwrap().trim(),
        "7",
        "committed rows survive a crash and restart"
    );
    pg.restart().unwrap();
    assert_eq!(db.psql("SELECT v FROM t").unwrap().trim(), "7");

    pg.restart_clean().unwrap();
    assert!(
        db.psql("SELECT v FROM t").is_err(),
        "a clean restart has no database"
    );
    assert_eq!(pg.psql("SELECT 1").unwrap().trim(), "1");

    let pid = pg.pid().unwrap();
    let dir = pg.process().dir().to_path_buf();
    drop(db);
    drop(pg);
    assert!(
        live_group_members(pid).is_empty(),
        "no postgres process is left"
    );
    assert!(!dir.exists());
}

#[test]
fn each_test_database_is_fresh_and_isolated() {
    let a = sd_testkit::database().expect("database");
    let b = sd_testkit::database().expect("database");
    assert_ne!(a.url(), b.url());
    a.psql("CREATE TABLE only_in_a (v int)").unwrap();
    assert!(b.psql("SELECT * FROM only_in_a").is_err());
    let name = a.name().to_owned();
    drop(a);
    let listed = b
        .psql(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{name}'"
        ))
        .unwrap();
    assert_eq!(listed.trim(), "0", "a dropped handle drops its database");
}

fn nats_client(port: u16) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO "));
    (stream, reader)
}

fn nats_pub_sub(port: u16, payload: &str) {
    let (mut sub, mut sub_reader) = nats_client(port);
    sub.write_all(b"CONNECT {\"verbose\":false}\r\nSUB sd.test 1\r\nPING\r\n")
        .unwrap();
    let mut line = String::new();
    sub_reader.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG\r\n", "the subscription is registered");

    let (mut publisher, mut pub_reader) = nats_client(port);
    let msg = format!(
        "CONNECT {{\"verbose\":false}}\r\nPUB sd.test {}\r\n{payload}\r\nPING\r\n",
        payload.len()
    );
    publisher.write_all(msg.as_bytes()).unwrap();
    line.clear();
    pub_reader.read_line(&mut line).unwrap();
    assert_eq!(line, "PONG\r\n");

    line.clear();
    sub_reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("MSG sd.test 1 {}\r\n", payload.len()));
    line.clear();
    sub_reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("{payload}\r\n"));
}

#[test]
fn nats_with_jetstream_publishes_pauses_restarts_and_leaves_nothing() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let info = sd_testkit::nats_info(nats.port()).unwrap();
    assert!(info.contains("\"jetstream\":true"), "{info}");
    nats_pub_sub(nats.port(), "hello");

    let pid = nats.pid().unwrap();
    nats.pause().unwrap();
    eventually("the server is stopped", || is_stopped(pid));
    assert!(hangs(nats.port(), b"PING\r\n"));
    nats.resume().unwrap();
    nats_pub_sub(nats.port(), "again");

    nats.kill().unwrap();
    assert!(!is_alive(pid));
    nats.start_again().unwrap();
    nats_pub_sub(nats.port(), "after-restart");
    nats.restart_clean().unwrap();
    nats_pub_sub(nats.port(), "clean");

    let pid = nats.pid().unwrap();
    drop(nats);
    assert!(!is_alive(pid));
}

fn base64(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn etcd_put(port: u16, key: &str, value: &str) {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        base64(key.as_bytes()),
        base64(value.as_bytes())
    );
    let (status, reply) =
        sd_testkit::http::request(port, "POST", "/v3/kv/put", Some(&body)).unwrap();
    assert_eq!(status, 200, "{reply}");
}

fn etcd_get(port: u16, key: &str) -> String {
    let body = format!(r#"{{"key":"{}"}}"#, base64(key.as_bytes()));
    let (status, reply) =
        sd_testkit::http::request(port, "POST", "/v3/kv/range", Some(&body)).unwrap();
    assert_eq!(status, 200, "{reply}");
    reply
}

#[test]
fn etcd_puts_gets_pauses_restarts_and_leaves_nothing() {
    let mut etcd = EtcdServer::start().expect("start etcd");
    etcd_put(etcd.port(), "sd/key", "value-1");
    assert!(etcd_get(etcd.port(), "sd/key").contains(&base64(b"value-1")));

    let pid = etcd.pid().unwrap();
    etcd.pause().unwrap();
    eventually("the server is stopped", || is_stopped(pid));
    assert!(hangs(
        etcd.port(),
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    ));
    etcd.resume().unwrap();
    assert!(etcd_get(etcd.port(), "sd/key").contains(&base64(b"value-1")));

    etcd.kill().unwrap();
    assert!(!is_alive(pid));
    etcd.start_again().unwrap();
    assert!(
        etcd_get(etcd.port(), "sd/key").contains(&base64(b"value-1")),
        "etcd keeps its data across a crash"
    );
    etcd.restart_clean().unwrap();
    assert!(!etcd_get(etcd.port(), "sd/key").contains(&base64(b"value-1")));

    let pid = etcd.pid().unwrap();
    drop(etcd);
    assert!(!is_alive(pid));
}

#[test]
fn servers_die_with_a_test_binary_killed_by_sigkill() {
    let mut holder = Command::new(env!("CARGO_BIN_EXE_sd-testkit-hold"))
        .args(["redis", "postgres"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let mut pids = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        let pid: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(is_alive(pid));
        pids.push(pid);
    }
    assert_eq!(pids.len(), 2, "the holder started redis and postgres");
    holder.kill().unwrap(); // SIGKILL: no destructor, no atexit runs in the holder
    holder.wait().unwrap();
    for pid in pids {
        eventually(&format!("server {pid} and its children are gone"), || {
            live_group_members(pid).is_empty()
        });
    }
}

#[test]
fn unique_names_differ() {
    let a = sd_testkit::unique_name("t");
    let b = sd_testkit::unique_name("t");
    assert_ne!(a, b);
    assert!(a.starts_with("t-"));
}
