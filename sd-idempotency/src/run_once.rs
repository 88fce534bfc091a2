//! Run a piece of work once per idempotency key, outside HTTP: message handlers, gRPC
//! methods, jobs.
//!
//! The guarantees are the middleware's: concurrent duplicates get
//! [`Error::InFlight`], a key reused with other input gets [`Error::Mismatch`], a
//! completed key replays the stored result, a failed work releases the key so a retry
//! runs again, and a store that fails stops the work from running (fail closed).
//! While the work runs, its lock is extended every third of `lock_ttl`.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures::future::{Either, select};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::store::{Claim, ClaimOutcome, Fingerprint, Store, StoredResponse, ttl_ms, validate_key};

/// The default lock: how long a claim holds without being extended.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(30);

/// The default retention of a completed key: 24 hours, as Stripe keeps them.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// What [`RunOnce::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome<T> {
    /// The work ran now, and this is its result.
    Executed(T),
    /// The work ran before; this is the stored result.
    Replayed(T),
}

impl<T> Outcome<T> {
    /// The result, either way.
    pub fn into_inner(self) -> T {
        match self {
            Outcome::Executed(t) | Outcome::Replayed(t) => t,
        }
    }

    /// True when the result was replayed.
    pub fn is_replay(&self) -> bool {
        matches!(self, Outcome::Replayed(_))
    }
}

/// Why [`RunOnce::run`] returned no result.
#[derive(Debug)]
#[non_exhaustive]
pub enum RunError<E> {
    /// The work ran and failed; the key was released, so a retry runs it again.
    Work(E),
    /// The work did not run: the key is in flight or mismatched, the key is invalid, or
    /// the store failed.
    Idempotency(Error),
}

impl<E: std::fmt::Display> std::fmt::Display for RunError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Work(e) => write!(f, "the work failed: {e}"),
            RunError::Idempotency(e) => write!(f, "{e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RunError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Work(e) => Some(e),
            RunError::Idempotency(e) => Some(e),
        }
    }
}

impl<E> From<Error> for RunError<E> {
    fn from(e: Error) -> Self {
        RunError::Idempotency(e)
    }
}

/// Runs work once per key on a [`Store`].
#[derive(Debug, Clone)]
pub struct RunOnce<S> {
    store: S,
    lock_ttl: Duration,
    retention: Duration,
}

/// Options of a [`RunOnce`]; [`build`](Self::build) checks them.
#[derive(Debug, Clone)]
pub struct RunOnceBuilder<S> {
    store: S,
    lock_ttl: Duration,
    retention: Duration,
}

impl<S: Store> RunOnceBuilder<S> {
    /// How long a claim holds without being extended (default 30 s; at least 3 ms: the
    /// heartbeat extends it every third).
    pub fn lock_ttl(mut self, lock_ttl: Duration) -> Self {
        self.lock_ttl = lock_ttl;
        self
    }

    /// How long a completed result is replayed (default 24 h; at least 1 ms).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The runner, or [`Error::InvalidConfig`] naming the first setter out of range.
    pub fn build(self) -> Result<RunOnce<S>> {
        heartbeat_lock_ttl(self.lock_ttl)?;
        ttl_ms("retention", self.retention)?;
        Ok(RunOnce {
            store: self.store,
            lock_ttl: self.lock_ttl,
            retention: self.retention,
        })
    }
}

impl<S: Store> RunOnce<S> {
    /// On `store` with a 30 s lock and 24 h retention.
    pub fn new(store: S) -> Self {
        RunOnce {
            store,
            lock_ttl: DEFAULT_LOCK_TTL,
            retention: DEFAULT_RETENTION,
        }
    }

    /// Options on `store`, starting from a 30 s lock and 24 h retention.
    pub fn builder(store: S) -> RunOnceBuilder<S> {
        RunOnceBuilder {
            store,
            lock_ttl: DEFAULT_LOCK_TTL,
            retention: DEFAULT_RETENTION,
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs `work` unless `key` ran before in `scope`, and stores its result as JSON.
    ///
    /// `fingerprint` identifies the input (e.g. [`Fingerprint::of`] the message body): the
    /// same key with another fingerprint is [`Error::Mismatch`]. When the work ran but
    /// its result could not be stored (the lock expired, the store failed), the result is
    /// still returned as [`Outcome::Executed`] and a warning is logged.
    pub async fn run<T, E, F>(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        work: F,
    ) -> Result<Outcome<T>, RunError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        validate_key(key)?;
        let claim = match self
            .store
            .claim(scope, key, fingerprint, self.lock_ttl)
            .await?
        {
            ClaimOutcome::Claimed(claim) => claim,
            ClaimOutcome::InFlight { retry_after } => {
                return Err(Error::InFlight { retry_after }.into());
            }
            ClaimOutcome::Completed(stored) => {
                return Ok(Outcome::Replayed(
                    serde_json::from_slice(&stored.body).map_err(Error::from)?,
                ));
            }
            ClaimOutcome::Mismatch => {
                return Err(Error::Mismatch {
                    key: key.to_owned(),
                }
                .into());
            }
        };
        match with_heartbeat(&self.store, &claim, self.lock_ttl, || true, work).await {
            Ok(value) => {
                let stored = serde_json::to_vec(&value)
                    .map_err(Error::from)
                    .map(|body| StoredResponse::new(200, body));
                let result = match stored {
                    Ok(stored) => self.store.complete(&claim, &stored, self.retention).await,
                    Err(e) => Err(e),
                };
                if let Err(error) = result {
                    tracing::warn!(%error, key, "work ran but its result was not stored");
                }
                Ok(Outcome::Executed(value))
            }
            Err(e) => {
                if let Err(error) = self.store.release(&claim).await {
                    tracing::warn!(%error, key, "releasing the key after a failed work");
                }
                Err(RunError::Work(e))
            }
        }
    }
}

/// [`RunOnce::run`] with the default lock and retention.
pub async fn run_once<S, T, E, F>(
    store: &S,
    scope: &str,
    key: &str,
    fingerprint: &Fingerprint,
    work: F,
) -> Result<Outcome<T>, RunError<E>>
where
    S: Store,
    T: Serialize + DeserializeOwned,
    F: Future<Output = Result<T, E>>,
{
    RunOnce::new(store).run(scope, key, fingerprint, work).await
}

/// Checks a `lock_ttl` setter's value for [`with_heartbeat`], which extends the lock every
/// third of it: a valid TTL of at least 3 ms.
pub(crate) fn heartbeat_lock_ttl(lock_ttl: Duration) -> Result<()> {
    ttl_ms("lock_ttl", lock_ttl)?;
    if lock_ttl < Duration::from_millis(3) {
        return Err(Error::config("lock_ttl", "must be at least 3 ms"));
    }
    Ok(())
}

/// Awaits `work`, extending `claim` every third of `lock_ttl` meanwhile, as long as
/// `holding()` says the claim is still the work's to keep (the middleware's handler may
/// complete it itself). When an extend is refused the heartbeat stops (the work goes on;
/// its completion will be refused).
pub(crate) async fn with_heartbeat<S: Store, F: Future>(
    store: &S,
    claim: &Claim,
    lock_ttl: Duration,
    holding: impl Fn() -> bool,
    work: F,
) -> F::Output {
    let period = (lock_ttl / 3).max(Duration::from_millis(1));
    let beat = async {
        let start = tokio::time::Instant::now() + period;
        let mut ticks = tokio::time::interval_at(start, period);
        loop {
            ticks.tick().await;
            if !holding() {
                return;
            }
            match store.extend(claim, lock_ttl).await {
                Ok(()) => {}
                Err(error @ Error::ClaimLost { .. }) => {
                    tracing::warn!(%error, "heartbeat stopped");
                    return;
                }
                Err(error) => tracing::warn!(%error, "heartbeat failed; trying again"),
            }
        }
    };
    match select(pin!(work), pin!(beat)).await {
        Either::Left((out, _)) => out,
        Either::Right(((), work)) => work.await,
    }
}
