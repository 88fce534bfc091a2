//! The store contract, the records it keeps, and the pure state machine every backend
//! follows.
//!
//! # States of one `(scope, key)`
//!
//! ```text
//!            claim                      complete (holder, lock live)
//!  absent ─────────▶ in flight ───────────────────────────▶ completed
//!    ▲                 │  ▲ │ extend (holder, lock live)        │
//!    │   release       │  └─┘                                   │
//!    ├─────────────────┘                                        │
//!    │   lock expired + claim with the same fingerprint:        │
//!    │   takeover, epoch + 1, the old holder is refused         │
//!    └────────────── retention over (or swept) ─────────────────┘
//! ```
//!
//! A claim holds while its lock lives. [`Store::complete`], [`Store::release`] and
//! [`Store::extend`] are refused with [`Error::ClaimLost`] once the lock expired, whether
//! or not another request took the key over yet: every backend can check that in the same
//! atomic step, and the rule does not depend on timing between two requests. An abandoned
//! in-flight record is kept for [`ABANDONED_GRACE`] (or one more `lock_ttl` when that is
//! longer) after its lock expires, so a takeover bumps the epoch and a different request
//! with the same key still gets a mismatch; then it is gone. A completed record is kept for the retention given to `complete`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Keys longer than this are refused (the IETF draft and Stripe allow 255 characters).
pub const MAX_KEY_LEN: usize = 255;

/// The longest lock or retention a store accepts (about 285 years; keeps the
/// millisecond arithmetic exact in Lua doubles).
pub const MAX_TTL: Duration = Duration::from_millis(1 << 53);

/// How long an in-flight record outlives its expired lock (at least; `lock_ttl` when
/// longer).
pub const ABANDONED_GRACE: Duration = Duration::from_secs(60);

const GRACE_MS: u64 = 60_000;

/// When an in-flight record locked until `lock_until` may be deleted.
pub(crate) fn in_flight_expiry(lock_until: u64, lock_ttl: u64) -> u64 {
    lock_until + lock_ttl.max(GRACE_MS)
}

/// Checks an idempotency key: 1 to [`MAX_KEY_LEN`] printable ASCII characters
/// (`0x20..=0x7e`), the character set of an RFC 8941 string.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "it is empty",
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidKey {
            reason: "it is longer than 255 characters",
        });
    }
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(Error::InvalidKey {
            reason: "it holds a character outside printable ascii",
        });
    }
    Ok(())
}

/// A duration in whole milliseconds, at least 1 ms and at most [`MAX_TTL`].
pub(crate) fn ttl_ms(field: &'static str, ttl: Duration) -> Result<u64> {
    if ttl < Duration::from_millis(1) {
        return Err(Error::config(field, "must be at least 1 ms"));
    }
    if ttl > MAX_TTL {
        return Err(Error::config(field, "must be at most 2^53 ms"));
    }
    // At most 2^53 ms, so the u128 fits.
    Ok(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// A `timeout` setter's value: how long one store call may take, refused when zero.
#[cfg(any(feature = "redis", feature = "postgres", feature = "tower"))]
pub(crate) fn call_timeout(timeout: Duration) -> Result<Duration> {
    if timeout.is_zero() {
        return Err(Error::config("timeout", "must be longer than zero"));
    }
    Ok(timeout)
}

/// The SHA-256 of what makes two requests "the same request".
///
/// The middleware hashes the method, path and body (or chosen JSON fields); callers of
/// [`run_once`](crate::run_once()) hash whatever identifies their work.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: impl AsRef<[u8]>) -> Self {
        Fingerprint(Sha256::digest(bytes.as_ref()).into())
    }

    /// The SHA-256 of several parts, each length-prefixed so `("ab", "c")` and
    /// `("a", "bc")` differ.
    pub fn of_parts<I, P>(parts: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut hasher = Sha256::new();
        for part in parts {
            let part = part.as_ref();
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Fingerprint(hasher.finalize().into())
    }

    /// A fingerprint from its 32 bytes (as read back from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// Its 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

/// What is replayed for a completed key: a status, chosen headers and the body, byte
/// for byte. [`run_once`](crate::run_once()) stores its JSON result as the body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The HTTP status (or any code the caller gives it).
    pub status: u16,
    /// Header names (lowercase) and raw values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

const FORMAT_VERSION: u8 = 1;

impl StoredResponse {
    /// A response with `status` and `body` and no headers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        StoredResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Its size once encoded.
    pub fn encoded_len(&self) -> usize {
        1 + 2
            + 2
            + self
                .headers
                .iter()
                .map(|(n, v)| 2 + n.len() + 4 + v.len())
                .sum::<usize>()
            + self.body.len()
    }

    /// The byte form the Redis and PostgreSQL backends store.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.status.to_be_bytes());
        let count = u16::try_from(self.headers.len())
            .map_err(|_| Error::config("headers", "at most 65535 headers are stored"))?;
        out.extend_from_slice(&count.to_be_bytes());
        for (name, value) in &self.headers {
            let n = u16::try_from(name.len())
                .map_err(|_| Error::config("headers", "a header name is longer than 65535"))?;
            let v = u32::try_from(value.len())
                .map_err(|_| Error::config("headers", "a header value is longer than 4 GiB"))?;
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&v.to_be_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Reads what [`to_bytes`](Self::to_bytes) wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader(bytes);
        let version = r.take(1)?[0];
        if version != FORMAT_VERSION {
            return Err(Error::corrupt(format!("unknown format version {version}")));
        }
        let status = u16::from_be_bytes(r.array()?);
        let count = u16::from_be_bytes(r.array()?);
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let n = usize::from(u16::from_be_bytes(r.array()?));
            let name = std::str::from_utf8(r.take(n)?)
                .map_err(|_| Error::corrupt("a header name is not utf-8"))?
                .to_owned();
            let v = u32::from_be_bytes(r.array()?) as usize;
            headers.push((name, r.take(v)?.to_vec()));
        }
        Ok(StoredResponse {
            status,
            headers,
            body: r.0.to_vec(),
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::corrupt("the record is truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

/// A held claim on `(scope, key)`: proof that this request may run the work, and the
/// handle to complete, release or extend it.
///
/// The epoch grows by one each time the key is taken over after an expired lock; pass it
/// downstream as a fencing token when the work writes somewhere that can check it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claim {
    pub(crate) scope: String,
    pub(crate) key: String,
    pub(crate) epoch: u64,
    pub(crate) token: u64,
}

impl Claim {
    /// The scope (caller) the key belongs to.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The takeover epoch: 1 for the first claim, one more after each takeover.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn lost(&self) -> Error {
        Error::ClaimLost {
            key: self.key.clone(),
            epoch: self.epoch,
        }
    }
}

/// The answer to [`Store::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// This request holds the key: run the work, then complete or release.
    Claimed(Claim),
    /// Another request holds the key; its lock expires within `retry_after`.
    InFlight {
        /// The lock's remaining time (an upper bound on the wait).
        retry_after: Duration,
    },
    /// The work ran before: replay this.
    Completed(StoredResponse),
    /// The key was first used with another fingerprint.
    Mismatch,
}

/// An atomic store of idempotency records.
///
/// # Contract
///
/// Each method is one atomic step on the record of `(scope, key)`, following the
/// state machine in the [module docs](self):
///
/// - `claim`: absent (or past its expiry) → in flight with a fresh claim, epoch 1 or the
///   previous epoch + 1; in flight with an expired lock and the same fingerprint → taken
///   over (epoch + 1); in flight with a live lock → [`ClaimOutcome::InFlight`];
///   completed → [`ClaimOutcome::Completed`]; present with another fingerprint →
///   [`ClaimOutcome::Mismatch`] (the fingerprint is compared first).
/// - `complete`, `release`, `extend`: only the holder of the current claim, while its
///   lock lives; otherwise [`Error::ClaimLost`] and nothing changes.
/// - `sweep`: deletes records past their expiry; never a live claim.
/// - `poll_claim`: what `claim` answers, asked again and again by a duplicate that waits
///   for the request in flight; the default is `claim` itself, and a backend whose claim
///   writes may first look without writing while the key is still in flight.
///
/// Backend failures come back as errors ([`Error::is_store_failure`]), never as an
/// outcome.
pub trait Store: Send + Sync {
    /// Claims `key` within `scope` for `lock_ttl`.
    fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome>> + Send;

    /// Stores `response` for the claim's key and keeps it for `retention`.
    fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Gives the key up (the work failed and may run again).
    fn release(&self, claim: &Claim) -> impl Future<Output = Result<()>> + Send;

    /// Renews the claim's lock to `lock_ttl` from now.
    fn extend(&self, claim: &Claim, lock_ttl: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Deletes expired records; returns how many.
    fn sweep(&self) -> impl Future<Output = Result<u64>> + Send;

    /// [`claim`](Self::claim) for a duplicate that polls a key in flight: the same
    /// answers, and the key is claimed when it is free again. The default calls `claim`;
    /// PostgreSQL reads the row first and claims only when it is no longer in flight,
    /// so polls write nothing and never wait on a transaction holding the row.
    fn poll_claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome>> + Send {
        self.claim(scope, key, fingerprint, lock_ttl)
    }
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        impl<S: Store + ?Sized> Store for $ty {
            fn claim(
                &self,
                scope: &str,
                key: &str,
                fingerprint: &Fingerprint,
                lock_ttl: Duration,
            ) -> impl Future<Output = Result<ClaimOutcome>> + Send {
                (**self).claim(scope, key, fingerprint, lock_ttl)
            }

            fn complete(
                &self,
                claim: &Claim,
                response: &StoredResponse,
                retention: Duration,
            ) -> impl Future<Output = Result<()>> + Send {
                (**self).complete(claim, response, retention)
            }

            fn release(&self, claim: &Claim) -> impl Future<Output = Result<()>> + Send {
                (**self).release(claim)
            }

            fn extend(&self, claim: &Claim, lock_ttl: Duration) -> impl Future<Output = Result<()>> + Send {
                (**self).extend(claim, lock_ttl)
            }

            fn sweep(&self) -> impl Future<Output = Result<u64>> + Send {
                (**self).sweep()
            }

            fn poll_claim(
                &self,
                scope: &str,
                key: &str,
                fingerprint: &Fingerprint,
                lock_ttl: Duration,
            ) -> impl Future<Output = Result<ClaimOutcome>> + Send {
                (**self).poll_claim(scope, key, fingerprint, lock_ttl)
            }
        }
    )*};
}

forward_store!(Arc<S>, &S);

/// Runs [`Store::sweep`] every `every`, forever; spawn it beside the server. Failures are
/// logged and the next round tries again. Redis expires keys by itself, so there it
/// finds nothing to do.
pub async fn run_sweeper<S: Store>(store: S, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "idempotency sweep"),
            Err(error) => tracing::warn!(%error, "idempotency sweep failed"),
        }
    }
}

/// A record as the pure state machine sees it; times in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) epoch: u64,
    pub(crate) token: u64,
    pub(crate) state: State,
    /// When the record may be deleted (and counts as absent).
    pub(crate) expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    InFlight { lock_until: u64, lock_ttl: u64 },
    Completed(StoredResponse),
}

/// The decision of a claim: the outcome and, when claimed, the record to write.
pub(crate) fn decide_claim(
    existing: Option<&Record>,
    fingerprint: &Fingerprint,
    now: u64,
    lock_ttl: u64,
    token: u64,
) -> (ClaimDecision, Option<Record>) {
    let live = existing.filter(|r| r.expires_at > now);
    let epoch = match live {
        None => existing.map_or(1, |r| r.epoch + 1),
        Some(r) if r.fingerprint != *fingerprint => return (ClaimDecision::Mismatch, None),
        Some(Record {
            state: State::Completed(response),
            ..
        }) => return (ClaimDecision::Completed(response.clone()), None),
        Some(Record {
            state: State::InFlight { lock_until, .. },
            ..
        }) if *lock_until > now => {
            return (
                ClaimDecision::InFlight {
                    retry_after_ms: lock_until - now,
                },
                None,
            );
        }
        Some(r) => r.epoch + 1,
    };
    let record = Record {
        fingerprint: *fingerprint,
        epoch,
        token,
        state: State::InFlight {
            lock_until: now + lock_ttl,
            lock_ttl,
        },
        expires_at: in_flight_expiry(now + lock_ttl, lock_ttl),
    };
    (ClaimDecision::Claimed { epoch }, Some(record))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimDecision {
    Claimed { epoch: u64 },
    InFlight { retry_after_ms: u64 },
    Completed(StoredResponse),
    Mismatch,
}

impl ClaimDecision {
    pub(crate) fn into_outcome(self, scope: &str, key: &str, token: u64) -> ClaimOutcome {
        match self {
            ClaimDecision::Claimed { epoch } => ClaimOutcome::Claimed(Claim {
                scope: scope.to_owned(),
                key: key.to_owned(),
                epoch,
                token,
            }),
            ClaimDecision::InFlight { retry_after_ms } => ClaimOutcome::InFlight {
                retry_after: Duration::from_millis(retry_after_ms),
            },
            ClaimDecision::Completed(r) => ClaimOutcome::Completed(r),
            ClaimDecision::Mismatch => ClaimOutcome::Mismatch,
        }
    }
}

/// Whether `claim` is the live holder of `record` at `now`.
pub(crate) fn holds(record: Option<&Record>, claim: &Claim, now: u64) -> bool {
    matches!(record, Some(Record { token, epoch, state: State::InFlight { lock_until, .. }, .. })
        if *token == claim.token && *epoch == claim.epoch && *lock_until > now)
}

/// The record after the holder completes.
pub(crate) fn completed(
    record: &Record,
    response: StoredResponse,
    now: u64,
    retention: u64,
) -> Record {
    Record {
        state: State::Completed(response),
        expires_at: now + retention,
        ..record.clone()
    }
}

/// The record after the holder extends its lock.
pub(crate) fn extended(record: &Record, now: u64, lock_ttl: u64) -> Record {
    Record {
        state: State::InFlight {
            lock_until: now + lock_ttl,
            lock_ttl,
        },
        expires_at: in_flight_expiry(now + lock_ttl, lock_ttl),
        ..record.clone()
    }
}

/// A random claim token (never 0).
pub(crate) fn new_token() -> u64 {
    // Tokens are compared as signed 64-bit integers in PostgreSQL; keep them positive.
    rand::random::<u64>() >> 1 | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("a").is_ok());
        assert!(validate_key(&"k".repeat(255)).is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(256)).is_err());
        assert!(validate_key("tab\there").is_err());
        assert!(validate_key("é").is_err());
    }

    #[test]
    fn ttl_bounds() {
        assert!(ttl_ms("lock_ttl", Duration::ZERO).is_err());
        assert!(ttl_ms("lock_ttl", Duration::from_micros(999)).is_err());
        assert_eq!(ttl_ms("lock_ttl", Duration::from_secs(2)).ok(), Some(2000));
        assert!(ttl_ms("lock_ttl", Duration::MAX).is_err());
    }

    #[test]
    fn fingerprint_parts_are_unambiguous() {
        assert_ne!(
            Fingerprint::of_parts(["ab", "c"]),
            Fingerprint::of_parts(["a", "bc"])
        );
        assert_eq!(Fingerprint::of("abc").to_hex().len(), 64);
    }

    #[test]
    fn corrupt_records_are_errors() {
        assert!(StoredResponse::from_bytes(&[]).is_err());
        assert!(StoredResponse::from_bytes(&[9, 0, 200, 0, 0]).is_err());
        assert!(StoredResponse::from_bytes(&[1, 0, 200, 0, 1, 0, 5, b'a']).is_err());
    }

    proptest! {
        #[test]
        fn responses_round_trip(
            status in any::<u16>(),
            headers in proptest::collection::vec(("[a-z-]{1,20}", proptest::collection::vec(any::<u8>(), 0..40)), 0..5),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let r = StoredResponse { status, headers, body };
            let bytes = r.to_bytes().unwrap();
            prop_assert_eq!(bytes.len(), r.encoded_len());
            prop_assert_eq!(StoredResponse::from_bytes(&bytes).unwrap(), r);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = StoredResponse::from_bytes(&bytes);
        }
    }
}
