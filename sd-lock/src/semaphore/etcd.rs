//! The etcd semaphore (feature `etcd`): one key per held slot, under an etcd lease.
//!
//! - **Acquire**: read the keys under `{prefix}{resource}/` (each a live slot: etcd
//!   deletes a key when its lease expires), apply
//!   [`free_slot`], then grant an etcd lease of the TTL and
//!   put the chosen slot's key in one transaction `if create_revision(key) == 0`. A slot
//!   taken in between fails the transaction: the attempt is contention and retries.
//!   The token is the key's create revision: cluster-wide, assigned by Raft, strictly
//!   increasing, with no clock assumption.
//! - **Renew** sends one keep-alive and checks the key still holds our value; etcd
//!   renews a lease to the TTL it was granted with. **Release** deletes the key only if
//!   it holds our value, then revokes the lease.
//! - The bound is kept by the slot keys: two holders never share a slot, and slots are
//!   `0..permits`. TTLs are whole seconds, at least 1 s.

use std::fmt;
use std::time::Duration;

use etcd_client::{Client, GetOptions};

use crate::error::Result;
use crate::etcd::{MIN_TTL, extend_key, holds, put_new, release_key};
use crate::lease::{self, Release, RetryPolicy};
use crate::observe::{Meters, SEMAPHORE};
use crate::semaphore::{Permit, check_permits, free_slot, full, grant_in_task};

/// Permits in etcd. Cheap to clone (the client is a channel handle).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::semaphore::{Semaphore, etcd::EtcdSemaphore};
///
/// let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
/// let workers = EtcdSemaphore::builder(client).permits(4).build()?;
/// let permit = workers.try_acquire("reindex", Duration::from_secs(10)).await?;
/// println!("slot {} token {}", permit.slot(), permit.token());
/// let _ = workers.release(permit).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdSemaphore {
    client: Client,
    prefix: String,
    permits: u32,
    retry: RetryPolicy,
    meters: Meters,
}

impl fmt::Debug for EtcdSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSemaphore")
            .field("prefix", &self.prefix)
            .field("permits", &self.permits)
            .finish_non_exhaustive()
    }
}

/// Options of an [`EtcdSemaphore`]; [`build`](Self::build) checks them and names the
/// setter of a value out of range.
#[derive(Clone)]
pub struct EtcdSemaphoreBuilder {
    semaphore: EtcdSemaphore,
    name: String,
}

impl fmt::Debug for EtcdSemaphoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.semaphore.fmt(f)
    }
}

impl EtcdSemaphoreBuilder {
    /// How many holders a resource may have at once (default 1; 1 to
    /// [`MAX_PERMITS`](crate::semaphore::MAX_PERMITS)).
    pub fn permits(mut self, permits: u32) -> Self {
        self.semaphore.permits = permits;
        self
    }

    /// The key prefix (default `sd-sem/`): slot keys are `{prefix}{resource}/{slot}`.
    /// Not empty.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.semaphore.prefix = prefix.into();
        self
    }

    /// The retry policy of [`Semaphore::acquire`](crate::semaphore::Semaphore::acquire)
    /// (default [`lease::default_retry`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.semaphore.retry = retry;
        self
    }

    /// The semaphore's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`, registered by [`build`](Self::build)) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The semaphore, or [`crate::Error::InvalidConfig`] naming the setter at fault.
    pub fn build(mut self) -> Result<EtcdSemaphore> {
        if self.semaphore.prefix.is_empty() {
            return Err(crate::Error::InvalidConfig {
                field: "prefix",
                reason: "must not be empty: it keeps the semaphore's keys apart from others".into(),
            });
        }
        self.semaphore.permits = check_permits(self.semaphore.permits)?;
        self.semaphore.meters = Meters::of(&SEMAPHORE, &self.name, sd_core::observe::backend::ETCD);
        Ok(self.semaphore)
    }
}

impl EtcdSemaphore {
    /// Options for permits on `client`.
    pub fn builder(client: Client) -> EtcdSemaphoreBuilder {
        EtcdSemaphoreBuilder {
            semaphore: EtcdSemaphore {
                client,
                prefix: "sd-sem/".into(),
                permits: 1,
                retry: lease::default_retry(),
                // `build` registers the named handles.
                meters: Meters::placeholder_of(&SEMAPHORE, sd_core::observe::backend::ETCD),
            },
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    fn slots_prefix(&self, resource: &str) -> String {
        format!("{}{resource}/", self.prefix)
    }

    /// The key of `resource`'s slot `slot`.
    pub fn key(&self, resource: &str, slot: u32) -> String {
        format!("{}{slot}", self.slots_prefix(resource))
    }

    /// [`Semaphore::try_acquire`](crate::semaphore::Semaphore::try_acquire).
    pub async fn try_acquire(&self, resource: &str, ttl: Duration) -> Result<Permit> {
        lease::validate(resource, ttl, MIN_TTL)?;
        let (this, owned) = (self.clone(), resource.to_owned());
        grant_in_task(self, async move { this.acquire_once(&owned, ttl).await }).await
    }

    async fn acquire_once(&self, resource: &str, ttl: Duration) -> Result<Permit> {
        let prefix = self.slots_prefix(resource);
        let held = self
            .client
            .clone()
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        // Every key present is live: etcd deletes it with its lease.
        let live = held.kvs().iter().filter_map(|kv| {
            let slot = kv.key_str().ok()?.strip_prefix(prefix.as_str())?;
            Some((slot.parse::<u32>().ok()?, true))
        });
        let Some(slot) = free_slot(live, self.permits, &false) else {
            return Err(full(resource, self.permits));
        };
        match put_new(&self.client, self.key(resource, slot), resource, ttl).await? {
            Some(lease) => Ok(Permit { lease, slot }),
            // Taken since the read: contention, like a full resource.
            None => Err(full(resource, self.permits)),
        }
    }

    /// [`Semaphore::renew`](crate::semaphore::Semaphore::renew): one keep-alive, then a
    /// check that the slot key is still ours.
    pub async fn renew(&self, permit: &mut Permit, ttl: Duration) -> Result<()> {
        let key = self.key(permit.resource(), permit.slot);
        let mine = holds(key, &permit.lease);
        extend_key(&self.client, mine, &mut permit.lease, ttl).await
    }

    /// [`Semaphore::release`](crate::semaphore::Semaphore::release). A permit past its
    /// validity is [`Release::Expired`] even if etcd had not yet expired its lease (etcd
    /// expires leases late); its key is deleted all the same.
    pub async fn release(&self, permit: Permit) -> Result<Release> {
        let key = self.key(permit.resource(), permit.slot);
        let valid = permit.is_valid();
        let mine = holds(key.clone(), &permit.lease);
        let released = release_key(&self.client, key, mine, &permit.lease).await?;
        Ok(if valid { released } else { Release::Expired })
    }
}

forward_semaphore!([] EtcdSemaphore);
