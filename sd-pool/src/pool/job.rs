//! What a job is: its future, key and position, its ordering, its outcome and handle.

use super::*;

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
    pub(super) future: F,
    pub(super) key: Option<u64>,
    pub(super) position: Option<(u32, u64)>,
    /// Boxed: a job without one stays as small as without the feature.
    #[cfg(feature = "otel")]
    pub(super) trace_parent: Option<Box<sd_core::trace::TraceParent>>,
}

impl<F> Job<F> {
    /// A job with no key and no position.
    pub fn new(future: F) -> Self {
        Self {
            future,
            key: None,
            position: None,
            #[cfg(feature = "otel")]
            trace_parent: None,
        }
    }

    /// Runs the job's `pool.job` span as a child of `parent`, a trace context read from
    /// the message the job handles ([`TraceParent::extract`] over its headers): the job,
    /// and every span it opens, join the producer's trace. `None` leaves the span a root
    /// of its own, as without this call.
    ///
    /// [`TraceParent::extract`]: sd_core::trace::TraceParent::extract
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn with_trace_parent(
        mut self,
        parent: impl Into<Option<sd_core::trace::TraceParent>>,
    ) -> Self {
        self.trace_parent = parent.into().map(Box::new);
        self
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

    /// Orders this job after earlier jobs with an equal key already hashed to 64 bits.
    #[cfg(feature = "kafka")]
    pub(crate) fn with_key_hash(mut self, key: u64) -> Self {
        self.key = Some(key);
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
        let mut f = f.debug_struct("Job");
        f.field("key", &self.key).field("position", &self.position);
        #[cfg(feature = "otel")]
        f.field(
            "trace_parent",
            &self.trace_parent.as_ref().map(ToString::to_string),
        );
        f.finish_non_exhaustive()
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
    pub(super) id: u64,
    pub(super) rx: oneshot::Receiver<Delivery<T>>,
}

/// What a job sends to its handle. The handle knows the job's id, so the job need not:
/// the run future is built before the id is assigned, outside the pool's lock.
#[derive(Debug)]
pub(super) enum Delivery<T> {
    Output(T),
    Panicked(String),
}

pin_project_lite::pin_project! {
    /// A job's run as a stream of two steps, in one allocation the size of the job's
    /// future: the first item says how the job ended (its output waits inside), and
    /// polling again delivers the output to the handle's sender (none when no handle was
    /// made: the output is then dropped).
    #[project = RunStep]
    pub(super) enum RunJob<F: Future> {
        Running {
            #[pin]
            future: futures::future::CatchUnwind<AssertUnwindSafe<F>>,
            tx: Option<Deliver<F::Output>>,
        },
        Booked {
            delivery: Option<Delivery<F::Output>>,
            tx: Option<Deliver<F::Output>>,
        },
        Delivered,
    }
}

impl<F> futures::Stream for RunJob<F>
where
    F: Future,
    F::Output: Outcome,
{
    type Item = Finished;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Finished>> {
        match self.as_mut().project() {
            RunStep::Running { future, tx } => {
                let (finished, delivery) = match std::task::ready!(future.poll(cx)) {
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
                let tx = tx.take();
                self.set(RunJob::Booked {
                    delivery: Some(delivery),
                    tx,
                });
                Poll::Ready(Some(finished))
            }
            RunStep::Booked { delivery, tx } => {
                if let (Some(tx), Some(delivery)) = (tx.take(), delivery.take()) {
                    let _ = tx.send(delivery);
                }
                self.set(RunJob::Delivered);
                Poll::Ready(None)
            }
            RunStep::Delivered => Poll::Ready(None),
        }
    }
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

pub(crate) type PanicHook = Arc<dyn Fn(&PanicReport) + Send + Sync>;
