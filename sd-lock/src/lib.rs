//! Distributed leases with fencing tokens on memory, Redis, Redlock over N masters,
//! PostgreSQL and etcd, with a watchdog and fenced registers for the protected resource;
//! a fenced counting semaphore and leader election on the same footing.
//!
//! # What it is
//!
//! Several replicas of a service must not run the same job, charge the same card or
//! rebuild the same cache entry at once. A [`Lock`] hands out a [`Lease`] on a resource
//! for a TTL. A lease alone is not safe: a holder that pauses past its TTL (GC, page
//! fault, network stall) keeps writing after another holder took over. So every lease
//! carries a [`FencingToken`], strictly increasing per resource, and the protected
//! storage checks it: [`fence::FencedRegister`] in memory, [`fence::redis::RedisFence`]
//! (a Lua script) and [`fence::postgres::PostgresFence`] (a row check inside the
//! caller's transaction) accept a write only when its token is not older than the newest
//! they have seen.
//!
//! # When to use it (and when not)
//!
//! - **Efficiency** (avoid doing the same work twice; a rare overlap is harmless): any
//!   backend; Redis single node is the cheapest.
//! - **Correctness** (an overlap corrupts data): use the token in the storage you write
//!   to, and prefer a backend whose token comes from consensus or a transaction:
//!   PostgreSQL or etcd. No lease lock guarantees mutual exclusion by itself in an
//!   asynchronous network (Jepsen, etcd 3.4.3); fencing turns an overlap into a rejected
//!   write.
//! - If the work and its state live in one PostgreSQL database, a transaction with
//!   `SELECT .. FOR UPDATE` or the transaction-scoped advisory lock is simpler than any
//!   lease.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use sd_lock::{Lock, Release, fence::FencedRegister, memory::MemoryLock};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let lock = MemoryLock::new();
//! let balance = FencedRegister::new(100_u64);
//!
//! let lease = lock.try_acquire("account:7", Duration::from_secs(10)).await?;
//! let old = lease.token();
//! let value = balance.read(old)?;
//! balance.write(old, value - 30)?;
//! assert_eq!(lock.release(lease).await?, Release::Released);
//!
//! // The next holder gets a larger token; a late write with the old one is refused.
//! let next = lock.try_acquire("account:7", Duration::from_secs(10)).await?;
//! assert!(next.token() > old);
//! assert_eq!(balance.read(next.token())?, 70);
//! assert!(balance.write(old, 0).is_err());
//! # Ok(()) }
//! ```
//!
//! # Backends and what they guarantee
//!
//! | backend | feature | token | safe under |
//! |---|---|---|---|
//! | [`memory::MemoryLock`] | – | a counter in the process | one process |
//! | [`redis::RedisLock`] | `redis` | `max(counter + 1, server µs)` in the acquire script | one Redis; tokens survive a restart via the server clock |
//! | [`redlock::Redlock`] | `redis` | max of the quorum's per-node grant times (`TIME`, µs) | bounded delays and clock drift (see below) |
//! | [`postgres::PostgresLock`] | `postgres` | the row's `epoch`, bumped in the acquiring statement | a transactional database |
//! | [`etcd::EtcdLock`] | `etcd` | the key's create revision (cluster-wide, Raft) | consensus; fencing still needed for pauses |
//!
//! - **Every backend**: `release` is compare-and-delete by the holder's random value, so
//!   nobody releases another holder's lease; `extend` succeeds only while the lease is
//!   still ours; `try_acquire` is cancellation-safe (a cancelled call leaves no key
//!   behind: the cleanup is spawned, never blocked on).
//! - **Redlock** gives mutual exclusion only in a synchronous model: bounded network
//!   delay, bounded process pauses and clock drift within 1 % of the TTL. A master that
//!   restarts empty inside a TTL can let a second holder in. Its token is *not* a
//!   consensus token: it is the largest of the quorum's per-node tokens, each seeded by
//!   that node's clock in microseconds, so it increases between holders as long as the
//!   masters' clocks agree to within the time between the two acquisitions. Use Redlock
//!   for efficiency, and fence the writes (the antirez/Kleppmann debate: both agree the
//!   fence is what makes it safe).
//! - **Replicas (`RedisLock`, optional)**: with
//!   [`redis::RedisLockBuilder::wait_for_replicas`]`(n, timeout)` a grant (or an
//!   extension) counts only once `WAIT` says `n` replicas hold it; fewer is
//!   [`Error::NotReplicated`] and the grant is released. A failover that promotes one of
//!   those replicas keeps the lease and its token counter. It is not durability on disk,
//!   a failover may still promote a replica that missed it when `n` is below the number
//!   of replicas, and `WAIT` does not make Redis a consensus system: fence the writes
//!   either way. Off by default.
//! - **Time**: `valid_until` is measured on the caller's monotonic clock from *before*
//!   the first request, minus the drift margin `ttl / 100 + 2 ms`
//!   ([`lease::validity`]). Backends expire keys on their own clocks (Redis `PX`,
//!   PostgreSQL `clock_timestamp()`, etcd leases).
//!
//! # Construction and run-time choice
//!
//! Each backend has `new(connection)` with the defaults and a `builder(connection)`
//! whose setters cannot fail; its `build()` checks every value and names the setter of
//! one out of range ([`Error::InvalidConfig`]). Redis key prefixes and table names follow
//! sd-core's one rule: keys are `{prefix}:{{resource}}`, sd adds the colon. The default
//! retry policy of [`Lock::acquire`] is [`lease::default_retry`], an sd-core
//! [`RetryPolicy`]. [`BoxLock`] holds any backend behind one type, for a backend picked
//! from configuration at run time.
//!
//! # Watchdog
//!
//! [`Watchdog`] renews a lease every `ttl / 3` and resolves [`Watchdog::lost`] when a
//! renewal fails for good, so the work can `select!` on it. Dropping it stops renewal and
//! spawns the release; nothing blocks.
//!
//! # Semaphore and leader election
//!
//! A [`Semaphore`] admits at most N holders of a resource at once: each holds a
//! [`Permit`] on one of N slots, a lease with a fencing token that grows for the
//! resource. Fence each slot ([`Permit::fence_resource`]) and at most N holders have
//! their writes accepted at once, however long one pauses. The rule that picks a slot
//! is [`semaphore::free_slot`]; backends: [`semaphore::memory`], Redis (one script over
//! a sorted set of leases), PostgreSQL (a transaction) and etcd.
//!
//! An [`election::Election`] runs `campaign`, `observe` and `resign` on named elections;
//! a leader's [`election::Term`] is a lease with a fencing token, so a deposed leader's
//! writes are refused by one fence. Backends: Redis, PostgreSQL and etcd (its election
//! API).
//!
//! # How it compares
//!
//! `benches/lock.rs` runs acquire + release on every backend beside `rslock` (the
//! Redlock crate most services use) on the same servers in the same run. Uncontended,
//! Redlock here and rslock are level; contended, this crate is ahead, because a miss
//! that every master refused sends no release and a backoff under tokio's 1 ms timer
//! tick is kept short on average instead of rounded up. Behind a network round trip,
//! Redlock over 3 or 5 masters costs little more than one node, since the masters are
//! asked in parallel. Unlike rslock, every lease carries a fencing token. The figures
//! are in [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md).
//!
//! # Sizing
//!
//! What one Redis server (one shard) sustained in acquire + release pairs a second on
//! distinct resources, beside rslock and a raw `SET NX PX` with a compare-and-delete, is
//! in the Sizing section of [`benches/RESULTS.md`](https://github.com/sd-rs/sd/blob/main/benches/RESULTS.md#sizing). A `RedisLock` on a cluster
//! spreads resources over its shards by slot (a resource's keys share a hash tag):
//! `shards = ceil(load / (rate × headroom))`, with a headroom below 1 (the file works
//! examples at 0.5). What more shards do not spread: one resource lives on one shard, and
//! its holders take turns anyway; Redlock writes every lease to each of its N masters, so
//! N masters sustain what one does. For more, split the resources over several
//! independent Redlock groups (or `RedisLock`s on a cluster).
//!
//! # Metrics and spans
//!
//! With feature `metrics`, every lock, fence, semaphore and election reports through
//! the `metrics` facade (install the exporter's recorder before building it: handles
//! are registered then). Labels follow `sd_core::observe`; `sd.name` is the instance's
//! name (the builders' `name`, [`memory::MemoryLock::with_name`],
//! [`fence::FencedRegister::with_name`]; default `"default"`), `sd.backend` one of
//! `memory`, `redis` (one server or Redlock), `postgres`, `etcd`. No label carries a
//! resource or an election's name.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `sd.lock.acquisitions` | counter | acquisitions | `sd.name`, `sd.backend`, `sd.outcome` (`acquired`, `contended`, `timeout`, `backend_error`) |
//! | `sd.lock.acquire.duration` | histogram | s | `sd.name`, `sd.backend`, `sd.outcome` |
//! | `sd.lock.contention.retries` | counter | attempts | `sd.name`, `sd.backend` |
//! | `sd.lock.leases.lost` | counter | leases | `sd.name`, `sd.backend` |
//! | `sd.lock.fencing.refusals` | counter | operations | `sd.name`, `sd.backend` (`memory`, `redis`, `postgres`) |
//! | `sd.lock.semaphore.acquisitions` | counter | acquisitions | `sd.name`, `sd.backend`, `sd.outcome` (`acquired`, `contended`, `timeout`, `backend_error`) |
//! | `sd.lock.semaphore.acquire.duration` | histogram | s | `sd.name`, `sd.backend`, `sd.outcome` |
//! | `sd.lock.semaphore.contention.retries` | counter | attempts | `sd.name`, `sd.backend` |
//! | `sd.lock.semaphore.permits.lost` | counter | permits | `sd.name`, `sd.backend` |
//! | `sd.lock.election.campaigns` | counter | campaigns | `sd.name`, `sd.backend` (`redis`, `postgres`, `etcd`), `sd.outcome` (`elected`, `contended`, `timeout`, `backend_error`) |
//! | `sd.lock.election.campaign.duration` | histogram | s | `sd.name`, `sd.backend`, `sd.outcome` |
//! | `sd.lock.election.contention.retries` | counter | attempts | `sd.name`, `sd.backend` |
//! | `sd.lock.election.terms.lost` | counter | terms | `sd.name`, `sd.backend` |
//! | `sd.lock.election.resignations` | counter | terms | `sd.name`, `sd.backend` |
//! | `sd.lock.election.leader` | gauge | terms | `sd.name`, `sd.backend` |
//!
//! An acquisition is one call of [`Lock::try_acquire`] or [`Lock::acquire`], counted
//! once: `contended` when the lease is held (or Redlock missed its quorum), `timeout`
//! when `acquire` waited `max_wait` out, `backend_error` when the store failed; bad input
//! is no outcome. Its time is the whole call, waits included. A wait's attempts after
//! the first are `sd.lock.contention.retries`. A lease is lost when an `extend` (a
//! [`Watchdog`]'s renewal among them) finds it gone ([`Error::LeaseExpired`]); a fence
//! refusal is an operation refused with [`Error::StaleToken`]. Every call of the memory,
//! Redis, Redlock, PostgreSQL and etcd locks runs in a `lock.call` span with `sd.name`,
//! `sd.backend` and `sd.operation` (`acquire`, `extend`, `release`), and every Redis or
//! PostgreSQL fence call in a `lock.fence` span with `sd.name` and `sd.backend`.
//!
//! PostgreSQL's advisory locks ([`postgres::PostgresLock::try_lock_xact`],
//! [`postgres::PostgresLock::try_lock_session`]) count as acquisitions of the
//! `PostgresLock` that took them (`sd.backend` `postgres`; name a separate instance to
//! tell them from its leases): `acquired` or `contended`, in `lock.call` spans, a
//! session lock's release too. A semaphore counts its permits the same way under
//! `sd.lock.semaphore.*` (a permit is lost when a `renew` finds it gone), in
//! `semaphore.call` spans (`acquire`, `extend` for `renew`, `release`). An election
//! counts each `try_campaign` or `campaign` once (`elected`, `contended`, `timeout`,
//! `backend_error`; etcd's `campaign` waits inside one call), a term lost when a `renew`
//! finds it gone (expired or taken by another leader), a resignation when `resign`
//! ended a live term; `sd.lock.election.leader` is the number of terms the instance
//! holds (1 while it leads; 0 again once a renewal or resign ends the term or its
//! validity runs out unrenewed), so give each election you watch an instance of its
//! own. Election calls run in `election.call` spans (`campaign`, `observe`, `extend`
//! for `renew`, `resign`).
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: [`redis::RedisLock`], [`redlock::Redlock`], [`fence::redis::RedisFence`]
//!   (redis-rs, async), the Redis semaphore and election.
//! - `postgres`: [`postgres::PostgresLock`], advisory locks, [`fence::postgres`] (sqlx 0.8),
//!   the PostgreSQL semaphore and election.
//! - `etcd`: [`etcd::EtcdLock`] (etcd-client), the etcd semaphore and election.
//! - `metrics`: acquisitions (of leases, advisory locks and permits) and campaigns, their
//!   time, contention retries, leases, permits and terms lost, resignations, the leader
//!   gauge and fencing refusals through the `metrics` facade (see
//!   [Metrics and spans](#metrics-and-spans)).
//! - `test-util`: `conformance`, the contract suite every backend runs, for a backend of
//!   your own or a [`BoxLock`] built from configuration.
// Without its feature an item is not there to link to: its links lead to the list above.
#![cfg_attr(
    not(feature = "redis"),
    doc = "",
    doc = "[`redis::RedisLock`]: #crate-features",
    doc = "[`redlock::Redlock`]: #crate-features",
    doc = "[`fence::redis::RedisFence`]: #crate-features",
    doc = "[`redis::RedisLockBuilder::wait_for_replicas`]: #crate-features",
    doc = "[`Error::NotReplicated`]: #crate-features"
)]
#![cfg_attr(
    not(feature = "postgres"),
    doc = "",
    doc = "[`postgres::PostgresLock`]: #crate-features",
    doc = "[`postgres::PostgresLock::try_lock_xact`]: #crate-features",
    doc = "[`postgres::PostgresLock::try_lock_session`]: #crate-features",
    doc = "[`fence::postgres::PostgresFence`]: #crate-features",
    doc = "[`fence::postgres`]: #crate-features"
)]
#![cfg_attr(
    not(feature = "etcd"),
    doc = "",
    doc = "[`etcd::EtcdLock`]: #crate-features"
)]
//! # Running the tests
//!
//! `cargo test -p sd-lock` (or `cargo nextest run -p sd-lock`) runs every suite: the
//! crate's tests turn on `redis`, `postgres`, `etcd`, `test-util` and `metrics` through a dev-dependency on
//! the crate itself, so no suite is left out for want of a feature flag. The backend
//! suites start real `redis-server`, `postgres` and `etcd` servers through `sd-testkit`; a missing
//! server binary fails the test, it is never skipped.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Implements [`Lock`] for a type by handing every method on. Three forms:
///
/// - `forward_lock!([generics] Type => field)`: to its field `field`, which has the same
///   methods ([`BoxLock`] over its boxed backend, whose own methods count).
/// - `forward_lock!([generics] Type => Lock field)`: to the [`Lock`] methods of its field
///   `field`, which count: [`RedisLock`](crate::redis::RedisLock) over its one-master
///   Redlock.
/// - `forward_lock!([generics] Type, retry: field, meters: field)`: to the type's own
///   inherent `try_acquire`, `extend` and `release` (inherent methods come first in
///   method lookup), each in a span and counted by the meters in its field `meters`,
///   `acquire` retrying the inherent `try_acquire` under the retry policy read from its
///   field `retry`: the Redlock, PostgreSQL and etcd backends.
macro_rules! forward_lock {
    ([$($generics:tt)*] $ty:ty => Lock $inner:ident) => {
        forward_lock!(@impl [$($generics)*] $ty,
            try_acquire(this, resource, ttl) { crate::Lock::try_acquire(&this.$inner, resource, ttl) },
            extend(this, lease, ttl) { crate::Lock::extend(&this.$inner, lease, ttl) },
            release(this, lease) { crate::Lock::release(&this.$inner, lease) },
            acquire(this, resource, ttl, max_wait) { crate::Lock::acquire(&this.$inner, resource, ttl, max_wait) },
            retry_policy(this) { crate::Lock::retry_policy(&this.$inner) }
        );
    };
    ([$($generics:tt)*] $ty:ty => $inner:ident) => {
        forward_lock!(@impl [$($generics)*] $ty,
            try_acquire(this, resource, ttl) { this.$inner.try_acquire(resource, ttl) },
            extend(this, lease, ttl) { this.$inner.extend(lease, ttl) },
            release(this, lease) { this.$inner.release(lease) },
            acquire(this, resource, ttl, max_wait) { this.$inner.acquire(resource, ttl, max_wait) },
            retry_policy(this) { this.$inner.retry_policy() }
        );
    };
    ([$($generics:tt)*] $ty:ty, retry: $retry:ident, meters: $meters:ident) => {
        forward_lock!(@impl [$($generics)*] $ty,
            try_acquire(this, resource, ttl) { this.$meters.try_acquire(this.try_acquire(resource, ttl)) },
            extend(this, lease, ttl) { this.$meters.extend(this.extend(lease, ttl)) },
            release(this, lease) { this.$meters.release(this.release(lease)) },
            acquire(this, resource, ttl, max_wait) {
                this.$meters.acquire(this.$retry, resource, max_wait, move || this.try_acquire(resource, ttl))
            },
            retry_policy(this) { this.$retry }
        );
    };
    (@impl [$($generics:tt)*] $ty:ty,
        try_acquire($t1:ident, $r1:ident, $ttl1:ident) $try_acquire:block,
        extend($t2:ident, $l2:ident, $ttl2:ident) $extend:block,
        release($t3:ident, $l3:ident) $release:block,
        acquire($t4:ident, $r4:ident, $ttl4:ident, $w4:ident) $acquire:block,
        retry_policy($t5:ident) $retry_policy:block
    ) => {
        impl<$($generics)*> crate::Lock for $ty {
            fn try_acquire<'a>(
                &'a self,
                $r1: &'a str,
                $ttl1: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::Lease>> + Send + 'a {
                let $t1 = self;
                $try_acquire
            }

            fn extend<'a>(
                &'a self,
                $l2: &'a mut crate::Lease,
                $ttl2: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = crate::Result<()>> + Send + 'a {
                let $t2 = self;
                $extend
            }

            fn release(
                &self,
                $l3: crate::Lease,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::Release>> + Send + '_ {
                let $t3 = self;
                $release
            }

            fn retry_policy(&self) -> crate::RetryPolicy {
                let $t5 = self;
                $retry_policy
            }

            fn acquire<'a>(
                &'a self,
                $r4: &'a str,
                $ttl4: ::std::time::Duration,
                $w4: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = crate::Result<crate::Lease>> + Send + 'a {
                let $t4 = self;
                $acquire
            }
        }
    };
}

mod boxed;
#[cfg(feature = "test-util")]
pub mod conformance;
pub mod election;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fence;
pub mod lease;
pub mod memory;
mod observe;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod redlock;
pub mod semaphore;
mod watchdog;

pub use crate::boxed::BoxLock;
pub use crate::error::{Error, Result};
pub use crate::lease::{FencingToken, Lease, Release};
pub use crate::semaphore::{Permit, Semaphore};
pub use crate::watchdog::{Lost, Watchdog};
pub use sd_core::RetryPolicy;

/// A lock service: leases on named resources, each with a fencing token.
///
/// Contract every backend honours:
///
/// - `try_acquire` grants a lease only if no other valid lease exists on the resource,
///   and the token it returns is greater than every token granted before on that
///   resource (under the backend's stated assumptions). A cancelled call leaves no
///   lease behind.
/// - `extend` resets the lease's expiry to `ttl` from now if, and only if, the lease is
///   still this holder's; otherwise [`Error::LeaseExpired`]. The token does not change.
/// - `release` deletes the lease only if it is still this holder's (compare-and-delete),
///   and says whether it was ([`Release::Released`]) or had already expired.
/// - Bad input ([`Error::EmptyResource`], [`Error::TtlTooShort`],
///   [`Error::TtlBelowDrift`], [`Error::TtlTooLong`]) fails before any round trip.
pub trait Lock: Send + Sync {
    /// Tries once to take the lease on `resource` for `ttl`. Contention is
    /// [`Error::Held`] (or `Error::NoQuorum` for Redlock).
    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Lease>> + Send + 'a;

    /// Extends a lease we hold to `ttl` from now.
    fn extend<'a>(
        &'a self,
        lease: &'a mut Lease,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send + 'a;

    /// Releases a lease (compare-and-delete).
    fn release(&self, lease: Lease) -> impl Future<Output = Result<Release>> + Send + '_;

    /// How [`Lock::acquire`] waits between attempts.
    fn retry_policy(&self) -> RetryPolicy {
        lease::default_retry()
    }

    /// Takes the lease, retrying contention as [`Lock::retry_policy`] says (by default
    /// [`lease::default_retry`]) for at most `max_wait` (one attempt at least; never a
    /// sleep after the last attempt). Other errors return at once. Cancellation-safe: dropping the future leaves no lease.
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        ttl: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Lease>> + Send + 'a {
        acquire_with_retry(self, resource, ttl, max_wait)
    }
}

async fn acquire_with_retry<L: Lock + ?Sized>(
    lock: &L,
    resource: &str,
    ttl: Duration,
    max_wait: Duration,
) -> Result<Lease> {
    retry_contention(lock.retry_policy(), resource, max_wait, || {
        lock.try_acquire(resource, ttl)
    })
    .await
}

/// Runs `attempt` until it succeeds or fails with something other than contention,
/// sleeping as `policy` says between attempts, for at most `max_wait` (one attempt at
/// least; never a sleep after the last attempt): the wait of [`Lock::acquire`]
/// [`Semaphore::acquire`] and [`election::Election::campaign`].
pub(crate) async fn retry_contention<T, F, Fut>(
    policy: RetryPolicy,
    resource: &str,
    max_wait: Duration,
    attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    retry_contention_counted(policy, resource, max_wait, attempt, || ()).await
}

/// [`retry_contention`], calling `retried` before each retry after contention.
pub(crate) async fn retry_contention_counted<T, F, Fut>(
    policy: RetryPolicy,
    resource: &str,
    max_wait: Duration,
    mut attempt: F,
    mut retried: impl FnMut(),
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        let last = match attempt().await {
            Ok(granted) => return Ok(granted),
            Err(e) if e.is_contention() => e,
            Err(e) => return Err(e),
        };
        let waited = start.elapsed();
        let left = max_wait
            .checked_sub(waited)
            .filter(|d| !d.is_zero() && policy.allows_retry_after(attempts));
        let Some(left) = left else {
            tracing::debug!(resource, attempts, ?waited, "lock wait timed out");
            return Err(Error::WaitTimeout {
                resource: resource.to_owned(),
                waited,
                attempts,
                last: Box::new(last),
            });
        };
        let delay = policy.random_delay(attempts).min(left);
        retried();
        sleep_about(delay, rand::random::<f64>()).await;
    }
}

/// Sleeps about `delay` on average. Tokio's timer counts whole milliseconds, so a sleep
/// of 300 µs lasts one to two: a delay under 1 ms becomes a 1 ms sleep with probability
/// `delay / 1 ms` (`unit` is the draw, in `[0, 1)`) and an immediate retry otherwise,
/// which keeps short backoffs short on average instead of rounding every one up.
async fn sleep_about(delay: Duration, unit: f64) {
    const TICK: Duration = Duration::from_millis(1);
    if delay >= TICK {
        tokio::time::sleep(delay).await;
    } else if unit < delay.as_secs_f64() / TICK.as_secs_f64() {
        tokio::time::sleep(TICK).await;
    } else {
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `sleep_about(delay, unit)` on paused time and returns how long it slept.
    fn slept(delay: Duration, unit: f64) -> Duration {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime")
            .block_on(async {
                let start = tokio::time::Instant::now();
                sleep_about(delay, unit).await;
                start.elapsed()
            })
    }

    #[test]
    fn short_delays_keep_their_mean() {
        let tick = Duration::from_millis(1);
        // 300 µs: a 1 ms sleep for draws below 0.3, none above.
        assert_eq!(slept(Duration::from_micros(300), 0.29), tick);
        assert_eq!(slept(Duration::from_micros(300), 0.31), Duration::ZERO);
        assert_eq!(slept(Duration::ZERO, 0.0), Duration::ZERO);
        // Over a grid of draws the mean is the delay.
        let n = 1000;
        let total: Duration = (0..n)
            .map(|i| slept(Duration::from_micros(300), f64::from(i) / f64::from(n)))
            .sum();
        assert_eq!(total / n, Duration::from_micros(300));
        // From 1 ms up, the delay itself.
        assert_eq!(
            slept(Duration::from_millis(7), 0.99),
            Duration::from_millis(7)
        );
    }
}
