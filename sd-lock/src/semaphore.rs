//! A fenced counting semaphore: at most `permits` holders of a named resource at once,
//! each holding a lease on one permit with a fencing token.
//!
//! A permit is one of the resource's `permits` slots, numbered `0..permits`. The rule
//! that decides who may take one ([`free_slot`]) lives here once, pure: given the slots
//! held and their expiry times, and now, a new holder gets the lowest slot that is not
//! held by a live lease, and only while fewer than `permits` leases are live. Each
//! backend applies it where the data lives: a mutex in memory, one Lua script over a
//! sorted set in Redis, a transaction in PostgreSQL, a compare-and-put in etcd.
//!
//! **Fencing a semaphore.** Every permit's token is greater than every token granted
//! before on the resource, so one fence per *slot* refuses the writes of a holder
//! whose slot was taken over: fence with [`Permit::fence_resource`] (`resource#slot`)
//! and [`Permit::token`]. At any time each slot's fence accepts one holder's writes,
//! so at most `permits` holders have their writes accepted at once, even when a holder
//! pauses past its lease.
//!
//! Every client of a resource must use the same `permits`; slots beyond a client's
//! count still count against it while they are live.
//!
//! ```
//! use std::time::Duration;
//! use sd_lock::{Release, fence::FencedRegister};
//! use sd_lock::semaphore::{Semaphore, memory::MemorySemaphore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let calls = MemorySemaphore::builder().permits(2).build()?;
//! let a = calls.try_acquire("payments", Duration::from_secs(10)).await?;
//! let b = calls.try_acquire("payments", Duration::from_secs(10)).await?;
//! assert_ne!(a.slot(), b.slot());
//! assert!(calls.try_acquire("payments", Duration::from_secs(10)).await.is_err());
//!
//! // A write through the permit's slot fence.
//! let slot0 = FencedRegister::new(0_u32);
//! slot0.write(a.token(), 1)?;
//! assert_eq!(calls.release(a).await?, Release::Released);
//! let c = calls.try_acquire("payments", Duration::from_secs(10)).await?;
//! assert_eq!(c.slot(), 0);
//! assert!(c.token() > b.token());
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Lease, Release, RetryPolicy};

/// The most permits a semaphore may have.
pub const MAX_PERMITS: u32 = 4096;

/// The lowest slot a new holder may take, or `None` when the resource is full.
///
/// `held` lists the slots that have a lease and when each lease expires (in any unit,
/// on the clock `now` is read from); a lease is live while `expires_at > now`. A slot is
/// granted only while fewer than `permits` leases are live, and it is the lowest slot in
/// `0..permits` without a live lease.
pub fn free_slot<T: Ord>(
    held: impl IntoIterator<Item = (u32, T)>,
    permits: u32,
    now: &T,
) -> Option<u32> {
    let live: BTreeSet<u32> = held
        .into_iter()
        .filter(|(_, expires_at)| expires_at > now)
        .map(|(slot, _)| slot)
        .collect();
    if u32::try_from(live.len()).unwrap_or(u32::MAX) >= permits {
        return None;
    }
    (0..permits).find(|slot| !live.contains(slot))
}

/// Checks the `permits` setter's value: 1 to [`MAX_PERMITS`].
pub(crate) fn check_permits(permits: u32) -> Result<u32> {
    if permits == 0 || permits > MAX_PERMITS {
        return Err(Error::InvalidConfig {
            field: "permits",
            reason: format!("is {permits}; give 1 to {MAX_PERMITS} holders at once").into(),
        });
    }
    Ok(permits)
}

/// A permit: one of a resource's slots, held under a lease with a fencing token.
///
/// Like a [`Lease`], it holds no connection and does nothing on drop: release it with
/// [`Semaphore::release`] or let it expire.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Permit {
    pub(crate) lease: Lease,
    pub(crate) slot: u32,
}

impl Permit {
    /// The resource.
    pub fn resource(&self) -> &str {
        self.lease.resource()
    }

    /// The slot held, in `0..permits`.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The fencing token: greater than every token granted before on the resource.
    pub fn token(&self) -> FencingToken {
        self.lease.token()
    }

    /// The name to fence this permit's writes under: `resource#slot`. One fence per slot
    /// admits one holder at a time, so at most `permits` holders write at once.
    pub fn fence_resource(&self) -> String {
        format!("{}#{}", self.lease.resource(), self.slot)
    }

    /// The lease underneath (TTL, validity, holder id).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether the lease is still valid now (see [`Lease::is_valid`]).
    pub fn is_valid(&self) -> bool {
        self.lease.is_valid()
    }

    /// The instant until which this holder may assume it holds the permit.
    pub fn valid_until(&self) -> Instant {
        self.lease.valid_until()
    }
}

/// A counting semaphore on named resources: at most [`Semaphore::permits`] holders of
/// a resource at once, each with a leased permit and a fencing token.
///
/// Contract every backend honours:
///
/// - `try_acquire` grants a permit only while fewer than `permits` live permits exist on
///   the resource, on the lowest free slot ([`free_slot`]); its token is greater than
///   every token granted before on the resource. Full is [`Error::NoPermit`].
/// - `renew` resets the permit's expiry to `ttl` from now if, and only if, it is still
///   this holder's; otherwise [`Error::LeaseExpired`]. Slot and token do not change.
/// - `release` frees the permit only if it is still this holder's, and says whether it
///   was live ([`Release::Released`]) or had expired.
/// - Bad input fails before any round trip, as for [`crate::Lock`].
///
/// A cancelled `try_acquire` leaves no permit behind: the network backends grant in a
/// task of their own and release in the background what was granted after the caller
/// gave up.
pub trait Semaphore: Send + Sync {
    /// How many holders a resource may have at once.
    fn permits(&self) -> u32;

    /// Tries once to take a permit on `resource` for `ttl`.
    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Permit>> + Send + 'a;

    /// Renews a permit we hold to `ttl` from now.
    fn renew<'a>(
        &'a self,
        permit: &'a mut Permit,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send + 'a;

    /// Gives a permit back (only if it is still ours).
    fn release(&self, permit: Permit) -> impl Future<Output = Result<Release>> + Send + '_;

    /// How [`Semaphore::acquire`] waits between attempts.
    fn retry_policy(&self) -> RetryPolicy {
        lease::default_retry()
    }

    /// Takes a permit, retrying while the resource is full as [`Semaphore::retry_policy`]
    /// says, for at most `max_wait` (one attempt at least); [`Error::WaitTimeout`] then.
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Permit>> + Send + 'a {
        crate::retry_contention(self.retry_policy(), resource, max_wait, move || {
            self.try_acquire(resource, ttl)
        })
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`Semaphore`].
trait DynSemaphore: Send + Sync {
    fn permits(&self) -> u32;
    fn try_acquire<'a>(&'a self, resource: &'a str, ttl: Duration)
    -> BoxFuture<'a, Result<Permit>>;
    fn renew<'a>(&'a self, permit: &'a mut Permit, ttl: Duration) -> BoxFuture<'a, Result<()>>;
    fn release(&self, permit: Permit) -> BoxFuture<'_, Result<Release>>;
    fn retry_policy(&self) -> RetryPolicy;
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Permit>>;
}

impl<S: Semaphore> DynSemaphore for S {
    fn permits(&self) -> u32 {
        Semaphore::permits(self)
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Permit>> {
        Box::pin(Semaphore::try_acquire(self, resource, ttl))
    }

    fn renew<'a>(&'a self, permit: &'a mut Permit, ttl: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(Semaphore::renew(self, permit, ttl))
    }

    fn release(&self, permit: Permit) -> BoxFuture<'_, Result<Release>> {
        Box::pin(Semaphore::release(self, permit))
    }

    fn retry_policy(&self) -> RetryPolicy {
        Semaphore::retry_policy(self)
    }

    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Permit>> {
        // The backend's own wait, which counts it once (feature `metrics`).
        Box::pin(Semaphore::acquire(self, resource, ttl, max_wait))
    }
}

/// Any [`Semaphore`] behind one type, for a backend chosen at run time. Cheap to clone.
#[derive(Clone)]
pub struct BoxSemaphore {
    inner: Arc<dyn DynSemaphore>,
}

impl fmt::Debug for BoxSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxSemaphore")
            .field("permits", &self.inner.permits())
            .finish_non_exhaustive()
    }
}

impl BoxSemaphore {
    /// Boxes `semaphore`.
    pub fn new<S: Semaphore + 'static>(semaphore: S) -> Self {
        BoxSemaphore {
            inner: Arc::new(semaphore),
        }
    }
}

impl Semaphore for BoxSemaphore {
    fn permits(&self) -> u32 {
        self.inner.permits()
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Permit>> + Send + 'a {
        self.inner.try_acquire(resource, ttl)
    }

    fn renew<'a>(
        &'a self,
        permit: &'a mut Permit,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        self.inner.renew(permit, ttl)
    }

    fn release(&self, permit: Permit) -> impl Future<Output = Result<Release>> + Send + '_ {
        self.inner.release(permit)
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry_policy()
    }

    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Permit>> + Send + 'a {
        self.inner.acquire(resource, ttl, max_wait)
    }
}

/// A permit on `slot` of `resource` just granted to `holder`, before its validity is
/// known (see [`finish_grant`]).
#[allow(dead_code)] // used by the network backends
pub(crate) fn granted(
    resource: &str,
    slot: u32,
    token: FencingToken,
    ttl: Duration,
    holder: String,
) -> Permit {
    Permit {
        lease: Lease {
            resource: resource.to_owned(),
            token,
            ttl,
            valid_until: Instant::now(),
            holder,
            handle: 0,
        },
        slot,
    }
}

/// `permit`, granted by a call that started at `start` and took `elapsed`, with its
/// validity set; or, when no validity is left, [`Error::ValidityExhausted`] after the
/// permit was given back with `release`.
#[allow(dead_code)] // used by the network backends
pub(crate) async fn finish_grant<F, Fut>(
    mut permit: Permit,
    start: Instant,
    elapsed: Duration,
    release: F,
) -> Result<Permit>
where
    F: FnOnce(Permit) -> Fut,
    Fut: Future<Output = Result<Release>>,
{
    let ttl = permit.lease.ttl;
    match lease::validity(ttl, elapsed) {
        Some(validity) => {
            permit.lease.valid_until = start + elapsed + validity;
            Ok(permit)
        }
        None => {
            let resource = permit.resource().to_owned();
            let _ = release(permit).await;
            Err(Error::ValidityExhausted {
                resource,
                ttl,
                elapsed,
            })
        }
    }
}

/// Runs `attempt` (a grant by `semaphore`) in a task of its own: a permit granted after
/// the caller gave up is released in the background.
#[allow(dead_code)] // used by the network backends
pub(crate) async fn grant_in_task<S, Fut>(semaphore: &S, attempt: Fut) -> Result<Permit>
where
    S: Semaphore + Clone + 'static,
    Fut: Future<Output = Result<Permit>> + Send + 'static,
{
    let releaser = semaphore.clone();
    lease::grant_in_task(attempt, move |permit| {
        lease::spawn_detached(async move {
            let _ = releaser.release(permit).await;
        });
    })
    .await
}

/// Implements [`Semaphore`] for a backend type by handing every method to its inherent
/// `try_acquire`, `renew` and `release`, each in a span and counted by the meters in its
/// field `meters`, with `permits` and `retry` read from its fields of those names;
/// `acquire` retries the inherent `try_acquire`, counted once.
#[allow(unused_macros)] // used by the network backends
macro_rules! forward_semaphore {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> crate::semaphore::Semaphore for $ty {
            fn permits(&self) -> u32 {
                self.permits
            }

            fn try_acquire<'a>(
                &'a self,
                resource: &'a str,
                ttl: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::semaphore::Permit>> + Send + 'a {
                self.meters.try_acquire(<$ty>::try_acquire(self, resource, ttl))
            }

            fn renew<'a>(
                &'a self,
                permit: &'a mut crate::semaphore::Permit,
                ttl: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = crate::Result<()>> + Send + 'a {
                self.meters.extend(<$ty>::renew(self, permit, ttl))
            }

            fn release(
                &self,
                permit: crate::semaphore::Permit,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::Release>> + Send + '_ {
                self.meters.release(<$ty>::release(self, permit))
            }

            fn retry_policy(&self) -> crate::RetryPolicy {
                self.retry
            }

            fn acquire<'a>(
                &'a self,
                resource: &'a str,
                ttl: ::std::time::Duration,
                max_wait: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::semaphore::Permit>> + Send + 'a {
                self.meters.acquire(self.retry, resource, max_wait, move || {
                    <$ty>::try_acquire(self, resource, ttl)
                })
            }
        }
    };
}

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

/// The contention error of a full resource.
pub(crate) fn full(resource: &str, permits: u32) -> Error {
    Error::NoPermit {
        resource: resource.to_owned(),
        permits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lowest_free_slot_while_not_full() {
        let now = 10;
        assert_eq!(free_slot(Vec::<(u32, u64)>::new(), 3, &now), Some(0));
        assert_eq!(free_slot([(0, 11), (1, 5)], 3, &now), Some(1));
        assert_eq!(free_slot([(0, 11), (1, 12), (2, 13)], 3, &now), None);
        // Expiry at `now` is expired.
        assert_eq!(free_slot([(0, 10)], 1, &now), Some(0));
        // A live slot beyond `permits` (a client with more permits) still counts.
        assert_eq!(free_slot([(0, 11), (5, 11)], 2, &now), None);
        assert_eq!(free_slot([(5, 11)], 2, &now), Some(0));
    }

    #[test]
    fn permits_are_checked() {
        assert!(matches!(
            check_permits(0),
            Err(Error::InvalidConfig {
                field: "permits",
                ..
            })
        ));
        assert!(check_permits(MAX_PERMITS + 1).is_err());
        assert_eq!(check_permits(1).ok(), Some(1));
    }

    proptest! {
        #[test]
        fn a_granted_slot_is_free_lowest_and_in_range(
            held in proptest::collection::vec((0u32..12, 0u64..20), 0..16),
            permits in 1u32..10,
            now in 0u64..20,
        ) {
            let live: BTreeSet<u32> =
                held.iter().filter(|(_, e)| *e > now).map(|(s, _)| *s).collect();
            match free_slot(held.iter().copied(), permits, &now) {
                Some(slot) => {
                    prop_assert!(slot < permits);
                    prop_assert!(!live.contains(&slot));
                    prop_assert!((0..slot).all(|s| live.contains(&s)));
                    prop_assert!((live.len() as u32) < permits);
                }
                None => prop_assert!(
                    live.len() as u32 >= permits || (0..permits).all(|s| live.contains(&s))
                ),
            }
        }

        /// Any sequence of grants, releases and time steps, applied through the rule,
        /// never has more than `permits` live leases or two live leases on one slot.
        #[test]
        fn never_more_than_permits_live(
            ops in proptest::collection::vec((0u8..3, 1u64..30, 0usize..8), 1..80),
            permits in 1u32..6,
        ) {
            let mut now = 0u64;
            let mut leases: Vec<(u32, u64)> = Vec::new();
            for (op, n, pick) in ops {
                match op {
                    0 => {
                        if let Some(slot) = free_slot(leases.iter().copied(), permits, &now) {
                            leases.retain(|(s, e)| *s != slot || *e > now);
                            leases.push((slot, now + n));
                        }
                    }
                    1 if !leases.is_empty() => {
                        let i = pick % leases.len();
                        leases.remove(i);
                    }
                    _ => now += n,
                }
                let live: Vec<u32> =
                    leases.iter().filter(|(_, e)| *e > now).map(|(s, _)| *s).collect();
                prop_assert!(live.len() as u32 <= permits);
                let distinct: BTreeSet<u32> = live.iter().copied().collect();
                prop_assert_eq!(distinct.len(), live.len());
            }
        }
    }
}
