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
        if st.running < st.limit && st.ready.is_empty() {
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
        tx: Option<Deliver<F::Output>>,
    ) -> (u64, Option<(Launch, Queued)>)
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
        let run: Run = Box::pin(RunJob::Running {
            future: AssertUnwindSafe(job.future).catch_unwind(),
            tx,
        });
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
        (id, launch)
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
    /// Launches several started jobs. From a thread outside the runtime each spawn
    /// wakes a runtime thread, which then preempts the spawning thread on a busy
    /// machine; so several are handed over in one spawned task that spawns them from
    /// inside the runtime. The workers are built (their guards armed) first: if that
    /// task never runs, dropping them books their jobs as cancelled.
    pub(super) fn launch_batch(self: &Arc<Self>, launches: Vec<(Launch, Queued)>) {
        if launches.len() <= 1 {
            for launch in launches {
                self.launch(Some(launch));
            }
            return;
        }
        let tasks: Vec<_> = launches
            .into_iter()
            .map(|(launch, job)| (launch, self.worker_task(launch.wid, job)))
            .collect();
        let shared = Arc::clone(self);
        self.handle.spawn(async move {
            for (launch, task) in tasks {
                let abort = shared.handle.spawn(task).abort_handle();
                shared.file_abort(launch, abort);
            }
        });
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
        self.handle.spawn(self.worker_task(wid, job)).abort_handle()
    }

    fn worker_task(
        self: &Arc<Self>,
        wid: usize,
        job: Queued,
    ) -> impl Future<Output = ()> + Send + use<> {
        CURRENT_POOL.scope(self.id, worker(Arc::clone(self), wid, job))
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
        if next.is_none() {
            st.running -= 1;
            free_worker(&mut st, wid);
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
