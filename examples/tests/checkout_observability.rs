//! The checkout's admin port over HTTP, with the Prometheus recorder installed before the
//! services are built, on Redis (two servers) and PostgreSQL started by the testkit:
//!
//! - `/metrics` serves every series the README's Metrics table documents for the crates
//!   the checkout uses, with the documented labels and label values;
//! - every metric and label the Grafana dashboard beside the example queries is one the
//!   checkout serves;
//! - `/debug/pprof/profile` answers a flamegraph of the process that names the code that
//!   ran, one at a time, and refuses a missing or bad `seconds`.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../checkout/app/mod.rs"]
mod app;

mod prometheus;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use app::Config;
use app::admin::{self, Admin};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::PrometheusHandle;
use prometheus::{Documented, Exposition};

/// The process's recorder, installed once (the first test to need it does it).
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| admin::install_recorder().unwrap())
        .clone()
}

/// A GET on the admin port: status and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, Option<String>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<axum::body::Bytes>>();
    let uri = format!("http://{addr}{path}").parse().unwrap();
    let reply = client.get(uri).await.unwrap();
    let status = reply.status().as_u16();
    let content_type = reply
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = reply.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8(body.to_vec()).unwrap(),
        content_type,
    )
}

/// What `/metrics` served after one checkout run on Redis x2 + PostgreSQL, the recorder
/// installed before the run built its services. Run once, for every test that reads it.
fn scraped() -> &'static Exposition {
    static SCRAPED: OnceLock<Exposition> = OnceLock::new();
    SCRAPED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let metrics = recorder();
            let admin = Admin::start(([127, 0, 0, 1], 0).into(), metrics)
                .await
                .unwrap();
            let redis = sd_testkit::RedisServer::start_many(2).expect("redis-server");
            let db = sd_testkit::database().expect("postgres");
            let config = Config::on(redis.iter().map(|r| r.url()).collect(), db.url());
            let summary = app::run(&config).await.unwrap();
            assert!(summary.problems.is_empty(), "{:#?}", summary.problems);
            let (status, body, content_type) = get(admin.addr(), "/metrics").await;
            assert_eq!(status, 200, "{body}");
            assert!(
                content_type.is_some_and(|t| t.starts_with("text/plain")),
                "the text exposition format"
            );
            Exposition::parse(&body)
        })
    })
}

/// The crates the checkout runs, as the README's metric names start (`sd.<crate>.`), and
/// `messaging`: OpenTelemetry's messaging metrics (the outbox relay's, and the sd-pool
/// stream consumers').
const CHECKOUT_CRATES: [&str; 8] = [
    "ratelimit",
    "cache",
    "lock",
    "idempotency",
    "saga",
    "outbox",
    "pool",
    "messaging",
];

/// Documented series the checkout cannot emit (by name, or by a prefix ending in `.`),
/// and why.
const NOT_IN_THE_CHECKOUT: [(&str, &str); 4] = [
    (
        "sd.pool.watermark.lag",
        "registered per partition of offset-tracked jobs; the checkout's jobs carry no offsets",
    ),
    ("sd.lock.election.", "the checkout elects no leader"),
    (
        "messaging.client.consumed.messages",
        "sd-pool's stream consumers'; the checkout's pool takes its jobs from the relay",
    ),
    (
        "messaging.process.duration",
        "sd-pool's stream consumers'; the checkout's pool takes its jobs from the relay",
    ),
];

/// Whether the checkout cannot emit the documented metric `name`.
fn not_in_the_checkout(name: &str) -> bool {
    NOT_IN_THE_CHECKOUT
        .iter()
        .any(|(n, _)| *n == name || (n.ends_with('.') && name.starts_with(n)))
}

/// The crate a documented metric belongs to (`messaging` for OpenTelemetry's names).
fn crate_of(name: &str) -> Option<&str> {
    if name.starts_with("messaging.") {
        return Some("messaging");
    }
    name.strip_prefix("sd.")?.split('.').next()
}

#[test]
fn metrics_serve_every_documented_series_of_the_checkouts_crates() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let documented = Documented::from_readme(&readme);
    let scraped = scraped();
    let mut checked = BTreeSet::new();
    let mut problems = Vec::new();
    for metric in &documented {
        let Some(krate) = crate_of(&metric.name) else {
            continue;
        };
        if !CHECKOUT_CRATES.contains(&krate) || not_in_the_checkout(&metric.name) {
            continue;
        }
        checked.insert(krate);
        let family = metric.prometheus_name();
        let Some(kind) = scraped.kinds.get(&family) else {
            problems.push(format!("{} ({family}) is not served", metric.name));
            continue;
        };
        if *kind != metric.kind {
            problems.push(format!(
                "{family} is served as a {kind}, documented as a {}",
                metric.kind
            ));
        }
        let series = scraped.series(&family);
        for (key, values) in &metric.labels {
            let key = prometheus::sanitize(key);
            let served: BTreeSet<&str> = series
                .iter()
                .filter_map(|labels| labels.get(&key).map(String::as_str))
                .collect();
            if served.is_empty() || series.iter().any(|l| !l.contains_key(&key)) {
                problems.push(format!("{family}: a series without the label {key}"));
            }
            for value in values {
                if !served.contains(value.as_str()) {
                    problems.push(format!("{family}: no series with {key}=\"{value}\""));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        checked,
        CHECKOUT_CRATES.into_iter().collect(),
        "the README documents metrics of each crate the checkout runs"
    );
}

#[test]
fn the_dashboard_queries_only_what_the_checkout_serves() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/checkout/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // A Prometheus datasource variable, which every panel and query uses.
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "a datasource variable of type prometheus"
    );
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            queries.push((title, target["expr"].as_str().unwrap()));
        }
    }
    let scraped = scraped();
    let mut problems = Vec::new();
    let mut families = BTreeSet::new();
    for (title, expr) in &queries {
        let query = prometheus::Query::parse(expr);
        assert!(!query.metrics.is_empty(), "{title}: no metric in {expr}");
        let mut queried = Vec::new();
        for (name, matchers) in &query.metrics {
            let Some(family) = scraped.family_of(name) else {
                problems.push(format!("{title}: {name} is not served"));
                continue;
            };
            families.insert(family.to_owned());
            let series = scraped.series(family);
            for (key, value) in matchers {
                if !series.iter().any(|l| l.get(key) == Some(value)) {
                    problems.push(format!("{title}: no {name} series with {key}=\"{value}\""));
                }
            }
            queried.push(series);
        }
        for key in &query.grouping {
            if !queried
                .iter()
                .flat_map(|s| s.iter())
                .any(|l| l.contains_key(key))
            {
                problems.push(format!(
                    "{title}: groups by {key}, which no queried series has"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // Each crate the checkout runs has a panel.
    for krate in CHECKOUT_CRATES {
        let prefix = match krate {
            "messaging" => "messaging_".to_owned(),
            _ => format!("sd_{krate}_"),
        };
        assert!(
            families.iter().any(|f| f.starts_with(&prefix)),
            "no panel over {prefix}*"
        );
    }
    println!("{} queries over {} families", queries.len(), families.len());
}

/// Burns CPU on this thread until `stop` is set: what the profile must show.
#[inline(never)]
fn spin_for_profile(stop: &AtomicBool) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    }
    std::hint::black_box(x)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_is_a_flamegraph_of_the_process_one_at_a_time() {
    let admin = Admin::start(([127, 0, 0, 1], 0).into(), recorder())
        .await
        .unwrap();
    let addr = admin.addr();
    const PROFILE: &str = "/debug/pprof/profile";

    // A missing or bad `seconds`: 400, saying what is allowed.
    let (status, body, _) = get(addr, PROFILE).await;
    assert_eq!(status, 400);
    assert!(body.starts_with("missing `seconds`"), "{body}");
    for bad in ["0", "61", "-1", "1.5", "", "ten", "99999999999999999999999"] {
        let (status, body, _) = get(addr, &format!("{PROFILE}?seconds={bad}")).await;
        assert_eq!(status, 400, "seconds={bad}: {body}");
        assert!(body.contains("whole number from 1 to 60"), "{body}");
    }

    // A 2 s profile while a thread spins (until the answer: the profiler's first start
    // in a process reads the binary's symbols, seconds in a debug build); a second request
    // meanwhile is refused.
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = std::thread::spawn({
        let stop = stop.clone();
        move || spin_for_profile(&stop)
    });
    let first = tokio::spawn(async move { get(addr, &format!("{PROFILE}?seconds=2")).await });
    let started = Instant::now();
    while !admin::profile_running() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the profile never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body, _) = get(addr, &format!("{PROFILE}?seconds=1")).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("already running"), "{body}");
    let (status, svg, content_type) = first.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    assert_eq!(status, 200, "{svg}");
    assert_eq!(content_type.as_deref(), Some("image/svg+xml"));
    let samples = well_formed_svg(&svg);
    assert!(samples > 0, "no samples:\n{svg}");
    assert!(
        svg.contains("spin_for_profile"),
        "the spinning function is not in the flamegraph ({samples} samples)"
    );
    println!(
        "a 2 s profile: {samples} samples, {} bytes of SVG",
        svg.len()
    );

    // The profile ended: the next one runs.
    let (status, svg, _) = get(addr, &format!("{PROFILE}?seconds=1")).await;
    assert_eq!(status, 200, "{svg}");
    well_formed_svg(&svg);
}

/// Checks `svg` is well-formed XML with an `<svg>` root, and returns the sample count
/// its title gives.
fn well_formed_svg(svg: &str) -> u64 {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(svg);
    let (mut depth, mut root, mut elements) = (0_usize, None, 0);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                root.get_or_insert_with(|| e.name().as_ref().to_vec());
                depth += 1;
                elements += 1;
            }
            Ok(Event::Empty(e)) => {
                root.get_or_insert_with(|| e.name().as_ref().to_vec());
                elements += 1;
            }
            Ok(Event::End(_)) => depth -= 1,
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("not well-formed at {}: {e}", reader.buffer_position()),
        }
    }
    assert_eq!(depth, 0, "unclosed elements");
    assert_eq!(root.as_deref(), Some(&b"svg"[..]));
    assert!(elements > 1);
    let title = svg.split("at 99 Hz: ").nth(1).unwrap_or_default();
    let samples: String = title.chars().take_while(char::is_ascii_digit).collect();
    samples.parse().unwrap_or(0)
}
