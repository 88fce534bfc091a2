//! Renews a lease every `ttl / 3` until released, and says when it is lost.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::lease::{Lease, Release};
use crate::{FencingToken, Lock};

/// Why a watched lease was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lost {
    /// The backend says the lease is no longer ours (it expired and may have a new
    /// holder).
    NotHeld,
    /// No renewal succeeded before the validity ran out; the last error is given.
    Unreachable {
        /// The last renewal error, as text.
        last_error: String,
    },
    /// The renewal task stopped unexpectedly.
    Stopped,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::NotHeld => f.write_str("the lease expired or belongs to another holder"),
            Lost::Unreachable { last_error } => {
                write!(
                    f,
                    "no renewal succeeded before the lease ran out: {last_error}"
                )
            }
            Lost::Stopped => f.write_str("the renewal task stopped"),
        }
    }
}

#[derive(Debug, Clone)]
struct Status {
    lease: Lease,
    lost: Option<Lost>,
}

/// A lease kept alive in the background.
///
/// ```
/// use std::time::Duration;
/// use sd_lock::{Lock, Watchdog, memory::MemoryLock};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let lock = MemoryLock::new();
/// let lease = lock.try_acquire("rebuild-index", Duration::from_millis(300)).await?;
/// let dog = Watchdog::start(lock.clone(), lease)?;
/// let work = tokio::time::sleep(Duration::from_millis(500)); // longer than the ttl
/// tokio::select! {
///     () = work => {}
///     lost = dog.lost() => return Err(format!("lease lost: {lost}").into()),
/// }
/// assert!(dog.lease().is_valid());
/// dog.release().await?;
/// # Ok(()) }
/// ```
pub struct Watchdog<L: Lock + Clone + 'static> {
    lock: L,
    status: watch::Receiver<Status>,
    task: Option<JoinHandle<()>>,
}

impl<L: Lock + Clone + 'static> fmt::Debug for Watchdog<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.status.borrow();
        f.debug_struct("Watchdog")
            .field("lease", &status.lease)
            .field("lost", &status.lost)
            .finish_non_exhaustive()
    }
}

impl<L: Lock + Clone + 'static> Watchdog<L> {
    /// Starts renewing `lease` on the current tokio runtime ([`Error::NoRuntime`] outside
    /// one). Renewal runs every `ttl / 3`; a failed renewal is retried every `ttl / 10`
    /// until the validity runs out.
    pub fn start(lock: L, lease: Lease) -> Result<Self> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (tx, status) = watch::channel(Status { lease, lost: None });
        let task = handle.spawn(renew(lock.clone(), tx));
        Ok(Watchdog {
            lock,
            status,
            task: Some(task),
        })
    }

    /// The lease as last renewed.
    pub fn lease(&self) -> Lease {
        self.status.borrow().lease.clone()
    }

    /// The lease's fencing token (it does not change on renewal).
    pub fn token(&self) -> FencingToken {
        self.status.borrow().lease.token
    }

    /// Whether the lease has been lost.
    pub fn is_lost(&self) -> bool {
        self.status.borrow().lost.is_some()
    }

    /// Resolves when the lease is lost; `select!` on it beside the work.
    pub async fn lost(&self) -> Lost {
        let mut rx = self.status.clone();
        match rx.wait_for(|s| s.lost.is_some()).await {
            Ok(s) => s.lost.clone().unwrap_or(Lost::Stopped),
            Err(_) => Lost::Stopped,
        }
    }

    /// Stops renewing and releases the lease.
    pub async fn release(mut self) -> Result<Release> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let lease = self.lease();
        self.lock.release(lease).await
    }
}

impl<L: Lock + Clone + 'static> Drop for Watchdog<L> {
    /// Stops renewing and spawns the release; never blocks.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let lock = self.lock.clone();
            let lease = self.lease();
            lease_release_detached(lock, lease);
        }
    }
}

fn lease_release_detached<L: Lock + 'static>(lock: L, lease: Lease) {
    let resource = lease.resource.clone();
    let spawned = crate::lease::spawn_detached(async move {
        if let Err(e) = lock.release(lease).await {
            tracing::warn!(error = %e, "releasing a dropped watchdog's lease failed; it expires with its ttl");
        }
    });
    if !spawned {
        tracing::warn!(
            resource,
            "watchdog dropped outside a runtime; the lease expires with its ttl"
        );
    }
}

async fn renew<L: Lock>(lock: L, tx: watch::Sender<Status>) {
    let mut lease = tx.borrow().lease.clone();
    let lost = 'renewal: loop {
        let ttl = lease.ttl;
        tokio::time::sleep(ttl / 3).await;
        let mut last_error = String::new();
        loop {
            let left = lease.remaining();
            if left.is_zero() {
                break 'renewal if last_error.is_empty() {
                    Lost::NotHeld
                } else {
                    Lost::Unreachable { last_error }
                };
            }
            let span = tracing::debug_span!("lock.renew", resource = lease.resource);
            let renewal = sd_core::deadline::timeout(left, span, lock.extend(&mut lease, ttl));
            match renewal.await {
                Ok(Ok(())) => {
                    tx.send_modify(|s| s.lease = lease.clone());
                    tracing::trace!(resource = lease.resource, "lease renewed");
                    break;
                }
                Ok(Err(Error::LeaseExpired { .. })) => break 'renewal Lost::NotHeld,
                Ok(Err(e)) => {
                    tracing::debug!(resource = lease.resource, error = %e, "lease renewal failed; retrying");
                    last_error = e.to_string();
                    let pause = (ttl / 10).max(Duration::from_millis(1));
                    tokio::time::sleep(pause.min(lease.remaining())).await;
                }
                Err(_) => {
                    break 'renewal Lost::Unreachable {
                        last_error: "renewal timed out".into(),
                    };
                }
            }
        }
    };
    tracing::warn!(resource = lease.resource, %lost, "lease lost");
    tx.send_modify(|s| s.lost = Some(lost));
}
