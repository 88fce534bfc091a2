//! One call of [`StreamConsumer::run`](super::StreamConsumer::run): claim, read, submit,
//! acknowledge, dead-letter.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use redis::aio::ConnectionLike;
use redis::{Value, cmd};
use tokio::time::Instant;

use super::dead_letter::{DeadLetter, Moved};
use super::reply::{parse_entries, parse_pending, parse_read};
use super::{ConsumerReport, Entry, RunState, Settings, lock, millis, redis_err};
use crate::error::{Error, Result};
use crate::observe::{ConsumerMeters, Processed};
use crate::pool::{Job, Pool};

pub(super) struct Run<'a, H, C> {
    pub(super) conn: C,
    pub(super) cfg: &'a Settings,
    pub(super) pool: &'a Pool,
    pub(super) meters: &'a ConsumerMeters,
    pub(super) handler: Arc<H>,
    pub(super) state: tokio::sync::MutexGuard<'a, RunState>,
    pub(super) report: ConsumerReport,
}

impl<H, Fut, E, C> Run<'_, H, C>
where
    C: ConnectionLike + Send,
    H: Fn(Entry) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    /// Claims, reads, submits and acknowledges until `shutdown` fires (`Ok(None)`) or the
    /// pool refuses an entry (`Ok(Some(error))`). A Redis error is returned as is.
    pub(super) async fn read_loop(
        &mut self,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Error>> {
        let mut cursor = "-".to_owned();
        let mut next_claim = Instant::now();
        loop {
            if Instant::now() >= next_claim {
                let (next, entries) = self.claim(&cursor).await?;
                self.report.reclaimed += entries.len() as u64;
                self.meters.consumed(entries.len() as u64);
                if let Some(end) = self.submit_all(entries, shutdown.as_mut()).await.end() {
                    return Ok(end);
                }
                cursor = next.unwrap_or_else(|| {
                    next_claim = Instant::now() + self.cfg.claim_every;
                    "-".to_owned()
                });
            }
            let read = tokio::select! {
                biased;
                () = shutdown.as_mut() => return Ok(None),
                read = self.read() => read?,
            };
            self.report.read += read.len() as u64;
            self.meters.consumed(read.len() as u64);
            let submitted = self.submit_all(read, shutdown.as_mut()).await;
            self.ack().await?;
            if let Some(end) = submitted.end() {
                return Ok(end);
            }
        }
    }

    async fn read(&mut self) -> Result<Vec<Entry>> {
        let reply: Value = cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch)
            .arg("BLOCK")
            .arg(millis(self.cfg.block))
            .arg("STREAMS")
            .arg(&self.cfg.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XREADGROUP"))?;
        parse_read(reply)
    }

    /// Takes over up to `batch` entries pending longer than `min_idle`, from `cursor`
    /// (`-`, or `(id` past the last one seen): `XPENDING` with `IDLE` lists them with
    /// their delivery counts, `XCLAIM` takes those still idle (each claim is one more
    /// delivery). Entries this consumer is running or about to dead-letter are left
    /// alone, so their counts do not grow. Returns the next cursor (`None` at the end
    /// of the pending list) and the entries, marked reclaimed, with their counts.
    async fn claim(&mut self, cursor: &str) -> Result<(Option<String>, Vec<Entry>)> {
        let reply: Value = cmd("XPENDING")
            .arg(&self.cfg.stream)
            .arg(&self.cfg.group)
            .arg("IDLE")
            .arg(millis(self.cfg.min_idle))
            .arg(cursor)
            .arg("+")
            .arg(self.cfg.batch)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XPENDING"))?;
        let pending = parse_pending(reply)?;
        let next = match pending.last() {
            Some((id, _)) if pending.len() >= self.cfg.batch => Some(format!("({id}")),
            _ => None,
        };
        let state = &*self.state;
        let candidates: Vec<(String, u64)> = pending
            .into_iter()
            .filter(|(id, _)| {
                !state.in_flight.contains_key(id)
                    && !state.to_dead.iter().any(|d| d.entry.id == *id)
            })
            .collect();
        if candidates.is_empty() {
            return Ok((next, Vec::new()));
        }
        let mut claim = cmd("XCLAIM");
        claim
            .arg(&self.cfg.stream)
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg(millis(self.cfg.min_idle));
        for (id, _) in &candidates {
            claim.arg(id);
        }
        let reply: Value = claim
            .query_async(&mut self.conn)
            .await
            .map_err(redis_err("XCLAIM"))?;
        let mut entries = parse_entries(reply)?;
        for e in &mut entries {
            e.reclaimed = true;
            // Still idle when claimed, so nobody claimed it since XPENDING counted.
            let counted = candidates.iter().find(|(id, _)| *id == e.id);
            e.deliveries = counted.map_or(1, |(_, n)| n + 1);
        }
        Ok((next, entries))
    }

    /// Submits entries in order, waiting for room, until `shutdown` fires or the pool
    /// refuses one; entries not submitted stay pending in Redis. An entry delivered more
    /// than `max_deliveries` times is not run: it goes to the dead-letter stream.
    async fn submit_all(
        &mut self,
        entries: Vec<Entry>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Submitted {
        for entry in entries {
            if let Some(max) = self.cfg.max_deliveries
                && entry.deliveries > max
            {
                let error = format!(
                    "delivered {} times, over max_deliveries {max}, and the last delivery left no result: the handler panicked, its consumer died, or it ran longer than min_idle",
                    entry.deliveries
                );
                self.state.to_dead.push_back(DeadLetter { entry, error });
                continue;
            }
            let seq = self.state.next_seq;
            let id = entry.id.clone();
            let key = self
                .cfg
                .key_field
                .as_deref()
                .and_then(|f| entry.get(f).map(<[u8]>::to_vec));
            let handler = Arc::clone(&self.handler);
            let (succeeded, failed) = (
                Arc::clone(&self.state.succeeded),
                Arc::clone(&self.state.failed),
            );
            // The last delivery allowed keeps a copy for the dead-letter stream.
            let last = self
                .cfg
                .max_deliveries
                .is_some_and(|m| entry.deliveries >= m);
            #[cfg(feature = "otel")]
            let trace_parent = entry.trace_parent();
            let meters = self.meters.clone();
            let mut job = Job::new(async move {
                let copy = last.then(|| entry.clone());
                let started = std::time::Instant::now();
                let handled = handler(entry).await;
                let end = if handled.is_ok() {
                    Processed::Ok
                } else {
                    Processed::Error
                };
                meters.processed(end, started);
                match handled {
                    Ok(()) => {
                        lock(&succeeded).insert(seq);
                        true
                    }
                    Err(error) => {
                        if let Some(entry) = copy {
                            let error = error.to_string();
                            lock(&failed).insert(seq, DeadLetter { entry, error });
                        }
                        false
                    }
                }
            })
            .with_offset(self.cfg.partition, seq);
            #[cfg(feature = "otel")]
            {
                job = job.with_trace_parent(trace_parent);
            }
            if let Some(key) = key {
                job = job.with_key(&key);
            }
            let submitted = tokio::select! {
                biased;
                () = shutdown.as_mut() => return Submitted::Shutdown,
                s = self.pool.submit(job) => s,
            };
            match submitted {
                Ok(_) => {
                    let state = &mut *self.state;
                    state.next_seq += 1;
                    state.by_seq.insert(seq, id.clone());
                    state.in_flight.insert(id, seq);
                }
                Err(rejected) => {
                    // Closed, or an offset error (another user of the partition): the
                    // entry stays pending and is reclaimed later.
                    tracing::warn!(entry = %id, error = %rejected, "sd-pool: entry not submitted");
                    return Submitted::Refused(rejected.error);
                }
            }
        }
        Submitted::All
    }
}

impl<H, C: ConnectionLike + Send> Run<'_, H, C> {
    /// Acknowledges the succeeded entries at or below the watermark, queues those that
    /// failed their last allowed delivery for the dead-letter stream, and forgets the
    /// other failed ones there (they stay pending for a claim). Then moves the queued
    /// dead letters. Ids whose `XACK` or move fails are kept and sent again by the next
    /// call (of this run or the next).
    pub(super) async fn ack(&mut self) -> Result<()> {
        if let Some(mark) = self.pool.watermark(self.cfg.partition) {
            let state = &mut *self.state;
            let mut succeeded = lock(&state.succeeded);
            let mut failed = lock(&state.failed);
            while let Some(entry) = state.by_seq.first_entry() {
                if *entry.key() > mark {
                    break;
                }
                let (seq, id) = entry.remove_entry();
                state.in_flight.remove(&id);
                if succeeded.remove(&seq) {
                    state.to_ack.push(id);
                } else if let Some(dead) = failed.remove(&seq) {
                    state.to_dead.push_back(dead);
                } else {
                    self.report.left_pending += 1;
                }
            }
        }
        if !self.state.to_ack.is_empty() {
            let _: Value = cmd("XACK")
                .arg(&self.cfg.stream)
                .arg(&self.cfg.group)
                .arg(&self.state.to_ack)
                .query_async(&mut self.conn)
                .await
                .map_err(redis_err("XACK"))?;
            self.report.acked += self.state.to_ack.len() as u64;
            self.state.to_ack.clear();
        }
        self.dead_letter().await
    }

    /// Moves the queued dead letters, oldest first; one that fails stays queued.
    async fn dead_letter(&mut self) -> Result<()> {
        while let Some(dead) = self.state.to_dead.front() {
            match dead.move_to(&mut self.conn, self.cfg).await? {
                Moved::Moved => {
                    tracing::warn!(
                        entry = %dead.entry.id,
                        deliveries = dead.entry.deliveries,
                        error = %dead.error,
                        "sd-pool: entry moved to the dead-letter stream"
                    );
                    self.report.dead_lettered += 1;
                }
                // Acknowledged meanwhile by a consumer that took it over: not ours to move.
                Moved::NotPending => {}
            }
            self.state.to_dead.pop_front();
        }
        Ok(())
    }
}

/// How [`Run::submit_all`] ended.
enum Submitted {
    /// Every entry is in the pool.
    All,
    /// The shutdown signal fired.
    Shutdown,
    /// The pool refused an entry.
    Refused(Error),
}

impl Submitted {
    /// `None` to read on; otherwise how [`Run::read_loop`] ends (`Some(None)` for the
    /// shutdown, `Some(Some(error))` for a refusal).
    fn end(self) -> Option<Option<Error>> {
        match self {
            Submitted::All => None,
            Submitted::Shutdown => Some(None),
            Submitted::Refused(error) => Some(Some(error)),
        }
    }
}
