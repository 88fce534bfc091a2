//! The handler's side of the claim ([`RequestClaim`](sd_idempotency::tower::RequestClaim))
//! and duplicates that wait for the request in flight (`wait_in_flight`), over HTTP.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sd_idempotency::{BoxStore, Store};

use super::Observed;
use super::http::{Hold, Payments, alice, pay, serve_with};

const PAY: &str = r#"{"amount":1000,"currency":"EUR"}"#;

fn key() -> String {
    sd_testkit::unique_name("key")
}

/// A handler that completes its key through its `RequestClaim` is replayed, and the
/// middleware stores nothing after it (no `complete`, no `release`).
pub async fn http_handler_completes_through_its_claim<S: Store + Clone + 'static>(
    h: &super::Harness<S>,
) {
    let observed = Observed::new(h.store.clone());
    let payments = Payments {
        completer: Some(BoxStore::new(h.store.clone())),
        ..Payments::default()
    };
    let port = serve_with(observed.clone(), payments.clone(), |b| b).await;
    let key = key();
    let first = alice(port, "POST", "/claimed", Some(key.as_bytes()), "{}").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, b"claimed, run 1");
    assert_eq!(first.header("idempotency-replayed"), None);
    assert_eq!(
        (observed.calls.completes(), observed.calls.releases()),
        (0, 0),
        "the handler completed; the middleware wrote nothing after it"
    );
    let again = alice(port, "POST", "/claimed", Some(key.as_bytes()), "{}").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotency-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(payments.runs(), 1, "the handler ran once");
}

/// The app with duplicates waiting up to 30 s, its handlers held at `hold`, its store
/// observed: its port, the hold, the payments and the observed store.
async fn waiting_app<S: Store + Clone + 'static>(
    h: &super::Harness<S>,
) -> (u16, Hold, Payments, Observed<S>) {
    let hold = Hold::default();
    let payments = Payments {
        hold: Some(hold.clone()),
        ..Payments::default()
    };
    let observed = Observed::new(h.store.clone());
    let port = serve_with(observed.clone(), payments.clone(), |b| {
        b.wait_in_flight(Duration::from_secs(30))
    })
    .await;
    (port, hold, payments, observed)
}

/// With `wait_in_flight`, 50 concurrent duplicates all get the first request's 201 and
/// body, and the handler runs once.
pub async fn http_waiting_duplicates_get_the_first_response<S: Store + Clone + 'static>(
    h: &super::Harness<S>,
) {
    let (port, hold, payments, observed) = waiting_app(h).await;
    let key = key();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let key = key.clone();
        tasks.spawn(async move { pay(port, &key, PAY).await });
    }
    hold.entered(1).await;
    // Every request has met the store: the first holds the key, the 49 others wait.
    observed.calls.claimed(50).await;
    assert_eq!(payments.count(), 0, "the first is still held");
    hold.go.add_permits(1);
    let mut replies = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        replies.push(reply.unwrap());
    }
    let first = replies
        .iter()
        .find(|r| r.header("idempotency-replayed").is_none())
        .expect("the first request's own answer");
    for r in &replies {
        assert_eq!(
            r.status,
            201,
            "every duplicate waited for the first: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.body, first.body, "the first request's body");
    }
    let replayed = replies
        .iter()
        .filter(|r| r.header("idempotency-replayed") == Some("true"))
        .count();
    assert_eq!(replayed, 49);
    assert_eq!(
        payments.seq.load(Ordering::SeqCst),
        1,
        "the handler ran once for 50 requests"
    );
    assert_eq!(*hold.entered.borrow(), 1);
}

/// When the first request's outcome is not stored (a 500 releases the key), one waiting
/// duplicate claims the key and runs the handler, and the others replay its response.
pub async fn http_waiting_duplicate_runs_when_the_first_is_not_stored<
    S: Store + Clone + 'static,
>(
    h: &super::Harness<S>,
) {
    let (port, hold, payments, observed) = waiting_app(h).await;
    let key = key();
    let send = || {
        let key = key.clone();
        tokio::spawn(async move { alice(port, "POST", "/flaky", Some(key.as_bytes()), "{}").await })
    };
    let first = send();
    hold.entered(1).await;
    let duplicates: Vec<_> = (0..5).map(|_| send()).collect();
    observed.calls.claimed(6).await;
    hold.go.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, 500);
    let mut replies = Vec::new();
    for d in duplicates {
        replies.push(d.await.unwrap());
    }
    for r in &replies {
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(
            r.body, b"flaky, run 2",
            "the run of the duplicate that claimed"
        );
    }
    let ran = replies
        .iter()
        .filter(|r| r.header("idempotency-replayed").is_none())
        .count();
    assert_eq!(ran, 1, "one duplicate ran, four replayed it");
    assert_eq!(payments.runs(), 2);
}

/// A duplicate whose wait runs out before the first request finishes gets 409 with
/// `Retry-After`, no sooner than the wait; the first then completes and is replayed.
pub async fn http_wait_that_runs_out_is_409<S: Store + Clone + 'static>(h: &super::Harness<S>) {
    let hold = Hold::default();
    let payments = Payments {
        hold: Some(hold.clone()),
        ..Payments::default()
    };
    let wait = Duration::from_millis(300);
    let port = serve_with(h.store.clone(), payments.clone(), |b| {
        b.wait_in_flight(wait)
    })
    .await;
    let key = key();
    let first = {
        let key = key.clone();
        tokio::spawn(async move { pay(port, &key, PAY).await })
    };
    hold.entered(1).await;
    let sent = Instant::now();
    let dup = pay(port, &key, PAY).await;
    let waited = sent.elapsed();
    dup.assert_problem(409);
    assert!(
        dup.header("retry-after")
            .is_some_and(|s| s.parse::<u64>().unwrap() >= 1),
        "{:?}",
        dup.headers
    );
    assert!(
        waited >= wait,
        "answered after {waited:?}, before the wait ran out"
    );
    hold.go.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, 201);
    let replay = pay(port, &key, PAY).await;
    assert_eq!(replay.header("idempotency-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    assert_eq!(payments.count(), 1);
}
