//! Running a job on a worker task, and booking how it ended.

use super::*;

impl Shared {
    fn effective_key(&self, key: Option<u64>) -> Option<u64> {
        match self.order {
            Order::Unordered => None,
            Order::PerKey => key,
            Order::Serial => Some(0),
        }
    }

    pub(super) fn check<F>(&self, st: &State, job: &Job<F>) -> Result<Slot, Blocked> {
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
        if st.running < st.limit && st.ready.len() == st.claimed {
            Ok(Slot::RunNow)
        } else if st.queued() >= self.queue_capacity {
            Err(Blocked::Bound("queue", self.queue_capacity))
        } else {
            Ok(Slot::Ready)
        }
    }

    /// Accepts a job that [`check`](Self::check) found room for.
    pub(super) fn insert<F>(
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
            let lag = st.watermarks.tracked(partition);
            st.lags.set(&self.name, partition, lag);
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
            #[cfg(feature = "otel")]
            trace_parent: job.trace_parent,
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
            Slot::Claim => {
                if let Some(key) = key {
                    st.keys.insert(key, VecDeque::new());
                }
                debug_assert_eq!(st.ready.len(), st.claimed, "claims lead the ready queue");
                st.running += 1;
                st.claimed += 1;
                st.metrics.running_peak = st.metrics.running_peak.max(st.running);
                st.ready.push_back(queued);
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
        self.meters.state(st.queued(), st.running);
        (JobHandle { id, rx }, launch)
    }

    /// Spawns the worker of a job that [`insert`](Self::insert) started, outside the
    /// lock (spawning allocates and may wake a runtime thread), then files its abort
    /// handle.
    pub(super) fn launch(self: &Arc<Self>, launch: Option<(Launch, Queued)>) {
        let Some((launch, job)) = launch else { return };
        let abort = self.spawn_task(launch.wid, job);
        self.file_abort(launch, abort);
    }

    #[cfg(feature = "kafka")]
    /// Starts a worker for the claimed jobs, unless one is starting already. From a
    /// thread outside the runtime a spawn wakes a runtime thread, which then preempts
    /// the spawning thread on a busy machine: one spawn per batch of jobs, not one per
    /// job; the worker starts the next (see [`start_one`]).
    pub(super) fn start_claimed(self: &Arc<Self>) {
        let start = start_one(&mut lock(&self.state));
        self.spawn_starter(start);
    }

    /// Spawns a worker that begins by taking a claimed job (a start booked by
    /// [`start_one`]), and files its abort handle.
    fn spawn_starter(self: &Arc<Self>, start: Option<Launch>) {
        let Some(start) = start else { return };
        let task = CURRENT_POOL.scope(self.id, worker(Arc::clone(self), start.wid, None));
        let abort = self.handle.spawn(task).abort_handle();
        self.file_abort(start, abort);
    }

    /// A starting worker takes the first claimed job (its place in `running` becomes
    /// the worker's), and books the next start if claims are left. With no claim left
    /// (a worker that finished a job took it, or a shutdown handed it back) the worker
    /// gives its slot back.
    fn take_claimed(&self, wid: usize) -> (Option<Queued>, Option<Launch>) {
        let mut st = lock(&self.state);
        st.starting = false;
        if st.claimed == 0 || st.shut {
            free_worker(&mut st, wid);
            return (None, None);
        }
        st.claimed -= 1;
        let job = st.ready.pop_front();
        let next = start_one(&mut st);
        (job, next)
    }

    /// Files a spawned worker's abort handle. If `shutdown_now` came in between, the
    /// worker is aborted here; if the worker already finished, its slot moved to a new
    /// generation and nothing is filed.
    fn file_abort(&self, launch: Launch, abort: AbortHandle) {
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
    pub(super) fn spawn_worker(self: &Arc<Self>, st: &mut State, job: Queued) {
        let launch = st.reserve_worker();
        let abort = self.spawn_task(launch.wid, job);
        st.workers[launch.wid].abort = Some(abort);
    }

    fn spawn_task(self: &Arc<Self>, wid: usize, job: Queued) -> AbortHandle {
        let task = CURRENT_POOL.scope(self.id, worker(Arc::clone(self), wid, Some(job)));
        self.handle.spawn(task).abort_handle()
    }

    /// Books a finished job and picks the worker's next one, if it should go on, and a
    /// worker to start (see [`take_over`]). `started` is when the job started and `now`
    /// when it finished: the worker reads the clock once per job, and `now` is the next
    /// job's start.
    fn finish(
        &self,
        wid: usize,
        meta: Meta,
        finished: &Finished,
        started: Instant,
        now: Instant,
    ) -> (Option<Queued>, Option<Launch>) {
        let run_time = now.saturating_duration_since(started);
        let queue_time = started.saturating_duration_since(meta.enqueued);
        let mut st = lock(&self.state);
        let m = &mut st.metrics;
        m.queue_time_total += queue_time;
        m.queue_time_max = m.queue_time_max.max(queue_time);
        let end = match finished {
            Finished::Done { failed } => {
                m.completed += 1;
                m.failed += u64::from(*failed);
                if *failed { JobEnd::Error } else { JobEnd::Ok }
            }
            Finished::Panicked(_) => {
                m.panicked += 1;
                JobEnd::Panicked
            }
        };
        self.meters.ended(end);
        self.meters.timed(queue_time, run_time);
        m.run_time_total += run_time;
        m.run_time_max = m.run_time_max.max(run_time);
        release(&mut st, &meta);
        if let Some((partition, offset)) = meta.position {
            st.watermarks.complete(partition, offset);
            let lag = st.watermarks.tracked(partition);
            st.lags.set(&self.name, partition, lag);
        }
        let next = if st.shut || st.running > st.limit {
            None
        } else {
            st.ready.pop_front()
        };
        let mut start = None;
        if next.is_none() {
            st.running -= 1;
            free_worker(&mut st, wid);
        } else if st.claimed > 0 {
            start = take_over(&mut st);
        }
        self.meters.state(st.queued(), st.running);
        let notify_room = std::mem::take(&mut st.room_wanted);
        let notify_idle = st.closed && st.running == 0 && st.queued() == 0;
        drop(st);
        if notify_room {
            self.room.notify_waiters();
        }
        if notify_idle {
            self.idle.notify_waiters();
        }
        (next, start)
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

/// Books a start of a worker for the claimed jobs, if there are any, none is starting
/// and the pool is not shut; the caller spawns it
/// ([`spawn_starter`](Shared::spawn_starter)).
fn start_one(st: &mut State) -> Option<Launch> {
    if st.claimed == 0 || st.starting || st.shut {
        return None;
    }
    st.starting = true;
    Some(st.reserve_worker())
}

/// A worker that finished a job took the first claimed job from `ready`: the claim's
/// place in `running` is now the worker's, and the finished job's place is free. Queued
/// jobs behind the claims may take it (they are claimed in turn); then a start is
/// booked if claims are left and no worker is starting.
fn take_over(st: &mut State) -> Option<Launch> {
    st.claimed -= 1;
    st.running -= 1;
    let room = st.limit.saturating_sub(st.running);
    let claim = room.min(st.ready.len() - st.claimed);
    st.claimed += claim;
    st.running += claim;
    start_one(st)
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

/// What a worker holds, for its guard to give back if the worker is dropped.
enum Holding {
    /// Nothing to give back (between jobs, or gone).
    Nothing,
    /// Started to take a claimed job and has not taken it: a slab slot and the start.
    Start,
    /// A job in the middle of its run.
    Job(Meta),
}

/// Books a worker that was aborted (by `shutdown_now`) in the middle of a job, or
/// dropped before it took its first.
struct WorkerGuard {
    shared: Arc<Shared>,
    wid: usize,
    holding: Holding,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        let meta = match std::mem::replace(&mut self.holding, Holding::Nothing) {
            Holding::Nothing => return,
            Holding::Start => {
                let mut st = lock(&self.shared.state);
                st.starting = false;
                free_worker(&mut st, self.wid);
                return;
            }
            Holding::Job(meta) => meta,
        };
        let mut st = lock(&self.shared.state);
        st.metrics.cancelled += 1;
        release(&mut st, &meta);
        st.running -= 1;
        free_worker(&mut st, self.wid);
        self.shared.meters.ended(JobEnd::Cancelled);
        self.shared.meters.state(st.queued(), st.running);
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

/// A worker: runs `first` (or, with none, takes a claimed job, see
/// [`Shared::take_claimed`]), then queued jobs while there are any and the limit
/// allows. The guard is built before the task starts, so an abort before the first
/// poll still books the job as cancelled (or the start as over) and the worker as gone.
fn worker(
    shared: Arc<Shared>,
    wid: usize,
    first: Option<Queued>,
) -> impl Future<Output = ()> + Send {
    let holding = match &first {
        Some(job) => Holding::Job(job.meta),
        None => Holding::Start,
    };
    let mut guard = WorkerGuard {
        shared,
        wid,
        holding,
    };
    async move {
        if guard.shared.shutting_down.load(AtomicOrdering::Acquire) {
            // `shutdown_now` ran between the spawn and the first poll: the guard books
            // the job as cancelled, as an abort would.
            return;
        }
        let mut job = match first {
            Some(job) => job,
            None => {
                let (job, next) = guard.shared.take_claimed(wid);
                // Booked under the lock: the start is over, the slot is the job's or
                // given back.
                guard.holding = match &job {
                    Some(job) => Holding::Job(job.meta),
                    None => Holding::Nothing,
                };
                guard.shared.spawn_starter(next);
                match job {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        let mut started = Instant::now();
        loop {
            let meta = job.meta;
            guard.holding = Holding::Job(meta);
            // A run always yields once before it ends; the fallback is never taken.
            let span =
                tracing::debug_span!("pool.job", sd.name = %guard.shared.name, job = meta.id);
            // Before the span is first entered, while its parent may still change.
            #[cfg(feature = "otel")]
            if let Some(parent) = job.trace_parent.take() {
                parent.set_parent_of(&span);
            }
            let finished =
                job.run.next().instrument(span).await.unwrap_or_else(|| {
                    Finished::Panicked("the job ended without a result".to_owned())
                });
            guard.holding = Holding::Nothing;
            let now = Instant::now();
            if let Finished::Panicked(message) = &finished {
                guard.shared.report_panic(&meta, message.clone());
            }
            let (next, start) = guard.shared.finish(wid, meta, &finished, started, now);
            // Synchronous (no await inside), so no abort can fall between booking and
            // delivery.
            let _ = job.run.next().await;
            guard.shared.spawn_starter(start);
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
