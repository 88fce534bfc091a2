use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while starting or driving a test server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server binary is not installed. Tests fail loudly on this; they never skip.
    #[error(
        "`{binary}` was not found (looked in {searched}); install it with \
         `apt-get install -y {package}`, or run scripts/test.sh as root, which installs it"
    )]
    MissingBinary {
        /// The program that was looked for.
        binary: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
        /// Where it was looked for.
        searched: String,
    },
    /// A server binary that is built from crates.io (not a Debian package) is not
    /// installed. Tests fail loudly on this; they never skip.
    #[error(
        "`{binary}` was not found (looked in {searched}); build it with `{install}` (about \
         12 minutes), or run scripts/test.sh, which builds it once into ~/.cache/sd-tools"
    )]
    MissingCargoBinary {
        /// The program that was looked for.
        binary: &'static str,
        /// The command that builds it.
        install: &'static str,
        /// Where it was looked for.
        searched: String,
    },
    /// The server did not become ready in time.
    #[error(
        "{server} on port {port} was not ready after {waited_ms} ms; last lines of its log:\n{log}"
    )]
    NotReady {
        /// Which kind of server.
        server: &'static str,
        /// Its port.
        port: u16,
        /// How long the testkit waited.
        waited_ms: u128,
        /// The tail of the server's own log.
        log: String,
    },
    /// The server process exited while it was expected to run.
    #[error("{server} exited during start-up ({status}); last lines of its log:\n{log}")]
    Exited {
        /// Which kind of server.
        server: &'static str,
        /// Its exit status.
        status: String,
        /// The tail of the server's own log.
        log: String,
    },
    /// A helper command (initdb, psql, ...) failed.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line that ran.
        command: String,
        /// What it printed.
        output: String,
    },
    /// A server answered something the testkit did not expect.
    #[error("{server} answered unexpectedly: {detail}")]
    Protocol {
        /// Which kind of server.
        server: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A fault control was used in a state where it makes no sense.
    #[error("cannot {action}: {reason}")]
    State {
        /// The control that was called.
        action: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the testkit was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A server that runs as another user (PostgreSQL under root runs as `postgres`)
    /// cannot reach its directory because a parent directory is closed to other users.
    #[error(
        "{server} runs as the `{user}` user, which cannot enter {dir} (a parent directory \
         is not searchable by other users, as /root usually is); set SD_TESTKIT_DIR to a \
         directory under /tmp"
    )]
    Unreachable {
        /// Which kind of server.
        server: &'static str,
        /// The user it runs as.
        user: &'static str,
        /// The directory it cannot reach.
        dir: PathBuf,
    },
    /// An environment variable holds something unusable.
    #[error("environment variable {var} is set but {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A path that must exist does not.
    #[error("{0} does not exist")]
    NoPath(PathBuf),
}

/// The testkit's result type.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
