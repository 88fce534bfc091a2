//! The miss path: coalescing in-process, the cross-process load lock, waiting for
//! another process's load, early refreshes, and reading around a failed Redis.

use super::*;

/// Why the in-process leader stopped waiting without the lock.
enum Next<V> {
    /// Another process stored a fresh value (with what is left of its lifetime).
    Fresh(Loaded<V>),
    /// An early refresh found another process refreshing.
    Skip,
    Failed(Error),
}

impl<V, C, K> RedisCache<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    pub(crate) async fn resolve<L, Fut>(&self, key: &str, load: L, want_value: bool) -> Shared<V>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Load<V>> + Send + 'static,
    {
        self.resolve_loaded(key, load, want_value)
            .await
            .map(|l| l.value)
    }

    /// [`Self::resolve`], with what is left of the value's lifetime in Redis.
    pub(crate) async fn resolve_loaded<L, Fut>(
        &self,
        key: &str,
        load: L,
        want_value: bool,
    ) -> Load<V>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Load<V>> + Send + 'static,
    {
        Self::check_key(key)?;
        let read = match self.read(key, Lock::Never, "").await {
            Ok(read) => read,
            Err(e @ Error::Backend { .. }) if self.inner.settings.fallback_to_loader => {
                return self.fallback(key, load, e).await;
            }
            Err(e) => return Err(e),
        };
        if let Some(value) = &read.fresh
            && (value.is_some() || !want_value)
        {
            self.inner.counters.hits.bump();
            let value = value.clone();
            self.maybe_refresh(key, &read, load);
            return Ok(Loaded {
                value,
                ttl: Some(self.memory_ttl(&read)),
            });
        }
        Counters::bump(&self.inner.counters.misses);
        let owned = key.to_owned();
        let (result, role) = self
            .inner
            .flights
            .run(&owned, || self.lead(owned.clone(), load, want_value, None))
            .await;
        self.inner.counters.note(role);
        result
    }

    /// Runs the loader around a failed Redis, coalesced in-process, uncached.
    async fn fallback<L, Fut>(&self, key: &str, load: L, cause: Error) -> Load<V>
    where
        L: FnOnce() -> Fut,
        Fut: Future<Output = Load<V>>,
    {
        let owned = key.to_owned();
        let (result, _) = self
            .inner
            .flights
            .run(&owned, || self.fallback_load(load, cause))
            .await;
        result
    }

    async fn fallback_load<L, Fut>(&self, load: L, cause: Error) -> Load<V>
    where
        L: FnOnce() -> Fut,
        Fut: Future<Output = Load<V>>,
    {
        tracing::warn!(error = %cause, "sd-cache: redis failed, reading through the loader");
        Counters::bump(&self.inner.counters.fallbacks);
        let start = tokio::time::Instant::now();
        let result = load()
            .instrument(crate::observe::load_span(
                &self.inner.counters.name,
                sd_core::observe::backend::REDIS,
            ))
            .await;
        self.inner
            .counters
            .record_load(start.elapsed(), result.is_ok());
        // Not stored anywhere, so not to be kept by a memory tier either.
        result.map(|l| Loaded {
            value: l.value,
            ttl: Some(Duration::ZERO),
        })
    }

    /// Starts a background refresh if XFetch says so: at most one per key in this process
    /// (the flight is claimed before the task is spawned), and across processes only while
    /// the entry this read saw is still in place (the lock is taken against its version).
    fn maybe_refresh<L, Fut>(&self, key: &str, read: &Read<V>, load: L)
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Load<V>> + Send + 'static,
    {
        let settings = &self.inner.settings;
        if read.now < settings.policy.refresh_from(read.expiry, read.delta) {
            return;
        }
        let u = settings.random.unit();
        if !crate::xfetch::should_refresh(
            read.now,
            read.expiry,
            read.delta,
            settings.policy.beta,
            u,
        ) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = key.to_owned();
        let Some(claim) = self.inner.refreshes.claim(&key) else {
            return;
        };
        let this = self.clone();
        let seen = read.version.clone();
        runtime.spawn(async move {
            let result = this
                .inner
                .refreshes
                .run_claimed(claim, || this.lead(key.clone(), load, false, Some(seen)))
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "sd-cache: early refresh failed; the current value stays until it expires");
            }
        });
    }

    /// The in-process leader: take the cross-process lock or wait for its holder. `refresh`
    /// is the version an early refresh was decided on.
    async fn lead<L, Fut>(
        &self,
        key: String,
        load: L,
        want_value: bool,
        refresh: Option<String>,
    ) -> Load<V>
    where
        L: FnOnce() -> Fut,
        Fut: Future<Output = Load<V>>,
    {
        let token = format!(
            "{:016x}",
            (self.inner.settings.random.unit() * u64::MAX as f64) as u64
        );
        let start = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mode = match &refresh {
            Some(version) => Lock::Refresh(version),
            None => Lock::IfMissing,
        };
        let notify = self.inner.subscribed.then(|| {
            Arc::clone(
                self.inner
                    .waiters
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(Notify::new()))
                    .value(),
            )
        });
        let next = loop {
            let notified = notify.as_ref().map(|n| n.notified());
            let mut notified = notified.map(Box::pin);
            if let Some(n) = notified.as_mut() {
                n.as_mut().enable();
            }
            let read = match self.read(&key, mode, &token).await {
                Ok(read) => read,
                Err(e) => break Err(Next::Failed(e)),
            };
            if read.locked {
                break Ok(read);
            }
            if refresh.is_some() {
                // Another process is refreshing, or already replaced the entry.
                break Err(Next::Skip);
            }
            if let Some(value) = &read.fresh
                && (value.is_some() || !want_value)
            {
                break Err(Next::Fresh(Loaded {
                    value: value.clone(),
                    ttl: Some(self.memory_ttl(&read)),
                }));
            }
            let waited = start.elapsed();
            if waited >= self.inner.settings.wait_timeout {
                break Err(Next::Failed(Error::LoadTimeout {
                    key: short_key(&key),
                    waited_ms: ms(waited),
                }));
            }
            let pause = backoff.min(self.inner.settings.wait_timeout - waited);
            match notified {
                Some(n) => {
                    let _ = tokio::time::timeout(pause, n).await;
                }
                None => tokio::time::sleep(pause).await,
            }
            backoff = (backoff * 2).min(Duration::from_millis(200));
        };
        drop(notify);
        self.inner
            .waiters
            .remove_if(&key, |_, n| Arc::strong_count(n) == 1);
        match next {
            Ok(read) => self.load_and_store(&key, load, read, &token).await,
            Err(Next::Fresh(loaded)) => Ok(loaded),
            Err(Next::Skip) => {
                Counters::bump(&self.inner.counters.skipped_refreshes);
                Ok(Loaded {
                    value: None,
                    ttl: Some(Duration::ZERO),
                })
            }
            Err(Next::Failed(e @ Error::Backend { .. }))
                if self.inner.settings.fallback_to_loader && refresh.is_none() =>
            {
                self.fallback_load(load, e).await
            }
            Err(Next::Failed(e)) => Err(e),
        }
    }

    /// We hold the lock: load, then write with the version we saw (or unlock on failure).
    async fn load_and_store<L, Fut>(
        &self,
        key: &str,
        load: L,
        read: Read<V>,
        token: &str,
    ) -> Load<V>
    where
        L: FnOnce() -> Fut,
        Fut: Future<Output = Load<V>>,
    {
        let start = tokio::time::Instant::now();
        let result = load()
            .instrument(crate::observe::load_span(
                &self.inner.counters.name,
                sd_core::observe::backend::REDIS,
            ))
            .await;
        let delta = start.elapsed();
        self.inner.counters.record_load(delta, result.is_ok());
        if read.fresh.is_some() {
            Counters::bump(&self.inner.counters.early_refreshes);
        }
        match result {
            Ok(loaded) => {
                let written = self
                    .write(
                        key,
                        loaded.value.as_ref(),
                        loaded.ttl,
                        delta,
                        Some(&read.version),
                        token,
                    )
                    .await;
                let life = match written {
                    Ok((version, life)) if version >= 0 => life,
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "sd-cache: loaded but could not store the value");
                        None
                    }
                };
                let keep = life.map_or(Duration::ZERO, |l| self.keep_in_memory(l, delta));
                Ok(Loaded {
                    value: loaded.value,
                    ttl: Some(keep),
                })
            }
            Err(error) => {
                if let Err(e) = self.unlock(key, token).await {
                    tracing::warn!(error = %e, "sd-cache: could not release the load lock; it expires by itself");
                }
                let remaining = self.memory_ttl(&read);
                if let Some(value) = read.fresh {
                    return Ok(Loaded {
                        value,
                        ttl: Some(remaining),
                    });
                }
                match read.stale {
                    Some(v) => {
                        Counters::bump(&self.inner.counters.stale_served);
                        Ok(Loaded {
                            value: Some(v),
                            ttl: Some(Duration::ZERO),
                        })
                    }
                    None => Err(error),
                }
            }
        }
    }
}
