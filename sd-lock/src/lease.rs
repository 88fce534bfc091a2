//! Leases, fencing tokens and the validity arithmetic, pure and synchronous.
//!
//! - The drift margin is `ttl / 100 + 2 ms` (the figure of the Redlock page and of
//!   rslock, RedLock.NET: 1 % for clock rate differences, 2 ms for Redis's
//!   millisecond expiry precision).
//! - A lease granted after `elapsed` is valid for `ttl - elapsed - drift`, counted from
//!   the end of the acquisition; equivalently it is valid until `start + ttl - drift`.
//!   Every subtraction is checked: a result that would be negative is "no validity".

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

pub use sd_core::RetryPolicy;

use crate::error::{Error, Result};

/// The longest TTL accepted: 2^31 ms, about 24.8 days (exact in Lua doubles, Redis `PX`,
/// PostgreSQL intervals and etcd's seconds). Longer work renews with a watchdog.
pub const MAX_TTL: Duration = Duration::from_millis(1 << 31);

/// The longest resource name accepted, in bytes.
pub const MAX_RESOURCE_LEN: usize = 1024;

/// The fixed part of the drift margin: Redis expires keys with millisecond precision.
pub const DRIFT_FIXED: Duration = Duration::from_millis(2);

/// A fencing token: a number the lock service hands out with each lease, strictly
/// greater than every token handed out before for the same resource (under the
/// assumptions each backend states). The protected resource remembers the newest token
/// it has seen and refuses older ones (see [`crate::fence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token as a number.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A granted lease: the resource, its fencing token, and how long it is valid.
///
/// The lease itself holds no connection and does nothing on drop: release it with
/// [`crate::Lock::release`], or hand it to a [`crate::Watchdog`], or let it expire.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    pub(crate) resource: String,
    pub(crate) token: FencingToken,
    pub(crate) ttl: Duration,
    pub(crate) valid_until: Instant,
    pub(crate) holder: String,
    pub(crate) handle: i64,
}

impl Lease {
    /// The resource this lease is on.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The fencing token: pass it with every write to the protected resource.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The TTL the lease was last granted or extended with.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The instant until which this holder may assume it holds the lease (already net of
    /// the drift margin and of the time the round trips took).
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// Validity left now (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }

    /// Whether the lease is still valid now. A `true` can be stale by the time it is
    /// used (the process may pause right after): protect writes with the token.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    /// The random value that identifies this holder to the backend (compare-and-delete).
    pub fn holder(&self) -> &str {
        &self.holder
    }
}

/// What [`crate::Lock::release`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Release {
    /// The lease was still ours and is now free.
    Released,
    /// The lease had already expired (and may belong to another holder now); nothing was
    /// deleted.
    Expired,
}

/// The drift margin for `ttl`: `ttl / 100 + 2 ms`.
pub fn drift(ttl: Duration) -> Duration {
    (ttl / 100).saturating_add(DRIFT_FIXED)
}

/// Validity left after an acquisition that took `elapsed`: `ttl - elapsed - drift(ttl)`,
/// or `None` when that is zero or negative.
pub fn validity(ttl: Duration, elapsed: Duration) -> Option<Duration> {
    ttl.checked_sub(elapsed)?
        .checked_sub(drift(ttl))
        .filter(|v| !v.is_zero())
}

/// Checks a resource name and a TTL before any round trip. `min` is the backend's
/// shortest TTL.
pub(crate) fn validate(resource: &str, ttl: Duration, min: Duration) -> Result<()> {
    if resource.is_empty() {
        return Err(Error::EmptyResource);
    }
    if resource.len() > MAX_RESOURCE_LEN {
        return Err(Error::ResourceTooLong {
            len: resource.len(),
            max: MAX_RESOURCE_LEN,
        });
    }
    validate_ttl(ttl, min)
}

/// Checks a TTL alone (extend).
pub(crate) fn validate_ttl(ttl: Duration, min: Duration) -> Result<()> {
    let min = min.max(Duration::from_millis(1));
    if ttl < min {
        return Err(Error::TtlTooShort { ttl, min });
    }
    if ttl > MAX_TTL {
        return Err(Error::TtlTooLong { ttl, max: MAX_TTL });
    }
    if validity(ttl, Duration::ZERO).is_none() {
        return Err(Error::TtlBelowDrift {
            ttl,
            drift: drift(ttl),
        });
    }
    Ok(())
}

/// Checks the `timeout` setter's value of a backend: above zero.
#[allow(dead_code)] // used by the network backends
pub(crate) fn check_timeout(timeout: Duration) -> Result<Duration> {
    if timeout.is_zero() {
        return Err(Error::InvalidConfig {
            field: "timeout",
            reason: "must be above zero; give each request time for a round trip".into(),
        });
    }
    Ok(timeout)
}

/// Whole milliseconds, rounded up: the server keeps the key at least as long as the
/// holder believes it holds it.
#[allow(dead_code)] // used by the network backends
pub(crate) fn ceil_millis(d: Duration) -> u64 {
    let ms = d.as_millis();
    let ms = if d.subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms + 1
    };
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// A random holder id: 128 bits, hex. Unique across clients and requests.
pub(crate) fn new_holder() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

/// The retry policy [`crate::Lock::acquire`] uses unless a backend is given another:
/// full jitter (a uniform draw below the ceiling) under a ceiling of 5 ms doubling to
/// 200 ms (redsync waits 50–250 ms; rslock 0–200 ms), attempts unlimited within the
/// caller's `max_wait`. Tokio's timer counts whole milliseconds, so a drawn delay under
/// 1 ms is a 1 ms sleep with probability `delay / 1 ms` and an immediate retry
/// otherwise: the same mean, where rounding each one up would make it 1 to 2 ms.
pub fn default_retry() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(5))
        .max_interval(Duration::from_millis(200))
        .jitter(1.0)
        .unlimited_attempts()
        .build()
        // The values above are within every bound `build` checks.
        .unwrap_or_default()
}

/// Runs `f` when dropped unless disarmed: the cleanup of a cancelled acquisition.
#[allow(dead_code)] // used by the network backends
pub(crate) struct OnCancel<F: FnOnce()>(Option<F>);

#[allow(dead_code)] // used by the network backends
impl<F: FnOnce()> OnCancel<F> {
    pub(crate) fn new(f: F) -> Self {
        OnCancel(Some(f))
    }

    /// The operation completed: do not clean up.
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnCancel<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Spawns `fut` on the current runtime, if there is one; never blocks.
pub(crate) fn spawn_detached<Fut>(fut: Fut) -> bool
where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            drop(handle.spawn(fut));
            true
        }
        Err(_) => false,
    }
}

/// A value granted by a task nobody waits for any more: handed to `cleanup` when dropped.
struct Orphan<T, C: FnOnce(T)> {
    value: Option<T>,
    cleanup: Option<C>,
}

impl<T, C: FnOnce(T)> Drop for Orphan<T, C> {
    fn drop(&mut self) {
        if let (Some(value), Some(cleanup)) = (self.value.take(), self.cleanup.take()) {
            cleanup(value);
        }
    }
}

/// Runs `attempt` in a task of its own and waits for it. If the caller's future is
/// dropped, the task still finishes and what it was granted goes to `cleanup` (which
/// spawns the release), so a cancelled grant leaves nothing behind.
#[allow(dead_code)] // used by the network backends
pub(crate) async fn grant_in_task<T, Fut, C>(attempt: Fut, cleanup: C) -> Result<T>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    C: FnOnce(T) + Send + 'static,
{
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
    let task = runtime.spawn(async move {
        let value = attempt.await?;
        Ok(Orphan {
            value: Some(value),
            cleanup: Some(cleanup),
        })
    });
    match task.await {
        Ok(Ok(mut granted)) => granted.value.take().ok_or(Error::UnexpectedReply {
            reason: "the grant task returned nothing",
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::UnexpectedReply {
            reason: "the grant task was cancelled or panicked",
        }),
    }
}

/// Runs one acquisition in a task of its own and waits for it. If the caller's future
/// is dropped, the task still finishes and a lease it got is released right after, so a
/// cancelled acquire leaves nothing behind. (Releasing from the dropped future instead
/// could overtake a request still in flight.)
#[allow(dead_code)] // used by the network backends
pub(crate) async fn acquire_in_task<L, F, Fut>(lock: &L, acquire: F) -> Result<Lease>
where
    L: crate::Lock + Clone + 'static,
    F: FnOnce(L) -> Fut,
    Fut: std::future::Future<Output = Result<Lease>> + Send + 'static,
{
    let releaser = lock.clone();
    grant_in_task(acquire(lock.clone()), move |lease| {
        spawn_detached(async move {
            let _ = releaser.release(lease).await;
        });
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn drift_is_one_percent_plus_two_ms() {
        assert_eq!(drift(Duration::from_secs(10)), Duration::from_millis(102));
        assert_eq!(
            validity(Duration::from_secs(10), Duration::from_millis(8)),
            Some(Duration::from_millis(9890))
        );
        assert_eq!(validity(Duration::from_millis(2), Duration::ZERO), None);
    }

    #[test]
    fn bad_input_is_typed() {
        let ms = Duration::from_millis;
        assert!(matches!(
            validate("", ms(100), ms(1)),
            Err(Error::EmptyResource)
        ));
        assert!(matches!(
            validate("r", Duration::ZERO, ms(1)),
            Err(Error::TtlTooShort { .. })
        ));
        assert!(matches!(
            validate("r", ms(500), ms(1000)),
            Err(Error::TtlTooShort { .. })
        ));
        assert!(matches!(
            validate("r", ms(2), ms(1)),
            Err(Error::TtlBelowDrift { .. })
        ));
        assert!(matches!(
            validate("r", MAX_TTL + ms(1), ms(1)),
            Err(Error::TtlTooLong { .. })
        ));
        let long = "x".repeat(MAX_RESOURCE_LEN + 1);
        assert!(matches!(
            validate(&long, ms(100), ms(1)),
            Err(Error::ResourceTooLong { .. })
        ));
        assert!(validate("r", ms(3), ms(1)).is_ok());
    }

    #[test]
    fn ceil_millis_rounds_up() {
        assert_eq!(ceil_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ceil_millis(Duration::from_millis(7)), 7);
        assert_eq!(ceil_millis(Duration::MAX), u64::MAX);
    }

    proptest! {
        #[test]
        fn validity_never_underflows(ttl in any::<u64>(), ttl_ns in 0u32..1_000_000_000, elapsed in any::<u64>(), el_ns in 0u32..1_000_000_000) {
            let ttl = Duration::new(ttl, ttl_ns);
            let elapsed = Duration::new(elapsed, el_ns);
            match validity(ttl, elapsed) {
                Some(v) => {
                    prop_assert!(!v.is_zero());
                    prop_assert!(v <= ttl);
                    prop_assert_eq!(v + elapsed + drift(ttl), ttl);
                }
                None => prop_assert!(elapsed.saturating_add(drift(ttl)) >= ttl),
            }
        }

        #[test]
        fn validity_shrinks_as_time_passes(ttl_ms in 0u64..(1 << 40), a in 0u64..(1 << 40), b in 0u64..(1 << 40)) {
            let ttl = Duration::from_millis(ttl_ms);
            let (lo, hi) = (Duration::from_millis(a.min(b)), Duration::from_millis(a.max(b)));
            let (vlo, vhi) = (validity(ttl, lo), validity(ttl, hi));
            prop_assert!(vhi <= vlo);
        }

        #[test]
        fn validate_accepts_only_ttls_with_validity(ms in 0u64..(1 << 33), min_ms in 0u64..5000) {
            let ttl = Duration::from_millis(ms);
            if validate("r", ttl, Duration::from_millis(min_ms)).is_ok() {
                prop_assert!(validity(ttl, Duration::ZERO).is_some());
                prop_assert!(ttl <= MAX_TTL);
            }
        }

        #[test]
        fn default_backoff_doubles_from_5ms_to_200ms_with_full_jitter(attempt in 1u32..200, unit in 0.0f64..1.0) {
            let p = default_retry();
            let ceiling = Duration::from_millis(5)
                .saturating_mul(1u32.checked_shl((attempt - 1).min(31)).unwrap_or(u32::MAX))
                .min(Duration::from_millis(200));
            let d = p.delay(attempt, unit);
            prop_assert!(d <= ceiling);
            prop_assert!((p.delay(attempt, 0.0).as_secs_f64() - ceiling.as_secs_f64()).abs() < 1e-9);
            prop_assert!(p.allows_retry_after(attempt));
        }
    }
}
