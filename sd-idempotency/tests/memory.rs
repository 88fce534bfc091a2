//! The behaviour suite on the memory backend, its clock moved by hand.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use sd_idempotency::Clock as _;
use sd_idempotency::{Error, ManualClock, MemoryStore, RunOnce};
use suite::Harness;

fn harness() -> (tokio::runtime::Runtime, Harness<MemoryStore<ManualClock>>) {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    (sd_testkit::runtime(), suite::manual_time(store, clock))
}

behaviour_suite!(harness());

#[test]
fn run_once_config_errors_name_the_field() {
    let runner = RunOnce::builder(MemoryStore::new());
    let err = runner.clone().lock_ttl(Duration::ZERO).build().unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "lock_ttl",
            ..
        }
    ));
    let err = runner.retention(Duration::ZERO).build().unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidConfig {
            field: "retention",
            ..
        }
    ));
}

/// The model over 512 sequences on the manual clock, where every time is exact (the
/// abandoned-record grace included).
#[test]
fn memory_store_follows_the_model() {
    let (runtime, _) = harness();
    suite::model::check(&runtime, 512, suite::model::ops(80, 70, true), || {
        let clock = ManualClock::new();
        clock.advance(Duration::from_secs(1));
        let store = MemoryStore::with_clock(clock.clone());
        let now = clock.clone();
        let backend = suite::model::Backend {
            lock: Duration::from_millis(30),
            retention: Duration::from_millis(50),
            expiry_forgets: false,
            sweep_counts: true,
            slack: 0,
            now: Arc::new(move || u64::try_from(now.now().as_millis()).unwrap()),
            pass: Arc::new(move |d| {
                clock.advance(d);
                Box::pin(std::future::ready(()))
            }),
        };
        (store, backend)
    });
}

/// `RequestClaim` as an axum extractor: `Option<RequestClaim>` is there on a covered
/// route with a key and not elsewhere; `RequestClaim` where the middleware did not claim
/// is a 500 problem, and the handler does not run.
#[test]
fn the_claim_extractor() {
    use axum::Router;
    use axum::routing::post;
    use sd_idempotency::IdempotencyLayer;
    use sd_idempotency::tower::RequestClaim;

    async fn optional(claim: Option<RequestClaim>) -> String {
        claim.map_or("no claim".into(), |c| {
            format!("claim on {}", c.claim().key())
        })
    }
    async fn required(claim: RequestClaim) -> String {
        format!("claim on {}", claim.claim().key())
    }
    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let layer = IdempotencyLayer::builder(MemoryStore::new())
            .paths(["/covered"])
            .require_key(false)
            .build()
            .unwrap();
        let app = Router::new()
            .route("/covered/optional", post(optional))
            .route("/covered/required", post(required))
            .route("/other/optional", post(optional))
            .route("/other/required", post(required))
            .layer(layer);
        let port = suite::http::listen(app).await;
        let send = async |path: &str, key: Option<&[u8]>| {
            suite::http::alice(port, "POST", path, key, "{}").await
        };
        let claimed = send("/covered/optional", Some(b"k1")).await;
        assert_eq!(claimed.body, b"claim on k1");
        assert_eq!(
            send("/covered/required", Some(b"k2")).await.body,
            b"claim on k2"
        );
        assert_eq!(send("/covered/optional", None).await.body, b"no claim");
        assert_eq!(send("/other/optional", Some(b"k3")).await.body, b"no claim");
        for (path, key) in [
            ("/other/required", Some(b"k4".as_slice())),
            ("/covered/required", None),
        ] {
            let refused = send(path, key).await;
            refused.assert_problem(500);
            assert!(
                String::from_utf8_lossy(&refused.body).contains("did not claim"),
                "{path}"
            );
        }
    });
}

/// Once the handler completed its key through its claim, the middleware's heartbeat
/// stops extending it (an extend would only be refused, and on PostgreSQL wait on the
/// row the handler's transaction holds): a handler that runs on for three heartbeat
/// periods after completing sees no extend at all.
#[test]
fn the_heartbeat_stops_once_the_handler_completed() {
    use axum::Router;
    use axum::routing::post;
    use sd_idempotency::tower::RequestClaim;
    use sd_idempotency::{BoxStore, IdempotencyLayer};

    let runtime = sd_testkit::runtime();
    runtime.block_on(async {
        let store = MemoryStore::new();
        let observed = suite::Observed::new(store.clone());
        let lock_ttl = Duration::from_millis(600);
        let layer = IdempotencyLayer::builder(observed.clone())
            .lock_ttl(lock_ttl)
            .build()
            .unwrap();
        let completer = BoxStore::new(store);
        let handler = async move |claim: RequestClaim| {
            let response = axum::response::IntoResponse::into_response("done");
            let response = claim.complete(&completer, response).await.unwrap();
            // Three heartbeat periods (a third of the lock each) after the completion.
            tokio::time::sleep(lock_ttl + lock_ttl / 6).await;
            response
        };
        let app = Router::new().route("/work", post(handler)).layer(layer);
        let port = suite::http::listen(app).await;
        let reply = suite::http::alice(port, "POST", "/work", Some(b"k"), "{}").await;
        assert_eq!(reply.body, b"done");
        assert_eq!(
            observed
                .calls
                .extend_calls
                .load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no extend after the handler's completion"
        );
        let replay = suite::http::alice(port, "POST", "/work", Some(b"k"), "{}").await;
        assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    });
}
