//! Leader election: campaign, observe the current leader, resign. A leader's term is a
//! lease with a fencing token, so the writes of a deposed leader are refused.
//!
//! A term's token is greater than every token of an earlier term of the same election:
//! fence the leader's writes with [`Term::token`] (one fence for the election), and a
//! leader that paused past its term cannot write once its successor has. In each term
//! the fence accepts one leader's writes.
//!
//! ```
//! # #[cfg(feature = "redis")]
//! # async fn run(conn: redis::aio::ConnectionManager) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use sd_lock::election::{Election, redis::RedisElection};
//!
//! let election = RedisElection::builder(conn).ttl(Duration::from_secs(5)).build()?;
//! let mut term = election.campaign("billing-leader", "10.0.0.7:8080", Duration::from_secs(30)).await?;
//! let leader = election.observe("billing-leader").await?.expect("a leader");
//! assert_eq!(leader.token(), term.token());
//! election.renew(&mut term).await?; // every ttl / 3, as long as it leads
//! let _ = election.resign(term).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Lease, MAX_TTL, Release, RetryPolicy};

/// Implements [`Election`] for a backend type by handing every method to its inherent
/// `try_campaign`, `observe`, `renew` and `resign`, each in a span and counted by the
/// [`ElectionMeters`](crate::observe::ElectionMeters) in its field `meters`; `campaign`
/// retries the inherent `try_campaign` under the retry policy read from its field
/// `retry`, counted once.
#[allow(unused_macros)] // used by the network backends
macro_rules! forward_election {
    ([$($generics:tt)*] $ty:ty) => {
        impl<$($generics)*> crate::election::Election for $ty {
            fn try_campaign<'a>(
                &'a self,
                name: &'a str,
                value: &'a str,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::election::Term>> + Send + 'a {
                self.meters.try_campaign(<$ty>::try_campaign(self, name, value))
            }

            fn observe<'a>(
                &'a self,
                name: &'a str,
            ) -> impl ::std::future::Future<Output = crate::Result<Option<crate::election::Leader>>> + Send + 'a {
                self.meters.observe(<$ty>::observe(self, name))
            }

            fn renew<'a>(
                &'a self,
                term: &'a mut crate::election::Term,
            ) -> impl ::std::future::Future<Output = crate::Result<()>> + Send + 'a {
                async move {
                    let result = self.meters.renew(<$ty>::renew(self, &mut *term)).await;
                    self.meters.renewed(term, &result);
                    result
                }
            }

            fn resign(
                &self,
                term: crate::election::Term,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::Release>> + Send + '_ {
                self.meters.resign(term, move |term| <$ty>::resign(self, term))
            }

            fn retry_policy(&self) -> crate::RetryPolicy {
                self.retry
            }

            fn campaign<'a>(
                &'a self,
                name: &'a str,
                value: &'a str,
                max_wait: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::election::Term>> + Send + 'a {
                self.meters.campaign(self.retry, name, max_wait, move || {
                    <$ty>::try_campaign(self, name, value)
                })
            }
        }
    };
}

#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

/// A term as leader: the election's name, the value the leader proclaimed, and a lease
/// with the term's fencing token. It holds no connection and does nothing on drop.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Term {
    pub(crate) lease: Lease,
    pub(crate) value: String,
}

impl Term {
    /// The election's name.
    pub fn name(&self) -> &str {
        self.lease.resource()
    }

    /// The value this leader proclaimed (an address, an id).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The term's fencing token: greater than every earlier term's.
    pub fn token(&self) -> FencingToken {
        self.lease.token()
    }

    /// Whether the term is still valid now (see [`Lease::is_valid`]).
    pub fn is_valid(&self) -> bool {
        self.lease.is_valid()
    }

    /// The instant until which this leader may assume it leads.
    pub fn valid_until(&self) -> Instant {
        self.lease.valid_until()
    }

    /// The lease underneath.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}

/// The current leader, as [`Election::observe`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leader {
    /// The value the leader proclaimed.
    pub value: String,
    /// The leader's term token.
    pub token: FencingToken,
}

impl Leader {
    /// The leader's term token.
    pub fn token(&self) -> FencingToken {
        self.token
    }
}

/// Checks a term TTL for a backend whose shortest is `min`: the `ttl` setter's value.
#[allow(dead_code)] // used by the network backends
pub(crate) fn check_ttl(ttl: Duration, min: Duration) -> Result<Duration> {
    match lease::validate_ttl(ttl, min) {
        Ok(()) => Ok(ttl),
        Err(_) => Err(Error::InvalidConfig {
            field: "ttl",
            reason: format!(
                "is {ttl:?}; give a term of {:?} to {MAX_TTL:?}, above its drift margin",
                min.max(Duration::from_millis(3))
            )
            .into(),
        }),
    }
}

/// Leader election on named elections.
///
/// Contract every backend honours:
///
/// - `try_campaign` makes the caller leader only if the election has no live term; the
///   term's token is greater than every earlier term's. Taken is [`Error::Held`].
/// - `observe` returns the live term's value and token, or `None`.
/// - `renew` extends the term by the election's TTL if, and only if, it is still this
///   leader's; otherwise [`Error::LeaseExpired`].
/// - `resign` ends the term only if it is still this leader's.
///
/// A campaign dropped while its request is in flight is not cleaned up after: a term it
/// may have won lasts until its TTL ends (etcd: the candidate's key, until its lease
/// expires).
pub trait Election: Send + Sync {
    /// Tries once to become leader of `name`, proclaiming `value`.
    fn try_campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
    ) -> impl Future<Output = Result<Term>> + Send + 'a;

    /// The current leader of `name`, if there is one.
    fn observe<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Future<Output = Result<Option<Leader>>> + Send + 'a;

    /// Extends a term we hold by the election's TTL.
    fn renew<'a>(&'a self, term: &'a mut Term) -> impl Future<Output = Result<()>> + Send + 'a;

    /// Ends a term we hold, so another campaign can win at once.
    fn resign(&self, term: Term) -> impl Future<Output = Result<Release>> + Send + '_;

    /// How [`Election::campaign`] waits between attempts.
    fn retry_policy(&self) -> RetryPolicy {
        lease::default_retry()
    }

    /// Waits to become leader of `name`, for at most `max_wait`
    /// ([`Error::WaitTimeout`] then).
    fn campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Term>> + Send + 'a {
        crate::retry_contention(self.retry_policy(), name, max_wait, move || {
            self.try_campaign(name, value)
        })
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`Election`].
trait DynElection: Send + Sync {
    fn try_campaign<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<Term>>;
    fn campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Term>>;
    fn observe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Leader>>>;
    fn renew<'a>(&'a self, term: &'a mut Term) -> BoxFuture<'a, Result<()>>;
    fn resign(&self, term: Term) -> BoxFuture<'_, Result<Release>>;
    fn retry_policy(&self) -> RetryPolicy;
}

impl<E: Election> DynElection for E {
    fn try_campaign<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<Term>> {
        Box::pin(Election::try_campaign(self, name, value))
    }

    fn campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Term>> {
        Box::pin(Election::campaign(self, name, value, max_wait))
    }

    fn observe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Leader>>> {
        Box::pin(Election::observe(self, name))
    }

    fn renew<'a>(&'a self, term: &'a mut Term) -> BoxFuture<'a, Result<()>> {
        Box::pin(Election::renew(self, term))
    }

    fn resign(&self, term: Term) -> BoxFuture<'_, Result<Release>> {
        Box::pin(Election::resign(self, term))
    }

    fn retry_policy(&self) -> RetryPolicy {
        Election::retry_policy(self)
    }
}

/// Any [`Election`] behind one type, for a backend chosen at run time. Cheap to clone.
/// It keeps the backend's own `campaign` (etcd waits inside one call).
#[derive(Clone)]
pub struct BoxElection {
    inner: Arc<dyn DynElection>,
}

impl fmt::Debug for BoxElection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxElection").finish_non_exhaustive()
    }
}

impl BoxElection {
    /// Boxes `election`.
    pub fn new<E: Election + 'static>(election: E) -> Self {
        BoxElection {
            inner: Arc::new(election),
        }
    }
}

impl Election for BoxElection {
    fn try_campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
    ) -> impl Future<Output = Result<Term>> + Send + 'a {
        self.inner.try_campaign(name, value)
    }

    fn observe<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Future<Output = Result<Option<Leader>>> + Send + 'a {
        self.inner.observe(name)
    }

    fn renew<'a>(&'a self, term: &'a mut Term) -> impl Future<Output = Result<()>> + Send + 'a {
        self.inner.renew(term)
    }

    fn resign(&self, term: Term) -> impl Future<Output = Result<Release>> + Send + '_ {
        self.inner.resign(term)
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.inner.retry_policy()
    }

    fn campaign<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Term>> + Send + 'a {
        self.inner.campaign(name, value, max_wait)
    }
}

/// Checks a campaign's input before any round trip.
#[allow(dead_code)] // used by the network backends
pub(crate) fn validate(name: &str, value: &str, ttl: Duration, min: Duration) -> Result<()> {
    lease::validate(name, ttl, min)?;
    if value.len() > lease::MAX_RESOURCE_LEN {
        return Err(Error::ResourceTooLong {
            len: value.len(),
            max: lease::MAX_RESOURCE_LEN,
        });
    }
    Ok(())
}

/// The term just won by `holder`, its validity counted from `start` after `elapsed`;
/// `None` when no validity is left.
#[allow(dead_code)] // used by the network backends
pub(crate) fn won(
    name: &str,
    value: &str,
    token: FencingToken,
    ttl: Duration,
    holder: String,
    (start, elapsed): (Instant, Duration),
) -> Option<Term> {
    let validity = lease::validity(ttl, elapsed)?;
    Some(Term {
        lease: Lease {
            resource: name.to_owned(),
            token,
            ttl,
            valid_until: start + elapsed + validity,
            holder,
            handle: 0,
        },
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_checked() {
        let ms = Duration::from_millis;
        assert!(matches!(
            check_ttl(ms(2), ms(1)),
            Err(Error::InvalidConfig { field: "ttl", .. })
        ));
        assert!(check_ttl(MAX_TTL + ms(1), ms(1)).is_err());
        assert!(check_ttl(ms(500), Duration::from_secs(1)).is_err());
        assert_eq!(check_ttl(ms(500), ms(1)).ok(), Some(ms(500)));
    }
}
