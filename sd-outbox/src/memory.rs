//! The in-memory outbox: [`MemoryOutbox`], its unit of work [`MemoryTx`] and its relay
//! [`MemoryRelay`]; no feature, no server.
//!
//! # What it is for
//!
//! Tests, demos, and single-process services that keep their business data in memory
//! too (the in-memory stores of the other sd crates). Everything lives in the process:
//! pending events and dead letters are **lost on restart**, and two processes do not
//! share an outbox. When the business data lives in PostgreSQL, use `postgres::Outbox`
//! (feature `postgres`) instead: only a row in the same database transaction survives
//! a crash between the write and the publish.
//!
//! # Guarantees
//!
//! - **Rolled back means never seen.** [`MemoryOutbox::begin`] opens a [`MemoryTx`];
//!   [`MemoryTx::enqueue`] validates the message and stages it inside the transaction,
//!   where no relay can see it. [`MemoryTx::commit`] appends every staged event at once
//!   (one lock, consecutive positions); dropping the transaction, or
//!   [`MemoryTx::rollback`], discards them. [`MemoryOutbox::transaction`] commits when
//!   its closure returns `Ok` and rolls back on `Err`.
//! - **With the business data.** In one process there is no crash window between two
//!   memory writes (both die together), so what is left to get right is the code path:
//!   [`MemoryTx::commit_with`] runs the business write under the outbox lock and
//!   appends the events only if it returned `Ok`, so a relay never sees an event before
//!   its data, nor an event whose data write failed. (The closure must not call the
//!   outbox: its lock is held.)
//! - **At least once.** An event leaves the outbox only after the [`Publisher`]
//!   acknowledged it (following the publisher contract: the leading `published` events
//!   of a failed batch count as sent). A failed event is sent again later with the same
//!   [`Event::id`], so consumers dedupe on it.
//! - **Order per aggregate.** Events of one aggregate (type and id) leave in commit
//!   order: any number of relays may run on one outbox, and an aggregate is in flight in
//!   at most one batch at a time; an event waiting for its retry holds back the later
//!   events of its aggregate only. No order across aggregates (a batch sends them in
//!   commit order, but relays overlap).
//! - **Failures.** A failed publish retries under the relay's [`RetryPolicy`]
//!   (exponential, jittered); after `max_attempts` failures the event is
//!   **dead-lettered**: kept with its attempts and last error, listed by
//!   [`MemoryOutbox::dead_letters`], sent again by [`MemoryOutbox::redrive`] (it then
//!   leaves after the events its aggregate committed meanwhile, as on PostgreSQL).
//!
//! ```
//! use sd_outbox::memory::{MemoryOutbox, MemoryRelay};
//! use sd_outbox::{MemoryPublisher, Message};
//!
//! let outbox = MemoryOutbox::new();
//! // Committed: published.
//! outbox.transaction(|tx| {
//!     tx.enqueue(Message::json("order", "o-1", "order_created", serde_json::json!({"total": 1250})))?;
//!     Ok::<_, sd_outbox::Error>(())
//! })?;
//! // Rolled back (dropped without commit): never seen by anyone.
//! let mut tx = outbox.begin();
//! tx.enqueue(Message::json("order", "o-2", "order_created", serde_json::json!({})))?;
//! drop(tx);
//! assert_eq!(outbox.pending(), 1);
//!
//! let sink = MemoryPublisher::new();
//! let relay = MemoryRelay::builder(outbox.clone(), sink.clone()).build()?;
//! let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
//! rt.block_on(relay.run_once())?;
//! assert_eq!(sink.events().len(), 1);
//! assert_eq!(sink.events()[0].aggregate_id, "o-1");
//! assert_eq!(outbox.pending(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::message::{Event, Message};
use crate::publisher::Publisher;
use crate::retry::{attempts_limit, check_relay_options, default_retry};
use sd_core::RetryPolicy;

/// A process-local outbox; clones share it. See the [module docs](self) for what it
/// promises and what it does not.
#[derive(Debug, Clone)]
pub struct MemoryOutbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped at every commit and redrive, so idle relays wake at once.
    commits: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    /// Committed, unpublished events by commit position.
    pending: BTreeMap<u64, Pending>,
    /// Aggregates in a batch being published right now.
    in_flight: HashSet<(String, String)>,
    dead: Vec<DeadLetter>,
}

#[derive(Debug)]
struct Pending {
    event: Event,
    not_before: Option<Instant>,
    last_error: Option<String>,
}

/// An event that reached the attempt cap.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The event (its `attempts` count the failures).
    pub event: Event,
    /// The last publish error.
    pub last_error: Option<String>,
}

impl Default for MemoryOutbox {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryOutbox {
    /// An empty outbox.
    pub fn new() -> Self {
        MemoryOutbox {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                commits: watch::Sender::new(0),
            }),
        }
    }

    /// Opens a unit of work: events enqueued in it become visible at
    /// [`MemoryTx::commit`], and never if it is dropped or rolled back.
    pub fn begin(&self) -> MemoryTx {
        MemoryTx {
            outbox: self.clone(),
            staged: Vec::new(),
        }
    }

    /// Runs `work` in a new transaction: commits its events when it returns `Ok`,
    /// discards them when it returns `Err` (which is passed on).
    pub fn transaction<T, E>(
        &self,
        work: impl FnOnce(&mut MemoryTx) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut tx = self.begin();
        let value = work(&mut tx)?;
        tx.commit();
        Ok(value)
    }

    /// Committed events not yet published (dead letters excluded).
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead.clone()
    }

    /// Sends the dead letter `id` back to the relays with a fresh attempt count, after
    /// the events pending now. Returns false when no dead letter has that id.
    pub fn redrive(&self, id: Uuid) -> bool {
        let mut state = self.lock();
        let Some(at) = state.dead.iter().position(|d| d.event.id == id) else {
            return false;
        };
        let mut event = state.dead.remove(at).event;
        event.attempts = 0;
        state.append(event);
        drop(state);
        self.wake();
        true
    }

    /// Redrives every dead letter; returns how many.
    pub fn redrive_all(&self) -> usize {
        let mut state = self.lock();
        let dead = std::mem::take(&mut state.dead);
        let n = dead.len();
        for letter in dead {
            let mut event = letter.event;
            event.attempts = 0;
            state.append(event);
        }
        drop(state);
        self.wake();
        n
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements: a panic elsewhere leaves it usable.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.shared.commits.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl State {
    fn append(&mut self, event: Event) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                event,
                not_before: None,
                last_error: None,
            },
        );
    }
}

/// A unit of work on a [`MemoryOutbox`]: staged events are visible to no one until
/// [`commit`](Self::commit); dropping it rolls back.
#[derive(Debug)]
#[must_use = "events are discarded unless the transaction is committed"]
pub struct MemoryTx {
    outbox: MemoryOutbox,
    staged: Vec<Event>,
}

impl MemoryTx {
    /// Validates `message` and stages it; returns the event id (the dedupe key
    /// consumers see). A message that fails [`Message::validate`] is refused with
    /// [`Error::InvalidMessage`] and the transaction stays usable. With feature `otel`,
    /// records the current span's trace context in the headers, as `postgres::Outbox`
    /// does (see the [crate docs](crate#traces)).
    pub fn enqueue(&mut self, message: Message) -> Result<Uuid> {
        message.validate()?;
        #[cfg(feature = "otel")]
        let message = message.with_current_trace();
        let event = Event::from_message(message);
        let id = event.id;
        self.staged.push(event);
        Ok(id)
    }

    /// Events staged so far.
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// True when nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Makes the staged events visible to the relays, all at once and in enqueue order;
    /// returns how many.
    pub fn commit(self) -> usize {
        self.commit_with(|| Ok::<_, std::convert::Infallible>(()))
            .map_or(0, |((), n)| n)
    }

    /// Runs `apply` (the business write) under the outbox lock and, if it returns `Ok`,
    /// appends the staged events before the lock is released: no relay sees the events
    /// before `apply` ran, and none at all if it failed. Returns `apply`'s value and the
    /// number of events committed. `apply` must not call this outbox (its lock is held).
    pub fn commit_with<T, E>(
        mut self,
        apply: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, usize), E> {
        let staged = std::mem::take(&mut self.staged);
        let n = staged.len();
        let mut state = self.outbox.lock();
        let value = apply()?;
        for event in staged {
            state.append(event);
        }
        drop(state);
        if n > 0 {
            self.outbox.wake();
        }
        Ok((value, n))
    }

    /// Discards the staged events (as dropping the transaction does).
    pub fn rollback(self) {}
}

/// Options of a [`MemoryRelay`].
#[derive(Debug, Clone)]
pub struct MemoryRelayBuilder<P> {
    outbox: MemoryOutbox,
    publisher: P,
    settings: Settings,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    batch_size: usize,
    max_attempts: u32,
    retry: RetryPolicy,
    poll_interval: Duration,
}

impl<P: Publisher> MemoryRelayBuilder<P> {
    /// Events per publish call, 1 to 10,000 (default 100).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.settings.batch_size = batch_size;
        self
    }

    /// Publish attempts before an event is dead-lettered, at least 1 (default 10; a
    /// [`retry`](Self::retry) policy with a lower `max_attempts` dead-letters sooner).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.settings.max_attempts = max_attempts;
        self
    }

    /// The waits between attempts (default: 100 ms doubling to 30 s, each wait a random
    /// point in the upper half of its window, `RetryPolicy` jitter 0.5).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.settings.retry = policy;
        self
    }

    /// How long a spawned relay sleeps when idle before looking again (default 1 s);
    /// commits wake it at once.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// The relay; fails with [`Error::InvalidConfig`] naming the first field out of range.
    pub fn build(self) -> Result<MemoryRelay<P>> {
        let s = self.settings;
        check_relay_options(s.batch_size, s.poll_interval, s.max_attempts)?;
        Ok(MemoryRelay {
            inner: Arc::new(RelayInner {
                outbox: self.outbox,
                publisher: self.publisher,
                settings: s,
                published: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                dead_lettered: AtomicU64::new(0),
            }),
        })
    }
}

/// Publishes the committed events of a [`MemoryOutbox`] through a [`Publisher`]:
/// batch by batch with [`run_once`](Self::run_once), or in the background with
/// [`spawn`](Self::spawn). Clones share their counters.
#[derive(Debug)]
pub struct MemoryRelay<P> {
    inner: Arc<RelayInner<P>>,
}

impl<P> Clone for MemoryRelay<P> {
    fn clone(&self) -> Self {
        MemoryRelay {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct RelayInner<P> {
    outbox: MemoryOutbox,
    publisher: P,
    settings: Settings,
    published: AtomicU64,
    failures: AtomicU64,
    dead_lettered: AtomicU64,
}

/// What one [`MemoryRelay::run_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BatchReport {
    /// Events the publisher acknowledged.
    pub published: usize,
    /// Whether a publish failed (the failed event was retried later or dead-lettered).
    pub failed: bool,
    /// Events dead-lettered by this batch (0 or 1).
    pub dead_lettered: usize,
    /// When the earliest event held back for its retry is due, if any.
    pub retry_in: Option<Duration>,
}

impl<P: Publisher> MemoryRelay<P> {
    /// Options for a relay of `outbox` publishing to `publisher`: batch 100, 10
    /// attempts, retries 100 ms doubling to 30 s, poll 1 s.
    pub fn builder(outbox: MemoryOutbox, publisher: P) -> MemoryRelayBuilder<P> {
        MemoryRelayBuilder {
            outbox,
            publisher,
            settings: Settings {
                batch_size: 100,
                max_attempts: 10,
                retry: default_retry(),
                poll_interval: Duration::from_secs(1),
            },
        }
    }

    /// Events this relay (and its clones) published.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// Failed publish attempts of this relay (and its clones).
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Events this relay (and its clones) dead-lettered.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.dead_lettered.load(Ordering::Relaxed)
    }

    /// Publishes one batch of due events: in commit order, skipping aggregates another
    /// batch holds and aggregates whose earlier event waits for its retry. Errors of the
    /// publisher are not returned but recorded on the event (retry or dead letter); the
    /// report says what happened.
    pub async fn run_once(&self) -> Result<BatchReport> {
        let inner = &self.inner;
        let Claimed {
            seqs,
            events,
            keys,
            retry_in,
        } = inner.claim();
        let mut report = BatchReport {
            retry_in,
            ..BatchReport::default()
        };
        if events.is_empty() {
            return Ok(report);
        }
        // Releases the claimed aggregates even if this future is dropped mid-publish
        // (the events then stay pending and are sent again: at least once).
        let claim = Claim {
            outbox: &inner.outbox,
            keys,
        };
        let (published, failure) = match inner.publisher.publish(&events).await {
            Ok(()) => (events.len(), None),
            Err(Error::Publish { published, reason }) => {
                (published.min(events.len()), Some(reason))
            }
            Err(other) => (0, Some(other.to_string())),
        };
        let mut state = inner.outbox.lock();
        for seq in &seqs[..published] {
            state.pending.remove(seq);
        }
        report.published = published;
        if let (Some(reason), Some(failed)) = (failure, events.get(published)) {
            report.failed = true;
            inner.failures.fetch_add(1, Ordering::Relaxed);
            // Only this batch holds the aggregate, so the entry is still there.
            let seq = seqs.get(published).copied();
            if let Some(seq) = seq {
                let attempts = failed.attempts.saturating_add(1);
                if attempts >= attempts_limit(inner.settings.max_attempts, &inner.settings.retry) {
                    if let Some(mut p) = state.pending.remove(&seq) {
                        p.event.attempts = attempts;
                        tracing::warn!(id = %failed.id, attempts, error = %reason, "outbox event dead-lettered");
                        state.dead.push(DeadLetter {
                            event: p.event,
                            last_error: Some(reason),
                        });
                        report.dead_lettered = 1;
                        inner.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                } else if let Some(p) = state.pending.get_mut(&seq) {
                    let delay = inner.settings.retry.random_delay(attempts);
                    tracing::debug!(id = %failed.id, attempts, error = %reason, ?delay, "outbox publish failed");
                    p.event.attempts = attempts;
                    p.not_before = Some(Instant::now() + delay);
                    p.last_error = Some(reason);
                    report.retry_in = Some(report.retry_in.map_or(delay, |r| r.min(delay)));
                }
            }
        }
        drop(state);
        drop(claim);
        inner
            .published
            .fetch_add(published as u64, Ordering::Relaxed);
        Ok(report)
    }

    /// Runs batches until nothing is due: every pending event published, dead-lettered
    /// or waiting for its retry. Returns how many events were published.
    pub async fn drain(&self) -> Result<usize> {
        let mut total = 0;
        loop {
            let report = self.run_once().await?;
            total += report.published;
            if report.published == 0 && !report.failed {
                return Ok(total);
            }
        }
    }

    /// Runs the relay on the current tokio runtime until the handle is shut down or
    /// dropped. Several relays may run on one outbox.
    pub fn spawn(self) -> MemoryRelayHandle<P> {
        let (stop, mut stopped) = watch::channel(false);
        let mut commits = self.inner.outbox.shared.commits.subscribe();
        let relay = self.clone();
        let task = tokio::spawn(async move {
            while !*stopped.borrow() {
                commits.mark_unchanged();
                let wait = match relay.run_once().await {
                    Ok(r) if r.published > 0 || r.dead_lettered > 0 => continue,
                    Ok(r) => r.retry_in.map_or(relay.inner.settings.poll_interval, |d| {
                        d.min(relay.inner.settings.poll_interval)
                    }),
                    Err(_) => relay.inner.settings.poll_interval,
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = commits.changed() => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        MemoryRelayHandle {
            task: Some(task),
            stop,
            relay: self,
        }
    }
}

impl<P> RelayInner<P> {
    /// Picks the due events of unclaimed aggregates, in commit order, and claims their
    /// aggregates; also returns when the earliest held-back retry is due.
    fn claim(&self) -> Claimed {
        let now = Instant::now();
        let mut state = self.outbox.lock();
        let mut blocked: HashSet<(&str, &str)> = state
            .in_flight
            .iter()
            .map(|(t, i)| (t.as_str(), i.as_str()))
            .collect();
        let mut seqs = Vec::new();
        let mut taken = Vec::new();
        let mut keys: HashSet<(String, String)> = HashSet::new();
        let mut retry_in: Option<Duration> = None;
        for (seq, p) in &state.pending {
            if taken.len() >= self.settings.batch_size {
                break;
            }
            let key = (
                p.event.aggregate_type.as_str(),
                p.event.aggregate_id.as_str(),
            );
            if blocked.contains(&key) {
                continue;
            }
            if let Some(at) = p.not_before.filter(|at| *at > now) {
                let wait = at - now;
                retry_in = Some(retry_in.map_or(wait, |r| r.min(wait)));
                blocked.insert(key);
                continue;
            }
            keys.insert((key.0.to_owned(), key.1.to_owned()));
            seqs.push(*seq);
            taken.push(p.event.clone());
        }
        drop(blocked);
        state.in_flight.extend(keys.iter().cloned());
        Claimed {
            seqs,
            events: taken,
            keys: keys.into_iter().collect(),
            retry_in,
        }
    }
}

/// A spawned [`MemoryRelay`]: its counters, shutdown. Dropping it stops the relay.
#[derive(Debug)]
pub struct MemoryRelayHandle<P> {
    task: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    relay: MemoryRelay<P>,
}

impl<P: Publisher> MemoryRelayHandle<P> {
    /// The relay, for its counters ([`MemoryRelay::published`] and the others).
    pub fn relay(&self) -> &MemoryRelay<P> {
        &self.relay
    }

    /// Asks the relay to stop after its current batch and waits for it.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl<P> Drop for MemoryRelayHandle<P> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What [`RelayInner::claim`] picked: commit positions and events, in commit order,
/// the aggregates now held, and when the earliest held-back retry is due.
struct Claimed {
    seqs: Vec<u64>,
    events: Vec<Event>,
    keys: Vec<(String, String)>,
    retry_in: Option<Duration>,
}

/// Releases claimed aggregates when dropped.
struct Claim<'a> {
    outbox: &'a MemoryOutbox,
    keys: Vec<(String, String)>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut state = self.outbox.lock();
        for key in &self.keys {
            state.in_flight.remove(key);
        }
        drop(state);
        // Events of these aggregates may have been skipped while they were claimed.
        self.outbox.wake();
    }
}
