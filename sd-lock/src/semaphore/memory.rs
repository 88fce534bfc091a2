//! The in-memory semaphore: permits shared by the tasks of one process.
//!
//! One mutex over a map of resources to their leased slots, never held across an
//! `.await`; every call completes synchronously and returns a ready future. Time is
//! [`tokio::time::Instant`], so tests that pause tokio's clock drive expiry.

use std::collections::HashMap;
use std::future::{Future, ready};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sd_core::observe::operation;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Lease, Release, RetryPolicy};
use crate::observe::{Meters, SEMAPHORE};
use crate::semaphore::{Permit, check_permits, free_slot, full};

#[derive(Debug)]
struct Held {
    slot: u32,
    holder: String,
    expires_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    resources: HashMap<String, Vec<Held>>,
    /// One counter for every resource: tokens grow per resource a fortiori.
    last_token: u64,
}

/// Permits in this process. Cheap to clone; clones share the permits.
#[derive(Debug, Clone)]
pub struct MemorySemaphore {
    state: Arc<Mutex<State>>,
    permits: u32,
    retry: RetryPolicy,
    meters: Meters,
}

/// Options of a [`MemorySemaphore`]; [`build`](Self::build) checks them.
#[derive(Debug, Clone)]
pub struct MemorySemaphoreBuilder {
    permits: u32,
    retry: RetryPolicy,
    name: String,
}

impl MemorySemaphoreBuilder {
    /// How many holders a resource may have at once (default 1; 1 to
    /// [`MAX_PERMITS`](crate::semaphore::MAX_PERMITS)).
    pub fn permits(mut self, permits: u32) -> Self {
        self.permits = permits;
        self
    }

    /// The retry policy of [`Semaphore::acquire`](crate::semaphore::Semaphore::acquire)
    /// (default [`lease::default_retry`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The semaphore's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`, registered by [`build`](Self::build)) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The semaphore, or [`Error::InvalidConfig`] naming the setter at fault.
    pub fn build(self) -> Result<MemorySemaphore> {
        Ok(MemorySemaphore {
            state: Arc::default(),
            permits: check_permits(self.permits)?,
            retry: self.retry,
            meters: Meters::of(&SEMAPHORE, &self.name, sd_core::observe::backend::MEMORY),
        })
    }
}

impl MemorySemaphore {
    /// Options for an empty table of permits.
    pub fn builder() -> MemorySemaphoreBuilder {
        MemorySemaphoreBuilder {
            permits: 1,
            retry: lease::default_retry(),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the map consistent before it can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Synchronous [`Semaphore::try_acquire`](crate::semaphore::Semaphore::try_acquire).
    pub fn try_acquire_now(&self, resource: &str, ttl: Duration) -> Result<Permit> {
        lease::validate(resource, ttl, Duration::ZERO)?;
        let now = Instant::now();
        let mut state = self.state();
        let state = &mut *state;
        let held = state.resources.entry(resource.to_owned()).or_default();
        let Some(slot) = free_slot(
            held.iter().map(|h| (h.slot, h.expires_at)),
            self.permits,
            &now,
        ) else {
            return Err(full(resource, self.permits));
        };
        held.retain(|h| h.expires_at > now);
        state.last_token += 1;
        let holder = lease::new_holder();
        let expires_at = now + ttl;
        held.push(Held {
            slot,
            holder: holder.clone(),
            expires_at,
        });
        Ok(Permit {
            lease: Lease {
                resource: resource.to_owned(),
                token: FencingToken(state.last_token),
                ttl,
                valid_until: expires_at,
                holder,
                handle: 0,
            },
            slot,
        })
    }

    /// Synchronous [`Semaphore::renew`](crate::semaphore::Semaphore::renew).
    pub fn renew_now(&self, permit: &mut Permit, ttl: Duration) -> Result<()> {
        lease::validate_ttl(ttl, Duration::ZERO)?;
        let now = Instant::now();
        let mut state = self.state();
        let mine = state.resources.get_mut(permit.resource()).and_then(|held| {
            held.iter_mut()
                .find(|h| h.holder == permit.lease.holder && h.expires_at > now)
        });
        match mine {
            Some(h) => {
                h.expires_at = now + ttl;
                permit.lease.valid_until = h.expires_at;
                permit.lease.ttl = ttl;
                Ok(())
            }
            None => Err(Error::LeaseExpired {
                resource: permit.resource().to_owned(),
            }),
        }
    }

    /// Synchronous [`Semaphore::release`](crate::semaphore::Semaphore::release).
    pub fn release_now(&self, permit: &Permit) -> Release {
        let now = Instant::now();
        let mut state = self.state();
        let Some(held) = state.resources.get_mut(permit.resource()) else {
            return Release::Expired;
        };
        let Some(i) = held.iter().position(|h| h.holder == permit.lease.holder) else {
            return Release::Expired;
        };
        let live = held.swap_remove(i).expires_at > now;
        if held.is_empty() {
            state.resources.remove(permit.resource());
        }
        if live {
            Release::Released
        } else {
            Release::Expired
        }
    }

    /// Live permits on `resource`, for tests and metrics.
    pub fn held(&self, resource: &str) -> usize {
        let now = Instant::now();
        self.state()
            .resources
            .get(resource)
            .map_or(0, |held| held.iter().filter(|h| h.expires_at > now).count())
    }
}

impl crate::semaphore::Semaphore for MemorySemaphore {
    fn permits(&self) -> u32 {
        self.permits
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Permit>> + Send + 'a {
        ready(
            self.meters
                .try_acquire_now(|| self.try_acquire_now(resource, ttl)),
        )
    }

    fn renew<'a>(
        &'a self,
        permit: &'a mut Permit,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        let renewed = self
            .meters
            .span(operation::EXTEND)
            .in_scope(|| self.renew_now(permit, ttl));
        self.meters.extended(&renewed);
        ready(renewed)
    }

    fn release(&self, permit: Permit) -> impl Future<Output = Result<Release>> + Send + '_ {
        let released = self
            .meters
            .span(operation::RELEASE)
            .in_scope(|| self.release_now(&permit));
        ready(Ok(released))
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Permit>> + Send + 'a {
        self.meters
            .acquire(self.retry, resource, max_wait, move || {
                ready(self.try_acquire_now(resource, ttl))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semaphore::Semaphore;

    #[tokio::test(start_paused = true)]
    async fn expiry_frees_a_slot_for_a_newer_token() {
        let sem = MemorySemaphore::builder().permits(2).build().unwrap();
        let ttl = Duration::from_millis(100);
        let a = sem.try_acquire("r", ttl).await.unwrap();
        let mut b = sem.try_acquire("r", ttl).await.unwrap();
        assert_eq!((a.slot(), b.slot()), (0, 1));
        assert!(matches!(
            sem.try_acquire("r", ttl).await,
            Err(Error::NoPermit { permits: 2, .. })
        ));
        tokio::time::advance(Duration::from_millis(60)).await;
        sem.renew(&mut b, ttl).await.unwrap();
        tokio::time::advance(Duration::from_millis(60)).await;
        // `a` expired, `b` was renewed: slot 0 goes to a newer token.
        let c = sem.try_acquire("r", ttl).await.unwrap();
        assert_eq!(c.slot(), 0);
        assert!(c.token() > b.token());
        assert_eq!(sem.release(a).await.unwrap(), Release::Expired);
        assert_eq!(sem.held("r"), 2);
        assert_eq!(sem.release(b).await.unwrap(), Release::Released);
        assert_eq!(sem.release(c).await.unwrap(), Release::Released);
        assert_eq!(sem.held("r"), 0);
    }
}
