//! Leader election on etcd's election API (feature `etcd`).
//!
//! A campaign grants an etcd lease of the term's TTL and calls etcd's `Campaign`, which
//! puts a key under the election's name with that lease and answers once every earlier
//! candidate's key is gone. The term's token is the key's create revision: cluster-wide,
//! assigned by Raft, greater than every earlier candidate's. `observe` is etcd's
//! `Leader`; `renew` is one keep-alive and a check that our key is still there;
//! `resign` deletes our key and revokes the lease.
//!
//! [`Election::campaign`] waits inside one `Campaign` call for up to `max_wait`;
//! [`Election::try_campaign`] waits for at most the request timeout. While it waits the
//! candidate keeps its lease alive (a third of the TTL apart), so it keeps its place in
//! line however long the leader holds; its term counts from the last keep-alive before
//! the win. A candidate that gives up revokes its lease, which takes its key out of the
//! queue.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use etcd_client::{CampaignResponse, Client, Compare, CompareOp};
use tokio::time::Instant;

use crate::election::{Election, Leader, Term, check_ttl, validate, won};
use crate::error::{Error, Result};
use crate::etcd::{MIN_TTL, extend_key, release_key};
use crate::lease::{self, FencingToken, Release, RetryPolicy};
use crate::observe::ElectionMeters;

/// Elections on etcd. Cheap to clone (the client is a channel handle).
#[derive(Clone)]
pub struct EtcdElection {
    client: Client,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    retry: RetryPolicy,
    meters: ElectionMeters,
}

impl fmt::Debug for EtcdElection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdElection")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Options of an [`EtcdElection`]; [`build`](Self::build) checks them and names the
/// setter of a value out of range.
#[derive(Clone)]
pub struct EtcdElectionBuilder {
    election: EtcdElection,
    name: String,
}

impl fmt::Debug for EtcdElectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.election.fmt(f)
    }
}

impl EtcdElectionBuilder {
    /// The prefix of election names (default `sd-election/`). Not empty.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.election.prefix = prefix.into();
        self
    }

    /// How long a term lasts unless renewed (default 10 s; whole seconds, at least 1 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.election.ttl = ttl;
        self
    }

    /// How long [`Election::try_campaign`] waits for a `Campaign` answer (default 1 s;
    /// above zero).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.election.timeout = timeout;
        self
    }

    /// The retry policy (kept for [`Election::retry_policy`]; `campaign` waits in etcd).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.election.retry = retry;
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
    pub fn build(mut self) -> Result<EtcdElection> {
        if self.election.prefix.is_empty() {
            return Err(Error::InvalidConfig {
                field: "prefix",
                reason: "must not be empty: it keeps the election's keys apart from others".into(),
            });
        }
        self.election.timeout = lease::check_timeout(self.election.timeout)?;
        self.election.ttl = check_ttl(self.election.ttl, MIN_TTL)?;
        self.election.meters = ElectionMeters::new(&self.name, sd_core::observe::backend::ETCD);
        Ok(self.election)
    }
}

impl EtcdElection {
    /// Options for elections on `client`.
    pub fn builder(client: Client) -> EtcdElectionBuilder {
        EtcdElectionBuilder {
            election: EtcdElection {
                client,
                prefix: "sd-election/".into(),
                ttl: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                retry: lease::default_retry(),
                // `build` registers the named handles.
                meters: ElectionMeters::placeholder(sd_core::observe::backend::ETCD),
            },
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// One `Campaign` call that waits up to `wait`; [`Error::Held`] when it did not win.
    /// The candidate's lease is kept alive while it waits in line (a third of the TTL
    /// apart), so a wait longer than the TTL keeps its place; the term counts from the
    /// last keep-alive sent before the win.
    async fn campaign_within(&self, name: &str, value: &str, wait: Duration) -> Result<Term> {
        validate(name, value, self.ttl, MIN_TTL)?;
        let mut client = self.client.clone();
        let start = Instant::now();
        let secs = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let id = client.lease_grant(secs, None).await?.id();
        let waited = self.wait_in_line(name, value, id, start, wait).await;
        let (reply, renewed) = match waited {
            Ok(won) => won,
            Err(e) => {
                // Our key leaves the queue with the lease.
                let _ = client.lease_revoke(id).await;
                return Err(e);
            }
        };
        let elapsed = renewed.elapsed();
        let key = reply
            .leader()
            .and_then(|l| Some((l.key_str().ok()?.to_owned(), l.rev())));
        let won = key.and_then(|(key, rev)| {
            let token = FencingToken(u64::try_from(rev).ok()?);
            let mut term = won(name, value, token, self.ttl, key, (renewed, elapsed))?;
            term.lease.handle = id;
            Some(term)
        });
        match won {
            Some(term) => Ok(term),
            None => {
                let _ = client.lease_revoke(id).await;
                Err(Error::ValidityExhausted {
                    resource: name.to_owned(),
                    ttl: self.ttl,
                    elapsed,
                })
            }
        }
    }

    /// Waits in etcd's `Campaign` with lease `id` (granted at `granted`) until it wins or
    /// `wait` passes ([`Error::Held`]), keeping the lease alive meanwhile. Returns the
    /// answer and when the last keep-alive that the server confirmed was sent.
    async fn wait_in_line(
        &self,
        name: &str,
        value: &str,
        id: i64,
        granted: Instant,
        wait: Duration,
    ) -> Result<(CampaignResponse, Instant)> {
        let mut campaigner = self.client.clone();
        let (mut keeper, mut alive) = self.client.clone().lease_keep_alive(id).await?;
        let campaign = campaigner.campaign(self.name(name), value, id);
        tokio::pin!(campaign);
        let deadline = granted + wait;
        let every = self.ttl / 3;
        let mut beat = tokio::time::interval_at(granted + every, every);
        let mut renewed = granted;
        loop {
            tokio::select! {
                reply = &mut campaign => return Ok((reply?, renewed)),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Error::Held { resource: name.to_owned() });
                }
                _ = beat.tick() => {
                    let sent = Instant::now();
                    keeper.keep_alive().await?;
                    match alive.message().await? {
                        Some(reply) if reply.ttl() > 0 => renewed = sent,
                        // The lease ran out (the process stalled past it): our key left
                        // the queue.
                        _ => {
                            return Err(Error::ValidityExhausted {
                                resource: name.to_owned(),
                                ttl: self.ttl,
                                elapsed: granted.elapsed(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Our key is still there, created at our term's revision.
    fn mine(term: &Term) -> Compare {
        let rev = i64::try_from(term.token().0).unwrap_or(i64::MAX);
        Compare::create_revision(term.lease.holder.clone(), CompareOp::Equal, rev)
    }

    /// [`Election::try_campaign`]: waits for at most the request timeout.
    pub async fn try_campaign(&self, name: &str, value: &str) -> Result<Term> {
        self.campaign_within(name, value, self.timeout).await
    }

    /// [`Election::observe`].
    pub async fn observe(&self, name: &str) -> Result<Option<Leader>> {
        let mut client = self.client.clone();
        match client.leader(self.name(name)).await {
            Ok(reply) => Ok(reply.kv().and_then(|kv| {
                Some(Leader {
                    value: kv.value_str().ok()?.to_owned(),
                    token: FencingToken(u64::try_from(kv.create_revision()).ok()?),
                })
            })),
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Election::renew`].
    pub async fn renew(&self, term: &mut Term) -> Result<()> {
        let mine = Self::mine(term);
        extend_key(&self.client, mine, &mut term.lease, self.ttl).await
    }

    /// [`Election::resign`].
    pub async fn resign(&self, term: Term) -> Result<Release> {
        let valid = term.is_valid();
        let key = term.lease.holder.clone();
        let ended = release_key(&self.client, key, Self::mine(&term), &term.lease).await?;
        Ok(if valid { ended } else { Release::Expired })
    }
}

impl Election for EtcdElection {
    fn try_campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
    ) -> impl Future<Output = Result<Term>> + Send + 'a {
        self.meters
            .try_campaign(EtcdElection::try_campaign(self, name, value))
    }

    fn observe<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Future<Output = Result<Option<Leader>>> + Send + 'a {
        self.meters.observe(EtcdElection::observe(self, name))
    }

    async fn renew(&self, term: &mut Term) -> Result<()> {
        let result = self
            .meters
            .renew(EtcdElection::renew(self, &mut *term))
            .await;
        self.meters.renewed(term, &result);
        result
    }

    fn resign(&self, term: Term) -> impl Future<Output = Result<Release>> + Send + '_ {
        self.meters
            .resign(term, move |term| EtcdElection::resign(self, term))
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// One `Campaign` call that waits in etcd for up to `max_wait`, counted once.
    fn campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Term>> + Send + 'a {
        self.meters
            .try_campaign(self.campaign_waiting(name, value, max_wait))
    }
}

impl EtcdElection {
    /// [`Election::campaign`] uncounted: one `Campaign` call that waits up to `max_wait`,
    /// [`Error::WaitTimeout`] when it did not win.
    async fn campaign_waiting(&self, name: &str, value: &str, max_wait: Duration) -> Result<Term> {
        let start = Instant::now();
        match self.campaign_within(name, value, max_wait).await {
            Err(e @ Error::Held { .. }) => Err(Error::WaitTimeout {
                resource: name.to_owned(),
                waited: start.elapsed(),
                attempts: 1,
                last: Box::new(e),
            }),
            other => other,
        }
    }
}
