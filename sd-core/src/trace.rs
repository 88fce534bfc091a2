//! W3C trace context across an asynchronous hop (feature `otel`): the `traceparent` and
//! `tracestate` headers a producer writes from the current `tracing` span, and the parent
//! a consumer gives its job span from them, so one trace shows the request that wrote a
//! message and the job that handled it.
//!
//! The spans are `tracing` spans; the trace and span ids are those of the
//! [tracing-opentelemetry](https://docs.rs/tracing-opentelemetry) layer, which the
//! application installs with its OpenTelemetry SDK and exporter. Without that layer (or
//! outside any span) there is no trace context: nothing is written, and a parent read
//! from headers is not applied.
//!
//! # Headers
//!
//! [`TRACEPARENT`] is W3C Trace Context's `version-traceid-parentid-flags`
//! (`00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`); [`TRACESTATE`] is
//! written beside it when the span carries vendor state. Reading follows the W3C rules:
//! lowercase hex only, an all-zero trace or parent id is invalid, version `ff` is
//! invalid, a later version is read by its version-00 prefix, and an invalid
//! `tracestate` is dropped while its `traceparent` still counts. A malformed
//! `traceparent`, or two different ones, means no parent: the job starts a trace of its
//! own, and the value is logged at debug level.
//!
//! # Parent, not link
//!
//! A consumer makes the message's context the **parent** of the job span, so the job is
//! in the producer's trace: one trace id from the request to the job. OpenTelemetry's
//! messaging conventions also allow a **link** (the job starts a trace of its own that
//! points at the producer's span), which suits a job that handles a batch of messages
//! from several traces; sd runs one job per message. A handler that wants a link instead
//! adds one to its own span from [`TraceParent::span_context`] with
//! tracing-opentelemetry's `OpenTelemetrySpanExt::add_link`.
//!
//! ```
//! use sd_core::trace::{TRACEPARENT, TraceParent};
//!
//! // What a consumer read off a message (a NATS or Kafka header map, a stream entry).
//! let headers = [(TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")];
//! let parent = TraceParent::extract(headers).ok_or("no trace context")?;
//! assert_eq!(parent.to_string(), headers[0].1);
//!
//! // The job's span continues that trace (with the tracing-opentelemetry layer installed).
//! let job = tracing::info_span!("job");
//! parent.set_parent_of(&job);
//!
//! // A malformed value is no parent, never an error.
//! assert!(TraceParent::extract([(TRACEPARENT, "00-not-a-trace-01")]).is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr as _;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::{OpenTelemetrySpanExt as _, SetParentError};

/// The W3C header carrying the trace id, the parent span id and the flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor trace state, written only when there is some.
pub const TRACESTATE: &str = "tracestate";

/// The length of a version-00 `traceparent`.
const LEN: usize = 55;

/// A span's W3C trace context: what [`inject`](Self::inject) writes and
/// [`extract`](Self::extract) reads back, to make a span's remote parent.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceParent {
    span_context: SpanContext,
}

impl TraceParent {
    /// The trace context of the current `tracing` span, or `None` outside any span or
    /// without the tracing-opentelemetry layer.
    pub fn current() -> Option<Self> {
        Self::of(&tracing::Span::current())
    }

    /// The trace context of `span`, or `None` when it has none (disabled, or no
    /// tracing-opentelemetry layer).
    pub fn of(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        let span_context = context.span().span_context().clone();
        span_context
            .is_valid()
            .then_some(TraceParent { span_context })
    }

    /// Reads a `traceparent` value and its optional `tracestate` by the W3C rules (see
    /// the [module docs](self)); `None` when `traceparent` is malformed. An invalid
    /// `tracestate` is dropped.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let value = traceparent.trim_matches([' ', '\t']);
        let bytes = value.as_bytes();
        let lower_hex = |range: std::ops::Range<usize>| {
            bytes
                .get(range)
                .is_some_and(|b| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
        };
        let dashes = [2, 35, 52].iter().all(|&i| bytes.get(i) == Some(&b'-'));
        let fields = [0..2, 3..35, 36..52, 53..55];
        if !dashes || !fields.into_iter().all(lower_hex) {
            return None;
        }
        // Version 00 is exactly 55 characters; a later one may add fields after a dash.
        match &value[0..2] {
            "ff" => return None,
            "00" if bytes.len() != LEN => return None,
            _ if bytes.len() > LEN && bytes[LEN] != b'-' => return None,
            _ => {}
        }
        let trace_id = TraceId::from_hex(&value[3..35]).ok()?;
        let span_id = SpanId::from_hex(&value[36..52]).ok()?;
        let flags = u8::from_str_radix(&value[53..55], 16).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        let state = tracestate
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        Some(TraceParent {
            span_context: SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::new(flags) & TraceFlags::SAMPLED,
                true,
                state,
            ),
        })
    }

    /// Reads [`TRACEPARENT`] and [`TRACESTATE`] from header pairs (names compared
    /// without regard to ASCII case; several `tracestate` values are joined). `None`
    /// when there is no `traceparent`, when it is malformed, or when two differ; a
    /// malformed one is logged at debug level.
    pub fn extract<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let mut parent: Option<&str> = None;
        let mut state: Option<String> = None;
        for (name, value) in headers {
            if name.eq_ignore_ascii_case(TRACEPARENT) {
                if parent.is_some_and(|p| p != value) {
                    tracing::debug!("two different traceparent headers; the job gets no parent");
                    return None;
                }
                parent = Some(value);
            } else if name.eq_ignore_ascii_case(TRACESTATE) {
                match &mut state {
                    Some(joined) => {
                        joined.push(',');
                        joined.push_str(value);
                    }
                    None => state = Some(value.to_owned()),
                }
            }
        }
        let parent = parent?;
        let parsed = Self::parse(parent, state.as_deref());
        if parsed.is_none() {
            tracing::debug!(
                traceparent = parent,
                "malformed traceparent header ignored; the job gets no parent"
            );
        }
        parsed
    }

    /// Writes [`TRACEPARENT`], and [`TRACESTATE`] when there is vendor state, through
    /// `insert(name, value)`.
    pub fn inject(&self, mut insert: impl FnMut(&'static str, String)) {
        insert(TRACEPARENT, self.to_string());
        let state = self.span_context.trace_state().header();
        if !state.is_empty() {
            insert(TRACESTATE, state);
        }
    }

    /// Makes this context the parent of `span`, which must not have been entered yet:
    /// `span` (and the spans under it) join this trace. Does nothing without the
    /// tracing-opentelemetry layer or for a disabled span; a span already entered keeps
    /// its parent (logged at debug level).
    pub fn set_parent_of(&self, span: &tracing::Span) {
        let context =
            opentelemetry::Context::new().with_remote_span_context(self.span_context.clone());
        if let Err(SetParentError::AlreadyStarted) = span.set_parent(context) {
            tracing::debug!("span already started; it keeps its parent");
        }
    }

    /// The OpenTelemetry span context: trace id, span id, flags, state.
    pub fn span_context(&self) -> &SpanContext {
        &self.span_context
    }
}

/// The `traceparent` value: `00-{trace id}-{span id}-{flags}`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sc = &self.span_context;
        write!(
            f,
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_reads_back_as_written() {
        let parent = TraceParent::parse(VALID, None).unwrap();
        let sc = parent.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(parent.to_string(), VALID);
        let mut written = Vec::new();
        parent.inject(|name, value| written.push((name, value)));
        assert_eq!(written, [(TRACEPARENT, VALID.to_owned())]);

        let unsampled = VALID.replace("-01", "-00");
        let parent = TraceParent::parse(&unsampled, None).unwrap();
        assert!(!parent.span_context().is_sampled());
        assert_eq!(parent.to_string(), unsampled);
    }

    #[test]
    fn tracestate_travels_with_it_and_an_invalid_one_is_dropped() {
        let parent = TraceParent::extract([
            ("TraceParent", VALID),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("TRACESTATE", "rojo=00f067aa0ba902b7"),
            ("other", "x"),
        ])
        .unwrap();
        let mut written = Vec::new();
        parent.inject(|name, value| written.push((name, value)));
        assert_eq!(
            written,
            [
                (TRACEPARENT, VALID.to_owned()),
                (
                    TRACESTATE,
                    "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_owned()
                )
            ]
        );
        let parent = TraceParent::parse(VALID, Some("not a=valid=state")).unwrap();
        assert_eq!(parent.span_context().trace_state().header(), "");
    }

    #[test]
    fn malformed_values_give_no_parent_and_never_panic() {
        let mut cases = vec![
            String::new(),
            "00".into(),
            "garbage".into(),
            VALID.to_uppercase(),
            VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            VALID.replacen("00", "ff", 1),
            format!("{VALID}-extra"), // version 00 is exactly 55 characters
            VALID.replace('-', "_"),
            VALID.replace("-01", "-0x"),
            VALID.replace("4bf9", "+bf9"),
            VALID.replace("4bf9", "é"),
            format!("{VALID}é"),
            VALID[..54].to_owned(),
        ];
        // Every prefix, too: truncated in transit.
        cases.extend((0..LEN).map(|n| VALID[..n].to_owned()));
        for case in &cases {
            assert!(TraceParent::parse(case, None).is_none(), "{case:?}");
            assert!(TraceParent::extract([(TRACEPARENT, case.as_str())]).is_none());
        }
        // Two different values: neither counts.
        let other = VALID.replace("4bf9", "5bf9");
        assert!(TraceParent::extract([(TRACEPARENT, VALID), (TRACEPARENT, &other)]).is_none());
        assert!(TraceParent::extract([(TRACEPARENT, VALID), (TRACEPARENT, VALID)]).is_some());
        assert!(TraceParent::extract([("x", "y")]).is_none());
    }

    #[test]
    fn a_later_version_is_read_by_its_version_00_prefix() {
        let later = format!("{}-{}", VALID.replacen("00", "01", 1), "what-comes-next");
        let parent = TraceParent::parse(&later, None).unwrap();
        assert_eq!(parent.to_string(), VALID, "written back as version 00");
        let glued = format!("{}x", VALID.replacen("00", "01", 1));
        assert!(TraceParent::parse(&glued, None).is_none());
    }

    #[test]
    fn without_the_layer_there_is_no_context_and_setting_a_parent_is_harmless() {
        assert!(TraceParent::current().is_none());
        let span = tracing::info_span!("job");
        TraceParent::parse(VALID, None)
            .unwrap()
            .set_parent_of(&span);
        assert!(TraceParent::of(&span).is_none());
    }
}
