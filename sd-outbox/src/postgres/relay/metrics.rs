//! A running relay's counters, its metrics snapshot and its handle.

use super::*;

#[derive(Default)]
pub(super) struct Counters {
    pub(super) published: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) database_errors: AtomicU64,
    pub(super) batches: AtomicU64,
    pub(super) active: AtomicBool,
    pub(super) window: Mutex<VecDeque<(Instant, u64)>>,
}

/// The window over which [`Metrics::publish_rate`] is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Counters {
    pub(super) fn published(&self, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        self.published.fetch_add(n, Ordering::Relaxed);
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        window.push_back((now, n));
        while window
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            window.pop_front();
        }
    }

    pub(super) fn rate(&self) -> f64 {
        let now = Instant::now();
        let window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let total: u64 = window
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= RATE_WINDOW)
            .map(|(_, n)| n)
            .sum();
        total as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// A snapshot of a relay and its table.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct Metrics {
    /// Rows waiting to be published (the whole table, not only this relay's share).
    pub backlog: u64,
    /// Dead-lettered rows in the table.
    pub dead: u64,
    /// Age of the oldest pending row, or `None` when nothing waits.
    pub oldest_unpublished_age: Option<Duration>,
    /// Events this relay published (acknowledged by the sink).
    pub published: u64,
    /// Events per second this relay published over the last 10 s.
    pub publish_rate: f64,
    /// Failed publish attempts of this relay.
    pub failures: u64,
    /// Rows this relay dead-lettered.
    pub dead_lettered: u64,
    /// Database errors this relay met (it reconnects and goes on).
    pub database_errors: u64,
    /// Batches this relay ran.
    pub batches: u64,
    /// Ordered mode: whether this relay is the active one; parallel mode: running.
    pub active: bool,
}

/// A running relay: metrics, shutdown. Dropping it aborts the relay.
#[derive(Debug)]
pub struct RelayHandle {
    pub(super) task: Option<JoinHandle<()>>,
    pub(super) shutdown: watch::Sender<bool>,
    pub(super) counters: Arc<Counters>,
    pub(super) outbox: Outbox,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("published", &self.published)
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// Events published by this relay so far.
    pub fn published(&self) -> u64 {
        self.counters.published.load(Ordering::Relaxed)
    }

    /// Ordered mode: whether this relay is the active one; parallel mode: running.
    pub fn is_active(&self) -> bool {
        self.counters.active.load(Ordering::Relaxed)
    }

    /// The relay's counters and the table's backlog, dead letters and lag.
    pub async fn metrics(&self) -> Result<Metrics> {
        let stats = self.outbox.stats().await?;
        let c = &self.counters;
        Ok(Metrics {
            backlog: stats.backlog,
            dead: stats.dead,
            oldest_unpublished_age: stats.oldest_pending_age,
            published: c.published.load(Ordering::Relaxed),
            publish_rate: c.rate(),
            failures: c.failures.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            database_errors: c.database_errors.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            active: self.is_active(),
        })
    }

    /// Asks the relay to stop after its current batch and waits for it.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Kills the relay where it stands, as a crash would: a batch in flight is neither
    /// marked nor committed, so its rows are published again by the next relay.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Aborts a background task when dropped.
pub(super) struct AbortOnDrop(pub(super) Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
