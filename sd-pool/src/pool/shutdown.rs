//! Close, drain and abort, and the jobs they hand back.

use super::*;

/// An accepted job that did not run, handed back by [`Pool::drain`] or
/// [`Pool::shutdown_now`]. Running it (anywhere) completes its [`JobHandle`]; dropping
/// it makes the handle resolve to [`Error::Cancelled`].
pub struct ReturnedJob {
    meta: Meta,
    run: Run,
    /// The remote parent of the job's span, as the pool would have used it.
    #[cfg(feature = "otel")]
    trace_parent: Option<Box<sd_core::trace::TraceParent>>,
    /// The pool's name, the `sd.name` of the job's span.
    pool: Arc<str>,
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
    /// Runs the job here, catching a panic, and delivers its result to its handle. The
    /// job runs in its `pool.job` span, as on a worker: a child of the trace context given
    /// with `Job::with_trace_parent` (feature `otel`), so a job handed back and run
    /// elsewhere stays in its producer's trace.
    pub async fn run(self) {
        let span = tracing::debug_span!("pool.job", sd.name = %self.pool, job = self.meta.id);
        #[cfg(feature = "otel")]
        if let Some(parent) = self.trace_parent {
            parent.set_parent_of(&span);
        }
        let mut run = self.run;
        async move { while run.next().await.is_some() {} }
            .instrument(span)
            .await;
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

impl Pool {
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
        let returned = take_queued(&mut st, &self.shared.name);
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
        let returned = take_queued(&mut st, &self.shared.name);
        let aborted = st.running;
        for worker in st.workers.iter().filter_map(|w| w.abort.as_ref()) {
            worker.abort();
        }
        drop(st);
        self.shared.room.notify_waiters();
        self.shared.idle.notify_waiters();
        Shutdown { returned, aborted }
    }
}

/// Takes every queued job out, in submission order, releasing the keys they held.
fn take_queued(st: &mut State, pool: &str) -> Vec<ReturnedJob> {
    let pool: Arc<str> = pool.into();
    let mut out: Vec<ReturnedJob> = Vec::with_capacity(st.queued());
    while let Some(q) = st.ready.pop_front() {
        if let Some(key) = q.meta.key
            && let Some(backlog) = st.keys.remove(&key)
        {
            st.backlog -= backlog.len();
            out.extend(backlog.into_iter().map(|q| q.returned(&pool)));
        }
        out.push(q.returned(&pool));
    }
    for backlog in st.keys.values_mut() {
        st.backlog -= backlog.len();
        out.extend(backlog.drain(..).map(|q| q.returned(&pool)));
    }
    out.sort_by_key(|j| j.meta.id);
    st.metrics.returned += out.len() as u64;
    out
}

impl Queued {
    fn returned(self, pool: &Arc<str>) -> ReturnedJob {
        ReturnedJob {
            meta: self.meta,
            run: self.run,
            #[cfg(feature = "otel")]
            trace_parent: self.trace_parent,
            pool: Arc::clone(pool),
        }
    }
}
