//! The poll thread: polls librdkafka, dispatches records to the pool, pauses and resumes
//! partitions, commits, and handles rebalances inside librdkafka's callbacks (which run
//! on this thread, inside `poll`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::{ClientContext, Offset};

use super::job::Finished;
use super::record::{Counters, Record, add};
use super::tracker::{Commit, Held, Offer, RevokedFlag, Tp, Tracker};
use crate::Pool;
use crate::error::{Error, Result};
use crate::fasthash::FastMap;
use crate::pool::Deferred;

/// How the poll thread hands a record (with its slot and revoked flag) to the pool.
pub(crate) type Dispatch = Box<dyn Fn(Record, u32, RevokedFlag) -> Dispatched + Send>;

/// What the pool did with a record.
pub(crate) enum Dispatched {
    /// It runs (or waits in the pool's queue).
    Taken,
    /// The pool is full: given back.
    Full(Record),
    /// The pool takes nothing any more.
    Closed,
}

/// The pool refused for good (closed).
pub(crate) struct PoolClosed;

/// Settings the poll thread reads.
#[derive(Debug, Clone)]
pub(crate) struct Timing {
    pub(crate) commit_interval: Duration,
    pub(crate) revoke_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) broker_timeout: Duration,
}

/// What the rebalance callbacks and the loop share (both run on the poll thread; the
/// locks are never held across a librdkafka call).
pub(crate) struct Shared {
    pub(crate) tracker: Mutex<Tracker<Record>>,
    pub(crate) reports: Mutex<Receiver<Finished>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) timing: Timing,
    /// Topic names interned, so a record carries an `Arc<str>`.
    pub(crate) topics: Mutex<FastMap<String, Arc<str>>>,
    /// The first commit that failed at a revoke or at the end, returned by `run`.
    pub(crate) failure: Mutex<Option<Error>>,
    /// The pool, and the jobs it accepted that are started once per batch of polled
    /// records ([`Shared::launch`]).
    pub(crate) pool: Pool,
    pub(crate) deferred: Mutex<Deferred>,
    pub(crate) meters: crate::observe::ConsumerMeters,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kafka_err(operation: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    move |source| Error::Backend {
        backend: "kafka",
        operation,
        source: Box::new(source),
    }
}

impl Shared {
    /// Starts the jobs dispatched since the last call. Called before anything waits on
    /// jobs and before every `poll` that may block.
    fn launch(&self) {
        self.pool.launch_deferred(&mut lock(&self.deferred));
    }

    fn intern(&self, topic: &str) -> Arc<str> {
        let mut topics = lock(&self.topics);
        match topics.get(topic) {
            Some(t) => Arc::clone(t),
            None => {
                let t: Arc<str> = Arc::from(topic);
                topics.insert(topic.to_owned(), Arc::clone(&t));
                t
            }
        }
    }

    fn tps(&self, tpl: &TopicPartitionList) -> Vec<Tp> {
        tpl.elements()
            .iter()
            .map(|e| (self.intern(e.topic()), e.partition()))
            .collect()
    }

    /// Applies every report waiting, or waits up to `wait` for one.
    fn take_reports(&self, wait: Option<Duration>) {
        let reports = lock(&self.reports);
        let mut tracker = lock(&self.tracker);
        if let Some(wait) = wait {
            drop(tracker);
            match reports.recv_timeout(wait) {
                Ok(f) => lock(&self.tracker).finished(f.slot, f.offset, f.done),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
            tracker = lock(&self.tracker);
        }
        while let Ok(f) = reports.try_recv() {
            tracker.finished(f.slot, f.offset, f.done);
        }
    }

    /// Waits until no job of `tps` (or of any partition) is outstanding, or `timeout`.
    /// Returns how many were still outstanding.
    fn wait_outstanding(&self, tps: Option<&[Tp]>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            self.take_reports(None);
            let left = {
                let tracker = lock(&self.tracker);
                match tps {
                    Some(tps) => tps.iter().map(|tp| tracker.outstanding(Some(tp))).sum(),
                    None => tracker.outstanding(None),
                }
            };
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            self.take_reports(Some((deadline - now).min(Duration::from_millis(50))));
        }
    }

    /// Commits what moved (of `only`, or everything), synchronously or not.
    fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        only: Option<&[Tp]>,
        mode: CommitMode,
    ) -> KafkaResult<()> {
        let commits = lock(&self.tracker).commits(only);
        if commits.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(commits.len());
        for c in &commits {
            let mut e = tpl.add_partition(&c.tp.0, c.tp.1);
            e.set_offset(Offset::Offset(c.next))?;
            if !c.metadata.is_empty() {
                e.set_metadata(c.metadata.as_str());
            }
        }
        let sent = consumer.commit(&tpl, mode);
        let mut tracker = lock(&self.tracker);
        match &sent {
            Ok(()) => {
                add(&self.counters.commits, commits.len() as u64);
                for c in commits {
                    let tp = c.tp.clone();
                    tracker.committed(&tp, Some(c));
                }
            }
            Err(error) => {
                add(&self.counters.commit_errors, 1);
                tracing::warn!(%error, "sd-pool: offset commit failed; sending it again later");
            }
        }
        sent
    }

    /// A revoke: stop dispatching, let the jobs already in the pool finish up to the
    /// revoke timeout (those not started by then never start), commit, forget.
    fn revoke<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, tps: &[Tp]) {
        self.launch();
        let owned = lock(&self.tracker).stop(Some(tps));
        let overran = self.wait_outstanding(Some(tps), self.timing.revoke_timeout);
        lock(&self.tracker).revoke(Some(tps));
        if overran > 0 {
            add(&self.counters.revoke_overran, overran as u64);
            tracing::warn!(
                jobs = overran,
                "sd-pool: jobs of revoked partitions still run past the revoke timeout; their records may run again on the new owner"
            );
        }
        if let Err(error) = self.commit(consumer, Some(tps), CommitMode::Sync) {
            self.remember(kafka_err("commit")(error));
        }
        let mut tracker = lock(&self.tracker);
        for tp in tps {
            tracker.forget(tp);
        }
        add(&self.counters.revoked, owned as u64);
    }

    fn assign<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, tpl: &TopicPartitionList) {
        let tps = self.tps(tpl);
        // A partition this member paused before a rebalance may come back still paused.
        if let Err(error) = consumer.resume(tpl) {
            tracing::warn!(%error, "sd-pool: resuming newly assigned partitions failed");
        }
        let committed = match consumer.committed_offsets(tpl.clone(), self.timing.broker_timeout) {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(%error, "sd-pool: could not read committed offsets; records above the watermark will run again");
                TopicPartitionList::new()
            }
        };
        let mut tracker = lock(&self.tracker);
        for tp in tps {
            let found = committed
                .find_partition(&tp.0, tp.1)
                .and_then(|e| match e.offset() {
                    Offset::Offset(next) => Some((next, e.metadata().to_owned())),
                    _ => None,
                });
            tracker.assign(tp, found.as_ref().map(|(n, m)| (*n, m.as_str())));
            add(&self.counters.assigned, 1);
        }
    }

    fn remember(&self, error: Error) {
        tracing::warn!(%error, "sd-pool: offset commit failed");
        lock(&self.failure).get_or_insert(error);
    }
}

/// The librdkafka context: rebalances go through [`Shared`].
pub(crate) struct Context(pub(crate) Arc<Shared>);

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps = self.0.tps(tpl);
            self.0.revoke(consumer, &tps);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.0.assign(consumer, tpl),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(%error, "sd-pool: rebalance error");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_err() {
            // An asynchronous commit failed: forget what we thought the group holds, so
            // the next interval sends it again.
            let tps = self.0.tps(offsets);
            let mut tracker = lock(&self.0.tracker);
            for tp in &tps {
                tracker.committed(tp, None::<Commit>);
            }
        }
    }
}

/// The longest wait for a report while records are held.
const HELD_WAIT: Duration = Duration::from_millis(2);

/// The most records polled before their jobs are started.
const BATCH: usize = 256;

/// The loop. Returns when `stop` is set (after draining and the last commit) or when
/// the pool closes.
pub(crate) fn poll_loop(
    consumer: BaseConsumer<Context>,
    shared: &Shared,
    dispatch: Dispatch,
    stop: &AtomicBool,
) -> Result<()> {
    let mut next_commit = Instant::now() + shared.timing.commit_interval;
    let mut closed = false;
    // The last topic interned: records mostly come in runs of one topic.
    let mut last_topic: Option<Arc<str>> = None;
    // Where a record's key and payload are joined before their one copy.
    let mut scratch = Vec::new();
    while !stop.load(Ordering::Acquire) && !closed {
        let holding = lock(&shared.tracker).holding();
        // Holding records until the pool has room: room comes back with the jobs'
        // reports, which cannot wake a blocked `poll`. So poll without blocking, and if
        // nothing came, wait for a report instead (a 2 ms wait in `poll` left the pool
        // idle most of that time once its jobs were quick).
        let wait = if holding {
            Duration::ZERO
        } else {
            Duration::from_millis(50)
        };
        // One record, waiting for it, then what librdkafka already holds, up to a
        // batch: the batch's jobs are started together.
        let mut polled = consumer.poll(wait);
        if holding && polled.is_none() {
            shared.take_reports(Some(HELD_WAIT));
        }
        let mut taken = 0;
        while let Some(message) = polled.take() {
            match message {
                Ok(message) => {
                    add(&shared.counters.received, 1);
                    shared.meters.consumed(1);
                    let name = rdkafka::Message::topic(&message);
                    let topic = match &last_topic {
                        Some(topic) if **topic == *name => Arc::clone(topic),
                        _ => Arc::clone(last_topic.insert(shared.intern(name))),
                    };
                    let record = Record::from_message(&message, topic, &mut scratch);
                    drop(message);
                    closed = offer(&consumer, shared, &dispatch, record).is_err();
                }
                Err(error) => {
                    tracing::warn!(%error, "sd-pool: kafka consumer error");
                    break;
                }
            }
            taken += 1;
            if closed || taken == BATCH {
                break;
            }
            polled = consumer.poll(Duration::ZERO);
        }
        shared.take_reports(None);
        if !closed {
            closed = redispatch(&consumer, shared, &dispatch).is_err();
        }
        shared.launch();
        if Instant::now() >= next_commit {
            next_commit = Instant::now() + shared.timing.commit_interval;
            // Synchronous: a failure is counted and the commit sent again next interval.
            let _ = shared.commit(&consumer, None, CommitMode::Sync);
        }
    }
    // Stopping: nothing new starts, running jobs get the drain timeout, then the last
    // commit. Forgetting every partition afterwards makes the revoke that closing the
    // consumer triggers a no-op.
    lock(&shared.tracker).stop(None);
    let left = shared.wait_outstanding(None, shared.timing.drain_timeout);
    lock(&shared.tracker).revoke(None);
    if left > 0 {
        tracing::warn!(
            jobs = left,
            "sd-pool: jobs still running past the drain timeout; their records run again after a restart"
        );
    }
    let last = shared.commit(&consumer, None, CommitMode::Sync);
    {
        let mut tracker = lock(&shared.tracker);
        let tps: Vec<Tp> = tracker.assigned().cloned().collect();
        for tp in &tps {
            tracker.forget(tp);
        }
    }
    drop(consumer);
    if let Err(error) = last {
        return Err(kafka_err("commit")(error));
    }
    if let Some(error) = lock(&shared.failure).take() {
        return Err(error);
    }
    if closed {
        return Err(Error::Closed);
    }
    Ok(())
}

fn pause_or_resume<C: ConsumerContext>(consumer: &BaseConsumer<C>, tp: &Tp, pause: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let done = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(error) = done {
        tracing::warn!(topic = &*tp.0, partition = tp.1, pause, %error, "sd-pool: pause/resume failed");
    }
}

/// Offers one polled record; `Err` when the pool is closed.
fn offer<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    shared: &Shared,
    dispatch: &Dispatch,
    record: Record,
) -> std::result::Result<(), PoolClosed> {
    let tp = (Arc::clone(record.topic_arc()), record.partition());
    let offset = record.offset();
    let offer = lock(&shared.tracker).offer(&tp, offset, record);
    match offer {
        Offer::Dispatch {
            slot,
            revoked,
            record,
        } => submit(
            consumer,
            shared,
            dispatch,
            (tp, offset, record, slot, revoked),
        )
        .map(drop),
        Offer::Skipped => {
            add(&shared.counters.skipped, 1);
            Ok(())
        }
        Offer::Held { pause } => {
            if pause {
                add(&shared.counters.paused, 1);
                pause_or_resume(consumer, &tp, true);
            }
            Ok(())
        }
        Offer::Ignored => Ok(()),
    }
}

/// Hands a record to the pool; when the pool is full, holds it first in line and
/// pauses its partition. `Ok(true)` when the pool took it.
fn submit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    shared: &Shared,
    dispatch: &Dispatch,
    (tp, offset, record, slot, revoked): Held<Record>,
) -> std::result::Result<bool, PoolClosed> {
    match dispatch(record, slot, revoked) {
        Dispatched::Taken => {
            lock(&shared.tracker).dispatched(&tp, offset);
            Ok(true)
        }
        Dispatched::Full(record) => {
            if lock(&shared.tracker).hold(&tp, offset, record) {
                add(&shared.counters.paused, 1);
                pause_or_resume(consumer, &tp, true);
            }
            Ok(false)
        }
        Dispatched::Closed => Err(PoolClosed),
    }
}

/// Dispatches held records of partitions that have room again, until the pool is full,
/// then resumes the partitions left with nothing held.
fn redispatch<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    shared: &Shared,
    dispatch: &Dispatch,
) -> std::result::Result<(), PoolClosed> {
    loop {
        let Some(held) = lock(&shared.tracker).take_held() else {
            break;
        };
        if !submit(consumer, shared, dispatch, held)? {
            break;
        }
    }
    let resume = lock(&shared.tracker).take_resumable();
    for tp in &resume {
        pause_or_resume(consumer, tp, false);
    }
    Ok(())
}
