//! A store wrapper that crashes or freezes the orchestrator using it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::{
    Claimant, Error, Lease, NewSaga, SagaRecord, SagaStore, StoreStats, StoredEvent, Write,
};

/// What [`Faulty::hook_at`] runs before a write.
pub type Hook = Arc<dyn Fn() -> crate::BoxFuture<()> + Send + Sync>;

struct FaultyState {
    writes: AtomicUsize,
    crash: Option<(usize, bool)>,
    hook: Option<(usize, Hook)>,
    crashed: watch::Sender<bool>,
    frozen: watch::Sender<bool>,
}

/// Wraps a store: counts `create` and `write` calls and, at an injected one, never
/// returns (before or after performing it), as an orchestrator that dies there; or
/// freezes every call until thawed, as a stalled process.
#[derive(Clone)]
pub struct Faulty<S> {
    inner: S,
    state: Arc<FaultyState>,
}

impl<S> std::fmt::Debug for Faulty<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty")
            .field("writes", &self.state.writes)
            .field("crash", &self.state.crash)
            .finish_non_exhaustive()
    }
}

impl<S: SagaStore + Clone> Faulty<S> {
    /// Wraps `inner` without a crash point.
    pub fn new(inner: S) -> Self {
        Self::build(inner, None, None)
    }

    /// Dies at the `n`-th create/write (1-based), before performing it or just after;
    /// no later write of this orchestrator goes through either (its other branches die
    /// with it).
    pub fn crash_at(inner: S, n: usize, after: bool) -> Self {
        Self::build(inner, Some((n, after)), None)
    }

    /// Runs `hook` (a cancel, a clock moved past a deadline) just before the `n`-th
    /// create/write, then performs it.
    pub fn hook_at(inner: S, n: usize, hook: Hook) -> Self {
        Self::build(inner, None, Some((n, hook)))
    }

    fn build(inner: S, crash: Option<(usize, bool)>, hook: Option<(usize, Hook)>) -> Self {
        Faulty {
            inner,
            state: Arc::new(FaultyState {
                writes: AtomicUsize::new(0),
                crash,
                hook,
                crashed: watch::channel(false).0,
                frozen: watch::channel(false).0,
            }),
        }
    }

    /// The `create` and `write` calls so far.
    pub fn writes(&self) -> usize {
        self.state.writes.load(Ordering::SeqCst)
    }

    /// Resolves once the injected crash point is reached.
    pub async fn crashed(&self) {
        let mut rx = self.state.crashed.subscribe();
        rx.wait_for(|c| *c).await.unwrap();
    }

    /// Freezes (or thaws) every call, as a stalled process.
    pub fn freeze(&self, frozen: bool) {
        self.state.frozen.send_replace(frozen);
    }

    async fn gate(&self) {
        let mut rx = self.state.frozen.subscribe();
        rx.wait_for(|f| !*f).await.unwrap();
    }

    async fn counted<T>(&self, op: impl Future<Output = T>) -> T {
        self.gate().await;
        if *self.state.crashed.borrow() {
            std::future::pending::<()>().await;
        }
        let n = self.state.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((at, hook)) = &self.state.hook
            && *at == n
        {
            hook().await;
        }
        if self.state.crash == Some((n, false)) {
            self.state.crashed.send_replace(true);
            std::future::pending::<()>().await;
        }
        let out = op.await;
        if self.state.crash == Some((n, true)) {
            self.state.crashed.send_replace(true);
            std::future::pending::<()>().await;
        }
        out
    }
}

impl<S: SagaStore + Clone> SagaStore for Faulty<S> {
    async fn create(&self, saga: &NewSaga<'_>) -> crate::Result<Lease> {
        self.counted(self.inner.create(saga)).await
    }
    async fn write(&self, lease: &Lease, write: &Write<'_>) -> crate::Result<Lease> {
        self.counted(self.inner.write(lease, write)).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> crate::Result<()> {
        // A stalled orchestrator's heartbeats do not arrive: its lease runs out.
        if *self.state.frozen.borrow() {
            return Err(Error::Timeout { after: ttl });
        }
        self.inner.renew(lease, ttl).await
    }
    async fn claim_expired(
        &self,
        by: &Claimant<'_>,
        limit: usize,
    ) -> crate::Result<Vec<SagaRecord>> {
        self.gate().await;
        self.inner.claim_expired(by, limit).await
    }
    async fn claim_stuck(&self, by: &Claimant<'_>, id: &str) -> crate::Result<SagaRecord> {
        self.gate().await;
        self.inner.claim_stuck(by, id).await
    }
    async fn cancel(&self, id: &str, reason: &str) -> crate::Result<SagaRecord> {
        self.inner.cancel(id, reason).await
    }
    async fn load(&self, id: &str) -> crate::Result<Option<SagaRecord>> {
        self.inner.load(id).await
    }
    async fn events(&self, id: &str) -> crate::Result<Vec<StoredEvent>> {
        self.inner.events(id).await
    }
    async fn stats(&self, saga_type: &str) -> crate::Result<StoreStats> {
        self.inner.stats(saga_type).await
    }
}
