//! The payments app the middleware cases run over: an axum router behind the layer,
//! with handlers the tests hold, count and switch.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{patch, post};
use sd_idempotency::tower::{IdempotencyLayerBuilder as Builder, RequestClaim};
use sd_idempotency::{BoxStore, IdempotencyLayer, Store};
use tokio::sync::{Semaphore, mpsc, watch};

use super::{Harness, Observed, Pass};

/// Arrivals in a handler that waits for the test's go-ahead: `entered` counts them, each
/// takes one permit of `go` to carry on.
#[derive(Clone)]
pub struct Hold {
    pub entered: Arc<watch::Sender<usize>>,
    pub go: Arc<Semaphore>,
}

impl Default for Hold {
    fn default() -> Self {
        Hold {
            entered: Arc::new(watch::channel(0).0),
            go: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Hold {
    pub async fn wait(&self) {
        self.entered.send_modify(|n| *n += 1);
        self.go.acquire().await.unwrap().forget();
    }

    /// Waits until `n` arrivals are held (a minute at most, then the test fails).
    pub async fn entered(&self, n: usize) {
        let mut rx = self.entered.subscribe();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|e| *e >= n))
            .await
            .expect("the handler was never entered")
            .unwrap();
    }
}

/// Work that outlives its lock three times: six times over, it lets half a lock TTL pass
/// and waits for the heartbeat's next renewal, then reports the step on `steps` and waits
/// for the test's go-ahead. Only the first run is long; later runs return at once.
#[derive(Clone)]
pub struct LongWork {
    pass: Pass,
    lock_ttl: Duration,
    extends: watch::Receiver<u64>,
    steps: mpsc::UnboundedSender<usize>,
    go: Arc<Semaphore>,
    pub runs: Arc<AtomicUsize>,
    /// Renewals that did not come within two lock TTLs.
    pub missed: Arc<AtomicUsize>,
}

/// The test's side of a [`LongWork`]: its steps, and the go-ahead after each.
pub struct LongWorkSteps {
    pub steps: mpsc::UnboundedReceiver<usize>,
    pub go: Arc<Semaphore>,
}

/// How many steps a [`LongWork`] takes (each half a lock TTL).
pub const LONG_STEPS: usize = 6;

impl LongWork {
    pub fn new<S>(h: &Harness<S>, observed: &Observed<S>) -> (Self, LongWorkSteps) {
        let (tx, rx) = mpsc::unbounded_channel();
        let go = Arc::new(Semaphore::new(0));
        let work = LongWork {
            pass: h.pass.clone(),
            lock_ttl: h.lock_ttl,
            extends: observed.extends(),
            steps: tx,
            go: go.clone(),
            runs: Arc::default(),
            missed: Arc::default(),
        };
        (work, LongWorkSteps { steps: rx, go })
    }

    /// Runs the work; returns which run this was (1 for the first).
    pub async fn run(&self) -> usize {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run > 1 {
            return run;
        }
        let mut extends = self.extends.clone();
        for step in 1..=LONG_STEPS {
            (self.pass)(self.lock_ttl / 2).await;
            let seen = *extends.borrow_and_update();
            let renewed = tokio::time::timeout(self.lock_ttl * 2, extends.wait_for(|n| *n > seen))
                .await
                .is_ok();
            if !renewed {
                self.missed.fetch_add(1, Ordering::SeqCst);
            }
            let _ = self.steps.send(step);
            self.go.acquire().await.unwrap().forget();
        }
        run
    }
}

/// The payments the app created, what the other routes ran, and switches for the tests.
#[derive(Clone, Default)]
pub struct Payments {
    pub created: Arc<Mutex<Vec<String>>>,
    pub crash_next: Arc<AtomicBool>,
    /// The number of the next payment.
    pub seq: Arc<AtomicUsize>,
    /// Runs of the routes other than `POST /payments`.
    pub runs: Arc<AtomicUsize>,
    /// When set, `POST /payments` waits here before creating the payment.
    pub hold: Option<Hold>,
    /// When set, `POST /slow` runs it.
    pub long: Option<LongWork>,
    /// The store `POST /claimed` completes its key on, through its `RequestClaim`.
    pub completer: Option<BoxStore>,
}

impl Payments {
    pub fn count(&self) -> usize {
        self.created.lock().unwrap().len()
    }

    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn create(
    State(p): State<Payments>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, HeaderMap::new(), "bad json".into());
    };
    if let Some(hold) = &p.hold {
        hold.wait().await;
    }
    if p.crash_next.swap(false, Ordering::SeqCst) {
        panic!("the handler crashed after the claim");
    }
    let n = p.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let caller = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let id = format!("pay_{n}_{caller}");
    p.created.lock().unwrap().push(id.clone());
    let mut out = HeaderMap::new();
    out.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    out.insert(header::LOCATION, format!("/payments/{id}").parse().unwrap());
    out.insert("x-not-replayed", "1".parse().unwrap());
    let body =
        serde_json::json!({ "id": id, "amount": json["amount"], "currency": json["currency"] });
    (StatusCode::CREATED, out, body.to_string())
}

async fn list(State(p): State<Payments>) -> String {
    p.runs.fetch_add(1, Ordering::SeqCst);
    serde_json::json!(*p.created.lock().unwrap()).to_string()
}

async fn update(State(p): State<Payments>, Path(id): Path<String>) -> String {
    let n = p.runs.fetch_add(1, Ordering::SeqCst) + 1;
    format!("patched {id}, run {n}")
}

/// Answers the status in the path; the body names the run.
async fn outcome(State(p): State<Payments>, Path(status): Path<u16>) -> (StatusCode, String) {
    let n = p.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let status = StatusCode::from_u16(status).unwrap();
    (status, format!("outcome {}, run {n}", status.as_u16()))
}

/// A 201 with a body of `size` bytes that starts with the run number.
async fn big(State(p): State<Payments>, Path(size): Path<usize>) -> (StatusCode, String) {
    let n = p.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let mut body = format!("run {n} ");
    body.extend(std::iter::repeat_n('x', size.saturating_sub(body.len())));
    (StatusCode::CREATED, body)
}

async fn unprotected(State(p): State<Payments>) -> String {
    let n = p.runs.fetch_add(1, Ordering::SeqCst) + 1;
    format!("unprotected, run {n}")
}

async fn slow(State(p): State<Payments>) -> (StatusCode, String) {
    let long = p.long.as_ref().expect("a LongWork for POST /slow");
    let run = long.run().await;
    (StatusCode::CREATED, format!("slow, run {run}"))
}

/// A 201 that the handler stores itself through its claim, on the `completer` store.
async fn claimed(State(p): State<Payments>, Extension(claim): Extension<RequestClaim>) -> Response {
    let n = p.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let store = p.completer.as_ref().expect("a completer for POST /claimed");
    let response = (StatusCode::CREATED, format!("claimed, run {n}")).into_response();
    claim.complete(store, response).await.unwrap()
}

/// The first run waits at `hold` and fails with 500 (not stored); later runs answer 201.
async fn flaky(State(p): State<Payments>) -> (StatusCode, String) {
    let n = p.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 {
        p.hold
            .as_ref()
            .expect("a hold for POST /flaky")
            .wait()
            .await;
        return (StatusCode::INTERNAL_SERVER_ERROR, "flaky, run 1".into());
    }
    (StatusCode::CREATED, format!("flaky, run {n}"))
}

/// The paths the layer covers in [`serve_with`] (`/unprotected` is left out).
pub const COVERED: [&str; 6] = [
    "/payments",
    "/outcome",
    "/big",
    "/slow",
    "/claimed",
    "/flaky",
];

/// Serves the app with the layer on `store`; returns the port.
pub async fn serve<S: Store + Clone + 'static>(
    store: S,
    lock_ttl: Duration,
    retention: Duration,
    payments: Payments,
) -> u16 {
    serve_with(store, payments, |b| {
        b.lock_ttl(lock_ttl).retention(retention)
    })
    .await
}

/// The app on `store` with a 30 s lock and 60 s retention: its port and its payment log.
pub async fn serve_payments<S: Store + Clone + 'static>(store: S) -> (u16, Payments) {
    let payments = Payments::default();
    let port = serve(
        store,
        Duration::from_secs(30),
        Duration::from_secs(60),
        payments.clone(),
    )
    .await;
    (port, payments)
}

/// Serves the app with the layer on `store`: callers by `X-Api-Key`, the [`COVERED`]
/// paths, 60 s lock and retention, then `configure`; returns the port.
pub async fn serve_with<S: Store + Clone + 'static>(
    store: S,
    payments: Payments,
    configure: impl FnOnce(Builder<S>) -> Builder<S>,
) -> u16 {
    let builder = IdempotencyLayer::builder(store)
        .principal(|parts| {
            parts
                .headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .paths(COVERED)
        .lock_ttl(Duration::from_secs(60))
        .retention(Duration::from_secs(60));
    let layer = configure(builder).build().unwrap();
    let app = Router::new()
        .route("/payments", post(create).get(list))
        .route("/payments/{id}", patch(update).delete(update))
        .route("/outcome/{status}", post(outcome))
        .route("/big/{size}", post(big))
        .route("/slow", post(slow))
        .route("/claimed", post(claimed))
        .route("/flaky", post(flaky))
        .route("/unprotected", post(unprotected))
        .layer(layer)
        .with_state(payments);
    listen(app).await
}

/// Serves `app` over HTTP on a free loopback port; returns the port.
pub async fn listen(app: Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}
