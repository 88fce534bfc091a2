//! Construction: [`PoolBuilder`].

use super::*;

/// Builds a [`Pool`]; see [`Pool::builder`]. `workers` and `queue` must be set.
#[derive(Clone)]
pub struct PoolBuilder {
    workers: usize,
    queue: usize,
    order: Order,
    max_key_backlog: Option<usize>,
    max_watermark_window: usize,
    on_panic: Option<PanicHook>,
    name: String,
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

    /// The pool's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`) and field of its job spans. Name it after its work
    /// (`"emails"`), never after a job: a label's values must stay few.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
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
                Err(Error::config(
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
                meters: crate::observe::PoolMeters::new(&self.name),
                name: self.name,
                shutting_down: AtomicBool::new(false),
                state: Mutex::new(State {
                    limit: max_concurrency,
                    running: 0,
                    ready: VecDeque::new(),
                    keys: FastMap::default(),
                    backlog: 0,
                    watermarks,
                    closed: false,
                    shut: false,
                    room_wanted: false,
                    next_job: 0,
                    workers: Vec::new(),
                    free_workers: Vec::new(),
                    metrics: Metrics::default(),
                    lags: crate::observe::Lags::default(),
                }),
                room: Notify::new(),
                idle: Notify::new(),
            }),
        })
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
            name: sd_core::observe::DEFAULT_NAME.to_owned(),
        }
    }
}
