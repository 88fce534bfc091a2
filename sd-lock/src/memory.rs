//! The in-memory backend: leases shared by the tasks of one process.
//!
//! One mutex over a map, held for a few hash operations and never across an `.await`;
//! every operation completes synchronously and returns a ready future. Time is
//! [`tokio::time::Instant`], so tests that pause tokio's clock drive expiry without
//! sleeping.

use std::collections::HashMap;
use std::future::{Future, ready};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Lease, Release, RetryPolicy};
use crate::observe::Meters;
use sd_core::observe::backend;

/// Expired entries are swept when the map has grown by this many since the last sweep.
const SWEEP_EVERY: usize = 1024;

#[derive(Debug)]
struct Entry {
    holder: String,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    leases: HashMap<String, Entry>,
    /// One counter for every resource: strictly increasing per resource a fortiori, and
    /// it survives the entry's removal.
    last_token: u64,
    sweep_at: usize,
}

/// Leases in this process. Cheap to clone; clones share the leases.
#[derive(Debug, Clone)]
pub struct MemoryLock {
    state: Arc<Mutex<State>>,
    retry: RetryPolicy,
    meters: Meters,
}

impl Default for MemoryLock {
    fn default() -> Self {
        MemoryLock {
            state: Arc::default(),
            retry: lease::default_retry(),
            meters: Meters::unnamed(backend::MEMORY),
        }
    }
}

impl MemoryLock {
    /// An empty lock table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same table with another retry policy for [`crate::Lock::acquire`].
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Names the lock (default `"default"`): the `sd.name` label of its metrics (feature
    /// `metrics`, registered again with the recorder installed now) and field of its
    /// spans.
    pub fn with_name(mut self, name: &str) -> Self {
        self.meters = Meters::new(name, backend::MEMORY);
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the mutex cannot leave the map half-updated: every
        // critical section is a single insert or remove.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Synchronous [`crate::Lock::try_acquire`].
    pub fn try_acquire_now(&self, resource: &str, ttl: Duration) -> Result<Lease> {
        lease::validate(resource, ttl, Duration::ZERO)?;
        let now = Instant::now();
        let mut state = self.state();
        if let Some(e) = state.leases.get(resource)
            && e.expires_at > now
        {
            return Err(Error::Held {
                resource: resource.to_owned(),
            });
        }
        if state.leases.len() >= state.sweep_at {
            state.leases.retain(|_, e| e.expires_at > now);
            state.sweep_at = state.leases.len() + SWEEP_EVERY;
        }
        state.last_token += 1;
        let token = FencingToken(state.last_token);
        let holder = lease::new_holder();
        let expires_at = now + ttl;
        state.leases.insert(
            resource.to_owned(),
            Entry {
                holder: holder.clone(),
                expires_at,
            },
        );
        Ok(Lease {
            resource: resource.to_owned(),
            token,
            ttl,
            // One clock, in one process: no drift to allow for.
            valid_until: expires_at,
            holder,
            handle: 0,
        })
    }

    /// Synchronous [`crate::Lock::extend`].
    pub fn extend_now(&self, lease: &mut Lease, ttl: Duration) -> Result<()> {
        lease::validate_ttl(ttl, Duration::ZERO)?;
        let now = Instant::now();
        let mut state = self.state();
        match state.leases.get_mut(&lease.resource) {
            Some(e) if e.holder == lease.holder && e.expires_at > now => {
                e.expires_at = now + ttl;
                lease.valid_until = e.expires_at;
                lease.ttl = ttl;
                Ok(())
            }
            _ => Err(Error::LeaseExpired {
                resource: lease.resource.clone(),
            }),
        }
    }

    /// Synchronous [`crate::Lock::release`].
    pub fn release_now(&self, lease: &Lease) -> Release {
        let now = Instant::now();
        let mut state = self.state();
        match state.leases.get(&lease.resource) {
            Some(e) if e.holder == lease.holder => {
                let live = e.expires_at > now;
                state.leases.remove(&lease.resource);
                if live {
                    Release::Released
                } else {
                    Release::Expired
                }
            }
            _ => Release::Expired,
        }
    }

    /// Live (unexpired) leases, for tests and metrics.
    pub fn held(&self) -> usize {
        let now = Instant::now();
        self.state()
            .leases
            .values()
            .filter(|e| e.expires_at > now)
            .count()
    }
}

impl crate::Lock for MemoryLock {
    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Lease>> + Send + 'a {
        ready(
            self.meters
                .try_acquire_now(|| self.try_acquire_now(resource, ttl)),
        )
    }

    fn extend<'a>(
        &'a self,
        lease: &'a mut Lease,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        let extended = self.extend_now(lease, ttl);
        self.meters.extended(&extended);
        ready(extended)
    }

    fn release(&self, lease: Lease) -> impl Future<Output = Result<Release>> + Send + '_ {
        ready(Ok(self.release_now(&lease)))
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Lease>> + Send + 'a {
        self.meters
            .acquire(self.retry, resource, max_wait, move || {
                ready(self.try_acquire_now(resource, ttl))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lock;

    #[tokio::test(start_paused = true)]
    async fn expiry_extend_release() {
        let lock = MemoryLock::new();
        let ttl = Duration::from_millis(100);
        let mut a = lock.try_acquire("r", ttl).await.unwrap();
        assert!(matches!(
            lock.try_acquire("r", ttl).await,
            Err(Error::Held { .. })
        ));
        lock.extend(&mut a, ttl).await.unwrap();
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(matches!(
            lock.extend(&mut a, ttl).await,
            Err(Error::LeaseExpired { .. })
        ));
        let b = lock.try_acquire("r", ttl).await.unwrap();
        assert!(b.token() > a.token());
        assert_eq!(lock.release(a).await.unwrap(), Release::Expired);
        assert_eq!(lock.release(b.clone()).await.unwrap(), Release::Released);
        assert_eq!(lock.release(b).await.unwrap(), Release::Expired);
        assert_eq!(lock.held(), 0);
    }
}
