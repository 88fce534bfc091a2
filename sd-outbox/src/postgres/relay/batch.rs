//! The relay loops and one batch: claim, read, publish, mark.

use super::*;

impl<P: Publisher> Inner<P> {
    pub(super) async fn parallel(
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

    pub(super) async fn ordered(
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
                        _ = tokio::time::sleep(self.options.standby_interval) => {}
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
        timeout(
            self.options.timeout,
            tracing::debug_span!("outbox.relay.batch", sd.name = %self.options.outbox.table),
            f,
        )
        .await?
    }

    async fn database_error(&self, e: &Error, errors: u32, shutdown: &mut watch::Receiver<bool>) {
        self.counters
            .database_errors
            .fetch_add(1, Ordering::Relaxed);
        let delay = self.options.retry.random_delay(errors).min(
            self.options
                .poll_interval
                .max(self.options.retry.initial_interval()),
        );
        tracing::warn!(error = %e, ?delay, "outbox relay batch failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
    }

    async fn after(&self, batch: Batch, wake: &Notify, shutdown: &mut watch::Receiver<bool>) {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        if batch.fetched >= self.options.batch_size as usize && batch.again_in.is_none() {
            return;
        }
        let wait = batch.again_in.map_or(self.options.poll_interval, |d| {
            d.min(self.options.poll_interval)
        });
        idle(wake, wait, shutdown).await;
    }

    async fn maybe_sweep(&self, sweeper: &mut Sweeper) {
        #[cfg(feature = "metrics")]
        if sweeper
            .observed
            .is_none_or(|at| at.elapsed() >= OBSERVE_INTERVAL)
        {
            sweeper.observed = Some(Instant::now());
            match self.options.outbox.stats().await {
                Ok(stats) => self.meters.oldest(stats.oldest_pending_age),
                Err(e) => tracing::debug!(error = %e, "outbox lag not read"),
            }
        }
        let Some(retention) = self.options.retention else {
            return;
        };
        if sweeper.last.elapsed() < self.options.sweep_interval {
            return;
        }
        sweeper.last = Instant::now();
        match self.options.outbox.sweep(retention).await {
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
            None => self.options.outbox.pool.acquire().await?.detach(),
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
            .bind(i64::from(self.options.batch_size))
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
        if fetched < self.options.batch_size as usize && again_in.is_none() {
            // Rows of transactions still running (ours or anyone's with an older
            // xid) wait for the horizon; look again soon rather than at the next poll.
            let waiting: bool = sqlx::query_scalar(&self.sql.beyond_horizon)
                .fetch_one(&mut *conn)
                .await?;
            if waiting {
                // 5 ms, doubling while the same old transaction stays open.
                let delay = Duration::from_millis(5) * (1u32 << (*horizon_waits).min(8));
                *horizon_waits = horizon_waits.saturating_add(1);
                again_in = Some(delay.min(self.options.poll_interval));
            } else {
                *horizon_waits = 0;
            }
        }
        Ok(Batch { fetched, again_in })
    }

    async fn parallel_batch(&self, offset: i16) -> Result<Batch> {
        let mut tx = HandTx {
            conn: self.options.outbox.pool.acquire().await?,
            open: true,
        };
        let claim = self
            .sql
            .claim_lanes
            .replace("{offset}", &offset.to_string())
            .replace("{lanes}", &self.options.lanes_per_claim.to_string());
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
            .bind(i64::from(self.options.batch_size))
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
        let fetched = if lanes.len() as u32 == self.options.lanes_per_claim && !events.is_empty() {
            self.options.batch_size as usize
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
        let publisher = &self.options.publisher;
        let span = tracing::debug_span!(
            "outbox.publish",
            sd.name = %self.options.outbox.table,
            messaging.system = publisher.system(),
            sd.operation = sd_core::observe::operation::PUBLISH,
            events = events.len(),
        );
        let start = Instant::now();
        let answer = publisher.publish(events).instrument(span).await;
        let (published, failure) = match answer {
            Ok(()) => (events.len(), None),
            Err(Error::Publish { published, reason }) => {
                (published.min(events.len()), Some(reason))
            }
            Err(other) => (0, Some(other.to_string())),
        };
        self.meters.published(start, published, failure.is_some());
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
        let delay = self.options.retry.random_delay(attempt);
        let status: Option<String> = sqlx::query_scalar(&self.sql.mark_failed)
            .bind(failed.id)
            .bind(&reason)
            .bind(i64::from(self.options.max_attempts))
            .bind(delay.as_secs_f64())
            .fetch_optional(&mut *conn)
            .await?;
        tx.done(None).await?;
        self.counters.published(published);
        if status.as_deref() == Some("dead") {
            self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
            self.meters.dead_lettered();
            tracing::warn!(id = %failed.id, attempts = attempt, error = %reason, "outbox event dead-lettered");
            Ok(Some(Duration::ZERO))
        } else {
            tracing::debug!(id = %failed.id, attempts = attempt, error = %reason, ?delay, "outbox publish failed");
            Ok(Some(delay))
        }
    }
}
