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
use job::Delivery;
pub(crate) use job::PanicHook;
pub use job::{IntoJob, Job, JobHandle, Order, Outcome, PanicReport};
pub use metrics::Metrics;
pub use shutdown::{Drained, ReturnedJob, Shutdown};

use std::collections::hash_map::DefaultHasher;

use crate::observe::JobEnd;
use std::collections::{HashMap, VecDeque};
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
    keys: HashMap<u64, VecDeque<Queued>>,
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
}

/// A job's run: the first item says how it ended; polling again delivers the output to
/// its handle. Delivery comes after the pool booked the job, so when a handle resolves,
/// the metrics and the watermark already count it.
type Run = BoxStream<'static, Finished>;

enum Step<F: Future> {
    Run(F, oneshot::Sender<Delivery<F::Output>>),
    Deliver(Delivery<F::Output>, oneshot::Sender<Delivery<F::Output>>),
}

type Channel<T> = (oneshot::Sender<Delivery<T>>, oneshot::Receiver<Delivery<T>>);

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
        let job = job.into_job();
        let channel = oneshot::channel();
        let mut st = lock(&self.shared.state);
        match self.shared.check(&st, &job) {
            Ok(slot) => {
                let (handle, launch) = self.shared.insert(&mut st, job, slot, channel);
                drop(st);
                self.shared.launch(launch);
                Ok(handle)
            }
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
        let channel = oneshot::channel();
        loop {
            let mut notified = pin!(shared.room.notified());
            {
                let mut st = lock(&shared.state);
                let (bound, limit) = match shared.check(&st, &job) {
                    Ok(slot) => {
                        let (handle, launch) = shared.insert(&mut st, job, slot, channel);
                        drop(st);
                        shared.launch(launch);
                        return Ok(handle);
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
