//! The contract every [`Lock`], [`Semaphore`] and [`Election`] honours, as functions that take any backend and assert it
//! (feature `test-util`). sd-lock's own backends run them; a new backend, or a
//! [`BoxLock`](crate::BoxLock) chosen from configuration, runs the same.
//!
//! They panic on a broken contract, like any test, and need a multi-threaded tokio
//! runtime with time enabled; `contract` waits out a `ttl` on real time.
//!
//! ```no_run
//! # async fn run() {
//! use std::time::Duration;
//! use sd_lock::{conformance, memory::MemoryLock};
//!
//! let lock = MemoryLock::new();
//! conformance::contract(&lock, "contract", Duration::from_millis(300)).await;
//! conformance::mutual_exclusion(lock.clone(), "job", 8, 50, Duration::from_secs(10)).await;
//! conformance::cancelled_acquire_leaves_nothing(&lock, "busy", false).await;
//! # }
//! ```
// A test suite: a failed expectation is a panic with the reason.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::election::Election;
use crate::fence::FencedRegister;
use crate::semaphore::{Permit, Semaphore};
use crate::{Error, Lock, Release};

/// What the checker saw.
#[derive(Debug)]
#[non_exhaustive]
pub struct Report {
    /// Critical sections run.
    pub sections: u64,
    /// Fenced writes the register accepted.
    pub accepted: u64,
    /// Fenced writes the register refused as stale.
    pub rejected: u64,
    /// Times two tasks were inside at once.
    pub overlaps: u64,
    /// The register's value at the end.
    pub final_value: u64,
}

/// The Jepsen `lock` workload in miniature: `tasks` tasks each run `sections` critical
/// sections doing a read-modify-write on a fenced register (read fenced too), with a
/// yield between read and write. Asserts no lost update, strictly increasing tokens on
/// accepted writes, and (for a healthy lock with a generous TTL) no overlap at all.
pub async fn mutual_exclusion<L: Lock + Clone + 'static>(
    lock: L,
    resource: &str,
    tasks: usize,
    sections: usize,
    ttl: Duration,
) -> Report {
    let register = Arc::new(FencedRegister::new(0_u64));
    let accepted_tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inside = Arc::new(AtomicU64::new(0));
    let overlaps = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (lock, register, accepted_tokens) =
            (lock.clone(), register.clone(), accepted_tokens.clone());
        let (inside, overlaps, rejected) = (inside.clone(), overlaps.clone(), rejected.clone());
        let resource = resource.to_owned();
        handles.push(tokio::spawn(async move {
            for _ in 0..sections {
                let lease = lock
                    .acquire(&resource, ttl, Duration::from_secs(120))
                    .await
                    .unwrap();
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                let token = lease.token();
                match register.read(token) {
                    Ok(v) => {
                        tokio::task::yield_now().await;
                        let mut log = accepted_tokens.lock().unwrap();
                        match register.write(token, v + 1) {
                            Ok(()) => log.push(token),
                            Err(Error::StaleToken { .. }) => {
                                rejected.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Err(Error::StaleToken { .. }) => {
                        rejected.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => panic!("{e}"),
                }
                inside.fetch_sub(1, Ordering::SeqCst);
                let released = lock.release(lease).await.unwrap();
                assert_eq!(
                    released,
                    Release::Released,
                    "lease expired inside its section"
                );
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let tokens = accepted_tokens.lock().unwrap().clone();
    let final_value = register.peek();
    let report = Report {
        sections: (tasks * sections) as u64,
        accepted: tokens.len() as u64,
        rejected: rejected.load(Ordering::SeqCst),
        overlaps: overlaps.load(Ordering::SeqCst),
        final_value,
    };
    assert_eq!(
        report.final_value, report.accepted,
        "lost update: {report:?}"
    );
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "accepted tokens not strictly increasing"
    );
    assert_eq!(report.accepted + report.rejected, report.sections);
    assert_eq!(report.overlaps, 0, "two holders at once: {report:?}");
    assert_eq!(
        report.rejected, 0,
        "a healthy lock handed out a stale token: {report:?}"
    );
    report
}

/// Contract checks that hold for every backend, with real time (`ttl` short enough to
/// wait out, long enough for a round trip).
pub async fn contract<L: Lock>(lock: &L, resource: &str, ttl: Duration) {
    // Bad input is typed and costs no round trip.
    assert!(matches!(
        lock.try_acquire("", ttl).await,
        Err(Error::EmptyResource)
    ));
    assert!(matches!(
        lock.try_acquire(resource, Duration::ZERO).await,
        Err(Error::TtlTooShort { .. })
    ));
    assert!(matches!(
        lock.try_acquire(resource, crate::lease::MAX_TTL * 2).await,
        Err(Error::TtlTooLong { .. })
    ));

    let mut a = lock.try_acquire(resource, ttl).await.unwrap();
    assert_eq!(a.resource(), resource);
    assert!(a.is_valid());
    assert!(matches!(
        lock.try_acquire(resource, ttl).await,
        Err(e) if e.is_contention()
    ));
    lock.extend(&mut a, ttl).await.unwrap();
    // Wait the lease out: extend fails, release reports expired, the next holder gets a
    // larger token.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(matches!(
        lock.extend(&mut a, ttl).await,
        Err(Error::LeaseExpired { .. })
    ));
    // The server may keep the key a little longer than the holder's validity (etcd
    // rounds leases up to its minimum of about 2 s).
    let b = lock
        .acquire(resource, ttl, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(b.token() > a.token(), "{} !> {}", b.token(), a.token());
    assert_eq!(lock.release(a).await.unwrap(), Release::Expired);
    // A stale holder cannot release the new one's lease.
    let b2 = b.clone();
    assert_eq!(lock.release(b).await.unwrap(), Release::Released);
    assert_eq!(lock.release(b2).await.unwrap(), Release::Expired);
    // Free again, at once.
    let c = lock.try_acquire(resource, ttl).await.unwrap();
    assert_eq!(lock.release(c).await.unwrap(), Release::Released);

    // `acquire` gives up after `max_wait`, with the last error.
    let held = lock.try_acquire(resource, ttl * 4).await.unwrap();
    match lock.acquire(resource, ttl, Duration::from_millis(50)).await {
        Err(Error::WaitTimeout { attempts, last, .. }) => {
            assert!(attempts >= 1);
            assert!(last.is_contention());
        }
        other => panic!("expected a wait timeout, got {other:?}"),
    }
    assert_eq!(lock.release(held).await.unwrap(), Release::Released);
}

/// Cancelling `acquire` at varied points leaves nothing behind: with a TTL far longer
/// than the test, the resource is free again within moments (the spawned cleanup ran).
pub async fn cancelled_acquire_leaves_nothing<L: Lock>(
    lock: &L,
    resource: &str,
    must_cancel: bool,
) {
    let ttl = Duration::from_secs(60);
    let mut cancelled = 0;
    for i in 0..40u64 {
        let outcome = {
            let mut fut = std::pin::pin!(lock.acquire(resource, ttl, Duration::from_secs(5)));
            // The first poll sends the request. Half the time the future is dropped right
            // after it, mid-flight, whatever the machine's load; the other half it gets a
            // growing time budget, so cancellation also lands at later points.
            let first =
                std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
            match first {
                std::task::Poll::Ready(lease) => Some(lease),
                std::task::Poll::Pending if i % 2 == 0 => None,
                std::task::Poll::Pending => {
                    tokio::time::timeout(Duration::from_micros(i * i * 5), fut.as_mut())
                        .await
                        .ok()
                }
            }
        };
        match outcome {
            Some(lease) => {
                let released = lock.release(lease.unwrap()).await.unwrap();
                assert_eq!(released, Release::Released);
            }
            None => cancelled += 1,
        }
        // A leaked key would hold for 60 s; the cleanup frees it at once.
        let lease = lock
            .acquire(resource, ttl, Duration::from_secs(3))
            .await
            .expect("a cancelled acquire left its lease behind");
        assert_eq!(lock.release(lease).await.unwrap(), Release::Released);
    }
    assert!(
        !must_cancel || cancelled > 0,
        "no acquisition was cancelled; the test proves nothing"
    );
}

/// What [`semaphore_bound`] saw.
#[derive(Debug)]
#[non_exhaustive]
pub struct SemaphoreReport {
    /// Permits taken and given back.
    pub sections: u64,
    /// The most holders inside at once.
    pub max_inside: u64,
    /// Fenced writes the slot registers refused as stale.
    pub rejected: u64,
}

/// `tasks` tasks each take a permit `sections` times, write through their slot's fenced
/// register (read, yield, write) and give it back. Asserts never more than `permits`
/// holders inside at once, no stale token on a slot, and every permit live at release.
pub async fn semaphore_bound<S: Semaphore + Clone + 'static>(
    semaphore: S,
    resource: &str,
    tasks: usize,
    sections: usize,
    ttl: Duration,
) -> SemaphoreReport {
    let permits = semaphore.permits();
    let slots: Arc<Vec<FencedRegister<u64>>> =
        Arc::new((0..permits).map(|_| FencedRegister::new(0)).collect());
    let inside = Arc::new(AtomicU64::new(0));
    let max_inside = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (semaphore, slots, resource) = (semaphore.clone(), slots.clone(), resource.to_owned());
        let (inside, max_inside, rejected) = (inside.clone(), max_inside.clone(), rejected.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..sections {
                let permit = semaphore
                    .acquire(&resource, ttl, Duration::from_secs(120))
                    .await
                    .unwrap();
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                let register = &slots[permit.slot() as usize];
                let written = register.read(permit.token()).and_then(|v| {
                    std::thread::yield_now();
                    register.write(permit.token(), v + 1)
                });
                if let Err(Error::StaleToken { .. }) = written {
                    rejected.fetch_add(1, Ordering::SeqCst);
                }
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
                let released = semaphore.release(permit).await.unwrap();
                assert_eq!(released, Release::Released, "permit expired in its section");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let report = SemaphoreReport {
        sections: (tasks * sections) as u64,
        max_inside: max_inside.load(Ordering::SeqCst),
        rejected: rejected.load(Ordering::SeqCst),
    };
    let written: u64 = slots.iter().map(FencedRegister::peek).sum();
    assert!(
        report.max_inside <= u64::from(permits),
        "more than {permits} holders at once: {report:?}"
    );
    assert_eq!(report.rejected, 0, "a slot saw a stale token: {report:?}");
    assert_eq!(written, report.sections, "lost update: {report:?}");
    report
}

/// Contract checks every [`Semaphore`] with at least two permits honours, with real
/// time (`ttl` short enough to wait out, long enough for a round trip).
pub async fn semaphore_contract<S: Semaphore>(semaphore: &S, resource: &str, ttl: Duration) {
    let permits = semaphore.permits();
    assert!(permits >= 2, "the contract needs at least two permits");
    assert!(matches!(
        semaphore.try_acquire("", ttl).await,
        Err(Error::EmptyResource)
    ));
    assert!(matches!(
        semaphore.try_acquire(resource, Duration::ZERO).await,
        Err(Error::TtlTooShort { .. })
    ));
    assert!(matches!(
        semaphore
            .try_acquire(resource, crate::lease::MAX_TTL * 2)
            .await,
        Err(Error::TtlTooLong { .. })
    ));

    // Every slot once, lowest first, tokens growing; then full.
    let mut held = Vec::new();
    for slot in 0..permits {
        let p = semaphore.try_acquire(resource, ttl).await.unwrap();
        assert_eq!(p.slot(), slot);
        assert_eq!(p.resource(), resource);
        assert!(p.is_valid());
        if let Some(last) = held.last() {
            assert!(p.token() > Permit::token(last));
        }
        held.push(p);
    }
    assert!(matches!(
        semaphore.try_acquire(resource, ttl).await,
        Err(Error::NoPermit { permits: n, .. }) if n == permits
    ));
    // A freed slot is the next one granted, with a newer token.
    let newest = held.last().map(Permit::token).unwrap();
    let first = held.remove(0);
    let first_again = first.clone();
    assert_eq!(semaphore.release(first).await.unwrap(), Release::Released);
    assert_eq!(
        semaphore.release(first_again).await.unwrap(),
        Release::Expired
    );
    let mut again = semaphore.try_acquire(resource, ttl).await.unwrap();
    assert_eq!(again.slot(), 0);
    assert!(again.token() > newest);
    semaphore.renew(&mut again, ttl).await.unwrap();

    // Wait them out: renew fails, release says expired, new holders get newer tokens.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(matches!(
        semaphore.renew(&mut again, ttl).await,
        Err(Error::LeaseExpired { .. })
    ));
    let next = semaphore
        .acquire(resource, ttl, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(next.token() > again.token());
    assert_eq!(semaphore.release(again).await.unwrap(), Release::Expired);
    for p in held {
        assert_eq!(semaphore.release(p).await.unwrap(), Release::Expired);
    }
    // `acquire` gives up on a full resource after `max_wait`, with the last error.
    let mut full = vec![next];
    while full.len() < permits as usize {
        full.push(semaphore.try_acquire(resource, ttl * 4).await.unwrap());
    }
    match semaphore
        .acquire(resource, ttl, Duration::from_millis(50))
        .await
    {
        Err(Error::WaitTimeout { last, .. }) => assert!(last.is_contention()),
        other => panic!("expected a wait timeout, got {other:?}"),
    }
    for p in full {
        assert_eq!(semaphore.release(p).await.unwrap(), Release::Released);
    }
}

/// Contract checks every [`Election`] honours; `ttl` is the election's term TTL (short
/// enough to wait out).
pub async fn election_contract<E: Election>(election: &E, name: &str, ttl: Duration) {
    assert!(matches!(
        election.try_campaign("", "a").await,
        Err(Error::EmptyResource)
    ));
    assert_eq!(election.observe(name).await.unwrap(), None);
    let mut a = election.try_campaign(name, "a").await.unwrap();
    assert_eq!((a.name(), a.value()), (name, "a"));
    let seen = election.observe(name).await.unwrap().unwrap();
    assert_eq!((seen.value.as_str(), seen.token), ("a", a.token()));
    assert!(matches!(
        election.try_campaign(name, "b").await,
        Err(e) if e.is_contention()
    ));
    election.renew(&mut a).await.unwrap();
    // Resigning lets the next candidate in at once, in a newer term.
    assert_eq!(election.resign(a.clone()).await.unwrap(), Release::Released);
    assert_eq!(election.observe(name).await.unwrap(), None);
    let mut b = election.try_campaign(name, "b").await.unwrap();
    assert!(b.token() > a.token());
    // A deposed leader can neither renew nor end the new term.
    assert!(matches!(
        election.renew(&mut a).await,
        Err(Error::LeaseExpired { .. })
    ));
    assert_eq!(election.resign(a).await.unwrap(), Release::Expired);
    assert_eq!(
        election.observe(name).await.unwrap().map(|l| l.token),
        Some(b.token())
    );
    // A term not renewed ends; the next one is newer.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(matches!(
        election.renew(&mut b).await,
        Err(Error::LeaseExpired { .. })
    ));
    let c = election
        .campaign(name, "c", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(c.token() > b.token());
    assert_eq!(election.resign(b).await.unwrap(), Release::Expired);
    assert_eq!(election.resign(c).await.unwrap(), Release::Released);
}

/// A campaign waits in line for longer than the term TTL while the leader keeps renewing,
/// and wins a live term once the leader resigns. `ttl` as for [`election_contract`].
pub async fn campaign_outwaits_a_renewing_leader<E: Election + Sync>(
    election: &E,
    name: &str,
    ttl: Duration,
) {
    let mut leader = election.try_campaign(name, "leader").await.unwrap();
    let held = ttl * 5 / 2;
    let candidate = async {
        let start = tokio::time::Instant::now();
        let term = election.campaign(name, "candidate", held * 3).await;
        (term, start.elapsed())
    };
    let keeper = async move {
        let until = tokio::time::Instant::now() + held;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(ttl / 4).await;
            election.renew(&mut leader).await.unwrap();
        }
        election.resign(leader).await.unwrap()
    };
    let ((term, waited), resigned) = tokio::join!(candidate, keeper);
    assert_eq!(
        resigned,
        Release::Released,
        "the leader held its term throughout"
    );
    let mut term = term.unwrap();
    assert!(
        waited >= held,
        "won after {waited:?}, before the leader resigned"
    );
    assert!(term.is_valid(), "the term won after a long wait is live");
    assert_eq!(
        election.observe(name).await.unwrap().map(|l| l.token),
        Some(term.token())
    );
    election.renew(&mut term).await.unwrap();
    assert_eq!(election.resign(term).await.unwrap(), Release::Released);
}

/// `tasks` candidates each win `terms` terms of election `name`, write through one
/// fenced register with the term's token, and resign. Asserts never two leaders at once,
/// every term's token newer than the last, and no lost write.
pub async fn one_leader_at_a_time<E: Election + Clone + 'static>(
    election: E,
    name: &str,
    tasks: usize,
    terms: usize,
) {
    let register = Arc::new(FencedRegister::new(0_u64));
    let inside = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for n in 0..tasks {
        let (election, register, inside) = (election.clone(), register.clone(), inside.clone());
        let name = name.to_owned();
        handles.push(tokio::spawn(async move {
            for _ in 0..terms {
                let value = format!("candidate-{n}");
                let term = election
                    .campaign(&name, &value, Duration::from_secs(120))
                    .await
                    .unwrap();
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two leaders");
                let v = register.read(term.token()).unwrap();
                tokio::task::yield_now().await;
                register.write(term.token(), v + 1).unwrap();
                inside.fetch_sub(1, Ordering::SeqCst);
                assert_eq!(election.resign(term).await.unwrap(), Release::Released);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(register.peek(), (tasks * terms) as u64, "lost write");
}

/// A one-permit semaphore seen as a [`Lock`], to run the lock's checks on it.
#[derive(Clone)]
struct OnePermit<S>(S);

impl<S: Semaphore> Lock for OnePermit<S> {
    async fn try_acquire(&self, resource: &str, ttl: Duration) -> crate::Result<crate::Lease> {
        let permit = self.0.try_acquire(resource, ttl).await?;
        Ok(permit.lease().clone())
    }

    async fn extend(&self, lease: &mut crate::Lease, ttl: Duration) -> crate::Result<()> {
        let mut permit = Permit {
            lease: lease.clone(),
            slot: 0,
        };
        self.0.renew(&mut permit, ttl).await?;
        *lease = permit.lease;
        Ok(())
    }

    async fn release(&self, lease: crate::Lease) -> crate::Result<Release> {
        self.0.release(Permit { lease, slot: 0 }).await
    }

    fn retry_policy(&self) -> crate::RetryPolicy {
        self.0.retry_policy()
    }
}

/// Cancelling `acquire` at varied points leaves no permit behind (as
/// [`cancelled_acquire_leaves_nothing`] for a lock); `semaphore` must have one permit.
pub async fn cancelled_semaphore_acquire_leaves_nothing<S: Semaphore>(
    semaphore: S,
    resource: &str,
    must_cancel: bool,
) {
    assert_eq!(
        semaphore.permits(),
        1,
        "the check needs a one-permit semaphore"
    );
    cancelled_acquire_leaves_nothing(&OnePermit(semaphore), resource, must_cancel).await;
}
