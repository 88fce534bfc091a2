//! Construction: [`TwoTierBuilder`].

use super::*;

/// Builds a [`TwoTier`] from a [`RedisCacheBuilder`] (whose settings apply to the Redis
/// tier) and the memory tier's settings.
pub struct TwoTierBuilder<V, K = JsonCodec> {
    remote: RedisCacheBuilder<V, K>,
    local_capacity: u64,
    local_ttl: Duration,
    lease: Duration,
}

impl<V, K: fmt::Debug> fmt::Debug for TwoTierBuilder<V, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwoTierBuilder")
            .field("remote", &self.remote)
            .field("local_capacity", &self.local_capacity)
            .field("local_ttl", &self.local_ttl)
            .field("lease", &self.lease)
            .finish()
    }
}

impl<V, K> TwoTierBuilder<V, K>
where
    V: Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    /// Most entries in the memory tier (default 10,000).
    pub fn local_capacity(mut self, entries: u64) -> Self {
        self.local_capacity = entries;
        self
    }

    /// How long a value stays in the memory tier (default 5 s, at most the Redis TTL).
    /// Writes and invalidations drop it sooner, in every process.
    pub fn local_ttl(mut self, ttl: Duration) -> Self {
        self.local_ttl = ttl;
        self
    }

    /// How long an instance may serve from memory without hearing from Redis (default 2 s,
    /// between 100 ms and 60 s). It bounds how long a write waits for an instance that does
    /// not acknowledge (frozen, partitioned), and how long a lost subscription goes unnoticed.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.lease < Duration::from_millis(100) || self.lease > Duration::from_secs(60) {
            return Err(Error::InvalidConfig {
                field: "lease",
                reason: "must be between 100 ms and 60 s; it bounds how long a write waits for an unresponsive instance".into(),
            });
        }
        if self.local_ttl.is_zero() || self.local_ttl > self.remote.policy().ttl {
            return Err(Error::InvalidConfig {
                field: "local_ttl",
                reason: "must be above zero and at most the Redis tier's `ttl`".into(),
            });
        }
        Ok(())
    }

    /// Checks the settings, subscribes through `pubsub` (a client of the same server as
    /// `conn`), registers this instance and starts its heartbeat. Must run inside a tokio
    /// runtime. The instance serves from memory once its first heartbeat came back.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field; [`Error::Backend`] when the subscription or
    /// the first heartbeat fails.
    pub async fn build<C>(self, conn: C, pubsub: redis::Client) -> Result<TwoTier<V, C, K>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.validate()?;
        let policy = self.remote.policy().clone();
        let clock = MonotonicClock::new();
        let mut local = Cache::builder()
            .clock(clock.clone())
            .max_capacity(self.local_capacity)
            .ttl(self.local_ttl)
            .beta(policy.beta)
            .early_refresh(policy.early_refresh);
        local = match policy.negative_ttl {
            Some(n) => local.negative_ttl(n.min(self.local_ttl)),
            None => local.no_negative_caching(),
        };
        let local = local.build()?;
        let remote = self.remote.build_woken_externally(conn)?;
        let prefix = remote.key_prefix().clone();
        let id = format!("{:016x}", rand::random::<u64>());
        let channel = prefix.key("two-tier");
        let channels = [
            channel.clone(),
            prefix.key(&format!("two-tier:ack:{id}")),
            remote.events_channel().to_owned(),
        ];
        let subscription = subscribe(&pubsub, &channels).await?;
        let (closed_tx, closed_rx) = watch::channel(());
        let leave = Leave::new(
            remote.connection(),
            prefix.key("two-tier:instances"),
            id.clone(),
        );
        let inner = Arc::new(Inner {
            local,
            remote,
            registry: prefix.key("two-tier:instances"),
            channel,
            events: channels[2].clone(),
            ack_prefix: prefix.key("two-tier:ack:"),
            ack_channel: channels[1].clone(),
            id,
            lease: self.lease,
            clock,
            serving_until: AtomicU64::new(0),
            pings: Mutex::new(BTreeMap::new()),
            next_seq: AtomicU64::new(1),
            acks: DashMap::new(),
            resyncs: AtomicU64::new(0),
            _leave: leave,
            _closed: closed_tx,
        });
        inner.heartbeat().await?;
        tokio::spawn(listen(
            Arc::downgrade(&inner),
            pubsub,
            channels,
            subscription,
            closed_rx.clone(),
        ));
        tokio::spawn(beat(Arc::downgrade(&inner), closed_rx));
        Ok(TwoTier { inner })
    }
}

impl<V> TwoTier<V>
where
    V: Clone + Send + Sync + 'static,
{
    /// A builder over `remote` (the Redis tier's settings), with the memory tier's defaults:
    /// 10,000 entries, local TTL 5 s (or the Redis TTL if shorter), lease 2 s.
    pub fn builder<K: Codec<V>>(remote: RedisCacheBuilder<V, K>) -> TwoTierBuilder<V, K> {
        let local_ttl = remote.policy().ttl.min(Duration::from_secs(5));
        TwoTierBuilder {
            remote,
            local_capacity: 10_000,
            local_ttl,
            lease: Duration::from_secs(2),
        }
    }
}
