//! Distributed tracing of a Decide (DESIGN.md §13): the caller's W3C context, the
//! spans, and the `traceparent` / `tracestate` headers of extension requests.
//!
//! Spans are `tracing` spans with target [`TARGET`], turned into OpenTelemetry spans
//! by `tracing-opentelemetry` in the binary, which also exports them. They are made
//! only while [`spans_enabled`] (an exporter is configured); otherwise every function
//! here returns [`Span::none`] or does nothing after one relaxed atomic load — the hot
//! path then allocates nothing and sends no header it did not send before, except a
//! caller's own `traceparent` / `tracestate`, which are passed through to extensions
//! as they came.
//!
//! The tree of one request:
//!
//! ```text
//! decide                       (server; child of the caller's traceparent)
//! ├── extension_call           (client; one per attempt: pre, validator, post steps)
//! ├── provider_selection
//! │   └── extension_call       (the provider's extension, and its fallbacks)
//! └── extension_call …
//! ```
//!
//! A step refused before anything is sent (breaker open, disabled, not found, too
//! large, bulkhead full, NATS down) gets one `extension_call` span with `attempt` 0.
//! Every extension request carries `traceparent` naming its own attempt span, so the
//! extension's spans are children of it.
//!
//! A request's trace id is its OpenTelemetry trace id: the caller's `traceparent`
//! wins (the intakes make it the request's `trace_id`); without one, the request's own
//! `trace_id` (the caller's when it is in W3C form, else the router's new one) starts
//! the trace, through [`RequestIdGenerator`].

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::{HeaderMap, HeaderName};
use beamline_model::trace::{HEADER_TRACEPARENT, HEADER_TRACESTATE, parse_trace_id};
pub use beamline_model::trace::{
    TraceParent, sample_ratio, set_sample_ratio, set_spans_enabled, spans_enabled,
};
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing::field::{Empty, display};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::invoker::{Call, InvokeError};
use crate::pipeline::{DecideError, DecideRequest, Decision};

/// The `tracing` target of every span the router makes (the binary's exporter
/// listens to it).
pub const TARGET: &str = "beamline_trace";

/// The trace context a caller sent with its Decide.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    /// A valid `traceparent`; an invalid one is ignored (the request starts a trace).
    pub parent: Option<TraceParent>,
    /// `tracestate`, passed on unchanged (only with a valid `traceparent`).
    pub tracestate: Option<String>,
    /// Where the request came in: `grpc`, `nats` (a span attribute).
    pub intake: &'static str,
    /// The request is traced (its Decide span exists): only then do its steps make
    /// spans. Set by the pipeline.
    pub recording: bool,
}

impl Incoming {
    /// Reads `traceparent` and `tracestate` with `get` (a header lookup).
    pub fn from_lookup<'a>(
        intake: &'static str,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Incoming {
        let parent = get(HEADER_TRACEPARENT).and_then(TraceParent::parse);
        let tracestate = parent
            .and(get(HEADER_TRACESTATE))
            .and_then(beamline_model::trace::usable_tracestate)
            .map(str::to_string);
        Incoming {
            parent,
            tracestate,
            intake,
            recording: false,
        }
    }

    /// From a NATS message's headers (names matched without regard to case).
    pub fn from_nats(intake: &'static str, headers: Option<&HeaderMap>) -> Incoming {
        let Some(h) = headers else {
            return Incoming {
                intake,
                ..Incoming::default()
            };
        };
        Incoming::from_lookup(intake, |name| {
            let exact = match name {
                HEADER_TRACEPARENT => h.get(TRACEPARENT),
                _ => h.get(TRACESTATE),
            };
            exact.map(|v| v.as_str()).or_else(|| {
                h.iter()
                    .find(|(k, _)| AsRef::<str>::as_ref(*k).eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| v.first())
                    .map(|v| v.as_str())
            })
        })
    }

    /// Makes the caller's trace id the request's `trace_id` (bodies, logs, the reply,
    /// spans all carry the same id). Returns whether it changed anything.
    pub fn adopt(&self, trace_id: &mut String) -> bool {
        let Some(p) = &self.parent else { return false };
        if parse_trace_id(trace_id) == Some(p.trace_id) {
            return false;
        }
        if !trace_id.is_empty() {
            tracing::debug!(
                body_trace_id = %trace_id,
                traceparent_trace_id = %p.trace_id_hex(),
                "the request's trace_id differs from its traceparent's; the traceparent's wins"
            );
        }
        *trace_id = p.trace_id_hex();
        true
    }
}

/// What an extension call's span records beyond the call itself.
#[derive(Debug, Clone, Copy)]
pub struct CallTrace<'a> {
    pub incoming: &'a Incoming,
    pub instance: Option<&'a str>,
    /// The breaker's state as the call was admitted (`closed`, `half_open`).
    pub breaker: &'static str,
}

static NO_CALLER: Incoming = Incoming {
    parent: None,
    tracestate: None,
    intake: "",
    recording: false,
};

impl CallTrace<'static> {
    /// A call outside any traced request.
    pub fn none() -> CallTrace<'static> {
        CallTrace {
            incoming: &NO_CALLER,
            instance: None,
            breaker: "",
        }
    }
}

impl<'a> CallTrace<'a> {
    pub(crate) fn new(
        incoming: &'a Incoming,
        instance: Option<&'a str>,
        admission: crate::breaker::Admission,
    ) -> CallTrace<'a> {
        CallTrace {
            incoming,
            instance,
            breaker: match admission {
                crate::breaker::Admission::Normal => "closed",
                crate::breaker::Admission::Probe => "half_open",
            },
        }
    }
}

// ---------------------------------------------------------------------------
// The Decide span.

/// The span of one Decide, started now (so its id is known to the log lines),
/// as a child of the caller's context when one came. Gives the request a trace id
/// first when it has none.
pub(crate) fn decide_span(request: &mut DecideRequest, incoming: &Incoming) -> Span {
    if !spans_enabled() {
        return Span::none();
    }
    if request.message.trace_id.is_empty() {
        request.message.trace_id = crate::pipeline::new_trace_id();
    }
    // Sampled or not is decided here, once per request, so an unsampled request
    // makes no span at all (only its `traceparent` travels on): a caller's sampled
    // flag decides for its own requests; a new trace is kept at `sample_ratio`, by
    // OpenTelemetry's ratio rule on its trace id.
    let sampled = match &incoming.parent {
        Some(p) => p.flags & 1 == 1,
        None => match parse_trace_id(&request.message.trace_id) {
            Some(id) => beamline_model::trace::ratio_samples(id, sample_ratio()),
            None => rand::random::<f64>() < sample_ratio(),
        },
    };
    if !sampled {
        return Span::none();
    }
    let policy_id = if request.policy_id.is_empty() {
        "default"
    } else {
        request.policy_id.as_str()
    };
    let span = tracing::info_span!(
        target: TARGET,
        "decide",
        otel.name = "Decide",
        otel.kind = "server",
        trace_id = %request.message.trace_id,
        span_id = Empty,
        beamline.intake = incoming.intake,
        beamline.request_id = %request.request_id,
        beamline.tenant_id = %request.message.tenant_id,
        beamline.policy_id = policy_id,
        beamline.dry_run = Empty,
        beamline.provider_id = Empty,
        beamline.decision.reason = Empty,
        beamline.steps = Empty,
        beamline.error_code = Empty,
    );
    if let Some(p) = &incoming.parent {
        let _ = span.set_parent(remote_context(p, incoming.tracestate.as_deref()));
    }
    start(&span, parse_trace_id(&request.message.trace_id));
    span
}

/// Records how a Decide ended on its span.
pub(crate) fn decide_ended(span: &Span, result: &Result<Decision, DecideError>) {
    if span.is_none() {
        return;
    }
    match result {
        Ok(d) => {
            span.record("beamline.provider_id", d.provider_id.as_str());
            span.record("beamline.decision.reason", d.reason.as_str());
            span.record("beamline.steps", d.executed_extensions.len() as u64);
            if d.metadata.contains_key("dry_run") {
                span.record("beamline.dry_run", true);
            }
        }
        Err(e) => {
            span.record("beamline.steps", e.executed_extensions.len() as u64);
            span.record("beamline.error_code", e.code.as_str());
            span.set_status(Status::error(format!("{}: {}", e.code, e.message)));
        }
    }
}

/// Runs `fut` inside `span` (nothing more when there is no span).
pub(crate) async fn within<T>(span: &Span, fut: impl Future<Output = T>) -> T {
    if span.is_none() {
        return fut.await;
    }
    tracing::Instrument::instrument(fut, span.clone()).await
}

// ---------------------------------------------------------------------------
// Provider selection.

/// The provider selection's span (a child of the Decide span) when the request is
/// traced.
pub(crate) fn provider_span(incoming: &Incoming) -> Span {
    if !incoming.recording {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "provider_selection",
        otel.name = "provider selection",
        beamline.provider_id = Empty,
        beamline.decision.reason = Empty,
        beamline.error_code = Empty,
    )
}

/// Records the chosen provider, or why none was.
pub(crate) fn provider_ended<T>(
    span: &Span,
    result: &Result<T, DecideError>,
    chosen: impl Fn(&T) -> (&str, &str),
) {
    if span.is_none() {
        return;
    }
    match result {
        Ok(selection) => {
            let (provider, reason) = chosen(selection);
            span.record("beamline.provider_id", provider);
            span.record("beamline.decision.reason", reason);
        }
        Err(e) => {
            span.record("beamline.error_code", e.code.as_str());
            span.set_status(Status::error(format!("{}: {}", e.code, e.message)));
        }
    }
}

// ---------------------------------------------------------------------------
// Extension calls.

/// The span of one attempt of an extension call (a child of the current span).
pub(crate) fn attempt(call: &Call<'_>, attempt: u32) -> Span {
    if !call.trace.incoming.recording {
        return Span::none();
    }
    call_span(
        call.extension.ext_type.as_str(),
        &call.extension.id,
        &call.extension.version,
        call.subject,
        &call.trace,
        attempt,
    )
}

fn call_span(
    ext_type: &str,
    id: &str,
    version: &str,
    subject: &str,
    trace: &CallTrace<'_>,
    attempt: u32,
) -> Span {
    tracing::info_span!(
        target: TARGET,
        "extension_call",
        otel.name = %format_args!("{ext_type} {id}"),
        otel.kind = "client",
        beamline.extension.id = id,
        beamline.extension.type = ext_type,
        beamline.extension.version = (!version.is_empty()).then_some(version),
        beamline.extension.instance = trace.instance,
        beamline.attempt = attempt,
        beamline.breaker.state = (!trace.breaker.is_empty()).then_some(trace.breaker),
        messaging.system = "nats",
        messaging.destination.name = (!subject.is_empty()).then_some(subject),
        beamline.status = Empty,
        beamline.error_code = Empty,
        beamline.extension.error_code = Empty,
    )
}

/// An attempt that failed and will be retried: recorded, and its span ended before
/// the backoff.
pub(crate) fn retried(span: &mut Span, failure: &InvokeError) {
    if span.is_none() {
        return;
    }
    record_failure(span, failure);
    *span = Span::none();
}

/// The call's outcome on its last attempt's span. A call that failed before any
/// attempt (deadline passed, NATS down) gets a span of its own with attempt 0.
pub(crate) fn ended<T>(
    span: &Span,
    outcome: &Result<T, InvokeError>,
    call: &Call<'_>,
    attempts: u32,
) {
    if !call.trace.incoming.recording {
        return;
    }
    match outcome {
        Ok(_) if !span.is_none() => {
            span.record("beamline.status", "success");
        }
        Ok(_) => {}
        Err(e) if !span.is_none() => record_failure(span, e),
        Err(e) if attempts == 0 => {
            let s = call_span(
                call.extension.ext_type.as_str(),
                &call.extension.id,
                &call.extension.version,
                call.subject,
                &call.trace,
                0,
            );
            record_failure(&s, e);
        }
        Err(_) => {}
    }
}

/// A step refused before its request was made (not found, wrong type, disabled,
/// breaker open, bulkhead full, too large): one span with attempt 0.
pub(crate) fn refused(
    incoming: &Incoming,
    ext_type: &str,
    id: &str,
    version: Option<&str>,
    e: &InvokeError,
) {
    if !incoming.recording {
        return;
    }
    let breaker = if matches!(e, InvokeError::CircuitOpen) {
        "open"
    } else {
        ""
    };
    let trace = CallTrace {
        breaker,
        ..CallTrace::none()
    };
    let s = call_span(ext_type, id, version.unwrap_or(""), "", &trace, 0);
    record_failure(&s, e);
}

fn record_failure(span: &Span, e: &InvokeError) {
    span.record("beamline.status", e.status_label());
    span.record("beamline.error_code", e.code().as_str());
    if let InvokeError::Extension { code, .. } = e {
        span.record("beamline.extension.error_code", code.as_str());
    }
    span.set_status(Status::error(e.to_string()));
}

const TRACEPARENT: HeaderName = HeaderName::from_static(HEADER_TRACEPARENT);
const TRACESTATE: HeaderName = HeaderName::from_static(HEADER_TRACESTATE);

/// Writes `traceparent` (naming the attempt's span, or the caller's when there is
/// none) and the caller's `tracestate` into an extension request's headers. Without
/// a span and without a caller's context, writes nothing.
#[inline]
pub(crate) fn inject(headers: &mut HeaderMap, call: &CallTrace<'_>, span: &Span, trace_id: &str) {
    let parent = if span.is_none() {
        call.incoming.parent.or_else(|| unsampled(trace_id))
    } else {
        own(span).or(call.incoming.parent)
    };
    let Some(parent) = parent else { return };
    headers.insert(TRACEPARENT, parent.encode().as_str());
    if let Some(state) = &call.incoming.tracestate {
        headers.insert(TRACESTATE, state.as_str());
    }
}

/// For a request tracing left out by its ratio (no span, no caller's context): the
/// request's trace with the sampled flag off, so an extension that traces makes the
/// same decision instead of starting a trace of its own. Nothing with tracing off.
fn unsampled(trace_id: &str) -> Option<TraceParent> {
    if !spans_enabled() {
        return None;
    }
    Some(TraceParent {
        trace_id: parse_trace_id(trace_id)?,
        parent_id: rand::random::<u64>().max(1),
        flags: 0,
    })
}

/// The span's own context as a `traceparent`.
fn own(span: &Span) -> Option<TraceParent> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        parent_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        flags: sc.trace_flags().to_u8(),
    })
}

/// An OpenTelemetry context whose span is the caller's (remote) one.
pub fn remote_context(parent: &TraceParent, tracestate: Option<&str>) -> opentelemetry::Context {
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        TraceId::from_bytes(parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(parent.parent_id.to_be_bytes()),
        TraceFlags::new(parent.flags),
        true,
        state,
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

/// Starts `span`'s OpenTelemetry span now — as a root with trace id `trace_id` when
/// it has no parent — and records its span id for the log lines.
fn start(span: &Span, trace_id: Option<u128>) {
    PRESET_TRACE_ID.with(|p| p.set(trace_id));
    let cx = span.context();
    PRESET_TRACE_ID.with(|p| p.set(None));
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("span_id", display(sc.span_id()));
    }
}

thread_local! {
    /// The trace id the next root span on this thread takes ([`start`] sets it
    /// around the call that starts a span).
    static PRESET_TRACE_ID: Cell<Option<u128>> = const { Cell::new(None) };
}

/// The tracer's id generator: random ids, except that a request's root span takes
/// the request's own trace id, so that bodies, logs and spans share one id.
#[derive(Debug, Default)]
pub struct RequestIdGenerator(opentelemetry_sdk::trace::RandomIdGenerator);

impl opentelemetry_sdk::trace::IdGenerator for RequestIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        match PRESET_TRACE_ID.with(Cell::take) {
            Some(id) => TraceId::from_bytes(id.to_be_bytes()),
            None => self.0.new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

// ---------------------------------------------------------------------------
// Export accounting (the binary's batch processor counts; /metrics shows).

static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

/// Why a finished span never reached the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was full (the collector is slow or unreachable).
    QueueFull,
    /// The collector refused the batch, or could not be reached before the export
    /// timeout.
    ExportFailed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ExportFailed => "export_failed",
        }
    }
}

/// Counts spans lost on their way out.
pub fn count_dropped(reason: DropReason, n: u64) {
    match reason {
        DropReason::QueueFull => &DROPPED_QUEUE_FULL,
        DropReason::ExportFailed => &DROPPED_EXPORT_FAILED,
    }
    .fetch_add(n, Ordering::Relaxed);
}

/// Spans lost so far, by reason (`router_tracing_spans_dropped_total`).
pub fn spans_dropped() -> [(DropReason, u64); 2] {
    [
        (
            DropReason::QueueFull,
            DROPPED_QUEUE_FULL.load(Ordering::Relaxed),
        ),
        (
            DropReason::ExportFailed,
            DROPPED_EXPORT_FAILED.load(Ordering::Relaxed),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_context_is_read_from_headers_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.insert(
            "TraceParent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        h.insert("tracestate", "rojo=00f067aa0ba902b7");
        let i = Incoming::from_nats("nats", Some(&h));
        assert_eq!(
            i.parent.map(|p| p.trace_id),
            Some(0x4bf92f3577b34da6a3ce929d0e0e4736)
        );
        assert_eq!(i.tracestate.as_deref(), Some("rojo=00f067aa0ba902b7"));
        let mut trace_id = "caller-id".to_string();
        assert!(i.adopt(&mut trace_id));
        assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(!i.adopt(&mut trace_id), "already the same");
    }

    #[test]
    fn an_invalid_or_absent_traceparent_is_no_context() {
        assert!(Incoming::from_nats("nats", None).parent.is_none());
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-zz-00f067aa0ba902b7-01");
        h.insert("tracestate", "rojo=1");
        let i = Incoming::from_nats("nats", Some(&h));
        assert!(i.parent.is_none());
        assert!(
            i.tracestate.is_none(),
            "tracestate only with a valid parent"
        );
        let mut trace_id = "mine".to_string();
        assert!(!i.adopt(&mut trace_id));
        assert_eq!(trace_id, "mine");
    }

    #[test]
    fn without_spans_only_a_callers_traceparent_is_passed_on() {
        set_spans_enabled(false);
        let mut h = HeaderMap::new();
        inject(
            &mut h,
            &CallTrace::none(),
            &Span::none(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
        );
        assert!(h.is_empty(), "nothing to pass on: no header");
        let incoming = Incoming {
            parent: TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            tracestate: Some("rojo=1".into()),
            intake: "grpc",
            recording: false,
        };
        let call = CallTrace {
            incoming: &incoming,
            instance: None,
            breaker: "closed",
        };
        inject(
            &mut h,
            &call,
            &Span::none(),
            "4bf92f3577b34da6a3ce929d0e0e4736",
        );
        assert_eq!(
            h.get("traceparent").map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
        );
        assert_eq!(h.get("tracestate").map(|v| v.as_str()), Some("rojo=1"));
    }
}
