//! Single-flight: concurrent calls for one key run one loader and share its result.
//!
//! The contract, which the cache builds on:
//!
//! - while a call for `key` is running, later calls for `key` wait for it and receive a clone
//!   of its result (the leader's result, error included: a waiter never reruns the loader
//!   because the leader's loader *failed*);
//! - if the leading call is dropped (its future cancelled) or its loader panics, the flight
//!   is abandoned: one waiter becomes the new leader and runs *its own* loader, the others
//!   wait for it. The panic reaches only the caller whose loader panicked;
//! - nothing is remembered after a flight completes (the cache does the remembering).

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;

/// How a call took part in its flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// This call ran its own loader.
    Leader,
    /// This call received another call's result.
    Waiter,
}

#[derive(Debug, Clone)]
enum State<T> {
    Running,
    Done(T),
    Abandoned,
}

type Flight<T> = Arc<watch::Sender<State<T>>>;

/// Deduplicates concurrent work per key.
pub struct SingleFlight<K, T> {
    flights: Arc<DashMap<K, Flight<T>>>,
}

impl<K: Hash + Eq, T> fmt::Debug for SingleFlight<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight")
            .field("in_flight", &self.flights.len())
            .finish()
    }
}

impl<K: Hash + Eq, T> Default for SingleFlight<K, T> {
    fn default() -> Self {
        Self {
            flights: Arc::new(DashMap::new()),
        }
    }
}

impl<K, T> SingleFlight<K, T>
where
    K: Hash + Eq + Clone,
    T: Clone,
{
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a flight for `key` is running now.
    pub fn is_running(&self, key: &K) -> bool {
        self.flights.contains_key(key)
    }

    /// Number of keys with a flight running.
    pub fn len(&self) -> usize {
        self.flights.len()
    }

    /// Whether no flight is running.
    pub fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    /// Detaches the flight running for `key`, if any: its callers still get its result, but
    /// later calls start a new flight instead of joining it (Go's `Forget`). Call it when
    /// the key was written or invalidated, so no call that starts afterwards receives a
    /// result loaded before.
    pub fn forget(&self, key: &K) {
        self.flights.remove(key);
    }

    /// [`forget`](Self::forget) by a borrowed key.
    #[cfg(feature = "redis")]
    pub(crate) fn forget_borrowed<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.flights.remove(key);
    }

    /// Detaches every running flight (see [`forget`](Self::forget)).
    pub fn forget_all(&self) {
        self.flights.clear();
    }

    /// Claims the lead for `key` now, synchronously, if no flight is running: the returned
    /// [`Claim`] holds the flight (later calls wait on it) until it is passed to
    /// [`run_claimed`](Self::run_claimed) or dropped. `None` when a flight is running.
    ///
    /// This is how a background task is started at most once per key: claim first, then
    /// spawn the work with the claim.
    pub fn claim(&self, key: &K) -> Option<Claim<K, T>> {
        match self.flights.entry(key.clone()) {
            Entry::Occupied(_) => None,
            Entry::Vacant(v) => {
                let (tx, _) = watch::channel(State::Running);
                let tx = Arc::new(tx);
                v.insert(Arc::clone(&tx));
                Some(Claim {
                    flights: Arc::clone(&self.flights),
                    key: key.clone(),
                    tx,
                    finished: false,
                })
            }
        }
    }

    /// Runs `work` as the leader of a flight claimed with [`claim`](Self::claim), and
    /// shares its result with the calls that waited on it.
    pub async fn run_claimed<F, Fut>(&self, mut claim: Claim<K, T>, work: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let value = work().await;
        claim.finished = true;
        claim
            .flights
            .remove_if(&claim.key, |_, f| Arc::ptr_eq(f, &claim.tx));
        claim.tx.send_replace(State::Done(value.clone()));
        value
    }

    /// Runs `work` for `key` unless a flight for `key` is already running, in which case it
    /// waits for that flight and returns a clone of its result. `work` is called at most
    /// once, and only when this call leads (first, or taking over an abandoned flight).
    pub async fn run<F, Fut>(&self, key: &K, work: F) -> (T, Role)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut work = Some(work);
        loop {
            let mut rx = match self.flights.entry(key.clone()) {
                Entry::Occupied(o) => o.get().subscribe(),
                Entry::Vacant(v) => {
                    let (tx, _) = watch::channel(State::Running);
                    let tx = Arc::new(tx);
                    v.insert(Arc::clone(&tx));
                    let guard = LeaderGuard {
                        flights: &self.flights,
                        key,
                        tx,
                        finished: false,
                    };
                    // `work` is Some: a caller leads at most once, since leading returns.
                    let Some(work) = work.take() else {
                        continue;
                    };
                    let value = work().await;
                    guard.finish(value.clone());
                    return (value, Role::Leader);
                }
            };
            let state = rx
                .wait_for(|s| !matches!(s, State::Running))
                .await
                .map(|s| s.clone());
            match state {
                Ok(State::Done(value)) => return (value, Role::Waiter),
                // Abandoned (leader dropped or panicked), or the sender vanished: try to lead.
                Ok(State::Abandoned | State::Running) | Err(_) => {
                    if work.is_none() {
                        // Unreachable in practice (waiters have not consumed `work`), but
                        // never spin: wait as a plain waiter on the next flight.
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }
}

/// A flight claimed by [`SingleFlight::claim`] and not yet run. Dropping it abandons the
/// flight (one waiter takes over).
pub struct Claim<K: Hash + Eq, T> {
    flights: Arc<DashMap<K, Flight<T>>>,
    key: K,
    tx: Flight<T>,
    finished: bool,
}

impl<K: Hash + Eq, T> fmt::Debug for Claim<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim").finish_non_exhaustive()
    }
}

impl<K: Hash + Eq, T> Drop for Claim<K, T> {
    fn drop(&mut self) {
        if !self.finished {
            self.flights
                .remove_if(&self.key, |_, f| Arc::ptr_eq(f, &self.tx));
            self.tx.send_replace(State::Abandoned);
        }
    }
}

struct LeaderGuard<'a, K: Hash + Eq, T> {
    flights: &'a DashMap<K, Flight<T>>,
    key: &'a K,
    tx: Flight<T>,
    finished: bool,
}

impl<K: Hash + Eq, T> LeaderGuard<'_, K, T> {
    fn finish(mut self, value: T) {
        self.finished = true;
        self.flights
            .remove_if(self.key, |_, f| Arc::ptr_eq(f, &self.tx));
        self.tx.send_replace(State::Done(value));
    }
}

impl<K: Hash + Eq, T> Drop for LeaderGuard<'_, K, T> {
    fn drop(&mut self) {
        if !self.finished {
            self.flights
                .remove_if(self.key, |_, f| Arc::ptr_eq(f, &self.tx));
            self.tx.send_replace(State::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_run_the_work_once() {
        let sf = Arc::new(SingleFlight::<u32, u64>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (sf, calls, gate) = (sf.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                sf.run(&1, || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    7
                })
                .await
            }));
        }
        while sf.is_empty() {
            tokio::task::yield_now().await;
        }
        // Let the others join, then release the leader.
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.notify_one();
        let mut leaders = 0;
        for t in tasks {
            let (v, role) = t.await.unwrap();
            assert_eq!(v, 7);
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert!(sf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_leader_hands_over_to_a_waiter() {
        let sf = Arc::new(SingleFlight::<u32, &'static str>::new());
        let leader = {
            let sf = sf.clone();
            tokio::spawn(async move {
                sf.run(&1, || async {
                    std::future::pending::<()>().await;
                    "leader"
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        assert!(sf.is_running(&1));
        let waiter = {
            let sf = sf.clone();
            tokio::spawn(async move {
                sf.run(&1, || async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    "waiter"
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        leader.abort();
        let (v, role) = waiter.await.unwrap();
        assert_eq!((v, role), ("waiter", Role::Leader));
        assert!(sf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_is_exclusive_and_shares_its_result() {
        let sf = Arc::new(SingleFlight::<u32, u8>::new());
        let claim = sf.claim(&1).unwrap();
        assert!(sf.claim(&1).is_none(), "one claim per key");
        let waiter = {
            let sf = sf.clone();
            tokio::spawn(async move { sf.run(&1, || async { 2 }).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(sf.run_claimed(claim, || async { 9 }).await, 9);
        assert_eq!(waiter.await.unwrap(), (9, Role::Waiter));
        assert!(sf.is_empty());
        drop(sf.claim(&1).unwrap());
        assert!(sf.claim(&1).is_some(), "a dropped claim frees the key");
    }

    /// Spawns a call for key 1 whose work waits for `gate`, then returns `answer()`.
    fn gated<V: Clone + Send + Sync + 'static>(
        sf: &Arc<SingleFlight<u32, V>>,
        gate: &Arc<tokio::sync::Notify>,
        answer: fn() -> V,
    ) -> tokio::task::JoinHandle<(V, Role)> {
        let (sf, gate) = (sf.clone(), gate.clone());
        tokio::spawn(async move {
            sf.run(&1, || async move {
                gate.notified().await;
                answer()
            })
            .await
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_flight_is_not_joined_by_later_calls() {
        let sf = Arc::new(SingleFlight::<u32, &'static str>::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let old = gated(&sf, &gate, || "old");
        tokio::task::yield_now().await;
        sf.forget(&1);
        let (v, role) = sf.run(&1, || async { "new" }).await;
        assert_eq!((v, role), ("new", Role::Leader));
        gate.notify_one();
        assert_eq!(old.await.unwrap(), ("old", Role::Leader));
        assert!(sf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_loader_fails_only_its_caller() {
        let sf = Arc::new(SingleFlight::<u32, u8>::new());
        let gate = Arc::new(tokio::sync::Notify::new());
        let leader = gated(&sf, &gate, || panic!("loader bug"));
        tokio::task::yield_now().await;
        let waiter = {
            let sf = sf.clone();
            tokio::spawn(async move { sf.run(&1, || async { 2 }).await })
        };
        tokio::task::yield_now().await;
        gate.notify_one();
        assert!(leader.await.unwrap_err().is_panic());
        assert_eq!(waiter.await.unwrap(), (2, Role::Leader));
    }
}
