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
    /// The cache's name (default `"default"`): the `sd.name` of both tiers' metrics
    /// (feature `metrics`, told apart by `sd.backend`) and spans; the same as naming the
    /// Redis tier's builder.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.remote = self.remote.name(name);
        self
    }

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
    /// For a Redis Cluster use [`build_on_cluster`](Self::build_on_cluster).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field; [`Error::Backend`] when the subscription or
    /// the first heartbeat fails.
    pub async fn build<C>(self, conn: C, pubsub: redis::Client) -> Result<TwoTier<V, C, K>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.build_with(conn, Source::Server(pubsub)).await
    }

    /// Like [`build`](Self::build) on a Redis Cluster (7.0 or later): `conn` is a cluster
    /// connection (`sd_core::failover::FailoverConnection` in cluster mode, or redis-rs's
    /// `ClusterConnection`), and `pubsub` a client of any node, whose credentials are used
    /// to subscribe on the master that owns the coherence channels' slot (plain TCP).
    ///
    /// The registry and the coherence channels share one hash tag
    /// (`prefix:{prefix:two-tier}`), so they live on one shard; invalidations and pings
    /// go through sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`) there. See the
    /// [module docs](super#on-a-redis-cluster) for what a failover of that shard costs.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build); [`Error::InvalidConfig`] (field `pubsub`) for a TLS or
    /// Unix-socket client.
    pub async fn build_on_cluster<C>(
        self,
        conn: C,
        pubsub: redis::Client,
    ) -> Result<TwoTier<V, C, K>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let timeout = self.lease.max(Duration::from_secs(1));
        let shard = shard::ShardClient::new(&pubsub, timeout)?;
        self.build_with(conn, Source::Cluster(shard)).await
    }

    async fn build_with<C>(self, conn: C, source: Source) -> Result<TwoTier<V, C, K>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.validate()?;
        let policy = self.remote.policy().clone();
        let clock = MonotonicClock::new();
        let mut local = Cache::builder()
            .name(self.remote.name_ref())
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
        let cluster = matches!(source, Source::Cluster(_));
        // On a cluster the registry and both channels share a hash tag, so the scripts
        // that write the one and publish on the other run on one shard.
        let base = if cluster {
            prefix.tagged(&prefix.key("two-tier"))
        } else {
            prefix.key("two-tier")
        };
        let registry = format!("{base}:instances");
        let channels = [
            base.clone(),
            format!("{base}:ack:{id}"),
            remote.events_channel().to_owned(),
        ];
        let subscription = subscribe(&source, &remote.connection(), &channels).await?;
        let (closed_tx, closed_rx) = watch::channel(());
        let leave = Leave::new(remote.connection(), registry.clone(), id.clone());
        let inner = Arc::new(Inner {
            local,
            remote,
            registry,
            channel: base.clone(),
            events: channels[2].clone(),
            ack_prefix: format!("{base}:ack:"),
            ack_channel: channels[1].clone(),
            cluster,
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
            source,
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
