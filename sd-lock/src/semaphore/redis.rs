//! The Redis semaphore (feature `redis`): a sorted set of leases and one script a call.
//!
//! - **Acquire** is one script, one round trip (`redis/acquire.lua`): reap the leases
//!   whose expiry (the score, server milliseconds from `TIME`) has passed, apply
//!   [`free_slot`](crate::semaphore::free_slot)'s rule to the rest, add
//!   `slot:holder` with its expiry, and hand out the token `max(last + 1, server µs)`.
//!   App servers with skewed clocks agree, since only the server's clock is read.
//! - **Renew** and **release** find the holder's member and act only if it is there
//!   (renew: and still live).
//! - Keys are `{prefix}:{{resource}}` (the set) and `{prefix}:{{resource}}:token`: one
//!   hash tag, so the same code runs on a Redis Cluster connection. The set expires
//!   with its longest lease.
//! - Guarantees: at most `permits` live leases while the server keeps its data. A
//!   failover or restart that loses the set frees permits early; tokens still grow
//!   (they follow the server clock), so the slot fences refuse the old holders' writes.

use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionLike;
use sd_core::KeyPrefix;
use sd_core::redis::Script;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::lease::{self, FencingToken, Release, RetryPolicy};
use crate::observe::{Meters, SEMAPHORE};
use crate::semaphore::{Permit, check_permits, finish_grant, full, grant_in_task, granted};

static ACQUIRE: Script = Script::new(include_str!("redis/acquire.lua"));
static RENEW: Script = Script::new(include_str!("redis/renew.lua"));
static RELEASE: Script = Script::new(include_str!("redis/release.lua"));

/// Permits in one Redis server. Cheap to clone.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use sd_lock::semaphore::{Semaphore, redis::RedisSemaphore};
///
/// let conn = redis::Client::open("redis://127.0.0.1/")?.get_connection_manager().await?;
/// let calls = RedisSemaphore::builder(conn).permits(8).prefix("psp").build()?;
/// let permit = calls.acquire("provider", Duration::from_secs(10), Duration::from_secs(2)).await?;
/// // ... fence the call's writes with permit.fence_resource() and permit.token() ...
/// let _ = calls.release(permit).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSemaphore<C> {
    conn: C,
    prefix: KeyPrefix,
    permits: u32,
    timeout: Duration,
    retry: RetryPolicy,
    meters: Meters,
}

impl<C> fmt::Debug for RedisSemaphore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSemaphore")
            .field("prefix", &self.prefix)
            .field("permits", &self.permits)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Options of a [`RedisSemaphore`]; [`build`](Self::build) checks them and names the
/// setter of a value out of range.
pub struct RedisSemaphoreBuilder<C> {
    conn: C,
    prefix: String,
    permits: u32,
    timeout: Duration,
    retry: RetryPolicy,
    name: String,
}

impl<C> fmt::Debug for RedisSemaphoreBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSemaphoreBuilder")
            .field("prefix", &self.prefix)
            .field("permits", &self.permits)
            .finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisSemaphoreBuilder<C> {
    /// How many holders a resource may have at once (default 1; 1 to
    /// [`MAX_PERMITS`](crate::semaphore::MAX_PERMITS)).
    pub fn permits(mut self, permits: u32) -> Self {
        self.permits = permits;
        self
    }

    /// The key prefix (default `sem`): keys are `{prefix}:{{resource}}` and
    /// `{prefix}:{{resource}}:token`. No `{`, `}` or trailing `:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one request may take (default 1 s; above zero), else
    /// [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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
    pub fn build(self) -> Result<RedisSemaphore<C>> {
        Ok(RedisSemaphore {
            conn: self.conn,
            prefix: KeyPrefix::parse("prefix", &self.prefix)?,
            permits: check_permits(self.permits)?,
            timeout: lease::check_timeout(self.timeout)?,
            retry: self.retry,
            meters: Meters::of(&SEMAPHORE, &self.name, sd_core::observe::backend::REDIS),
        })
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisSemaphore<C> {
    /// Options for permits on the server behind `conn`.
    pub fn builder(conn: C) -> RedisSemaphoreBuilder<C> {
        RedisSemaphoreBuilder {
            conn,
            prefix: "sem".into(),
            permits: 1,
            timeout: Duration::from_secs(1),
            retry: lease::default_retry(),
            name: sd_core::observe::DEFAULT_NAME.into(),
        }
    }

    /// The sorted set of `resource`'s leases.
    pub fn key(&self, resource: &str) -> String {
        self.prefix.tagged(resource)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        call: sd_core::redis::ScriptCall<'_>,
    ) -> Result<T> {
        let mut conn = self.conn.clone();
        let span = tracing::debug_span!("semaphore.redis");
        Ok(sd_core::deadline::timeout(self.timeout, span, call.invoke(&mut conn)).await??)
    }

    fn member(permit: &Permit) -> String {
        format!("{}:{}", permit.slot, permit.lease.holder)
    }

    /// [`Semaphore::try_acquire`](crate::semaphore::Semaphore::try_acquire).
    pub async fn try_acquire(&self, resource: &str, ttl: Duration) -> Result<Permit> {
        lease::validate(resource, ttl, Duration::from_millis(1))?;
        let (this, owned) = (self.clone(), resource.to_owned());
        grant_in_task(self, async move { this.acquire_once(&owned, ttl).await }).await
    }

    async fn acquire_once(&self, resource: &str, ttl: Duration) -> Result<Permit> {
        let key = self.key(resource);
        let holder = lease::new_holder();
        let mut call = ACQUIRE.call(2);
        call.arg(&key)
            .arg(format!("{key}:token"))
            .arg(&holder)
            .arg(lease::ceil_millis(ttl))
            .arg(self.permits);
        let start = Instant::now();
        let reply: Option<(u32, u64)> = self.run(call).await?;
        let elapsed = start.elapsed();
        let Some((slot, token)) = reply else {
            return Err(full(resource, self.permits));
        };
        let permit = granted(resource, slot, FencingToken(token), ttl, holder);
        finish_grant(permit, start, elapsed, |p| self.release(p)).await
    }

    /// [`Semaphore::renew`](crate::semaphore::Semaphore::renew).
    pub async fn renew(&self, permit: &mut Permit, ttl: Duration) -> Result<()> {
        lease::validate_ttl(ttl, Duration::from_millis(1))?;
        let mut call = RENEW.call(1);
        call.arg(self.key(permit.resource()))
            .arg(Self::member(permit))
            .arg(lease::ceil_millis(ttl));
        let start = Instant::now();
        let renewed: i64 = self.run(call).await?;
        let elapsed = start.elapsed();
        match (renewed, lease::validity(ttl, elapsed)) {
            (1, Some(validity)) => {
                permit.lease.valid_until = start + elapsed + validity;
                permit.lease.ttl = ttl;
                Ok(())
            }
            _ => Err(Error::LeaseExpired {
                resource: permit.resource().to_owned(),
            }),
        }
    }

    /// [`Semaphore::release`](crate::semaphore::Semaphore::release).
    pub async fn release(&self, permit: Permit) -> Result<Release> {
        let mut call = RELEASE.call(1);
        call.arg(self.key(permit.resource()))
            .arg(Self::member(&permit));
        let live: i64 = self.run(call).await?;
        Ok(if live == 1 {
            Release::Released
        } else {
            Release::Expired
        })
    }
}

forward_semaphore!([C: ConnectionLike + Clone + Send + Sync + 'static] RedisSemaphore<C>);
