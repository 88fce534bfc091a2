//! The testkit's self-test: every kind of server starts, answers, survives pause/resume,
//! kill/restart, and leaves no process behind.
#![allow(clippy::unwrap_used)] // a failed step in a self-test is a test failure

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use sd_testkit::resp::Reply;
use sd_testkit::{
    EtcdServer, NatsServer, PostgresServer, RedisCluster, RedisOptions, RedisServer, descendants,
    is_alive, is_stopped, live_group_members,
};

use sd_testkit::eventually_blocking as eventually;

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
    let pid = redis.pid().unwrap();
    redis.stop().unwrap();
    assert!(!is_alive(pid), "stop waits for the server to exit");
    assert!(redis.pid().is_none() && redis.stop().is_err());
    redis.start_again().unwrap();
    redis.restart().unwrap();
    assert_eq!(redis.port(), port);
    assert_eq!(
        redis.command(&["PING"]).unwrap(),
        Reply::Status("PONG".into())
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
    redis.stop().unwrap();
    redis.start_again().unwrap();
    assert_eq!(
        text(redis.command(&["GET", "durable"]).unwrap()).as_deref(),
        Some("yes")
    );
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

/// Sends a command to the cluster node on `via`, following one MOVED redirection, and
/// returns the port that answered and its reply. An error reply (CLUSTERDOWN, ...) or a
/// node that cannot be reached is an `Err`.
fn cluster_try(via: u16, args: &[&str]) -> Result<(u16, Reply), String> {
    let answer = |port: u16| match sd_testkit::resp::command(port, args) {
        Ok(Reply::Error(e)) => Err(e),
        Ok(reply) => Ok((port, reply)),
        Err(e) => Err(e.to_string()),
    };
    match answer(via) {
        Err(e) if e.starts_with("MOVED") => {
            let target = e.split_whitespace().nth(2).unwrap();
            answer(target.rsplit(':').next().unwrap().parse().unwrap())
        }
        other => other,
    }
}

/// Sends a command to the cluster through its first node, following one MOVED redirection.
fn cluster_command(cluster: &RedisCluster, args: &[&str]) -> (u16, Reply) {
    cluster_try(cluster.nodes()[0].port(), args).unwrap()
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
fn a_redis_cluster_node_killed_paused_or_restarted_rejoins_with_its_slots() {
    let mut cluster = RedisCluster::start().expect("start redis cluster");
    let victim = cluster.nodes()[1].port();
    let other = cluster.nodes()[0].port();
    // A key whose slot the victim serves.
    let key = (0..)
        .map(|i| format!("victim-key-{i}"))
        .find(|k| cluster_command(&cluster, &["SET", k, "1"]).0 == victim)
        .unwrap();

    cluster.nodes_mut()[1].kill().unwrap();
    let err = cluster_try(other, &["GET", &key]).unwrap_err();
    assert!(!err.is_empty(), "a key on a killed node's slots fails");
    assert!(cluster.wait_ok(Duration::from_millis(200)).is_err());
    cluster.nodes_mut()[1].start_again().unwrap();
    assert_eq!(cluster.nodes()[1].port(), victim);
    cluster.wait_ok(Duration::from_secs(30)).unwrap();
    assert_eq!(
        cluster_try(other, &["SET", &key, "after-kill"]).unwrap(),
        (victim, Reply::Status("OK".into())),
        "the node serves its slots again"
    );
    assert_eq!(
        text(cluster_try(other, &["GET", &key]).unwrap().1).as_deref(),
        Some("after-kill")
    );

    let pid = cluster.nodes()[1].pid().unwrap();
    cluster.nodes_mut()[1].pause().unwrap();
    eventually("the paused node is stopped", || is_stopped(pid));
    let get = format!("GET {key}\r\n");
    assert!(
        hangs(victim, get.as_bytes()),
        "a paused node does not answer"
    );
    cluster.nodes_mut()[1].resume().unwrap();
    assert!(!is_stopped(pid));
    cluster.wait_ok(Duration::from_secs(30)).unwrap();
    assert_eq!(
        text(cluster_try(other, &["GET", &key]).unwrap().1).as_deref(),
        Some("after-kill")
    );

    cluster.nodes_mut()[1].stop().unwrap();
    assert!(!is_alive(pid));
    cluster.nodes_mut()[1].start_again().unwrap();
    cluster.nodes_mut()[1].restart().unwrap();
    cluster.wait_ok(Duration::from_secs(30)).unwrap();
    assert_eq!(
        cluster_try(other, &["SET", &key, "after-restart"]).unwrap(),
        (victim, Reply::Status("OK".into()))
    );

    // A clean restart would lose nodes.conf and leave the slots unserved: refused, and
    // the node keeps running.
    let pid = cluster.nodes()[1].pid().unwrap();
    let err = cluster.nodes_mut()[1].restart_clean().unwrap_err();
    assert!(
        matches!(
            err,
            sd_testkit::Error::State {
                action: "restart clean",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cluster.nodes()[1].pid(), Some(pid));
    assert_eq!(
        text(cluster_try(other, &["GET", &key]).unwrap().1).as_deref(),
        Some("after-restart")
    );
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
    let pid = pg.pid().unwrap();
    pg.stop().unwrap();
    assert!(!is_alive(pid) && db.psql("SELECT 1").is_err());
    pg.start_again().unwrap();
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

/// Sends a request on a new connection and returns the reply's payload.
fn nats_request(port: u16, subject: &str, payload: &str) -> String {
    let (mut conn, mut reader) = nats_client(port);
    let request = format!(
        "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.sd 1\r\nPUB {subject} _INBOX.sd {}\r\n{payload}\r\n",
        payload.len()
    );
    conn.write_all(request.as_bytes()).unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("MSG ") {
            break;
        }
        if line == "PING\r\n" {
            conn.write_all(b"PONG\r\n").unwrap();
        }
    }
    let size: usize = line.trim_end().rsplit(' ').next().unwrap().parse().unwrap();
    let mut body = vec![0; size + 2];
    reader.read_exact(&mut body).unwrap();
    body.truncate(size);
    String::from_utf8(body).unwrap()
}

/// The JetStream API's answer to fetching message `seq` of `stream`.
fn jetstream_message(port: u16, stream: &str, seq: u64) -> String {
    nats_request(
        port,
        &format!("$JS.API.STREAM.MSG.GET.{stream}"),
        &format!(r#"{{"seq":{seq}}}"#),
    )
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

    // A JetStream stream on disk, with one message.
    let port = nats.port();
    let created = nats_request(
        port,
        "$JS.API.STREAM.CREATE.SDTEST",
        r#"{"name":"SDTEST","subjects":["sdtest.>"],"storage":"file"}"#,
    );
    assert!(!created.contains("\"error\""), "{created}");
    let ack = nats_request(port, "sdtest.one", "kept");
    assert!(ack.contains(r#""seq":1"#), "{ack}");
    let kept = base64(b"kept");
    assert!(jetstream_message(port, "SDTEST", 1).contains(&kept));

    nats.stop().unwrap();
    assert!(!is_alive(pid) && nats.pid().is_none());
    nats.start_again().unwrap();
    let after = jetstream_message(port, "SDTEST", 1);
    assert!(
        after.contains(&kept),
        "stop and start keep the stream: {after}"
    );
    nats.restart().unwrap();
    let after = jetstream_message(port, "SDTEST", 1);
    assert!(after.contains(&kept), "a restart keeps the stream: {after}");

    let pid = nats.pid().unwrap();
    nats.kill().unwrap();
    assert!(!is_alive(pid));
    nats.start_again().unwrap();
    assert_eq!(nats.port(), port);
    nats_pub_sub(port, "after-restart");
    nats.restart_clean().unwrap();
    let info = nats_request(port, "$JS.API.STREAM.INFO.SDTEST", "");
    assert!(
        info.contains("stream not found"),
        "a clean restart has no stream: {info}"
    );
    nats_pub_sub(port, "clean");

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
    let pid = etcd.pid().unwrap();
    etcd.stop().unwrap();
    assert!(!is_alive(pid) && etcd.pid().is_none());
    etcd.start_again().unwrap();
    etcd.restart().unwrap();
    assert!(
        etcd_get(etcd.port(), "sd/key").contains(&base64(b"value-1")),
        "etcd keeps its data across stop and restart"
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
        .args(["redis", "postgres", "nats", "etcd", "cluster"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    // (kind, server pid, every process it forked)
    let mut servers: Vec<(String, u32, Vec<u32>)> = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        let mut fields = line.split_whitespace();
        let kind = fields.next().unwrap().to_owned();
        let pids: Vec<u32> = fields.map(|p| p.parse().unwrap()).collect();
        assert!(pids.iter().all(|&p| is_alive(p)), "{line}");
        servers.push((kind, pids[0], pids[1..].to_vec()));
    }
    let kinds: Vec<&str> = servers.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "redis", "postgres", "nats", "etcd", "cluster", "cluster", "cluster"
        ]
    );
    // PostgreSQL's background processes call setsid: they are outside the postmaster's
    // process group, so only the descendants list finds them.
    let (_, postmaster, children) = &mut servers[1];
    eventually("postgres has started its background processes", || {
        for p in descendants(*postmaster) {
            if !children.contains(&p) {
                children.push(p);
            }
        }
        children.len() >= 4
    });
    assert!(
        children
            .iter()
            .any(|&p| !live_group_members(*postmaster).contains(&p)),
        "some postgres children live outside the postmaster's group"
    );
    holder.kill().unwrap(); // SIGKILL: no destructor, no atexit runs in the holder
    holder.wait().unwrap();
    for (kind, pid, children) in &servers {
        eventually(&format!("{kind} {pid} and its children are gone"), || {
            live_group_members(*pid).is_empty() && !children.iter().any(|&p| is_alive(p))
        });
    }
}

#[test]
fn sd_urls_from_the_environment_are_used_instead_of_starting_servers() {
    let redis = RedisServer::start().expect("start redis");
    let nats = NatsServer::start().expect("start nats-server");
    let etcd = EtcdServer::start().expect("start etcd");
    let pg = PostgresServer::start().expect("start postgres");
    let probe = |vars: [(&str, String); 4]| {
        // A directory of its own: a server started by the probe would appear in it.
        let dir = std::env::temp_dir().join(sd_testkit::unique_name("sd-env-probe"));
        let output = Command::new(env!("CARGO_BIN_EXE_sd-testkit-env"))
            .envs(vars)
            .env("SD_TESTKIT_DIR", &dir)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert!(!dir.exists(), "the probe started a server in {dir:?}");
        String::from_utf8(output.stdout).unwrap()
    };

    let given = probe([
        ("SD_REDIS_URL", redis.url()),
        ("SD_NATS_URL", nats.url()),
        ("SD_ETCD_URL", etcd.url()),
        ("SD_DATABASE_URL", pg.url()),
    ]);
    let lines: Vec<&str> = given.lines().collect();
    assert_eq!(lines[0], format!("redis env {}", redis.url()));
    assert_eq!(lines[1], format!("nats env {}", nats.url()));
    assert_eq!(lines[2], format!("etcd env {}", etcd.url()));
    let db: Vec<&str> = lines[3].split(' ').collect();
    assert_eq!(db[0], "database", "{given}");
    assert!(db[1].starts_with("sd_test_"), "a fresh database: {given}");
    assert_eq!(db[2], pg.url_for(db[1]), "on the given server");
    let listed = pg
        .psql(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{}'",
            db[1]
        ))
        .unwrap();
    assert_eq!(
        listed.trim(),
        "0",
        "the probe's database is dropped with it"
    );

    let empty = probe([
        ("SD_REDIS_URL", String::new()),
        ("SD_NATS_URL", " ".into()),
        ("SD_ETCD_URL", String::new()),
        ("SD_DATABASE_URL", String::new()),
    ]);
    assert_eq!(
        empty.lines().collect::<Vec<_>>(),
        [
            "redis error SD_REDIS_URL",
            "nats error SD_NATS_URL",
            "etcd error SD_ETCD_URL",
            "database error SD_DATABASE_URL"
        ]
    );
}

#[test]
fn unique_names_differ() {
    let a = sd_testkit::unique_name("t");
    let b = sd_testkit::unique_name("t");
    assert_ne!(a, b);
    assert!(a.starts_with("t-"));
}
