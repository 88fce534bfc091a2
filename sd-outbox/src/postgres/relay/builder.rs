//! The relay's options and the SQL it builds from them.

use super::*;

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
        let channel = match &self.channel {
            Some(channel) => {
                one_part("channel", channel)?;
                channel.clone()
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
        let lock_key = format!("sd-outbox:{t}:ordered:{}", self.group);
        Ok(Relay {
            inner: Arc::new(Inner {
                channel,
                lock_key,
                sql,
                counters: Arc::new(Counters::default()),
                meters: RelayMeters::new(&self.outbox.table, self.publisher.system()),
                options: RelayBuilder {
                    max_attempts: attempts_limit(self.max_attempts, &self.retry),
                    ..self
                },
            }),
        })
    }
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
}
