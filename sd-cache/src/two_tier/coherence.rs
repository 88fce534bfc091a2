//! Keeping the memory tiers coherent: leases and heartbeats, announcing writes and
//! waiting for acknowledgements, the subscription that drops copies, and resyncs.

use sd_core::observe::operation;
use tracing::Instrument;

use super::*;

impl<V, C, K> Inner<V, C, K>
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    pub(super) fn serving(&self) -> bool {
        saturating_nanos(self.clock.now()) < self.serving_until.load(Ordering::Acquire)
    }

    /// A memory hit needing no refresh, while the lease is live: one clock read for both.
    #[inline]
    pub(super) fn hit(&self, key: &str, want_value: bool) -> Option<Option<V>> {
        let now = self.clock.now_nanos();
        if now >= self.serving_until.load(Ordering::Acquire) {
            return None;
        }
        self.local.peek_at(key, want_value, now)
    }

    /// Stops serving from memory until a heartbeat comes back (which then resyncs).
    pub(super) fn lapse(&self) {
        self.serving_until.store(0, Ordering::Release);
    }

    /// Forgets everything the memory tier holds or is loading.
    fn resync(&self) {
        self.lapse();
        self.local.invalidate_all();
        self.remote.forget_all();
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads through the Redis tier; a Redis failure (or a read answered around one) stops
    /// the memory tier from serving until the lease is renewed, and that renewal resyncs.
    pub(super) async fn remote_resolve<L, Fut>(
        &self,
        key: &str,
        load: L,
        want_value: bool,
    ) -> crate::memory::Load<V>
    where
        L: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = crate::memory::Load<V>> + Send + 'static,
    {
        let fallbacks = self.remote.fallback_count();
        let result = self.remote.resolve_loaded(key, load, want_value).await;
        if matches!(result, Err(Error::Backend { .. })) || self.remote.fallback_count() != fallbacks
        {
            self.lapse();
        }
        result
    }

    /// Drops the local copy, announces the change and waits for the acknowledgements.
    pub(super) async fn after_write(&self, key: &str, written: Result<()>) -> Result<()> {
        // Whatever happened in Redis, our own copy may be outdated now.
        self.local.invalidate_borrowed(key);
        self.remote.forget(key);
        if let Err(e) = written {
            if matches!(e, Error::Backend { .. }) {
                self.lapse();
            }
            return Err(e);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let wait = Arc::new(AckWait::default());
        self.acks.insert(seq, Arc::clone(&wait));
        let _cleanup = AckCleanup {
            acks: &self.acks,
            seq,
        };
        let message = format!("i|{}|{seq}|{key}", self.id);
        let mut conn = self.remote.connection();
        let (now, registry): (u64, Vec<(String, u64)>) = ANNOUNCE
            .call(1)
            .arg(&self.registry)
            .arg(&self.channel)
            .arg(message)
            .arg(if self.cluster { "1" } else { "0" })
            .invoke(&mut conn)
            .instrument(crate::observe::redis_span(
                self.remote.name(),
                operation::ANNOUNCE,
            ))
            .await
            .map_err(|e| {
                self.lapse();
                backend("announce", e)
            })?;
        let replied = tokio::time::Instant::now();
        let mut pending: HashMap<String, tokio::time::Instant> = registry
            .into_iter()
            .filter(|(id, expiry)| *id != self.id && *expiry > now)
            .map(|(id, expiry)| (id, replied + Duration::from_millis(expiry - now)))
            .collect();
        loop {
            let notified = wait.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let acked = wait.acked.lock().unwrap_or_else(PoisonError::into_inner);
                let now = tokio::time::Instant::now();
                pending.retain(|id, deadline| !acked.contains(id) && *deadline > now);
            }
            let Some(next) = pending.values().min().copied() else {
                return Ok(());
            };
            let _ = tokio::time::timeout_at(next, notified).await;
        }
    }

    /// Renews the lease and sends a ping through the invalidation channel.
    pub(super) async fn heartbeat(&self) -> Result<()> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let sent = self.clock.now();
        self.pings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, sent);
        let mut conn = self.remote.connection();
        HEARTBEAT
            .call(1)
            .arg(&self.registry)
            .arg(&self.id)
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(&self.channel)
            .arg(format!("p|{}|{seq}", self.id))
            .arg(if self.cluster { "1" } else { "0" })
            .invoke::<u64>(&mut conn)
            .instrument(crate::observe::redis_span(
                self.remote.name(),
                operation::HEARTBEAT,
            ))
            .await
            .map(|_| ())
            .map_err(|e| backend("heartbeat", e))
    }

    /// Handles one message, in the order the server published them.
    fn on_message(&self, channel: &str, payload: &str) {
        if channel == self.events {
            // A write, load or invalidation of `payload` in some process: wake our waiters.
            // The memory copy is dropped by the writer's announcement (a load does not make
            // the memory copy wrong; see the module docs for plain Redis writers).
            self.remote.wake(payload);
        } else if channel == self.ack_channel {
            if let Some((seq, id)) = payload.split_once('|')
                && let Ok(seq) = seq.parse::<u64>()
                && let Some(wait) = self.acks.get(&seq)
            {
                wait.acked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id.to_owned());
                wait.notify.notify_waiters();
            }
        } else if channel == self.channel {
            let mut parts = payload.splitn(4, '|');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                // Our own writes dropped our copy before they were announced; dropping it
                // again here would only throw away a newer value read since.
                (Some("i"), Some(writer), Some(seq), Some(key)) if writer != self.id => {
                    self.local.invalidate_borrowed(key);
                    self.remote.forget(key);
                    self.acknowledge(writer, seq);
                }
                (Some("p"), Some(id), Some(seq), None) if id == self.id => {
                    if let Ok(seq) = seq.parse::<u64>() {
                        self.on_ping(seq);
                    }
                }
                _ => {}
            }
        }
    }

    fn acknowledge(&self, writer: &str, seq: &str) {
        let mut conn = self.remote.connection();
        let channel = format!("{}{writer}", self.ack_prefix);
        let message = format!("{seq}|{}", self.id);
        let publish = if self.cluster { "SPUBLISH" } else { "PUBLISH" };
        tokio::spawn(async move {
            let sent: redis::RedisResult<i64> = redis::cmd(publish)
                .arg(channel)
                .arg(message)
                .query_async(&mut conn)
                .await;
            if let Err(error) = sent {
                tracing::warn!(%error, "sd-cache: could not acknowledge an invalidation; the writer waits for our lease instead");
            }
        });
    }

    /// Our ping came back: every message published before it was handled.
    fn on_ping(&self, seq: u64) {
        let sent = {
            let mut pings = self.pings.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(sent) = pings.remove(&seq) else {
                return;
            };
            // Older pings were lost (or overtaken): forget them.
            *pings = pings.split_off(&seq);
            sent
        };
        if !self.serving() {
            // The lease lapsed (or this is the first ping): invalidations may have been
            // missed meanwhile, so start from an empty memory tier.
            self.resync();
        }
        let until = sent + self.lease - self.lease / 10;
        self.serving_until
            .fetch_max(saturating_nanos(until), Ordering::AcqRel);
    }
}

/// Leaves the registry when the instance is dropped, so writers stop waiting for it at
/// once instead of until its lease lapses (best effort: needs a runtime; the lease bounds
/// the wait otherwise).
pub(super) struct Leave(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Leave {
    pub(super) fn new<C: ConnectionLike + Clone + Send + Sync + 'static>(
        mut conn: C,
        registry: String,
        id: String,
    ) -> Self {
        Leave(Some(Box::new(move || {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            runtime.spawn(async move {
                let _: redis::RedisResult<i64> = redis::cmd("HDEL")
                    .arg(registry)
                    .arg(id)
                    .query_async(&mut conn)
                    .await;
            });
        })))
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(leave) = self.0.take() {
            leave();
        }
    }
}

struct AckCleanup<'a> {
    acks: &'a DashMap<u64, Arc<AckWait>>,
    seq: u64,
}

impl Drop for AckCleanup<'_> {
    fn drop(&mut self) {
        self.acks.remove(&self.seq);
    }
}

/// Where an instance subscribes.
pub(super) enum Source {
    /// One server (or a primary with replicas): `SUBSCRIBE` through a client of it.
    Server(redis::Client),
    /// A cluster: `SSUBSCRIBE` on the master that owns the channels' slot.
    Cluster(shard::ShardClient),
}

/// Subscribes to the invalidation and acknowledgement channels (`channels[0]`, `[1]`) and
/// the Redis tier's events (`[2]`).
pub(super) async fn subscribe<C: ConnectionLike + Clone>(
    source: &Source,
    conn: &C,
    channels: &[String; 3],
) -> Result<shard::Messages> {
    match source {
        Source::Server(client) => {
            let mut pubsub = client
                .get_async_pubsub()
                .await
                .map_err(|e| backend("subscribe", e))?;
            pubsub
                .subscribe(channels.as_slice())
                .await
                .map_err(|e| backend("subscribe", e))?;
            Ok(Box::pin(pubsub.into_on_message().filter_map(|msg| {
                let payload = std::str::from_utf8(msg.get_payload_bytes()).ok();
                let message = payload.map(|p| (msg.get_channel_name().to_owned(), p.to_owned()));
                std::future::ready(message)
            })))
        }
        Source::Cluster(shard) => shard
            .subscribe(&mut conn.clone(), &channels[..2], &channels[2..])
            .await
            .map_err(|e| backend("subscribe", redis::RedisError::from(e))),
    }
}

/// Delivers messages in order; when the subscription drops, stops serving from memory,
/// re-subscribes with backoff and resyncs. On a cluster it also re-subscribes when the
/// instance's pings stop coming back for a lease (the shard's master was frozen or
/// partitioned away and another took over without closing this connection).
pub(super) async fn listen<V, C, K>(
    inner: Weak<Inner<V, C, K>>,
    source: Source,
    channels: [String; 3],
    first: shard::Messages,
    mut closed: watch::Receiver<()>,
) where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    let Some((lease, conn)) = inner.upgrade().map(|i| (i.lease, i.remote.connection())) else {
        return;
    };
    let watchdog = matches!(source, Source::Cluster(_));
    let mut subscription = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut stream = match subscription.take() {
            Some(p) => p,
            None => {
                let attempt = tokio::select! {
                    r = subscribe(&source, &conn, &channels) => r,
                    _ = closed.changed() => return,
                };
                match attempt {
                    Ok(p) => {
                        backoff = Duration::from_millis(50);
                        let Some(inner) = inner.upgrade() else { return };
                        // Anything published while we were not subscribed is lost to us.
                        inner.resync();
                        p
                    }
                    Err(error) => {
                        tracing::warn!(%error, "sd-cache: two-tier subscription failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = closed.changed() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            }
        };
        let subscribed = tokio::time::Instant::now();
        let mut check = tokio::time::interval(lease / 2);
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = closed.changed() => return,
                _ = check.tick(), if watchdog => {
                    let Some(inner) = inner.upgrade() else { return };
                    if !inner.serving() && subscribed.elapsed() > lease {
                        tracing::warn!("sd-cache: two-tier pings stopped coming back; subscribing again");
                        break;
                    }
                    continue;
                }
            };
            let Some((channel, payload)) = msg else { break };
            let Some(inner) = inner.upgrade() else { return };
            inner.on_message(&channel, &payload);
        }
        let Some(inner) = inner.upgrade() else { return };
        tracing::warn!("sd-cache: two-tier subscription lost; serving from Redis until it is back");
        inner.resync();
    }
}

/// Renews the lease every quarter lease.
pub(super) async fn beat<V, C, K>(inner: Weak<Inner<V, C, K>>, mut closed: watch::Receiver<()>)
where
    V: Clone + Send + Sync + 'static,
    C: ConnectionLike + Clone + Send + Sync + 'static,
    K: Codec<V>,
{
    loop {
        let period = match inner.upgrade() {
            Some(inner) => inner.lease / 4,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = closed.changed() => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        if let Err(error) = inner.heartbeat().await {
            tracing::warn!(%error, "sd-cache: two-tier heartbeat failed; the memory tier stops serving when the lease lapses");
        }
    }
}

fn backend(operation: &'static str, e: redis::RedisError) -> Error {
    Error::Backend {
        backend: "redis",
        operation,
        source: Arc::new(e),
    }
}
