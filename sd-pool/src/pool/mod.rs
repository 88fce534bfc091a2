//! The pool: bounded queue, bounded concurrency, ordering modes, watermarks, lifecycle.
//!
//! [`job`]: what a job is and what it hands back; [`builder`]: construction; the
//! submission path here; [`worker`]: running a job and booking its end; [`shutdown`]:
//! close, drain and abort; [`metrics`]: counters, gauges and watermarks.

mod builder;
mod job;
mod metrics;
mod shutdown;
mod worker;

pub use builder::PoolBuilder;
pub(crate) use job::PanicHook;
use job::{Delivery, RunJob};
pub use job::{IntoJob, Job, JobHandle, Order, Outcome, PanicReport};
pub use metrics::Metrics;
pub use shutdown::{Drained, ReturnedJob, Shutdown};

use std::collections::hash_map::DefaultHasher;

use crate::observe::JobEnd;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tracing::Instrument as _;

use futures::FutureExt;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::runtime::Handle;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::{Error, Rejected, Result};
use crate::fasthash::FastMap;
use crate::watermark::Watermarks;

tokio::task_local! {
    /// The id of the pool whose worker is running the current task, if any.
    static CURRENT_POOL: u64;
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// A bounded worker pool. Cheap to clone; clones share the pool.
///
/// Jobs are futures run on tokio tasks the pool spawns (at most `workers` at
/// once). Up to `queue` accepted jobs wait their turn; past that, `submit`
/// waits, `try_submit` hands the job back and `submit_timeout` does either. Dropping every
/// `Pool` handle does not stop accepted jobs: they still run.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("id", &self.shared.id)
            .field("order", &self.shared.order)
            .field("queue", &self.shared.queue_capacity)
            .field("metrics", &self.metrics())
            .finish()
    }
}

struct Shared {
    id: u64,
    handle: Handle,
    order: Order,
    queue_capacity: usize,
    max_key_backlog: usize,
    on_panic: Option<PanicHook>,
    meters: crate::observe::PoolMeters,
    /// The `sd.name` of metrics and job spans.
    name: String,
    /// Set by `shutdown_now` (under the lock, beside `State::shut`), so a worker spawned
    /// just before it does not start its job.
    shutting_down: AtomicBool,
    state: Mutex<State>,
    /// Producers waiting for room.
    room: Notify,
    /// Drainers waiting for an empty pool.
    idle: Notify,
}

struct State {
    limit: usize,
    running: usize,
    /// Jobs free to start, in order. Non-empty only while `running >= limit`.
    ready: VecDeque<Queued>,
    /// Keys with a job in `ready` or running, and the jobs waiting behind it.
    keys: FastMap<u64, VecDeque<Queued>>,
    /// Jobs in all the key backlogs.
    backlog: usize,
    watermarks: Watermarks,
    closed: bool,
    shut: bool,
    /// A submitter is waiting for room and has not been woken since it began to wait.
    /// Whoever frees room clears it and wakes every waiter (`notify_waiters`), so a steady
    /// stream of completions wakes a waiting producer once, not once per completion.
    room_wanted: bool,
    next_job: u64,
    /// The abort handles of running workers, indexed by worker slot (a slab: the worker
    /// keeps its index, and freed indices are reused; the generation tells a reused slot
    /// from the one a late registration was meant for).
    workers: Vec<WorkerSlot>,
    free_workers: Vec<usize>,
    metrics: Metrics,
    lags: crate::observe::Lags,
}

impl State {
    fn queued(&self) -> usize {
        self.ready.len() + self.backlog
    }

    /// Takes a worker slot for a job about to be spawned.
    fn reserve_worker(&mut self) -> Launch {
        let wid = match self.free_workers.pop() {
            Some(wid) => wid,
            None => {
                self.workers.push(WorkerSlot::default());
                self.workers.len() - 1
            }
        };
        self.metrics.running_peak = self.metrics.running_peak.max(self.running);
        Launch {
            wid,
            generation: self.workers[wid].generation,
        }
    }
}

#[derive(Default)]
struct WorkerSlot {
    generation: u64,
    abort: Option<AbortHandle>,
}

/// Jobs accepted by [`Pool::try_submit_deferred`] and not started yet. Dropping it
/// starts them, as [`Pool::launch_deferred`] does: a job the pool accepted always runs
/// (or is booked as cancelled by a shutdown).
#[cfg(feature = "kafka")]
pub(crate) struct Deferred {
    shared: Arc<Shared>,
    launches: Vec<(Launch, Queued)>,
}

#[cfg(feature = "kafka")]
impl Drop for Deferred {
    fn drop(&mut self) {
        self.shared.launch_batch(std::mem::take(&mut self.launches));
    }
}

/// A worker slot reserved under the lock; the task is spawned after the lock is released.
#[derive(Clone, Copy)]
struct Launch {
    wid: usize,
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    id: u64,
    key: Option<u64>,
    position: Option<(u32, u64)>,
    enqueued: Instant,
}

struct Queued {
    meta: Meta,
    run: Run,
    /// The remote parent of the job's span.
    #[cfg(feature = "otel")]
    trace_parent: Option<Box<sd_core::trace::TraceParent>>,
}

/// A job's run: the first item says how it ended; polling again delivers the output to
/// its handle. Delivery comes after the pool booked the job, so when a handle resolves,
/// the metrics and the watermark already count it.
type Run = BoxStream<'static, Finished>;

type Deliver<T> = oneshot::Sender<Delivery<T>>;

enum Finished {
    Done { failed: bool },
    Panicked(String),
}

enum Slot {
    RunNow,
    Ready,
    Backlog,
}

enum Blocked {
    Closed,
    Bound(&'static str, usize),
    Invalid(Error),
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic never happens under this lock (user code runs outside it), but if one
    // did, the state is still consistent enough to shut down: keep going.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl Pool {
    /// Submits a job, waiting while the pool is full (backpressure).
    ///
    /// Cancel-safe: if this future is dropped, the job was either accepted (and the
    /// handle lost; the job still runs) or not accepted and dropped. Errors, with the job
    /// handed back: [`Error::Closed`], [`Error::OffsetNotIncreasing`], and
    /// [`Error::WouldDeadlock`] when called from one of this pool's own jobs while full.
    pub async fn submit<J>(&self, job: J) -> Result<JobHandle<OutputOf<J>>, Rejected<J::Future>>
    where
        J: IntoJob,
        J::Future: Send + 'static,
        OutputOf<J>: Outcome + Send + 'static,
    {
        self.submit_until(job.into_job(), None).await
    }

    /// Like [`submit`](Self::submit), but gives up after `timeout` with
    /// [`Error::Timeout`] and the job handed back.
    pub async fn submit_timeout<J>(
        &self,
        job: J,
        timeout: Duration,
    ) -> Result<JobHandle<OutputOf<J>>, Rejected<J::Future>>
    where
        J: IntoJob,
        J::Future: Send + 'static,
        OutputOf<J>: Outcome + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        self.submit_until(job.into_job(), Some((deadline, timeout)))
            .await
    }

    /// Submits a job if there is room now; otherwise hands it back with
    /// [`Error::Full`] naming the bound that was reached.
    pub fn try_submit<J>(&self, job: J) -> Result<JobHandle<OutputOf<J>>, Rejected<J::Future>>
    where
        J: IntoJob,
        J::Future: Send + 'static,
        OutputOf<J>: Outcome + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let (id, launch) = self.try_insert(job.into_job(), Some(tx))?;
        self.shared.launch(launch);
        Ok(JobHandle { id, rx })
    }

    #[cfg(feature = "kafka")]
    /// Like [`try_submit`](Self::try_submit), but a job that may start now is started
    /// by [`launch_deferred`](Self::launch_deferred) later, with the others deferred
    /// since: a thread outside the runtime (the Kafka poll thread) then wakes a runtime
    /// thread once per batch of records instead of once per record. The job's output is
    /// dropped.
    pub(crate) fn try_submit_deferred<F>(
        &self,
        job: Job<F>,
        deferred: &mut Deferred,
    ) -> Result<(), Rejected<F>>
    where
        F: Future + Send + 'static,
        F::Output: Outcome + Send + 'static,
    {
        debug_assert!(Arc::ptr_eq(&self.shared, &deferred.shared));
        let (_, launch) = self.try_insert(job, None)?;
        deferred.launches.extend(launch);
        Ok(())
    }

    #[cfg(feature = "kafka")]
    /// An empty batch for [`try_submit_deferred`](Self::try_submit_deferred).
    pub(crate) fn deferred(&self) -> Deferred {
        Deferred {
            shared: Arc::clone(&self.shared),
            launches: Vec::new(),
        }
    }

    #[cfg(feature = "kafka")]
    /// Starts the jobs [`try_submit_deferred`](Self::try_submit_deferred) accepted.
    pub(crate) fn launch_deferred(&self, deferred: &mut Deferred) {
        self.shared
            .launch_batch(std::mem::take(&mut deferred.launches));
    }

    /// Checks and inserts a job under the lock; the launch (if it may start now) is the
    /// caller's to do once the lock is released.
    #[allow(clippy::type_complexity)]
    fn try_insert<F>(
        &self,
        job: Job<F>,
        deliver: Option<Deliver<F::Output>>,
    ) -> Result<(u64, Option<(Launch, Queued)>), Rejected<F>>
    where
        F: Future + Send + 'static,
        F::Output: Outcome + Send + 'static,
    {
        let mut st = lock(&self.shared.state);
        match self.shared.check(&st, &job) {
            Ok(slot) => Ok(self.shared.insert(&mut st, job, slot, deliver)),
            Err(Blocked::Closed) => Err(Rejected {
                error: Error::Closed,
                job,
            }),
            Err(Blocked::Invalid(error)) => Err(Rejected { error, job }),
            Err(Blocked::Bound(bound, limit)) => {
                drop(st);
                self.shared.meters.ended(JobEnd::Rejected);
                Err(Rejected {
                    error: Error::Full { bound, limit },
                    job,
                })
            }
        }
    }

    async fn submit_until<F>(
        &self,
        job: Job<F>,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<JobHandle<F::Output>, Rejected<F>>
    where
        F: Future + Send + 'static,
        F::Output: Outcome + Send + 'static,
    {
        let shared = &self.shared;
        // Built once, outside the lock; only the job's own future is boxed under it.
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        loop {
            let mut notified = pin!(shared.room.notified());
            {
                let mut st = lock(&shared.state);
                let (bound, limit) = match shared.check(&st, &job) {
                    Ok(slot) => {
                        let (id, launch) = shared.insert(&mut st, job, slot, tx.take());
                        drop(st);
                        shared.launch(launch);
                        return Ok(JobHandle { id, rx });
                    }
                    Err(Blocked::Closed) => {
                        return Err(Rejected {
                            error: Error::Closed,
                            job,
                        });
                    }
                    Err(Blocked::Invalid(error)) => return Err(Rejected { error, job }),
                    Err(Blocked::Bound(bound, limit)) => (bound, limit),
                };
                if CURRENT_POOL
                    .try_with(|id| *id == shared.id)
                    .unwrap_or(false)
                {
                    return Err(Rejected {
                        error: Error::WouldDeadlock { bound },
                        job,
                    });
                }
                if let Some((at, waited)) = deadline
                    && Instant::now() >= at
                {
                    shared.meters.ended(JobEnd::Rejected);
                    return Err(Rejected {
                        error: Error::Timeout {
                            after: waited,
                            bound: Some(bound),
                        },
                        job,
                    });
                }
                let _ = limit;
                // Registered under the lock, so whoever frees room next sees the flag
                // and its `notify_waiters` comes after this registration.
                st.room_wanted = true;
                notified.as_mut().enable();
            }
            match deadline {
                Some((at, _)) => {
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }

    /// The `sd.name` of the pool's metrics and spans.
    #[cfg(any(feature = "redis", feature = "kafka"))]
    pub(crate) fn name(&self) -> &str {
        &self.shared.name
    }

    /// Changes the concurrency limit at run time. Raising it starts queued jobs at once;
    /// lowering it lets running jobs finish and starts no more until below the limit.
    pub fn set_workers(&self, workers: usize) -> Result<()> {
        if workers == 0 {
            return Err(Error::config("workers", "must be at least 1"));
        }
        let mut st = lock(&self.shared.state);
        st.limit = workers;
        while st.running < st.limit && !st.shut {
            let Some(job) = st.ready.pop_front() else {
                break;
            };
            st.running += 1;
            self.shared.spawn_worker(&mut st, job);
        }
        let notify = std::mem::take(&mut st.room_wanted);
        drop(st);
        if notify {
            self.shared.room.notify_waiters();
        }
        Ok(())
    }
}

/// The output type of a job.
pub type OutputOf<J> = <<J as IntoJob>::Future as Future>::Output;

#[cfg(all(test, feature = "kafka"))]
mod deferred_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Submits `n` jobs over 7 keys from this thread (outside the runtime); each records
    /// its number when it runs.
    fn submit(pool: &Pool, batch: &mut Deferred, n: u64, ran: &Arc<Mutex<Vec<u64>>>) {
        for i in 0..n {
            let ran = Arc::clone(ran);
            let job = Job::new(async move {
                ran.lock().unwrap().push(i);
                Ok::<(), String>(())
            })
            .with_key(&(i % 7));
            assert!(pool.try_submit_deferred(job, batch).is_ok());
        }
    }

    fn in_key_order(ran: &[u64]) -> bool {
        (0..7).all(|k| {
            let of_key: Vec<u64> = ran.iter().copied().filter(|i| i % 7 == k).collect();
            of_key.windows(2).all(|w| w[0] < w[1])
        })
    }

    fn pool(rt: &tokio::runtime::Runtime) -> Pool {
        let _enter = rt.enter();
        Pool::builder()
            .workers(4)
            .queue(1_000)
            .order(Order::PerKey)
            .build()
            .unwrap()
    }

    /// Waits until every accepted job finished: true if none was left.
    fn drained(rt: &tokio::runtime::Runtime, pool: &Pool) -> bool {
        let drained = rt.block_on(pool.drain(Duration::from_secs(10)));
        drained.returned.is_empty() && drained.still_running == 0
    }

    #[test]
    fn deferred_jobs_start_at_the_launch_or_when_the_batch_is_dropped() {
        let rt = runtime();
        let pool = pool(&rt);
        let ran: Arc<Mutex<Vec<u64>>> = Arc::default();
        let mut batch = pool.deferred();
        submit(&pool, &mut batch, 200, &ran);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            ran.lock().unwrap().is_empty(),
            "nothing starts before the launch"
        );
        pool.launch_deferred(&mut batch);
        assert!(drained(&rt, &pool));
        let ran_once = std::mem::take(&mut *ran.lock().unwrap());
        assert_eq!(ran_once.len(), 200, "every job ran once");
        assert!(in_key_order(&ran_once), "per key, in submission order");
        let m = pool.metrics();
        assert_eq!((m.completed, m.cancelled, m.running), (200, 0, 0));
        assert!(m.running_peak <= 4, "the limit held: {}", m.running_peak);

        // A batch dropped before its launch still starts its jobs.
        let pool = self::pool(&rt);
        let mut batch = pool.deferred();
        submit(&pool, &mut batch, 50, &ran);
        drop(batch);
        assert!(drained(&rt, &pool));
        assert_eq!(ran.lock().unwrap().len(), 50);
        assert_eq!(pool.metrics().completed, 50);
    }
}
