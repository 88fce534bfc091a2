//! Construction: [`RedisCacheBuilder`].

use super::*;

/// Builds a [`RedisCache`].
pub struct RedisCacheBuilder<V, K = JsonCodec> {
    prefix: String,
    settings: Settings<K>,
    notifications: Option<redis::Client>,
    _value: PhantomData<fn(V) -> V>,
}

impl<V, K: fmt::Debug> fmt::Debug for RedisCacheBuilder<V, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheBuilder")
            .field("prefix", &self.prefix)
            .field("policy", &self.settings.policy)
            .field("lock_ttl", &self.settings.lock_ttl)
            .field("wait_timeout", &self.settings.wait_timeout)
            .field("fallback_to_loader", &self.settings.fallback_to_loader)
            .field("codec", &self.settings.codec)
            .field("notifications", &self.notifications.is_some())
            .finish()
    }
}

impl<V, K> RedisCacheBuilder<V, K>
where
    V: Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    crate::policy::policy_setters!(settings);

    /// The cache's name (default `"default"`): the `sd.name` of its metrics (feature
    /// `metrics`) and spans. Name it after what it holds (`"users"`, `"prices"`), never
    /// after a key: a label's values must stay few.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// The name [`name`](Self::name) set.
    pub(crate) fn name_ref(&self) -> &str {
        &self.settings.name
    }

    /// How long the cross-process load lock lives (default 5 s). Set it above the slowest
    /// load: if a load outlives it, another process may load too (its older result is then
    /// refused by the version check, not lost).
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.settings.lock_ttl = ttl;
        self
    }

    /// How long a caller waits for another process's load before giving up with
    /// [`Error::LoadTimeout`] (default 10 s).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.settings.wait_timeout = timeout;
        self
    }

    /// When Redis fails, run the caller's loader instead of returning [`Error::Backend`]
    /// (default off). The value is returned but not cached.
    pub fn fallback_to_loader(mut self, on: bool) -> Self {
        self.settings.fallback_to_loader = on;
        self
    }

    /// Wake waiting processes through Redis pub/sub on this client's server instead of
    /// polling (one extra connection per cache). Without it waiters re-read with backoff.
    pub fn notifications(mut self, client: redis::Client) -> Self {
        self.notifications = Some(client);
        self
    }

    /// Replaces the codec (default [`JsonCodec`]).
    pub fn codec<K2: Codec<V>>(self, codec: K2) -> RedisCacheBuilder<V, K2> {
        RedisCacheBuilder {
            prefix: self.prefix,
            settings: self.settings.with_codec(codec),
            notifications: self.notifications,
            _value: PhantomData,
        }
    }

    /// Checks every setting; the prefix comes back checked.
    fn validate(&self) -> Result<KeyPrefix> {
        let Settings {
            policy,
            lock_ttl,
            wait_timeout,
            ..
        } = &self.settings;
        policy.validate()?;
        let prefix = KeyPrefix::parse("prefix", &self.prefix)?;
        if *lock_ttl < Duration::from_millis(10) || *lock_ttl > Duration::from_secs(3600) {
            return Err(Error::InvalidConfig {
                field: "lock_ttl",
                reason: "must be between 10 ms and 1 hour; set it above the slowest load".into(),
            });
        }
        if wait_timeout.is_zero() {
            return Err(Error::InvalidConfig {
                field: "wait_timeout",
                reason: "must be above zero; a few times the slowest load is typical".into(),
            });
        }
        Ok(prefix)
    }

    /// Checks the settings and builds the cache on `conn` (a `ConnectionManager` or
    /// `MultiplexedConnection` for one server, a `cluster_async::ClusterConnection` for a
    /// cluster). With [`notifications`](Self::notifications) it also subscribes, so it must
    /// run inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field; [`Error::Backend`] if the subscription fails.
    pub async fn build<C>(self, conn: C) -> Result<RedisCache<V, C, K>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let prefix = self.validate()?;
        let channel = prefix.key("events");
        let waiters: Arc<DashMap<String, Arc<Notify>>> = Arc::new(DashMap::new());
        let subscribed = match &self.notifications {
            Some(client) => {
                let mut pubsub = client
                    .get_async_pubsub()
                    .await
                    .map_err(backend("subscribe"))?;
                pubsub
                    .subscribe(&channel)
                    .await
                    .map_err(backend("subscribe"))?;
                let waiters = Arc::downgrade(&waiters);
                tokio::spawn(async move {
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        let Some(waiters) = waiters.upgrade() else {
                            break;
                        };
                        if let Ok(key) = msg.get_payload::<String>()
                            && let Some(n) = waiters.get(&key)
                        {
                            n.notify_waiters();
                        }
                    }
                    tracing::warn!(
                        "sd-cache: the notification connection closed; waiters fall back to polling"
                    );
                });
                true
            }
            None => false,
        };
        Ok(self.assemble(conn, prefix, channel, waiters, subscribed))
    }

    /// Builds a cache whose waiters are woken by the caller (the two-tier cache's own
    /// subscriber calls [`RedisCache::wake`]); `notifications` is ignored.
    pub(crate) fn build_woken_externally<C>(self, conn: C) -> Result<RedisCache<V, C, K>>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let prefix = self.validate()?;
        let channel = prefix.key("events");
        Ok(self.assemble(conn, prefix, channel, Arc::new(DashMap::new()), true))
    }

    pub(crate) fn policy(&self) -> &Policy {
        &self.settings.policy
    }

    fn assemble<C>(
        self,
        conn: C,
        prefix: KeyPrefix,
        channel: String,
        waiters: Arc<DashMap<String, Arc<Notify>>>,
        subscribed: bool,
    ) -> RedisCache<V, C, K> {
        let counters = Counters::observed(&self.settings.name, sd_core::observe::backend::REDIS);
        RedisCache {
            inner: Arc::new(RedisInner {
                conn,
                prefix,
                channel,
                settings: self.settings,
                flights: SingleFlight::new(),
                refreshes: SingleFlight::new(),
                counters,
                waiters,
                subscribed,
                server_clock: ServerClock::new(),
            }),
        }
    }
}

impl<V> RedisCache<V>
where
    V: Clone + Send + Sync + 'static,
{
    /// A builder for keys under `prefix` (no `{` or `}`), with the defaults: TTL 60 s,
    /// beta 1, negative TTL 5 s, lock TTL 5 s, wait timeout 10 s, JSON codec.
    pub fn builder(prefix: impl Into<String>) -> RedisCacheBuilder<V, JsonCodec> {
        RedisCacheBuilder {
            prefix: prefix.into(),
            settings: Settings {
                name: sd_core::observe::DEFAULT_NAME.to_owned(),
                policy: Policy::default(),
                lock_ttl: Duration::from_secs(5),
                wait_timeout: Duration::from_secs(10),
                fallback_to_loader: false,
                codec: JsonCodec,
                random: Arc::new(ThreadRandom),
            },
            notifications: None,
            _value: PhantomData,
        }
    }
}
