//! The handler's span, a child of the router's call (W3C `traceparent` in the
//! request's NATS headers).

use std::future::Future;

use async_nats::{HeaderMap, HeaderName};
use beamline_model::trace::{HEADER_TRACEPARENT, HEADER_TRACESTATE, TraceParent};
use beamline_model::wire::{
    HEADER_EXTENSION_ID, HEADER_SERVICE_ERROR, HEADER_SERVICE_ERROR_CODE, HEADER_TRACE_ID,
};
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: HeaderName = HeaderName::from_static(HEADER_TRACEPARENT);
const TRACESTATE: HeaderName = HeaderName::from_static(HEADER_TRACESTATE);

/// `handle <subject>`, parented to the request's `traceparent`; none without one.
pub(crate) fn handler_span(msg: &async_nats::Message) -> Span {
    let Some(h) = msg.headers.as_ref() else {
        return Span::none();
    };
    let Some(parent) = h
        .get(TRACEPARENT)
        .and_then(|v| TraceParent::parse(v.as_str()))
    else {
        return Span::none();
    };
    let text = |name: &str| h.get(name).map(|v| v.as_str().to_string());
    let subject = msg.subject.as_str();
    let span = tracing::info_span!(
        target: "beamline_sdk",
        "handle",
        otel.name = %format_args!("handle {subject}"),
        otel.kind = "server",
        messaging.system = "nats",
        messaging.destination.name = subject,
        beamline.extension.id = text(HEADER_EXTENSION_ID),
        beamline.trace_id = text(HEADER_TRACE_ID),
        beamline.error_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let _ = span.set_parent(remote_context(&parent, h));
    }
    span
}

fn remote_context(parent: &TraceParent, h: &HeaderMap) -> opentelemetry::Context {
    let state = h
        .get(TRACESTATE)
        .and_then(|v| v.as_str().parse::<TraceState>().ok())
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

pub(crate) async fn within<T>(span: &Span, fut: impl Future<Output = T>) -> T {
    if span.is_none() {
        return fut.await;
    }
    tracing::Instrument::instrument(fut, span.clone()).await
}

/// An error reply (its NATS micro headers) marks the span as failed.
pub(crate) fn ended(span: &Span, error_headers: Option<&HeaderMap>) {
    let Some(h) = error_headers.filter(|_| !span.is_none()) else {
        return;
    };
    let code = h
        .get(HEADER_SERVICE_ERROR_CODE)
        .map(|v| v.as_str())
        .unwrap_or("extension_error");
    span.record("beamline.error_code", code);
    let message = h
        .get(HEADER_SERVICE_ERROR)
        .map(|v| v.as_str())
        .unwrap_or("");
    span.set_status(Status::error(format!("{code}: {message}")));
}
