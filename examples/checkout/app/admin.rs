//! The checkout's admin HTTP port:
//!
//! - `GET /metrics`: every pattern's metrics in the Prometheus text format, rendered by
//!   metrics-exporter-prometheus's recorder. Counters end in `_total`, durations and ages
//!   in `_seconds`, dots become underscores (`sd.lock.acquire.duration` is served as the
//!   histogram `sd_lock_acquire_duration_seconds`, its buckets from 0.5 ms to 10 s);
//! - `GET /debug/pprof/profile?seconds=N`: the CPU profile of the whole process over the
//!   next N seconds (1 to 60), sampled 99 times a second, as a flamegraph SVG (the
//!   counterpart of Go's `net/http/pprof`). One profile runs at a time: a second request
//!   meanwhile gets `409 Conflict`; a missing or bad `seconds` gets `400`.
//!
//! The pattern crates register their metric handles when an instance is built, with the
//! recorder installed then: [`install_recorder`] runs before the services are started.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The longest profile one request may ask for, in seconds.
pub(crate) const MAX_PROFILE_SECONDS: u64 = 60;
/// Samples a second while a profile runs (Go's profiler takes 100; 99 keeps clear of
/// work that runs on a 10 ms beat).
const PROFILE_HZ: i32 = 99;
/// The buckets of every duration histogram, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Histograms that grow between scrapes are folded into their buckets this often.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// A client gets this long to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's `metrics` recorder and returns the
/// handle that renders it. Call it before building anything whose metrics it should
/// hold; it fails if a recorder is already installed.
pub(crate) fn install_recorder() -> Result<PrometheusHandle, BoxError> {
    let handle = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .set_buckets(&BUCKETS)?
        .install_recorder()
        .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
    Ok(handle)
}

/// The running admin server; stopped when dropped.
#[derive(Debug)]
pub(crate) struct Admin {
    addr: SocketAddr,
    tasks: [JoinHandle<()>; 2],
}

impl Admin {
    /// Serves `/metrics` from `metrics` and the profile endpoint on `addr` (port 0: any
    /// free port; see [`Admin::addr`]).
    pub(crate) async fn start(
        addr: SocketAddr,
        metrics: PrometheusHandle,
    ) -> Result<Self, BoxError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("admin port {addr}: {e}"))?;
        let addr = listener.local_addr()?;
        let upkeep = {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(UPKEEP_EVERY);
                loop {
                    every.tick().await;
                    metrics.run_upkeep();
                }
            })
        };
        let router = Router::new()
            .route("/metrics", get(render))
            .route("/debug/pprof/profile", get(profile))
            .with_state(metrics);
        Ok(Admin {
            addr,
            tasks: [tokio::spawn(serve(listener, router)), upkeep],
        })
    }

    /// The address the server listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serves `router` on `listener` (HTTP/1.1), each connection on a task of its own.
async fn serve(listener: TcpListener, router: Router) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = builder.http1_only();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                eprintln!("checkout admin: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            )
            .into_owned();
        // A client that went away or was too slow is no error of ours: ignored.
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// `GET /metrics`: the counts sd keeps in per-thread steps published first, so the
/// scrape is exact.
async fn render(State(metrics): State<PrometheusHandle>) -> Response {
    sd_core::observe::publish();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

/// Set while a profile runs (the profiler samples the whole process: one at a time).
static PROFILING: AtomicBool = AtomicBool::new(false);

/// Whether a profile is running now.
#[cfg_attr(not(test), allow(dead_code))] // read by examples/tests/checkout_observability.rs
pub(crate) fn profile_running() -> bool {
    PROFILING.load(Ordering::Acquire)
}

/// The right to run the one profile; gives it back when dropped.
struct Profiling;

impl Profiling {
    fn take() -> Option<Self> {
        PROFILING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Profiling)
    }
}

impl Drop for Profiling {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

/// The `seconds` of a profile request's query: a whole number from 1 to
/// [`MAX_PROFILE_SECONDS`], or the message a `400` carries.
pub(crate) fn profile_seconds(query: Option<&str>) -> Result<u64, String> {
    let value = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("seconds="));
    let Some(value) = value else {
        return Err(format!(
            "missing `seconds`: ask for a profile of 1 to {MAX_PROFILE_SECONDS} seconds, e.g. /debug/pprof/profile?seconds=10\n"
        ));
    };
    match value.parse::<u64>() {
        Ok(n) if (1..=MAX_PROFILE_SECONDS).contains(&n) => Ok(n),
        _ => Err(format!(
            "`seconds` must be a whole number from 1 to {MAX_PROFILE_SECONDS}, got {value:?}\n"
        )),
    }
}

/// `GET /debug/pprof/profile?seconds=N`: samples the process for N seconds, then answers
/// with the flamegraph.
async fn profile(RawQuery(query): RawQuery) -> Response {
    let seconds = match profile_seconds(query.as_deref()) {
        Ok(n) => n,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let Some(running) = Profiling::take() else {
        return (
            StatusCode::CONFLICT,
            "a profile is already running; ask again when it ends\n",
        )
            .into_response();
    };
    let guard = match pprof::ProfilerGuardBuilder::default()
        .frequency(PROFILE_HZ)
        // Unwinding from inside these while a signal lands can deadlock.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
    {
        Ok(guard) => guard,
        Err(e) => return internal(format!("cannot start the profiler: {e}")),
    };
    // A client that goes away drops this future, and with it the profiler and `running`.
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    // Resolving symbols takes a while: off the runtime's threads.
    let svg = tokio::task::spawn_blocking(move || {
        let svg = flamegraph(&guard, seconds);
        drop(guard);
        drop(running);
        svg
    })
    .await;
    match svg {
        Ok(Ok(svg)) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(format!("the profile's report failed: {e}")),
    }
}

/// The samples `guard` took over `seconds`, as a flamegraph SVG.
fn flamegraph(guard: &pprof::ProfilerGuard<'_>, seconds: u64) -> Result<Vec<u8>, String> {
    let report = guard
        .report()
        .build()
        .map_err(|e| format!("cannot build the profile's report: {e}"))?;
    let samples: isize = report.data.values().sum();
    let title = format!("checkout CPU, {seconds} s at {PROFILE_HZ} Hz: {samples} samples");
    if report.data.is_empty() {
        // The flamegraph renderer writes nothing for no samples: say so in an SVG.
        return Ok(format!(
            "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg version=\"1.1\" width=\"600\" height=\"40\" xmlns=\"http://www.w3.org/2000/svg\"><text x=\"10\" y=\"25\">{title} (the process was idle)</text></svg>\n"
        )
        .into_bytes());
    }
    let mut options = pprof::flamegraph::Options::default();
    options.title = title;
    let mut svg = Vec::new();
    report
        .flamegraph_with_options(&mut svg, &mut options)
        .map_err(|e| format!("cannot render the flamegraph: {e}"))?;
    Ok(svg)
}

fn internal(message: String) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, message + "\n").into_response()
}
