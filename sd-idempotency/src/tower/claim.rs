//! [`RequestClaim`]: the middleware's claim, handed to the handler so it completes the key
//! itself, in its own transaction where the store allows it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt as _;

use super::{BoxError, Config};
use crate::error::{Error, Result};
use crate::store::{Claim, Store, StoredResponse};

/// Who completes the key, as the middleware reads it once the handler returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handoff {
    /// The handler did not complete: the middleware stores the response (or releases).
    Untouched,
    /// The handler wrote the completion into a transaction it commits itself.
    InTransaction,
    /// The handler's completion is stored (committed, or written outside a transaction).
    Completed,
}

const UNTOUCHED: u8 = 0;
const IN_TRANSACTION: u8 = 1;
const COMPLETED: u8 = 2;

/// The claim the middleware holds on this request's key, in the request's extensions for
/// the handler: with feature `axum` an extractor (`claim: RequestClaim`, or
/// `Option<RequestClaim>` where the layer may not claim: a route it does not cover, or a
/// request without a key when keys are optional), otherwise
/// `Extension<RequestClaim>`.
///
/// A handler that completes the key through it stores the response it is about to send,
/// and the middleware then stores nothing: with PostgreSQL in the handler's own
/// transaction (`complete_in`, `commit`; feature `postgres`), so the
/// response commits with the handler's rows or neither does; with any store when the
/// handler calls [`complete`](Self::complete). The stored form is the middleware's
/// (status, the replayed headers, body; a 500 problem in place of a response over
/// `max_response_bytes`), whatever the store policy says of the status. Complete before
/// the handler returns, and send the response the call hands back.
///
/// Clones share one state: the middleware reads it when the handler returns.
#[derive(Clone)]
pub struct RequestClaim {
    claim: Claim,
    config: Arc<Config>,
    state: Arc<AtomicU8>,
}

impl fmt::Debug for RequestClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestClaim")
            .field("claim", &self.claim)
            .field("handoff", &self.handoff())
            .finish_non_exhaustive()
    }
}

impl RequestClaim {
    pub(super) fn new(claim: Claim, config: Arc<Config>) -> Self {
        RequestClaim {
            claim,
            config,
            state: Arc::new(AtomicU8::new(UNTOUCHED)),
        }
    }

    pub(super) fn handoff(&self) -> Handoff {
        match self.state.load(Ordering::Acquire) {
            IN_TRANSACTION => Handoff::InTransaction,
            COMPLETED => Handoff::Completed,
            _ => Handoff::Untouched,
        }
    }

    /// The store's claim (its key, scope and epoch; the epoch is a fencing token for
    /// writes downstream).
    pub fn claim(&self) -> &Claim {
        &self.claim
    }

    /// How long the stored response is replayed (the layer's `retention`).
    pub fn retention(&self) -> Duration {
        self.config.retention
    }

    /// What the middleware would store for `status`, `headers` and `body`.
    pub fn to_stored(
        &self,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> StoredResponse {
        self.config.stored(self.claim.key(), status, headers, body)
    }

    /// Reads `response`'s body, and hands back its stored form and the same response.
    async fn buffer<B>(&self, response: Response<B>) -> Result<(StoredResponse, Response<B>)>
    where
        B: http_body::Body<Data = Bytes> + From<Bytes>,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| Error::ResponseBody { source: e.into() })?
            .to_bytes();
        let stored = self.to_stored(parts.status, &parts.headers, &body);
        Ok((stored, Response::from_parts(parts, B::from(body))))
    }

    /// Completes the key with `response` on `store` (the layer's store, or another
    /// handle on the same records) now, in one write, and hands `response` back to send.
    /// On memory and Redis this is the handler's way to complete: the write happens when
    /// the handler chooses, but it is not part of the handler's database transaction.
    ///
    /// Fails with [`Error::ClaimLost`] when the lock lapsed; the middleware then
    /// handles the response as if the handler had not called this.
    pub async fn complete<S, B>(&self, store: &S, response: Response<B>) -> Result<Response<B>>
    where
        S: Store,
        B: http_body::Body<Data = Bytes> + From<Bytes>,
        B::Error: Into<BoxError>,
    {
        let (stored, response) = self.buffer(response).await?;
        store
            .complete(&self.claim, &stored, self.config.retention)
            .await?;
        self.state.store(COMPLETED, Ordering::Release);
        Ok(response)
    }

    /// Completes the key with `response` inside `tx`
    /// ([`PostgresStore::complete_in`](crate::postgres::PostgresStore::complete_in)),
    /// and hands `response` back to send: the response commits with the handler's rows,
    /// or neither does. The handler commits `tx` itself; the middleware then asks the
    /// store to release the key, which it refuses once `tx` committed, and does when
    /// `tx` rolled back (so a retry runs at once). The row stays locked until `tx` ends:
    /// call this last, just before the commit.
    #[cfg(feature = "postgres")]
    pub async fn complete_in<B>(
        &self,
        store: &crate::postgres::PostgresStore,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        response: Response<B>,
    ) -> Result<Response<B>>
    where
        B: http_body::Body<Data = Bytes> + From<Bytes>,
        B::Error: Into<BoxError>,
    {
        let (stored, response) = self.buffer(response).await?;
        store
            .complete_in(tx, &self.claim, &stored, self.config.retention)
            .await?;
        self.state.store(IN_TRANSACTION, Ordering::Release);
        Ok(response)
    }

    /// [`complete_in`](Self::complete_in), then commits `tx`: after this returns `Ok`
    /// the middleware writes nothing more. When the commit fails the error is returned
    /// and the middleware releases the key if the transaction did not commit.
    #[cfg(feature = "postgres")]
    pub async fn commit<B>(
        &self,
        store: &crate::postgres::PostgresStore,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        response: Response<B>,
    ) -> Result<Response<B>>
    where
        B: http_body::Body<Data = Bytes> + From<Bytes>,
        B::Error: Into<BoxError>,
    {
        let response = self.complete_in(store, &mut tx, response).await?;
        tx.commit().await?;
        self.state.store(COMPLETED, Ordering::Release);
        Ok(response)
    }
}

/// The rejection of the [`RequestClaim`] extractor when the middleware did not claim the
/// request (the route is not behind an [`IdempotencyLayer`](super::IdempotencyLayer) that
/// covers it, or keys are optional and none was sent): a 500 problem, since the handler
/// is wired wrong, not the caller. Extract `Option<RequestClaim>` where that may happen.
#[cfg(feature = "axum")]
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct ClaimMissing;

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for ClaimMissing {
    fn into_response(self) -> axum::response::Response {
        tracing::warn!(
            "a handler asked for the RequestClaim of a request the middleware did not claim"
        );
        super::problem::Problem::new(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "Idempotency claim missing",
            "the handler expects an idempotency claim, but the middleware did not claim this request",
        )
        .into_response()
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestClaim {
    type Rejection = ClaimMissing;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestClaim>()
            .cloned()
            .ok_or(ClaimMissing)
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for RequestClaim {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<RequestClaim>().cloned())
    }
}
