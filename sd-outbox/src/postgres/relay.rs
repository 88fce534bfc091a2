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
use crate::observe::RelayMeters;
use crate::publisher::Publisher;
use crate::retry::{attempts_limit, check_relay_options, default_retry};
use sd_core::RetryPolicy;

mod batch;
mod builder;
mod metrics;
mod tx;

use self::metrics::{AbortOnDrop, Counters};
pub use self::metrics::{Metrics, RelayHandle};
use self::tx::{HandTx, Marks, claim_lanes};

/// How relays share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// One active relay per group, transaction order kept; the others stand by.
    Ordered,
    /// Every relay works, on disjoint lanes of aggregates; order kept per aggregate.
    #[default]
    Parallel,
}

struct Sql {
    claim_lanes: String,
    fetch_lanes: String,
    fetch_ordered: String,
    beyond_horizon: String,
    mark_published: String,
    mark_failed: String,
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

struct Inner<P> {
    /// The options as `build` checked them, `max_attempts` bounded by the retry policy's.
    options: RelayBuilder<P>,
    /// The NOTIFY channel: the one set, else the table name.
    channel: String,
    lock_key: String,
    sql: Sql,
    counters: Arc<Counters>,
    meters: RelayMeters,
}

/// Publishes the outbox's rows through a [`Publisher`]; see the [module docs](crate::postgres::relay).
pub struct Relay<P> {
    inner: Arc<Inner<P>>,
}

impl<P> std::fmt::Debug for Relay<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("table", &self.inner.options.outbox.table)
            .field("mode", &self.inner.options.mode)
            .field("batch_size", &self.inner.options.batch_size)
            .finish_non_exhaustive()
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
    /// Starts the relay on the current tokio runtime.
    pub fn spawn(self) -> RelayHandle {
        let (tx, rx) = watch::channel(false);
        let counters = self.inner.counters.clone();
        let outbox = self.inner.options.outbox.clone();
        let span = tracing::info_span!("outbox.relay", sd.name = %outbox.table);
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
        let _listener = AbortOnDrop(inner.options.listen.then(|| {
            tokio::spawn(listen(
                inner.options.outbox.pool.clone(),
                inner.channel.clone(),
                wake.clone(),
            ))
        }));
        let mut sweeper = Sweeper {
            last: Instant::now(),
            observed: None,
        };
        match inner.options.mode {
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
    /// When the oldest unpublished row's age was last read (feature `metrics`).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    observed: Option<Instant>,
}

/// How often a relay reads the age of the oldest unpublished row for its gauge.
#[cfg(feature = "metrics")]
const OBSERVE_INTERVAL: Duration = Duration::from_secs(10);

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
