//! Calls [`sd_testkit::redis`], [`sd_testkit::database`], [`sd_testkit::nats`] and
//! [`sd_testkit::etcd`] once each and prints what they gave, one line each:
//! `kind env URL` (the server came from the environment), `kind owned URL` (the testkit
//! started one), `database DB_NAME URL` or `kind error VAR` for an [`sd_testkit::Error::Env`].
//! The testkit self-test runs it with the `SD_*_URL` variables set.

use std::io::Write;

use sd_testkit::Error;

fn line(kind: &str, result: sd_testkit::Result<(bool, String)>) -> Result<String, Error> {
    match result {
        Ok((true, url)) => Ok(format!("{kind} owned {url}")),
        Ok((false, url)) => Ok(format!("{kind} env {url}")),
        Err(Error::Env { var, .. }) => Ok(format!("{kind} error {var}")),
        Err(other) => Err(other),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::stdout().lock();
    let redis = sd_testkit::redis().map(|h| (h.server().is_some(), h.url().to_owned()));
    writeln!(out, "{}", line("redis", redis)?)?;
    let nats = sd_testkit::nats().map(|h| (h.server().is_some(), h.url().to_owned()));
    writeln!(out, "{}", line("nats", nats)?)?;
    let etcd = sd_testkit::etcd().map(|h| (h.server().is_some(), h.url().to_owned()));
    writeln!(out, "{}", line("etcd", etcd)?)?;
    match sd_testkit::database() {
        Ok(db) => {
            // The database is usable, and it is the one the handle names.
            let name = db.psql("CREATE TABLE probe (v int); SELECT current_database()")?;
            writeln!(out, "database {} {}", name.trim(), db.url())?;
        }
        Err(Error::Env { var, .. }) => writeln!(out, "database error {var}")?,
        Err(other) => return Err(other.into()),
    }
    Ok(())
}
