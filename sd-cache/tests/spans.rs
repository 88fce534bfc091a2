//! Loads and Redis calls run in `tracing` spans carrying the fields every sd crate's
//! spans use (`sd.name`, `sd.backend`, `sd.operation`); a memory hit opens none.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)] // a failed step is a test failure

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_cache::{Cache, RedisCache};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// A span's name and fields.
type Opened = (String, BTreeMap<String, String>);

/// Every span opened, in order.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Opened>>>);

impl Spans {
    /// The spans opened since the last call, as `name operation backend name`.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .into_iter()
            .map(|(span, f)| {
                let field = |k: &str| f.get(k).cloned().unwrap_or_else(|| "-".into());
                format!(
                    "{span} {} {} {}",
                    field("sd.operation"),
                    field("sd.backend"),
                    field("sd.name")
                )
            })
            .collect()
    }
}

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut fields = Fields(BTreeMap::new());
        attrs.record(&mut fields);
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields.0));
    }
}

#[test]
fn loads_and_redis_calls_run_in_spans_with_the_shared_fields() {
    let server = sd_testkit::redis().expect("redis-server must be installed");
    let spans = Spans::default();
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    // One thread, so every span is opened where the subscriber is installed.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let memory: Cache<u64, u64> = Cache::builder().name("users").build().unwrap();
        assert_eq!(memory.get_or_load(1, || async { 7 }).await.unwrap(), 7);
        assert_eq!(spans.take(), ["cache.load load memory users"]);
        assert_eq!(memory.get_or_load(1, || async { 8 }).await.unwrap(), 7);
        assert_eq!(memory.get(&1), Some(7));
        assert_eq!(spans.take(), Vec::<String>::new(), "a hit opens no span");

        let conn =
            sd_testkit::redis_manager(server.url(), Duration::from_secs(5), Duration::from_secs(5))
                .await;
        let redis: RedisCache<u64, _> =
            RedisCache::builder(sd_testkit::unique_name("spans").as_str())
                .name("prices")
                .build(conn)
                .await
                .unwrap();
        assert_eq!(redis.get_or_load("k", || async { 7 }).await.unwrap(), 7);
        let miss = spans.take();
        for expected in [
            "cache.redis read redis prices",
            "cache.load load redis prices",
            "cache.redis write redis prices",
        ] {
            assert!(miss.iter().any(|s| s == expected), "{expected} in {miss:?}");
        }
        assert_eq!(redis.get("k").await.unwrap(), Some(7));
        assert_eq!(spans.take(), ["cache.redis read redis prices"]);
        redis.invalidate("k").await.unwrap();
        assert_eq!(spans.take(), ["cache.redis invalidate redis prices"]);
    });
}
