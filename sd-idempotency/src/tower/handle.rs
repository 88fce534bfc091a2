//! One request through the middleware: read the key, claim it (or wait for the request
//! in flight), run the handler, then store its response unless the handler did.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use super::claim::{Handoff, RequestClaim};
use super::problem::{Problem, read_key, replay};
use super::{BoxError, Config, OnStoreFailure};
use crate::error::{Error, Result};
use crate::run_once::with_heartbeat;
use crate::store::{Claim, ClaimOutcome, Fingerprint, Store};

pub(super) async fn call_store<T>(
    config: &Config,
    f: impl Future<Output = Result<T>>,
) -> Result<T> {
    let span = tracing::debug_span!("idempotency.store");
    sd_core::deadline::timeout(config.timeout, span, f).await?
}

pub(super) async fn handle<S, I, ReqB, ResB>(
    store: S,
    config: Arc<Config>,
    mut inner: I,
    request: Request<ReqB>,
) -> Result<Response<ResB>, I::Error>
where
    S: Store,
    I: tower::Service<Request<ReqB>, Response = Response<ResB>>,
    ReqB: http_body::Body + From<Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + From<Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    if !config.covers(&parts) {
        return inner.call(Request::from_parts(parts, body)).await;
    }
    let key = match read_key(&parts.headers) {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => {
            return Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key required",
                format!(
                    "{} {} requires an Idempotency-Key header",
                    parts.method,
                    parts.uri.path()
                ),
            )
            .into_response());
        }
        Ok(None) => return inner.call(Request::from_parts(parts, body)).await,
        Err(problem) => return Ok(problem.into_response()),
    };
    let scope = match &config.principal {
        None => String::new(),
        Some(extract) => match extract(&parts) {
            Some(scope) => scope,
            None => {
                return Ok(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "Caller unknown",
                    "idempotency keys are kept per caller; authenticate the request",
                )
                .into_response());
            }
        },
    };
    let body = match Limited::new(body, config.max_request_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request too large",
                format!("the body exceeds {} bytes", config.max_request_bytes),
            )
            .into_response());
        }
        Err(e) => {
            return Ok(Problem::new(
                StatusCode::BAD_REQUEST,
                "Unreadable body",
                format!("reading the request body failed: {e}"),
            )
            .into_response());
        }
    };
    let fingerprint = config.fingerprint(&parts, &body);
    let mut claimed = call_store(
        &config,
        store.claim(&scope, &key, &fingerprint, config.lock_ttl),
    )
    .await;
    if let (Ok(ClaimOutcome::InFlight { retry_after }), Some(max_wait)) =
        (&claimed, config.wait_in_flight)
    {
        let first = (scope.as_str(), key.as_str(), &fingerprint);
        claimed = wait_for_first(&store, &config, first, *retry_after, max_wait).await;
    }
    let claim = match claimed {
        Ok(ClaimOutcome::Claimed(claim)) => claim,
        Ok(ClaimOutcome::InFlight { retry_after }) => {
            let secs = retry_after
                .min(config.max_retry_after)
                .as_secs_f64()
                .ceil()
                .max(1.0) as u64;
            let mut problem = Problem::new(
                StatusCode::CONFLICT,
                "Request in progress",
                "a request with this Idempotency-Key is still running; retry later",
            );
            problem.retry_after = Some(secs);
            return Ok(problem.into_response());
        }
        Ok(ClaimOutcome::Completed(stored)) => return Ok(replay(stored)),
        Ok(ClaimOutcome::Mismatch) => {
            return Ok(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key reused",
                "this Idempotency-Key was used with a different request; send a new key",
            )
            .into_response());
        }
        Err(error) => {
            tracing::warn!(%error, key, "idempotency store failed");
            if config.on_failure == OnStoreFailure::FailOpen && error.is_store_failure() {
                return inner
                    .call(Request::from_parts(parts, ReqB::from(body)))
                    .await;
            }
            return Ok(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store unavailable",
                "the request was not processed; retry with the same Idempotency-Key",
            )
            .into_response());
        }
    };
    let handoff = RequestClaim::new(claim.clone(), Arc::clone(&config));
    let mut parts = parts;
    parts.extensions.insert(handoff.clone());
    let request = Request::from_parts(parts, ReqB::from(body));
    let holding = || handoff.handoff() == Handoff::Untouched;
    let work = inner.call(request);
    let result = with_heartbeat(&store, &claim, config.lock_ttl, holding, work).await;
    match handoff.handoff() {
        Handoff::Completed => return result,
        Handoff::InTransaction => {
            settle(&config, &store, &claim).await;
            return result;
        }
        Handoff::Untouched => {}
    }
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            release(&config, &store, &claim).await;
            return Err(e);
        }
    };
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.map_err(Into::<BoxError>::into);
    let body = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            release(&config, &store, &claim).await;
            return Ok(Problem::new(
                StatusCode::BAD_GATEWAY,
                "Response failed",
                format!("the handler's response body failed: {error}"),
            )
            .into_response());
        }
    };
    if (config.policy)(parts.status) {
        let stored = config.stored(&key, parts.status, &parts.headers, &body);
        let done = call_store(&config, store.complete(&claim, &stored, config.retention)).await;
        if let Err(error) = done {
            tracing::warn!(
                %error,
                key,
                "the response was not stored: the key frees when its lock expires, and a retry then runs the handler again (complete through the RequestClaim to avoid this)"
            );
        }
    } else {
        release(&config, &store, &claim).await;
    }
    Ok(Response::from_parts(parts, ResB::from(body)))
}

async fn release<S: Store>(config: &Config, store: &S, claim: &Claim) {
    if let Err(error) = call_store(config, store.release(claim)).await {
        tracing::warn!(%error, key = claim.key(), "releasing the key failed; it frees when the lock expires");
    }
}

/// After the handler completed its key in a transaction it commits itself: releases the
/// key, which the store refuses when the transaction committed (the record is completed)
/// and does when it rolled back (nothing of the request is left, so a retry runs).
async fn settle<S: Store>(config: &Config, store: &S, claim: &Claim) {
    match call_store(config, store.release(claim)).await {
        Ok(()) => tracing::info!(
            key = claim.key(),
            "the handler's transaction did not commit its completion; the key is released"
        ),
        Err(Error::ClaimLost { .. }) => {}
        Err(error) => tracing::warn!(
            %error,
            key = claim.key(),
            "checking the handler's transaction failed: if it rolled back, the key frees when its lock expires"
        ),
    }
}

/// Polls the key in flight, with growing pauses, until its record changes or
/// `max_wait` passes: the first request's stored response, or the key itself when the
/// first released it or its lock lapsed; `InFlight` when the wait is over.
async fn wait_for_first<S: Store>(
    store: &S,
    config: &Config,
    (scope, key, fingerprint): (&str, &str, &Fingerprint),
    mut retry_after: Duration,
    max_wait: Duration,
) -> Result<ClaimOutcome> {
    let deadline = tokio::time::Instant::now() + max_wait;
    for attempt in 1.. {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let pause = config.poll.random_delay(attempt).min(retry_after).min(left);
        tokio::time::sleep(pause.max(Duration::from_millis(1))).await;
        let poll = store.poll_claim(scope, key, fingerprint, config.lock_ttl);
        match call_store(config, poll).await? {
            ClaimOutcome::InFlight { retry_after: lock } => retry_after = lock,
            settled => return Ok(settled),
        }
    }
    Ok(ClaimOutcome::InFlight { retry_after })
}
