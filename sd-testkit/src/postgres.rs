//! PostgreSQL: a throwaway cluster per handle, and a fresh database per test.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result, io_err};
use crate::process::{self, Process, Spec};

/// A PostgreSQL server owned by the test: its own data directory (copied from a cached
/// `initdb` template), `fsync=off`, trust authentication, loopback only.
///
/// As root it runs as the `postgres` user, because PostgreSQL refuses to run as root.
#[derive(Debug)]
pub struct PostgresServer {
    process: Process,
    bin: Binaries,
}

#[derive(Debug, Clone)]
struct Binaries {
    psql: PathBuf,
}

impl PostgresServer {
    /// Starts a new PostgreSQL server and waits until it accepts connections.
    pub fn start() -> Result<Self> {
        crate::retry_on_port_clash(Self::spawn)
    }

    fn spawn() -> Result<Self> {
        let postgres = find_postgres()?;
        let bin_dir = postgres.parent().map(Path::to_path_buf).unwrap_or_default();
        let extra = [bin_dir.clone()];
        let initdb = process::find_binary("initdb", "postgresql", &extra)?;
        let pg_isready = process::find_binary("pg_isready", "postgresql-client", &extra)?;
        let psql = process::find_binary("psql", "postgresql-client", &extra)?;
        let run_as = postgres_user()?;
        if run_as.is_some() {
            let root = process::root_dir()?;
            if !process::searchable_by_others(&root) {
                return Err(Error::Unreachable {
                    server: "postgres",
                    user: "postgres",
                    dir: root,
                });
            }
        }

        let template = template(&postgres, &initdb, run_as)?;
        let port = crate::ports::free_port()?;
        let dir = process::server_dir("postgres")?;
        let data = dir.join("data");
        let socket = dir.join("socket");
        fs::create_dir_all(&socket).map_err(io_err("creating the socket directory"))?;
        chown(&socket, run_as)?;
        copy_template(&template, &data)?;

        let mut args: Vec<OsString> = vec!["-D".into(), data.clone().into()];
        args.extend(["-p".into(), port.to_string().into()]);
        args.extend(["-k".into(), socket.into()]);
        for setting in [
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=300",
            "shared_buffers=32MB",
            "dynamic_shared_memory_type=mmap",
            "max_prepared_transactions=10",
        ] {
            args.extend(["-c".into(), setting.into()]);
        }
        let reset_template = template.clone();
        let ready = Arc::new(move |port: u16| {
            Ok(Command::new(&pg_isready)
                .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
                .arg("-p")
                .arg(port.to_string())
                .status()
                .is_ok_and(|s| s.success()))
        });
        let process = Process::start(Spec {
            run_as,
            // SIGINT is PostgreSQL's "fast" shutdown: clean, and quick with fsync off.
            stop_signal: libc::SIGINT,
            reset: Arc::new(move |data| copy_template(&reset_template, data)),
            ..Spec::new("postgres", postgres, args, port, dir, data, ready)
        })?;
        Ok(PostgresServer {
            process,
            bin: Binaries { psql },
        })
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`, the maintenance database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn url_for(&self, name: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.process.port()
        )
    }

    /// Creates a new, empty database that is dropped with the returned handle.
    pub fn create_database(&self) -> Result<TestDatabase> {
        TestDatabase::create(&self.url(), &self.bin.psql)
    }

    /// Runs SQL with `psql` and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        psql(&self.bin.psql, &self.url(), sql)
    }
}

crate::fault_controls!(PostgresServer);

/// A database of its own for one test, dropped (`WITH (FORCE)`) when the handle drops.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
    psql: PathBuf,
    // Keeps a per-test server alive as long as its database; `None` for shared ones.
    _server: Option<Arc<PostgresServer>>,
}

impl TestDatabase {
    pub(crate) fn create(admin_url: &str, psql_bin: &Path) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "sd_test_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            crate::nonce() % 1_000_000
        );
        psql(psql_bin, admin_url, &format!("CREATE DATABASE \"{name}\""))?;
        Ok(TestDatabase {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
            psql: psql_bin.to_owned(),
            _server: None,
        })
    }

    /// The connection URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs SQL in this database with `psql` and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        psql(&self.psql, &self.url, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = psql(
            &self.psql,
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        );
    }
}

/// Replaces the database part of a `postgres://` URL, keeping host, user and query.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

pub(crate) fn psql(bin: &Path, url: &str, sql: &str) -> Result<String> {
    process::run(
        Command::new(bin)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "10"),
    )
}

/// The `psql` binary, for databases on a server given by URL.
pub(crate) fn psql_binary() -> Result<PathBuf> {
    let extra: Vec<PathBuf> = find_postgres()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .into_iter()
        .collect();
    process::find_binary("psql", "postgresql-client", &extra)
}

/// `postgres` on PATH, or in the newest `/usr/lib/postgresql/<major>/bin` (Debian).
fn find_postgres() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    let extra: Vec<PathBuf> = versions.into_iter().rev().map(|(_, p)| p).collect();
    process::find_binary("postgres", "postgresql", &extra)
}

/// (uid, gid) of the `postgres` user when running as root; `None` otherwise.
fn postgres_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .map(Some)
        .ok_or(Error::MissingBinary {
            binary: "postgres (the `postgres` user, needed to run it as root)",
            package: "postgresql",
            searched: "/etc/passwd".into(),
        })
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", path.display()))),
        None => Ok(()),
    }
}

/// The initdb'd template for this PostgreSQL build, created once per machine.
/// `initdb` takes about a second; copying its result takes a tenth of that.
fn template(postgres: &Path, initdb: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf> {
    let version = process::run(Command::new(postgres).arg("--version"))?;
    let version: String = version
        .split_whitespace()
        .last()
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    let uid = owner.map_or(0, |(uid, _)| uid);
    let root = process::root_dir()?;
    let template = root.join(format!(
        "template-pg{version}u{uid}-{}",
        crate::CACHE_FORMAT
    ));
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    let building = process::server_dir("pgbuild")?;
    chown(&building, owner)?;
    let data = building.join("data");
    let mut command = Command::new(initdb);
    command.arg("-D").arg(&data).args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    if let Some((uid, gid)) = owner {
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, gid);
    }
    process::run(&mut command)?;
    // Another test binary may have won the race; either template is as good.
    if fs::rename(&data, &template).is_err() && !template.join("PG_VERSION").exists() {
        return Err(Error::NoPath(template));
    }
    let _ = fs::remove_dir_all(&building);
    Ok(template)
}

fn copy_template(template: &Path, data: &Path) -> Result<()> {
    if data.exists() {
        fs::remove_dir_all(data).map_err(io_err(format!("removing {}", data.display())))?;
    }
    process::run(Command::new("cp").arg("-a").arg(template).arg(data)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5/old?sslmode=disable", "new"),
            "postgres://u:p@h:5/new?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:5", "new"), "postgres://h:5/new");
        assert_eq!(with_database("postgresql://h/old", "x"), "postgresql://h/x");
    }
}
