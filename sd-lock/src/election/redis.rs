//! Leader election on one Redis server (feature `redis`).
//!
//! The term is a hash `{holder, value, token}` at `{prefix}:{{name}}` that expires with
//! the term. Campaign is one script: if no term is live, write ours and hand out the
//! token `max(last + 1, server µs)` from `{prefix}:{{name}}:token`. Renew and resign
//! compare the holder. Guarantees as [`crate::redis::RedisLock`]: one leader while the
//! server keeps its data; after a restart that lost the term, tokens still grow (they
//! follow the server clock), so the fence refuses the old leader's writes.

use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionLike;
use sd_core::KeyPrefix;
use sd_core::redis::{Script, ScriptCall};
use tokio::time::Instant;

use crate::election::{Leader, Term, check_ttl, validate, won};
use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Release, RetryPolicy};
use crate::observe::ElectionMeters;

static CAMPAIGN: Script = Script::new(include_str!("redis/campaign.lua"));
static RENEW: Script = Script::new(include_str!("redis/renew.lua"));
static RESIGN: Script = Script::new(include_str!("redis/resign.lua"));

/// Elections on one Redis server. Cheap to clone.
#[derive(Clone)]
pub struct RedisElection<C> {
    conn: C,
    prefix: KeyPrefix,
    ttl: Duration,
    timeout: Duration,
    retry: RetryPolicy,
    meters: ElectionMeters,
}

impl<C> fmt::Debug for RedisElection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisElection")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Options of a [`RedisElection`]; [`build`](Self::build) checks them and names the
/// setter of a value out of range.
pub struct RedisElectionBuilder<C> {
    conn: C,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    retry: RetryPolicy,
    name: String,
}

impl<C> fmt::Debug for RedisElectionBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisElectionBuilder")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisElectionBuilder<C> {
    /// The key prefix (default `leader`). No `{`, `}` or trailing `:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a term lasts unless renewed (default 10 s; 3 ms to 24.8 days).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long one request may take (default 1 s; above zero).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The retry policy of [`Election::campaign`](crate::election::Election::campaign).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The election instance's name (default `"default"`): the `sd.name` label of its
    /// metrics (feature `metrics`, registered by [`build`](Self::build)) and field of its
    /// spans. Metrics carry no election name: give each election you watch an instance
    /// of its own.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The election, or [`Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<RedisElection<C>> {
        Ok(RedisElection {
            conn: self.conn,
            prefix: KeyPrefix::parse("prefix", &self.prefix)?,
            ttl: check_ttl(self.ttl, Duration::from_millis(1))?,
            timeout: lease::check_timeout(self.timeout)?,
            retry: self.retry,
            meters: ElectionMeters::new(&self.name, sd_core::observe::backend::REDIS),
        })
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisElection<C> {
    /// Options for elections on the server behind `conn`.
    pub fn builder(conn: C) -> RedisElectionBuilder<C> {
        RedisElectionBuilder {
            conn,
            prefix: "leader".into(),
            ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            retry: lease::default_retry(),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    /// The key of election `name`'s term.
    pub fn key(&self, name: &str) -> String {
        self.prefix.tagged(name)
    }

    async fn run<T: redis::FromRedisValue>(&self, call: ScriptCall<'_>) -> Result<T> {
        let mut conn = self.conn.clone();
        let span = tracing::debug_span!("election.redis");
        Ok(sd_core::deadline::timeout(self.timeout, span, call.invoke(&mut conn)).await??)
    }

    /// [`Election::try_campaign`](crate::election::Election::try_campaign).
    pub async fn try_campaign(&self, name: &str, value: &str) -> Result<Term> {
        validate(name, value, self.ttl, Duration::from_millis(1))?;
        let key = self.key(name);
        let holder = lease::new_holder();
        let mut call = CAMPAIGN.call(2);
        call.arg(&key)
            .arg(format!("{key}:token"))
            .arg(&holder)
            .arg(value)
            .arg(lease::ceil_millis(self.ttl));
        let start = Instant::now();
        let Some(token) = self.run::<Option<u64>>(call).await? else {
            return Err(Error::Held {
                resource: name.to_owned(),
            });
        };
        let elapsed = start.elapsed();
        let token = FencingToken(token);
        match won(
            name,
            value,
            token,
            self.ttl,
            holder.clone(),
            (start, elapsed),
        ) {
            Some(term) => Ok(term),
            None => {
                let mut call = RESIGN.call(1);
                call.arg(&key).arg(&holder);
                let _ = self.run::<i64>(call).await;
                Err(Error::ValidityExhausted {
                    resource: name.to_owned(),
                    ttl: self.ttl,
                    elapsed,
                })
            }
        }
    }

    /// [`Election::observe`](crate::election::Election::observe).
    pub async fn observe(&self, name: &str) -> Result<Option<Leader>> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key(name)).arg("value").arg("token");
        let span = tracing::debug_span!("election.redis");
        let (value, token): (Option<String>, Option<u64>) =
            sd_core::deadline::timeout(self.timeout, span, cmd.query_async(&mut conn)).await??;
        Ok(value.zip(token).map(|(value, token)| Leader {
            value,
            token: FencingToken(token),
        }))
    }

    /// [`Election::renew`](crate::election::Election::renew).
    pub async fn renew(&self, term: &mut Term) -> Result<()> {
        let mut call = RENEW.call(1);
        call.arg(self.key(term.name()))
            .arg(&term.lease.holder)
            .arg(lease::ceil_millis(self.ttl));
        let start = Instant::now();
        let renewed: i64 = self.run(call).await?;
        let elapsed = start.elapsed();
        match (renewed, lease::validity(self.ttl, elapsed)) {
            (1, Some(validity)) => {
                term.lease.valid_until = start + elapsed + validity;
                Ok(())
            }
            _ => Err(Error::LeaseExpired {
                resource: term.name().to_owned(),
            }),
        }
    }

    /// [`Election::resign`](crate::election::Election::resign).
    pub async fn resign(&self, term: Term) -> Result<Release> {
        let mut call = RESIGN.call(1);
        call.arg(self.key(term.name())).arg(&term.lease.holder);
        let ended: i64 = self.run(call).await?;
        Ok(if ended == 1 {
            Release::Released
        } else {
            Release::Expired
        })
    }
}

forward_election!([C: ConnectionLike + Clone + Send + Sync + 'static] RedisElection<C>);
