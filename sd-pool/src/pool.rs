//! The pool: bounded queue, bounded concurrency, ordering modes, watermarks, lifecycle.

use std::collections::hash_map::DefaultHasher;
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

/// How jobs are ordered against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Any job may run beside any other; keys are ignored. The fastest mode.
    #[default]
    Unordered,
    /// Jobs with the same key run one at a time, in submission order; different keys
    /// (and jobs without a key) run concurrently. Each key's backlog is bounded by
    /// [`PoolBuilder::max_key_backlog`].
    PerKey,
    /// One job at a time, in submission order, whatever the key.
    Serial,
}

/// What a job's output says about success, for the `failed` metric and for stream
/// consumers that must not acknowledge a failed entry.
///
/// Implemented for `Result` (`Err` is a failure) and, as never failing, for `()`, the
/// primitive types, `String`, `Vec`, `Option` and `Box`; implement it for your own
/// output types (the one method, usually `false`).
pub trait Outcome {
    /// Whether this output counts as a failure.
    fn is_failure(&self) -> bool;
}

macro_rules! never_fails {
    ($($t:ty),* $(,)?) => {$(
        impl Outcome for $t {
            fn is_failure(&self) -> bool {
                false
            }
        }
    )*};
}

never_fails!(
    (),
    bool,
    char,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    String,
    &'static str,
);

impl<T> Outcome for Vec<T> {
    fn is_failure(&self) -> bool {
        false
    }
}

impl<T> Outcome for Option<T> {
    fn is_failure(&self) -> bool {
        false
    }
}

impl<T: Outcome + ?Sized> Outcome for Box<T> {
    fn is_failure(&self) -> bool {
        (**self).is_failure()
    }
}

impl<T, E> Outcome for Result<T, E> {
    fn is_failure(&self) -> bool {
        self.is_err()
    }
}

/// A future to run, with its optional ordering key and stream position.
pub struct Job<F> {
    future: F,
    key: Option<u64>,
    position: Option<(u32, u64)>,
}

impl<F> Job<F> {
    /// A job with no key and no position.
    pub fn new(future: F) -> Self {
        Self {
            future,
            key: None,
            position: None,
        }
    }

    /// Orders this job after earlier jobs with an equal key (in [`Order::PerKey`]).
    /// The key is hashed to 64 bits; two keys with the same hash are ordered together,
    /// which costs concurrency, never correctness.
    pub fn with_key<K: Hash + ?Sized>(mut self, key: &K) -> Self {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        self.key = Some(hasher.finish());
        self
    }

    /// Tags the job with its stream position, so the pool tracks the partition's
    /// completion watermark. Offsets of a partition must be submitted in increasing order.
    pub fn with_offset(mut self, partition: u32, offset: u64) -> Self {
        self.position = Some((partition, offset));
        self
    }

    /// The hashed key, if any.
    pub fn key(&self) -> Option<u64> {
        self.key
    }

    /// The `(partition, offset)`, if any.
    pub fn position(&self) -> Option<(u32, u64)> {
        self.position
    }

    /// The future, unrun.
    pub fn into_future(self) -> F {
        self.future
    }
}

impl<F> fmt::Debug for Job<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("key", &self.key)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

/// Anything the pool can take: a bare future or a [`Job`].
pub trait IntoJob {
    /// The future inside.
    type Future: Future;
    /// Wraps it.
    fn into_job(self) -> Job<Self::Future>;
}

impl<F: Future> IntoJob for F {
    type Future = F;
    fn into_job(self) -> Job<F> {
        Job::new(self)
    }
}

impl<F: Future> IntoJob for Job<F> {
    type Future = F;
    fn into_job(self) -> Job<F> {
        self
    }
}

/// Resolves to the job's output, or to [`Error::Panicked`] / [`Error::Cancelled`].
///
/// Dropping the handle does not cancel the job.
#[derive(Debug)]
pub struct JobHandle<T> {
    id: u64,
    rx: oneshot::Receiver<Delivery<T>>,
}

/// What a job sends to its handle. The handle knows the job's id, so the job need not:
/// the run future is built before the id is assigned, outside the pool's lock.
#[derive(Debug)]
enum Delivery<T> {
    Output(T),
    Panicked(String),
}

impl<T> JobHandle<T> {
    /// The job's id, unique within its pool, increasing in submission order.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl<T> Future for JobHandle<T> {
    type Output = Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        Pin::new(&mut self.rx).poll(cx).map(|r| match r {
            Ok(Delivery::Output(out)) => Ok(out),
            Ok(Delivery::Panicked(message)) => Err(Error::Panicked { id, message }),
            Err(_) => Err(Error::Cancelled { id }),
        })
    }
}

/// What a panic hook is told.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PanicReport {
    /// The job's id.
    pub id: u64,
    /// The job's hashed key.
    pub key: Option<u64>,
    /// The job's `(partition, offset)`.
    pub position: Option<(u32, u64)>,
    /// The panic payload when it was a string.
    pub message: String,
}

type PanicHook = Arc<dyn Fn(&PanicReport) + Send + Sync>;

/// An accepted job that did not run, handed back by [`Pool::drain`] or
/// [`Pool::shutdown_now`]. Running it (anywhere) completes its [`JobHandle`]; dropping
/// it makes the handle resolve to [`Error::Cancelled`].
pub struct ReturnedJob {
    meta: Meta,
    run: Run,
}

impl ReturnedJob {
    /// The job's id.
    pub fn id(&self) -> u64 {
        self.meta.id
    }
    /// The job's hashed key.
    pub fn key(&self) -> Option<u64> {
        self.meta.key
    }
    /// The job's `(partition, offset)`.
    pub fn position(&self) -> Option<(u32, u64)> {
        self.meta.position
    }
    /// Runs the job here, catching a panic, and delivers its result to its handle.
    pub async fn run(self) {
        let mut run = self.run;
        while run.next().await.is_some() {}
    }
}

impl fmt::Debug for ReturnedJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReturnedJob")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// The outcome of [`Pool::drain`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Drained {
    /// Accepted jobs that had not started by the deadline, in submission order.
    pub returned: Vec<ReturnedJob>,
    /// Jobs still running at the deadline. They go on and complete their handles;
    /// call [`Pool::shutdown_now`] to abort them.
    pub still_running: usize,
}

impl Drained {
    /// Whether every accepted job finished.
    pub fn is_complete(&self) -> bool {
        self.returned.is_empty() && self.still_running == 0
    }
}

/// The outcome of [`Pool::shutdown_now`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Shutdown {
    /// Accepted jobs that had not started, in submission order.
    pub returned: Vec<ReturnedJob>,
    /// Jobs that were running and were aborted; their handles resolve to
    /// [`Error::Cancelled`] unless they finished first.
    pub aborted: usize,
}

/// Counters and gauges of a pool, taken at one instant.
///
/// A job's counters are booked before its handle resolves, so after awaiting a handle
/// the metrics (and the watermark) include that job. Times come from one clock reading
/// per transition: when a job is accepted into the queue and when it ends; a worker's
/// next job starts at the instant its previous one ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Jobs accepted and not started.
    pub queued: usize,
    /// Jobs running now.
    pub running: usize,
    /// The concurrency limit now.
    pub workers: usize,
    /// The most jobs ever running at once.
    pub running_peak: usize,
    /// The most jobs ever queued at once.
    pub queued_peak: usize,
    /// Jobs accepted.
    pub submitted: u64,
    /// Jobs that ran to their end (their output may be a failure).
    pub completed: u64,
    /// Completed jobs whose output was a failure (see [`Outcome`]).
    pub failed: u64,
    /// Jobs that panicked.
    pub panicked: u64,
    /// Jobs aborted while running by [`Pool::shutdown_now`].
    pub cancelled: u64,
    /// Accepted jobs handed back unrun by `drain` or `shutdown_now`.
    pub returned: u64,
    /// Total time started jobs spent queued.
    pub queue_time_total: Duration,
    /// Longest time a job spent queued.
    pub queue_time_max: Duration,
    /// Total run time of finished jobs (completed or panicked).
    pub run_time_total: Duration,
    /// Longest run time of a finished job.
    pub run_time_max: Duration,
}

/// Builds a [`Pool`]; see [`Pool::builder`]. `workers` and `queue` must be set.
#[derive(Clone)]
pub struct PoolBuilder {
    workers: usize,
    queue: usize,
    order: Order,
    max_key_backlog: Option<usize>,
    max_watermark_window: usize,
    on_panic: Option<PanicHook>,
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("workers", &self.workers)
            .field("queue", &self.queue)
            .field("order", &self.order)
            .field("max_key_backlog", &self.max_key_backlog)
            .field("max_watermark_window", &self.max_watermark_window)
            .field("on_panic", &self.on_panic.is_some())
            .finish()
    }
}

impl PoolBuilder {
    /// How many jobs run at once (required; at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// How many accepted jobs may wait for a worker (required; at least 1). Past it,
    /// `submit` waits and `try_submit` hands the job back.
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n;
        self
    }

    /// The ordering mode; [`Order::Unordered`] by default.
    pub fn order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// In [`Order::PerKey`], how many jobs may wait behind one key's running job;
    /// `queue` by default. A key at its bound makes `submit` wait and
    /// `try_submit` refuse, for that key only.
    pub fn max_key_backlog(mut self, n: usize) -> Self {
        self.max_key_backlog = Some(n);
        self
    }

    /// How many finished jobs of one partition may wait behind an unfinished one before
    /// the pool takes no more jobs for that partition; 1024 by default.
    pub fn max_watermark_window(mut self, n: usize) -> Self {
        self.max_watermark_window = n;
        self
    }

    /// Called, on the worker, after a job panics. A panic in the hook is caught too.
    pub fn on_panic(mut self, hook: impl Fn(&PanicReport) + Send + Sync + 'static) -> Self {
        self.on_panic = Some(Arc::new(hook));
        self
    }

    /// Builds the pool on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the first field out of range (`workers` and `queue`
    /// unset count as 0); [`Error::NoRuntime`] outside a tokio runtime.
    pub fn build(self) -> Result<Pool> {
        let nonzero = |field, v: usize| {
            if v == 0 {
                Err(Error::invalid(
                    field,
                    format!("must be at least 1; set it with `.{field}(n)`"),
                ))
            } else {
                Ok(v)
            }
        };
        let max_concurrency = nonzero("workers", self.workers)?;
        let queue_capacity = nonzero("queue", self.queue)?;
        let max_key_backlog = nonzero(
            "max_key_backlog",
            self.max_key_backlog.unwrap_or(queue_capacity),
        )?;
        let max_window = nonzero("max_watermark_window", self.max_watermark_window)?;
        let watermarks = Watermarks::new(max_window)?;
        let handle = Handle::try_current().map_err(|_| Error::NoRuntime)?;
        Ok(Pool {
            shared: Arc::new(Shared {
                id: NEXT_POOL_ID.fetch_add(1, AtomicOrdering::Relaxed),
                handle,
                order: self.order,
                queue_capacity,
                max_key_backlog: if self.order == Order::Serial {
                    queue_capacity
                } else {
                    max_key_backlog
                },
                on_panic: self.on_panic,
                shutting_down: AtomicBool::new(false),
                state: Mutex::new(State {
                    limit: max_concurrency,
                    running: 0,
                    ready: VecDeque::new(),
                    keys: HashMap::new(),
                    backlog: 0,
                    watermarks,
                    closed: false,
                    shut: false,
                    room_wanted: false,
                    next_job: 0,
                    workers: Vec::new(),
                    free_workers: Vec::new(),
                    metrics: Metrics::default(),
                }),
                room: Notify::new(),
                idle: Notify::new(),
            }),
        })
    }
}

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

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl Pool {
    /// A builder; set the two bounds every pool needs, how many jobs run at once
    /// ([`workers`](PoolBuilder::workers)) and how many accepted jobs may wait
    /// ([`queue`](PoolBuilder::queue)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), sd_pool::Error> {
    /// let pool = sd_pool::Pool::builder().workers(4).queue(64).build()?;
    /// assert_eq!(pool.metrics().workers, 4);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            workers: 0,
            queue: 0,
            order: Order::Unordered,
            max_key_backlog: None,
            max_watermark_window: 1024,
            on_panic: None,
        }
    }

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
            Err(Blocked::Bound(bound, limit)) => Err(Rejected {
                error: Error::Full { bound, limit },
                job,
            }),
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
            return Err(Error::invalid("workers", "must be at least 1"));
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

    /// Stops intake: later submissions get [`Error::Closed`], and so do submitters
    /// waiting for room. Accepted jobs still run.
    pub fn close(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.room.notify_waiters();
    }

    /// Whether [`close`](Self::close) (or a drain or shutdown) was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.state).closed
    }

    /// Closes the pool and waits up to `timeout` for every accepted job to finish.
    /// At the deadline, jobs that had not started are taken out and returned; running
    /// ones are counted in [`Drained::still_running`] and go on.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        self.close();
        let deadline = Instant::now() + timeout;
        loop {
            let mut idle = pin!(self.shared.idle.notified());
            {
                let st = lock(&self.shared.state);
                if st.running == 0 && st.queued() == 0 {
                    return Drained {
                        returned: Vec::new(),
                        still_running: 0,
                    };
                }
                idle.as_mut().enable();
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                break;
            }
        }
        let mut st = lock(&self.shared.state);
        let returned = take_queued(&mut st);
        Drained {
            returned,
            still_running: st.running,
        }
    }

    /// Closes the pool, takes out every job that has not started, and aborts the
    /// running ones (their handles resolve to [`Error::Cancelled`]).
    pub fn shutdown_now(&self) -> Shutdown {
        let mut st = lock(&self.shared.state);
        st.closed = true;
        st.shut = true;
        self.shared
            .shutting_down
            .store(true, AtomicOrdering::Release);
        let returned = take_queued(&mut st);
        let aborted = st.running;
        for worker in st.workers.iter().filter_map(|w| w.abort.as_ref()) {
            worker.abort();
        }
        drop(st);
        self.shared.room.notify_waiters();
        self.shared.idle.notify_waiters();
        Shutdown { returned, aborted }
    }

    /// The counters and gauges now.
    pub fn metrics(&self) -> Metrics {
        let st = lock(&self.shared.state);
        let mut m = st.metrics.clone();
        m.queued = st.queued();
        m.running = st.running;
        m.workers = st.limit;
        m
    }

    /// The ordering mode.
    pub fn order(&self) -> Order {
        self.shared.order
    }

    /// The watermark of `partition`: the highest offset at or below which every job
    /// submitted with that partition is done (completed, failed or panicked).
    pub fn watermark(&self, partition: u32) -> Option<u64> {
        lock(&self.shared.state).watermarks.committed(partition)
    }

    /// Every partition's watermark, in partition order.
    pub fn watermarks(&self) -> Vec<(u32, u64)> {
        lock(&self.shared.state).watermarks.all_committed()
    }

    /// Finished jobs of `partition` waiting behind an unfinished one.
    pub fn watermark_window(&self, partition: u32) -> usize {
        lock(&self.shared.state).watermarks.window(partition)
    }
}

/// The output type of a job.
pub type OutputOf<J> = <<J as IntoJob>::Future as Future>::Output;

/// Takes every queued job out, in submission order, releasing the keys they held.
fn take_queued(st: &mut State) -> Vec<ReturnedJob> {
    let mut out: Vec<ReturnedJob> = Vec::with_capacity(st.queued());
    while let Some(q) = st.ready.pop_front() {
        if let Some(key) = q.meta.key
            && let Some(backlog) = st.keys.remove(&key)
        {
            st.backlog -= backlog.len();
            out.extend(backlog.into_iter().map(Queued::returned));
        }
        out.push(q.returned());
    }
    for backlog in st.keys.values_mut() {
        st.backlog -= backlog.len();
        out.extend(backlog.drain(..).map(Queued::returned));
    }
    out.sort_by_key(|j| j.meta.id);
    st.metrics.returned += out.len() as u64;
    out
}

impl Queued {
    fn returned(self) -> ReturnedJob {
        ReturnedJob {
            meta: self.meta,
            run: self.run,
        }
    }
}

impl Shared {
    fn effective_key(&self, key: Option<u64>) -> Option<u64> {
        match self.order {
            Order::Unordered => None,
            Order::PerKey => key,
            Order::Serial => Some(0),
        }
    }

    fn check<F>(&self, st: &State, job: &Job<F>) -> Result<Slot, Blocked> {
        if st.closed {
            return Err(Blocked::Closed);
        }
        if let Some((partition, offset)) = job.position {
            st.watermarks
                .check_increasing(partition, offset)
                .map_err(Blocked::Invalid)?;
            if !st.watermarks.has_room(partition) {
                return Err(Blocked::Bound(
                    "max_watermark_window",
                    st.watermarks.max_window(),
                ));
            }
        }
        if let Some(key) = self.effective_key(job.key)
            && let Some(backlog) = st.keys.get(&key)
        {
            if backlog.len() >= self.max_key_backlog {
                return Err(Blocked::Bound("max_key_backlog", self.max_key_backlog));
            }
            if st.queued() >= self.queue_capacity {
                return Err(Blocked::Bound("queue", self.queue_capacity));
            }
            return Ok(Slot::Backlog);
        }
        if st.running < st.limit && st.ready.is_empty() {
            Ok(Slot::RunNow)
        } else if st.queued() >= self.queue_capacity {
            Err(Blocked::Bound("queue", self.queue_capacity))
        } else {
            Ok(Slot::Ready)
        }
    }

    /// Accepts a job that [`check`](Self::check) found room for.
    fn insert<F>(
        self: &Arc<Self>,
        st: &mut State,
        job: Job<F>,
        slot: Slot,
        (tx, rx): Channel<F::Output>,
    ) -> (JobHandle<F::Output>, Option<(Launch, Queued)>)
    where
        F: Future + Send + 'static,
        F::Output: Outcome + Send + 'static,
    {
        let id = st.next_job;
        st.next_job += 1;
        let key = self.effective_key(job.key);
        if let Some((partition, offset)) = job.position {
            // `check` verified the offset increases, so this cannot fail.
            let _ = st.watermarks.track(partition, offset);
        }
        let future = job.future;
        // Two steps in one allocation: run the job (yielding how it ended, while its
        // output waits inside), then, once the pool has booked it, deliver the output.
        let run: Run = futures::stream::unfold(Step::Run(future, tx), |step| async move {
            match step {
                Step::Run(future, tx) => {
                    let (finished, delivery) = match AssertUnwindSafe(future).catch_unwind().await {
                        Ok(out) => (
                            Finished::Done {
                                failed: out.is_failure(),
                            },
                            Delivery::Output(out),
                        ),
                        Err(payload) => {
                            let message = panic_message(&*payload);
                            (
                                Finished::Panicked(message.clone()),
                                Delivery::Panicked(message),
                            )
                        }
                    };
                    Some((finished, Step::Deliver(delivery, tx)))
                }
                Step::Deliver(delivery, tx) => {
                    let _ = tx.send(delivery);
                    None
                }
            }
        })
        .boxed();
        let queued = Queued {
            meta: Meta {
                id,
                key,
                position: job.position,
                enqueued: Instant::now(),
            },
            run,
        };
        st.metrics.submitted += 1;
        let mut launch = None;
        match slot {
            Slot::RunNow => {
                if let Some(key) = key {
                    st.keys.insert(key, VecDeque::new());
                }
                st.running += 1;
                launch = Some((st.reserve_worker(), queued));
            }
            Slot::Ready => {
                if let Some(key) = key {
                    st.keys.insert(key, VecDeque::new());
                }
                st.ready.push_back(queued);
            }
            Slot::Backlog => {
                if let Some(backlog) = key.and_then(|k| st.keys.get_mut(&k)) {
                    backlog.push_back(queued);
                    st.backlog += 1;
                }
            }
        }
        st.metrics.queued_peak = st.metrics.queued_peak.max(st.queued());
        (JobHandle { id, rx }, launch)
    }

    /// Spawns the worker of a job that [`insert`](Self::insert) started, outside the
    /// lock (spawning allocates and may wake a runtime thread), then files its abort
    /// handle. If `shutdown_now` came in between, the worker is aborted here; if the
    /// worker already finished, its slot moved to a new generation and nothing is filed.
    fn launch(self: &Arc<Self>, launch: Option<(Launch, Queued)>) {
        let Some((launch, job)) = launch else { return };
        let abort = self.spawn_task(launch.wid, job);
        let mut st = lock(&self.state);
        let shut = st.shut;
        match st.workers.get_mut(launch.wid) {
            Some(slot) if slot.generation == launch.generation => {
                if shut {
                    abort.abort();
                } else {
                    slot.abort = Some(abort);
                }
            }
            _ => {}
        }
    }

    /// Spawns a worker and files its abort handle, under the lock (used when raising the
    /// concurrency limit starts several queued jobs at once).
    fn spawn_worker(self: &Arc<Self>, st: &mut State, job: Queued) {
        let launch = st.reserve_worker();
        let abort = self.spawn_task(launch.wid, job);
        st.workers[launch.wid].abort = Some(abort);
    }

    fn spawn_task(self: &Arc<Self>, wid: usize, job: Queued) -> AbortHandle {
        let task = CURRENT_POOL.scope(self.id, worker(Arc::clone(self), wid, job));
        self.handle.spawn(task).abort_handle()
    }

    /// Books a finished job and picks the worker's next one, if it should go on.
    /// `started` is when the job started and `now` when it finished: the worker reads
    /// the clock once per job, and `now` is the next job's start.
    fn finish(
        &self,
        wid: usize,
        meta: Meta,
        finished: &Finished,
        started: Instant,
        now: Instant,
    ) -> Option<Queued> {
        let run_time = now.saturating_duration_since(started);
        let queue_time = started.saturating_duration_since(meta.enqueued);
        let mut st = lock(&self.state);
        let m = &mut st.metrics;
        m.queue_time_total += queue_time;
        m.queue_time_max = m.queue_time_max.max(queue_time);
        match finished {
            Finished::Done { failed } => {
                m.completed += 1;
                m.failed += u64::from(*failed);
            }
            Finished::Panicked(_) => m.panicked += 1,
        }
        m.run_time_total += run_time;
        m.run_time_max = m.run_time_max.max(run_time);
        release(&mut st, &meta);
        if let Some((partition, offset)) = meta.position {
            st.watermarks.complete(partition, offset);
        }
        let next = if st.shut || st.running > st.limit {
            None
        } else {
            st.ready.pop_front()
        };
        if next.is_none() {
            st.running -= 1;
            free_worker(&mut st, wid);
        }
        let notify_room = std::mem::take(&mut st.room_wanted);
        let notify_idle = st.closed && st.running == 0 && st.queued() == 0;
        drop(st);
        if notify_room {
            self.room.notify_waiters();
        }
        if notify_idle {
            self.idle.notify_waiters();
        }
        next
    }

    fn report_panic(&self, meta: &Meta, message: String) {
        tracing::warn!(job = meta.id, %message, "sd-pool: job panicked");
        if let Some(hook) = &self.on_panic {
            let report = PanicReport {
                id: meta.id,
                key: meta.key,
                position: meta.position,
                message,
            };
            if std::panic::catch_unwind(AssertUnwindSafe(|| hook(&report))).is_err() {
                tracing::error!(job = meta.id, "sd-pool: the panic hook panicked");
            }
        }
    }
}

/// Gives a worker's slot back to the slab.
fn free_worker(st: &mut State, wid: usize) {
    if let Some(slot) = st.workers.get_mut(wid) {
        slot.abort = None;
        slot.generation += 1;
        st.free_workers.push(wid);
    }
}

/// Lets the next job of the finished job's key become ready.
fn release(st: &mut State, meta: &Meta) {
    let Some(key) = meta.key else { return };
    let next = match st.keys.get_mut(&key) {
        Some(backlog) => backlog.pop_front(),
        None => return,
    };
    match next {
        Some(next) => {
            st.backlog -= 1;
            st.ready.push_back(next);
        }
        None => {
            st.keys.remove(&key);
        }
    }
}

/// Books a worker that was aborted (by `shutdown_now`) in the middle of a job.
struct WorkerGuard {
    shared: Arc<Shared>,
    wid: usize,
    current: Option<Meta>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        let Some(meta) = self.current.take() else {
            return;
        };
        let mut st = lock(&self.shared.state);
        st.metrics.cancelled += 1;
        release(&mut st, &meta);
        st.running -= 1;
        free_worker(&mut st, self.wid);
        let idle = st.running == 0 && st.queued() == 0;
        let room = std::mem::take(&mut st.room_wanted);
        drop(st);
        if idle {
            self.shared.idle.notify_waiters();
        }
        if room {
            self.shared.room.notify_waiters();
        }
    }
}

/// A worker: runs `first`, then queued jobs while there are any and the limit allows.
/// The guard is built before the task starts, so an abort before the first poll still
/// books the job as cancelled and the worker as gone.
fn worker(shared: Arc<Shared>, wid: usize, first: Queued) -> impl Future<Output = ()> + Send {
    let mut guard = WorkerGuard {
        shared,
        wid,
        current: Some(first.meta),
    };
    async move {
        if guard.shared.shutting_down.load(AtomicOrdering::Acquire) {
            // `shutdown_now` ran between the spawn and the first poll: the guard books
            // the job as cancelled, as an abort would.
            return;
        }
        let mut job = first;
        let mut started = Instant::now();
        loop {
            let meta = job.meta;
            guard.current = Some(meta);
            // A run always yields once before it ends; the fallback is never taken.
            let finished =
                job.run.next().await.unwrap_or_else(|| {
                    Finished::Panicked("the job ended without a result".to_owned())
                });
            guard.current = None;
            let now = Instant::now();
            if let Finished::Panicked(message) = &finished {
                guard.shared.report_panic(&meta, message.clone());
            }
            let next = guard.shared.finish(wid, meta, &finished, started, now);
            // Synchronous (no await inside), so no abort can fall between booking and
            // delivery.
            let _ = job.run.next().await;
            match next {
                Some(next) => {
                    job = next;
                    // The panic hook ran after `now`; do not bill it to the next job.
                    started = match finished {
                        Finished::Done { .. } => now,
                        Finished::Panicked(_) => Instant::now(),
                    };
                }
                None => return,
            }
        }
    }
}
