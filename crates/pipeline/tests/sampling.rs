//! Sampling decided once per request (DESIGN.md §13): an unsampled request — left
//! out by `sample_ratio`, or under a caller's unsampled `traceparent` — makes no
//! span at all, and its extensions still get a `traceparent` with the sampled flag
//! off, so they make the same decision. A sampled one makes its spans.
//!
//! Its own test binary: it turns span making on for the whole process.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use beamline_pipeline::trace;
use common::*;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

/// Counts the router's spans as they are made.
struct CountSpans(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountSpans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().target() == trace::TARGET {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn an_unsampled_request_makes_no_span_and_passes_its_decision_on() {
    let made = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(CountSpans(made.clone())),
    )
    .expect("the only subscriber of this test binary");
    trace::set_spans_enabled(true);

    let h = Harness::new(
        json!([ext("a", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}]}),
    )
    .await;
    let (_a, seen) = serve_recording(&h.client, &h.subject("a"), |_| json!({})).await;
    // The registry's sync at start is traced too; only requests count from here.
    made.store(0, Ordering::SeqCst);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let request = || {
        let mut r = h.request("x");
        r.message.trace_id = trace_id.into();
        r
    };
    let last_traceparent = || seen.lock().unwrap().last().unwrap().headers["traceparent"].clone();

    // Ratio 0, no caller's context: nothing made; the extension hears "not sampled".
    trace::set_sample_ratio(0.0);
    h.pipeline.decide(request()).await.unwrap();
    assert_eq!(
        made.load(Ordering::SeqCst),
        0,
        "no span for an unsampled request"
    );
    let tp = last_traceparent();
    assert!(
        tp.starts_with(&format!("00-{trace_id}-")) && tp.ends_with("-00"),
        "{tp}"
    );

    // A caller's unsampled context, whatever the ratio: nothing made, passed on as is.
    trace::set_sample_ratio(1.0);
    let caller = format!("00-{trace_id}-00f067aa0ba902b7-00");
    let incoming = trace::Incoming::from_lookup("test", |name| {
        (name == "traceparent").then_some(caller.as_str())
    });
    h.pipeline.decide_with(request(), incoming).await.unwrap();
    assert_eq!(made.load(Ordering::SeqCst), 0);
    assert_eq!(last_traceparent(), caller);

    // Ratio 1: the Decide, its provider selection and the step's attempt are made.
    h.pipeline.decide(request()).await.unwrap();
    let sampled = made.load(Ordering::SeqCst);
    assert!(sampled >= 3, "{sampled} spans");

    // A caller's sampled context at ratio 0: its decision wins.
    trace::set_sample_ratio(0.0);
    let caller = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let incoming = trace::Incoming::from_lookup("test", |name| {
        (name == "traceparent").then_some(caller.as_str())
    });
    h.pipeline.decide_with(request(), incoming).await.unwrap();
    assert_eq!(made.load(Ordering::SeqCst), 2 * sampled);
    trace::set_spans_enabled(false);
}
