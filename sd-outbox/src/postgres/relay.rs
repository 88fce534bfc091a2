//! The relay: reads pending rows and publishes them, in ordered or parallel mode.
//!
//! # How rows are found: by status, never by an id watermark
//!
//! A relay never remembers "the last id it saw". Every batch reads rows whose `status`
//! is still `pending`, so a row whose transaction commits after a row with a higher id
//! (the sequence-gap trap of relays that poll `WHERE id > $last`) is simply found by
//! the next batch. A row leaves `pending` only when the sink has acknowledged it
//! (`published`) or its attempt cap is reached (`dead`).
//!
//! # Ordered mode
//!
//! One relay of a group is active: it holds a session advisory lock on its own
//! connection and runs every batch on that connection, so a relay whose connection
//! died cannot keep publishing without the lock. Standbys try the lock every
//! `standby_interval` and take over when the active relay's connection closes (its
//! process died, it was shut down, the database restarted). The active relay reads
//! only rows written by transactions that can no longer be running
//! (`txid < pg_snapshot_xmin(pg_current_snapshot())`, as watermill-sql does) in
//! `(txid, seq)` order, so events leave in the order of their transactions and, within
//! one transaction, in insertion order. A failing event blocks everything behind it
//! until it is published or dead-lettered.
//!
//! A relay whose batch stalls (a hung sink) gives the slot up when the batch
//! `timeout` (60 s) fires, since that drops the connection. A relay process that is
//! frozen as a whole (SIGSTOP, a VM pause) keeps its TCP connection and so the slot
//! until PostgreSQL drops the connection (set `tcp_keepalives_idle` and friends, or
//! `idle_session_timeout`, if that matters to you).
//!
//! # Parallel mode
//!
//! Every aggregate hashes to one of 64 lanes (a hash of its type and id, the expression
//! of the pending rows' lane index). A relay
//! claims some free lanes with `SELECT .. FROM {table}_lanes .. FOR UPDATE SKIP LOCKED`
//! in a transaction, publishes the pending rows of those lanes in `seq` order and marks
//! them in the same transaction. Since a lane is held by one relay at a time, two
//! events of one aggregate are never in flight together and each aggregate's events
//! leave in `seq` order. A failing event holds back the later events of its own
//! aggregate only (until it is published or dead-lettered); other aggregates go on.
//!
//! # Connections
//!
//! A parallel relay uses one pooled connection per batch (a transaction that holds its
//! lanes) and one for LISTEN. An ordered relay keeps one connection of its own, active
//! or standby, plus one for LISTEN and pooled ones for sweeps and metrics. Size the
//! pool for the relays you run beside the service's own work.
//!
//! # Wake-ups, retries, retention
//!
//! A statement trigger sends `NOTIFY {table}` at commit; each relay listens on its own
//! connection and starts a batch at once. A fallback poll (`poll_interval`, 1 s) covers
//! lost notifications, and a full batch is followed by the next at once. A failed
//! publish increments `attempts`, stores `last_error` and sets `next_attempt_at` by
//! exponential backoff with jitter; at `max_attempts` the row becomes `dead` (see
//! [`Outbox::dead_letters`] and [`Outbox::redrive`]). The relay deletes published rows
//! older than `retention` every `sweep_interval`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_core::deadline::timeout;
use sqlx::Row as _;
use sqlx::postgres::{PgConnection, PgListener};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::{EVENT_COLUMNS, LANE, LANES, Outbox, event_from_row, one_part};
use crate::error::{Error, Result};
use crate::message::Event;
use crate::publisher::Publisher;
use crate::retry::{attempts_limit, check_relay_options, default_retry};
use sd_core::RetryPolicy;

/// How relays share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One active relay per group, transaction order kept; the others stand by.
    Ordered,
    /// Every relay works, on disjoint lanes of aggregates; order kept per aggregate.
    #[default]
    Parallel,
}

/// Options of a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayBuilder<P> {
    outbox: Outbox,
    publisher: P,
    mode: Mode,
    batch_size: u32,
    poll_interval: Duration,
    listen: bool,
    channel: Option<String>,
    max_attempts: u32,
    retry: RetryPolicy,
    retention: Option<Duration>,
    sweep_interval: Duration,
    lanes_per_claim: u32,
    standby_interval: Duration,
    group: String,
    timeout: Duration,
}

impl<P: Publisher> RelayBuilder<P> {
    /// [`Mode::Parallel`] (default) or [`Mode::Ordered`].
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Rows per batch, 1 to 10,000 (default 100). Larger batches publish faster; on a
    /// crash, up to one batch is published again.
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// The fallback poll when no notification arrives (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Whether to LISTEN for the commit notifications (default true); without them the
    /// relay only polls.
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// The NOTIFY channel (default: the table name, which is what the trigger sends).
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = Some(channel.into());
        self
    }

    /// Publish attempts before a row is dead-lettered, at least 1 (default 10; a
    /// [`retry`](Self::retry) policy with a lower `max_attempts` dead-letters sooner).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The waits between attempts, and after database errors (default: 100 ms doubling
    /// to 30 s, each wait a random point in the upper half of its window,
    /// `RetryPolicy` jitter 0.5).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long published rows are kept before the sweep deletes them (default 24 h);
    /// `None` keeps them until [`Outbox::sweep`] is called.
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// How often the relay sweeps (default 60 s).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Parallel mode: lanes one relay claims per batch, 1 to 64 (default 16). Lower
    /// spreads the work over more relays; higher fills batches from more aggregates.
    pub fn lanes_per_claim(mut self, lanes: u32) -> Self {
        self.lanes_per_claim = lanes;
        self
    }

    /// Ordered mode: how often a standby tries to become active (default 1 s).
    pub fn standby_interval(mut self, interval: Duration) -> Self {
        self.standby_interval = interval;
        self
    }

    /// Ordered mode: relays of the same group share one active slot (default
    /// `default`); 1 to 64 characters.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// How long one batch may take, database and sink together (default 60 s) before
    /// it is abandoned (and its rows published again later).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The relay; fails with [`Error::InvalidConfig`] naming the first field out of range.
    pub fn build(self) -> Result<Relay<P>> {
        check_relay_options(
            self.batch_size as usize,
            self.poll_interval,
            self.max_attempts,
        )?;
        if self.retention.is_some_and(|r| r.is_zero()) {
            return Err(Error::config(
                "retention",
                "must be longer than zero; use None to keep published rows",
            ));
        }
        if self.sweep_interval.is_zero() {
            return Err(Error::config("sweep_interval", "must be longer than zero"));
        }
        if !(1..=LANES as u32).contains(&self.lanes_per_claim) {
            return Err(Error::config("lanes_per_claim", "must be 1 to 64"));
        }
        if self.standby_interval.is_zero() {
            return Err(Error::config(
                "standby_interval",
                "must be longer than zero",
            ));
        }
        if self.group.is_empty() || self.group.len() > 64 {
            return Err(Error::config("group", "must be 1 to 64 bytes"));
        }
        if self.timeout.is_zero() {
            return Err(Error::config("timeout", "must be longer than zero"));
        }
        let channel = match self.channel {
            Some(channel) => {
                one_part("channel", &channel)?;
                channel
            }
            None => self.outbox.table.clone(),
        };
        let t = &self.outbox.table;
        let sql = Sql {
            // Sent with BEGIN in one simple-query round trip; `{{offset}}` and
            // `{{lanes}}` become integer literals per batch. One index probe per lane
            // (LATERAL .. LIMIT 1): written as EXISTS, the planner hashes every pending
            // row instead, which costs milliseconds per batch on a large backlog.
            claim_lanes: format!(
                "BEGIN; SELECT l.lane FROM {t}_lanes l
                 CROSS JOIN LATERAL (SELECT 1 FROM {t} o
                     WHERE {LANE} = l.lane AND o.status = 'pending' LIMIT 1) AS p
                 ORDER BY (l.lane + {{offset}}) % {LANES}
                 LIMIT {{lanes}} FOR UPDATE OF l SKIP LOCKED"
            ),
            // Lane by lane, each lane's pending rows in `seq` order, cut at the batch
            // size: for every lane (so every aggregate) a prefix of its pending rows,
            // read through the (lane, seq) index without sorting the backlog.
            fetch_lanes: format!(
                "SELECT x.* FROM unnest($1::int2[]) AS l(lane)
                 CROSS JOIN LATERAL (
                     SELECT {EVENT_COLUMNS}, seq FROM {t} o
                     WHERE {LANE} = l.lane AND o.status = 'pending'
                       AND NOT EXISTS (SELECT 1 FROM {t} b
                           WHERE b.status = 'pending' AND b.next_attempt_at IS NOT NULL
                             AND b.next_attempt_at > now()
                             AND b.aggregatetype = o.aggregatetype AND b.aggregateid = o.aggregateid
                             AND b.seq <= o.seq)
                     ORDER BY o.seq LIMIT $2) AS x
                 LIMIT $2"
            ),
            fetch_ordered: format!(
                "SELECT {EVENT_COLUMNS},
                     GREATEST(0, EXTRACT(EPOCH FROM (next_attempt_at - clock_timestamp())) * 1000)::float8 AS wait_ms
                 FROM {t}
                 WHERE status = 'pending' AND txid < pg_snapshot_xmin(pg_current_snapshot())
                 ORDER BY txid, seq LIMIT $1"
            ),
            beyond_horizon: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE status = 'pending'
                     AND txid >= pg_snapshot_xmin(pg_current_snapshot()))"
            ),
            mark_published: format!(
                "UPDATE {t} SET status = 'published', published_at = now(), next_attempt_at = NULL
                 WHERE id = ANY($1) AND status = 'pending'"
            ),
            mark_failed: format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = $2,
                     status = (CASE WHEN attempts + 1 >= $3 THEN 'dead' ELSE 'pending' END)::{t}_status,
                     next_attempt_at = now() + make_interval(secs => $4)
                 WHERE id = $1 AND status = 'pending'
                 RETURNING status::text"
            ),
        };
        Ok(Relay {
            inner: Arc::new(Inner {
                lock_key: format!("sd-outbox:{t}:ordered:{}", self.group),
                outbox: self.outbox,
                publisher: self.publisher,
                mode: self.mode,
                batch_size: self.batch_size,
                poll_interval: self.poll_interval,
                listen: self.listen,
                channel,
                max_attempts: attempts_limit(self.max_attempts, &self.retry),
                retry: self.retry,
                retention: self.retention,
                sweep_interval: self.sweep_interval,
                lanes_per_claim: self.lanes_per_claim,
                standby_interval: self.standby_interval,
                timeout: self.timeout,
                sql,
                counters: Arc::new(Counters::default()),
            }),
        })
    }
}

struct Sql {
    claim_lanes: String,
    fetch_lanes: String,
    fetch_ordered: String,
    beyond_horizon: String,
    mark_published: String,
    mark_failed: String,
}

struct Inner<P> {
    outbox: Outbox,
    publisher: P,
    mode: Mode,
    batch_size: u32,
    poll_interval: Duration,
    listen: bool,
    channel: String,
    max_attempts: u32,
    retry: RetryPolicy,
    retention: Option<Duration>,
    sweep_interval: Duration,
    lanes_per_claim: u32,
    standby_interval: Duration,
    timeout: Duration,
    lock_key: String,
    sql: Sql,
    counters: Arc<Counters>,
}

/// Publishes the outbox's rows through a [`Publisher`]; see the [module docs](crate::postgres::relay).
pub struct Relay<P> {
    inner: Arc<Inner<P>>,
}

impl<P> std::fmt::Debug for Relay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("table", &self.inner.outbox.table)
            .field("mode", &self.inner.mode)
            .field("batch_size", &self.inner.batch_size)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    failures: AtomicU64,
    dead_lettered: AtomicU64,
    database_errors: AtomicU64,
    batches: AtomicU64,
    active: AtomicBool,
    window: Mutex<VecDeque<(Instant, u64)>>,
}

/// The window over which [`Metrics::publish_rate`] is measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Counters {
    fn published(&self, n: usize) {
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

    fn rate(&self) -> f64 {
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
    task: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    counters: Arc<Counters>,
    outbox: Outbox,
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
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// What a batch found.
struct Batch {
    /// Rows read.
    fetched: usize,
    /// When to look again at the latest, if sooner than the poll interval.
    again_in: Option<Duration>,
}

impl<P: Publisher> Relay<P> {
    /// Options for a relay of `outbox` publishing to `publisher`: parallel mode, batch
    /// 100, poll 1 s, LISTEN on, 10 attempts, retries 100 ms doubling to 30 s, retention 24 h.
    pub fn builder(outbox: Outbox, publisher: P) -> RelayBuilder<P> {
        RelayBuilder {
            outbox,
            publisher,
            mode: Mode::default(),
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            listen: true,
            channel: None,
            max_attempts: 10,
            retry: default_retry(),
            retention: Some(Duration::from_secs(24 * 3600)),
            sweep_interval: Duration::from_secs(60),
            lanes_per_claim: 16,
            standby_interval: Duration::from_secs(1),
            group: "default".into(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Starts the relay on the current tokio runtime.
    pub fn spawn(self) -> RelayHandle {
        let (tx, rx) = watch::channel(false);
        let counters = self.inner.counters.clone();
        let outbox = self.inner.outbox.clone();
        let span = tracing::info_span!("outbox.relay", table = %outbox.table);
        let task = tokio::spawn(self.run(rx).instrument(span));
        RelayHandle {
            task: Some(task),
            shutdown: tx,
            counters,
            outbox,
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let inner = self.inner;
        let wake = Arc::new(Notify::new());
        let _listener = AbortOnDrop(inner.listen.then(|| {
            tokio::spawn(listen(
                inner.outbox.pool.clone(),
                inner.channel.clone(),
                wake.clone(),
            ))
        }));
        let mut sweeper = Sweeper {
            last: Instant::now(),
        };
        match inner.mode {
            Mode::Parallel => {
                inner.counters.active.store(true, Ordering::Relaxed);
                inner.parallel(&wake, &mut shutdown, &mut sweeper).await;
            }
            Mode::Ordered => inner.ordered(&wake, &mut shutdown, &mut sweeper).await,
        }
        inner.counters.active.store(false, Ordering::Relaxed);
    }
}

struct Sweeper {
    last: Instant,
}

/// True once shutdown was asked for (or nobody can ask any more).
fn stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Waits for a notification, `wait`, or shutdown, whichever comes first.
async fn idle(wake: &Notify, wait: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = wake.notified() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = shutdown.changed() => {}
    }
}

/// Forwards commit notifications to `wake`, reconnecting as needed. A (re)connect wakes
/// the relay too, since notifications sent meanwhile are lost.
async fn listen(pool: sqlx::PgPool, channel: String, wake: Arc<Notify>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(error = %e, "outbox listener cannot connect");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            tracing::debug!(error = %e, "outbox LISTEN failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        wake.notify_one();
        loop {
            match listener.recv().await {
                Ok(_) => wake.notify_one(),
                Err(e) => {
                    tracing::debug!(error = %e, "outbox listener lost its connection");
                    wake.notify_one();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

impl<P: Publisher> Inner<P> {
    async fn parallel(
        &self,
        wake: &Notify,
        shutdown: &mut watch::Receiver<bool>,
        sweeper: &mut Sweeper,
    ) {
        let mut errors = 0u32;
        let mut offset: i16 = rand::random_range(0..LANES);
        while !stopping(shutdown) {
            self.maybe_sweep(sweeper).await;
            offset = (offset + 17) % LANES;
            match self.bounded(self.parallel_batch(offset)).await {
                Ok(batch) => {
                    errors = 0;
                    self.after(batch, wake, shutdown).await;
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    self.database_error(&e, errors, shutdown).await;
                }
            }
        }
    }

    async fn ordered(
        &self,
        wake: &Notify,
        shutdown: &mut watch::Receiver<bool>,
        sweeper: &mut Sweeper,
    ) {
        let mut errors = 0u32;
        // A standby keeps its connection between attempts at the lock.
        let mut standby = None;
        while !stopping(shutdown) {
            let mut conn = match self.bounded(self.try_lead(&mut standby)).await {
                Ok(Some(conn)) => conn,
                Ok(None) => {
                    errors = 0;
                    tokio::select! {
                        _ = tokio::time::sleep(self.standby_interval) => {}
                        _ = shutdown.changed() => {}
                    }
                    continue;
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    self.database_error(&e, errors, shutdown).await;
                    continue;
                }
            };
            tracing::info!("outbox relay is the active ordered relay");
            self.counters.active.store(true, Ordering::Relaxed);
            errors = 0;
            let mut horizon_waits = 0;
            while !stopping(shutdown) {
                self.maybe_sweep(sweeper).await;
                match self
                    .bounded(self.ordered_batch(&mut conn, &mut horizon_waits))
                    .await
                {
                    Ok(batch) => self.after(batch, wake, shutdown).await,
                    Err(e) => {
                        // The lock lives on this connection: give it up with it.
                        self.counters.active.store(false, Ordering::Relaxed);
                        errors = errors.saturating_add(1);
                        self.database_error(&e, errors, shutdown).await;
                        break;
                    }
                }
            }
            self.counters.active.store(false, Ordering::Relaxed);
            // Closing the connection releases the advisory lock.
            drop(conn);
        }
    }

    async fn bounded<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        timeout(self.timeout, tracing::debug_span!("outbox.relay.batch"), f).await?
    }

    async fn database_error(&self, e: &Error, errors: u32, shutdown: &mut watch::Receiver<bool>) {
        self.counters
            .database_errors
            .fetch_add(1, Ordering::Relaxed);
        let delay = self
            .retry
            .random_delay(errors)
            .min(self.poll_interval.max(self.retry.initial_interval()));
        tracing::warn!(error = %e, ?delay, "outbox relay batch failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
    }

    async fn after(&self, batch: Batch, wake: &Notify, shutdown: &mut watch::Receiver<bool>) {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        if batch.fetched >= self.batch_size as usize && batch.again_in.is_none() {
            return;
        }
        let wait = batch
            .again_in
            .map_or(self.poll_interval, |d| d.min(self.poll_interval));
        idle(wake, wait, shutdown).await;
    }

    async fn maybe_sweep(&self, sweeper: &mut Sweeper) {
        let Some(retention) = self.retention else {
            return;
        };
        if sweeper.last.elapsed() < self.sweep_interval {
            return;
        }
        sweeper.last = Instant::now();
        match self.outbox.sweep(retention).await {
            Ok(n) if n > 0 => tracing::debug!(deleted = n, "outbox swept"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox sweep failed"),
        }
    }

    /// Opens a connection of its own and takes the group's advisory lock on it.
    /// Tries the group's advisory lock on the standby connection (opened on first use,
    /// kept across attempts); the connection is returned once it holds the lock.
    async fn try_lead(&self, standby: &mut Option<PgConnection>) -> Result<Option<PgConnection>> {
        let mut conn = match standby.take() {
            Some(conn) => conn,
            None => self.outbox.pool.acquire().await?.detach(),
        };
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(&self.lock_key)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(conn))
        } else {
            *standby = Some(conn);
            Ok(None)
        }
    }

    async fn ordered_batch(
        &self,
        conn: &mut PgConnection,
        horizon_waits: &mut u32,
    ) -> Result<Batch> {
        let rows = sqlx::query(&self.sql.fetch_ordered)
            .bind(i64::from(self.batch_size))
            .fetch_all(&mut *conn)
            .await?;
        let fetched = rows.len();
        let mut events = Vec::with_capacity(fetched);
        let mut again_in = None;
        for row in &rows {
            let wait_ms: Option<f64> = row.try_get("wait_ms")?;
            if let Some(ms) = wait_ms.filter(|ms| *ms > 0.0) {
                // Strict order: nothing passes a row that waits for its retry.
                again_in = Some(Duration::from_secs_f64(ms / 1000.0));
                break;
            }
            events.push(event_from_row(row)?);
        }
        if let Some(retry) = self.publish(&events, Marks::Conn(&mut *conn)).await? {
            again_in = Some(again_in.map_or(retry, |a: Duration| a.min(retry)));
        }
        if fetched < self.batch_size as usize && again_in.is_none() {
            // Rows of transactions still running (ours or anyone's with an older
            // xid) wait for the horizon; look again soon rather than at the next poll.
            let waiting: bool = sqlx::query_scalar(&self.sql.beyond_horizon)
                .fetch_one(&mut *conn)
                .await?;
            if waiting {
                // 5 ms, doubling while the same old transaction stays open.
                let delay = Duration::from_millis(5) * (1u32 << (*horizon_waits).min(8));
                *horizon_waits = horizon_waits.saturating_add(1);
                again_in = Some(delay.min(self.poll_interval));
            } else {
                *horizon_waits = 0;
            }
        }
        Ok(Batch { fetched, again_in })
    }

    async fn parallel_batch(&self, offset: i16) -> Result<Batch> {
        let mut tx = HandTx {
            conn: self.outbox.pool.acquire().await?,
            open: true,
        };
        let claim = self
            .sql
            .claim_lanes
            .replace("{offset}", &offset.to_string())
            .replace("{lanes}", &self.lanes_per_claim.to_string());
        let lanes = claim_lanes(&mut tx.conn, claim).await?;
        if lanes.is_empty() {
            tx.finish(None).await?;
            return Ok(Batch {
                fetched: 0,
                again_in: None,
            });
        }
        // A statement of its own, after the lanes are locked: under READ COMMITTED it
        // takes a new snapshot, which sees the marks of the relay that held these lanes
        // before. Folding the claim and the read into one statement reads with the
        // snapshot from before that relay committed and publishes its rows again (the
        // three-relay test catches it as duplicates).
        let rows = sqlx::query(&self.sql.fetch_lanes)
            .bind(&lanes)
            .bind(i64::from(self.batch_size))
            .fetch_all(&mut *tx.conn)
            .await?;
        let mut rows = rows
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("seq")?, event_from_row(row)?)))
            .collect::<Result<Vec<_>>>()?;
        // Insertion order across the lanes; within an aggregate it is the row order.
        rows.sort_unstable_by_key(|(seq, _)| *seq);
        let events: Vec<Event> = rows.into_iter().map(|(_, event)| event).collect();
        let again_in = self.publish(&events, Marks::Tx(&mut tx)).await?;
        // A batch from only some lanes may leave work in others: go again at once.
        let fetched = if lanes.len() as u32 == self.lanes_per_claim && !events.is_empty() {
            self.batch_size as usize
        } else {
            events.len()
        };
        Ok(Batch { fetched, again_in })
    }

    /// Publishes `events`, marks the acknowledged ones and records a failure on the
    /// first one that was not (committing `tx` if it is a [`HandTx`]); returns the retry
    /// delay after a failure.
    async fn publish(&self, events: &[Event], mut tx: Marks<'_>) -> Result<Option<Duration>> {
        if events.is_empty() {
            return tx.done(None).await.map(|()| None);
        }
        let (published, failure) = match self.publisher.publish(events).await {
            Ok(()) => (events.len(), None),
            Err(Error::Publish { published, reason }) => {
                (published.min(events.len()), Some(reason))
            }
            Err(other) => (0, Some(other.to_string())),
        };
        let ids: Vec<uuid::Uuid> = events[..published].iter().map(|e| e.id).collect();
        let Some(reason) = failure else {
            // The common case: mark (and commit) in one round trip.
            tx.done(Some((&self.sql.mark_published, &ids))).await?;
            self.counters.published(published);
            return Ok(None);
        };
        let conn = tx.conn();
        if published > 0 {
            sqlx::query(&self.sql.mark_published)
                .bind(&ids)
                .execute(&mut *conn)
                .await?;
        }
        let Some(failed) = events.get(published) else {
            tx.done(None).await?;
            self.counters.published(published);
            return Ok(None);
        };
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let attempt = failed.attempts.saturating_add(1);
        let delay = self.retry.random_delay(attempt);
        let status: Option<String> = sqlx::query_scalar(&self.sql.mark_failed)
            .bind(failed.id)
            .bind(&reason)
            .bind(i64::from(self.max_attempts))
            .bind(delay.as_secs_f64())
            .fetch_optional(&mut *conn)
            .await?;
        tx.done(None).await?;
        self.counters.published(published);
        if status.as_deref() == Some("dead") {
            self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(id = %failed.id, attempts = attempt, error = %reason, "outbox event dead-lettered");
            Ok(Some(Duration::ZERO))
        } else {
            tracing::debug!(id = %failed.id, attempts = attempt, error = %reason, ?delay, "outbox publish failed");
            Ok(Some(delay))
        }
    }
}

/// Where [`Inner::publish`] writes its marks: the ordered relay's own connection
/// (autocommit) or a parallel batch's transaction.
enum Marks<'a> {
    Conn(&'a mut PgConnection),
    Tx(&'a mut HandTx),
}

impl Marks<'_> {
    /// The connection to run statements on.
    fn conn(&mut self) -> &mut PgConnection {
        match self {
            Marks::Conn(conn) => conn,
            Marks::Tx(tx) => &mut tx.conn,
        }
    }

    /// Ends the batch: runs the published mark over `ids` (if any) and commits when
    /// there is a transaction, in one round trip where it can.
    async fn done(&mut self, mark: Option<(&str, &[uuid::Uuid])>) -> Result<()> {
        match self {
            Marks::Conn(conn) => {
                if let Some((sql, ids)) = mark {
                    sqlx::query(sql).bind(ids).execute(&mut **conn).await?;
                }
                Ok(())
            }
            Marks::Tx(tx) => tx.finish(mark).await,
        }
    }
}

/// A pooled connection in a transaction begun by hand (`BEGIN` travels with the lane
/// claim). Dropped while still open (an error, a timeout, an abort), the connection is
/// closed rather than returned to the pool mid-transaction; the server rolls back.
struct HandTx {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    open: bool,
}

impl HandTx {
    /// Commits, with the published mark in the same round trip when there is one.
    async fn finish(&mut self, mark: Option<(&str, &[uuid::Uuid])>) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        match mark {
            Some((sql, ids)) if !ids.is_empty() => {
                // Ids are UUIDs we read ourselves: their text form is safe as a literal.
                let list: Vec<String> = ids.iter().map(uuid::Uuid::to_string).collect();
                let sql = sql.replace("$1", &format!("'{{{}}}'::uuid[]", list.join(",")));
                raw_execute(&mut self.conn, format!("{sql}; COMMIT")).await?;
            }
            _ => {
                raw_execute(&mut self.conn, "COMMIT".to_owned()).await?;
            }
        }
        self.open = false;
        Ok(())
    }
}

impl Drop for HandTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// A query string without arguments goes over the simple-query protocol, which takes
// several statements at once (`raw_sql` futures would trip the higher-ranked `Send`
// check of the spawned relay).

/// Runs `BEGIN` and the lane claim in one simple-query round trip.
fn claim_lanes(conn: &mut PgConnection, sql: String) -> BoxFuture<'_, Result<Vec<i16>>> {
    Box::pin(async move {
        let rows = sqlx::Executor::fetch_all(conn, sql.as_str()).await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get::<i16, _>(0))
            .collect::<Result<Vec<_>, _>>()?)
    })
}

/// Runs statements without parameters in one simple-query round trip.
fn raw_execute(conn: &mut PgConnection, sql: String) -> BoxFuture<'_, Result<()>> {
    Box::pin(async move {
        sqlx::Executor::execute(conn, sql.as_str()).await?;
        Ok(())
    })
}
