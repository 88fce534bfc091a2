//! The etcd backend (feature `etcd`): a lease plus a key, the key's create revision as
//! the fencing token.
//!
//! - **Acquire**: grant an etcd lease of the TTL (whole seconds, rounded up), then one
//!   transaction `if create_revision(key) == 0 then put(key, holder, lease)`. The
//!   transaction's revision is the key's create revision: cluster-wide, assigned by
//!   Raft, strictly increasing. That is the fencing token, with no clock assumption.
//!   A lost race revokes the new lease at once.
//! - **Extend** sends one keep-alive for the lease and checks the key still holds our
//!   value. etcd cannot change a lease's TTL: the lease is renewed to the TTL it was
//!   granted with (the `ttl` argument is validated, the granted TTL applies).
//! - **Release** deletes the key only if it holds our value, then revokes the lease.
//! - **Expiry**: the server expires the lease when no keep-alive arrives within its TTL
//!   and deletes the key with it. Jepsen (etcd 3.4.3) showed that etcd locks, like every
//!   lease lock, cannot guarantee mutual exclusion in an asynchronous network: fence the
//!   writes with the token.

use std::fmt;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Lease, Release, RetryPolicy};
use crate::observe::Meters;

/// etcd leases are whole seconds.
pub(crate) const MIN_TTL: Duration = Duration::from_secs(1);

/// Leases in etcd. Cheap to clone (the client is a channel handle).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::{Lock, etcd::EtcdLock};
///
/// let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
/// let lock = EtcdLock::builder(client).prefix("jobs/locks/").build()?;
/// let lease = lock.try_acquire("reindex", Duration::from_secs(10)).await?;
/// println!("token (create revision) {}", lease.token());
/// let _ = lock.release(lease).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdLock {
    client: Client,
    prefix: String,
    retry: RetryPolicy,
    meters: Meters,
}

impl fmt::Debug for EtcdLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLock")
            .field("prefix", &self.prefix)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

fn whole_seconds(ttl: Duration) -> i64 {
    let s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(s).unwrap_or(i64::MAX)
}

/// Options of an [`EtcdLock`]; [`build`](Self::build) checks them and names the setter
/// of a value out of range.
#[derive(Clone)]
pub struct EtcdLockBuilder {
    /// The lock with the options so far, unchecked.
    lock: EtcdLock,
    name: String,
}

impl fmt::Debug for EtcdLockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLockBuilder")
            .field("prefix", &self.lock.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdLockBuilder {
    /// The key prefix (default `sd-lock/`): keys are `{prefix}{resource}`, so end it
    /// with the separator your keyspace uses. Not empty.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.lock.prefix = prefix.into();
        self
    }

    /// The retry policy of [`crate::Lock::acquire`] (default
    /// [`lease::default_retry`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.lock = self.lock.with_retry(retry);
        self
    }

    /// The lock's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`, registered by [`build`](Self::build)) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The lock, or [`Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<EtcdLock> {
        if self.lock.prefix.is_empty() {
            return Err(Error::InvalidConfig {
                field: "prefix",
                reason: "must not be empty: it keeps the lock's keys apart from others".into(),
            });
        }
        Ok(EtcdLock {
            meters: Meters::new(&self.name, sd_core::observe::backend::ETCD),
            ..self.lock
        })
    }
}

impl EtcdLock {
    /// Leases under the key prefix `sd-lock/`, with the default retry policy.
    pub fn new(client: Client) -> Self {
        Self::with_meters(client, Meters::unnamed(sd_core::observe::backend::ETCD))
    }

    fn with_meters(client: Client, meters: Meters) -> Self {
        EtcdLock {
            client,
            prefix: "sd-lock/".into(),
            retry: lease::default_retry(),
            meters,
        }
    }

    /// The same lock with another retry policy for [`crate::Lock::acquire`].
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Options for leases on `client`.
    pub fn builder(client: Client) -> EtcdLockBuilder {
        EtcdLockBuilder {
            // `build` registers the named handles.
            lock: Self::with_meters(client, Meters::placeholder(sd_core::observe::backend::ETCD)),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    /// The key of `resource`.
    pub fn key(&self, resource: &str) -> String {
        format!("{}{resource}", self.prefix)
    }

    /// [`crate::Lock::try_acquire`]. TTLs are whole seconds, at least 1 s.
    pub async fn try_acquire(&self, resource: &str, ttl: Duration) -> Result<Lease> {
        lease::validate(resource, ttl, MIN_TTL)?;
        let owned = resource.to_owned();
        lease::acquire_in_task(self, move |this| async move {
            this.acquire_once(&owned, ttl).await
        })
        .await
    }

    async fn acquire_once(&self, resource: &str, ttl: Duration) -> Result<Lease> {
        put_new(&self.client, self.key(resource), resource, ttl)
            .await?
            .ok_or_else(|| Error::Held {
                resource: resource.to_owned(),
            })
    }

    /// [`crate::Lock::extend`]: one keep-alive, then a check that the key is still ours.
    pub async fn extend(&self, lease: &mut Lease, ttl: Duration) -> Result<()> {
        let mine = holds(self.key(&lease.resource), lease);
        extend_key(&self.client, mine, lease, ttl).await
    }

    /// [`crate::Lock::release`]: delete the key if ours, revoke the lease.
    pub async fn release(&self, lease: Lease) -> Result<Release> {
        let key = self.key(&lease.resource);
        release_key(&self.client, key.clone(), holds(key, &lease), &lease).await
    }
}

/// Grants an etcd lease of `ttl` and, in one transaction, puts `key` = a new holder
/// value under it if the key does not exist: the lease on `resource`, its token the
/// key's create revision. `None` when the key exists (the new etcd lease is revoked).
pub(crate) async fn put_new(
    client: &Client,
    key: String,
    resource: &str,
    ttl: Duration,
) -> Result<Option<Lease>> {
    let mut client = client.clone();
    let holder = lease::new_holder();
    let start = Instant::now();
    let id = client.lease_grant(whole_seconds(ttl), None).await?.id();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            holder.clone(),
            Some(PutOptions::new().with_lease(id)),
        )]);
    let reply = match client.txn(txn).await {
        Ok(r) => r,
        Err(e) => {
            let _ = client.lease_revoke(id).await;
            return Err(e.into());
        }
    };
    let elapsed = start.elapsed();
    if !reply.succeeded() {
        let _ = client.lease_revoke(id).await;
        return Ok(None);
    }
    let mut lease = Lease {
        resource: resource.to_owned(),
        token: FencingToken(0),
        ttl,
        valid_until: start,
        holder,
        handle: id,
    };
    let revision = reply.header().map(|h| h.revision()).unwrap_or(0);
    let (Ok(token), Some(validity)) = (u64::try_from(revision), lease::validity(ttl, elapsed))
    else {
        let _ = release_key(&client, key.clone(), holds(key, &lease), &lease).await;
        return Err(Error::ValidityExhausted {
            resource: resource.to_owned(),
            ttl,
            elapsed,
        });
    };
    lease.token = FencingToken(token);
    lease.valid_until = start + elapsed + validity;
    Ok(Some(lease))
}

/// The holder's check: `key` still holds `lease`'s holder value.
pub(crate) fn holds(key: String, lease: &Lease) -> Compare {
    Compare::value(key, CompareOp::Equal, lease.holder.clone())
}

/// A check that `mine` still holds, then one keep-alive for `lease`'s etcd lease. etcd
/// cannot change a lease's TTL: the granted TTL applies.
pub(crate) async fn extend_key(
    client: &Client,
    mine: Compare,
    lease: &mut Lease,
    ttl: Duration,
) -> Result<()> {
    lease::validate_ttl(ttl, MIN_TTL)?;
    let expired = || Error::LeaseExpired {
        resource: lease.resource.clone(),
    };
    // Past its validity the holder must assume another took over, whatever the server
    // still says.
    if !lease.is_valid() {
        return Err(expired());
    }
    let mut client = client.clone();
    let start = Instant::now();
    // Our key first: a term or lease given up (its key deleted) is over even while its
    // etcd lease is kept alive.
    if !client.txn(Txn::new().when([mine])).await?.succeeded() {
        return Err(expired());
    }
    let (mut keeper, mut stream) = client.lease_keep_alive(lease.handle).await?;
    keeper.keep_alive().await?;
    let granted = match stream.message().await? {
        Some(reply) if reply.ttl() > 0 => reply.ttl(),
        _ => return Err(expired()),
    };
    let granted = Duration::from_secs(u64::try_from(granted).unwrap_or(0));
    let ttl = lease.ttl.min(granted);
    match lease::validity(ttl, start.elapsed()) {
        Some(validity) => {
            lease.valid_until = Instant::now() + validity;
            lease.ttl = ttl;
            Ok(())
        }
        None => Err(expired()),
    }
}

/// Deletes `key` if `mine` holds, then revokes `lease`'s etcd lease.
pub(crate) async fn release_key(
    client: &Client,
    key: String,
    mine: Compare,
    lease: &Lease,
) -> Result<Release> {
    let mut client = client.clone();
    let txn = Txn::new().when([mine]).and_then([TxnOp::delete(key, None)]);
    let deleted = client.txn(txn).await?.succeeded();
    // The lease may be gone already (expired): that is not an error here.
    let _ = client.lease_revoke(lease.handle).await;
    Ok(if deleted {
        Release::Released
    } else {
        Release::Expired
    })
}

forward_lock!([] EtcdLock, retry: retry, meters: meters);
