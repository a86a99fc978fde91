//! An extension served with the SDK continues the router's trace: a request whose
//! NATS headers carry `traceparent` is handled in a span whose OpenTelemetry parent
//! is the caller's span; an error reply marks it failed. Exported over OTLP/gRPC to
//! the test's receiver, as an extension author would export (their own
//! `tracing-opentelemetry` layer).

use std::time::Duration;

use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::{NatsServer, OtlpReceiver};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

struct Upper;

impl Handler for Upper {
    async fn handle(&self, request: ExtensionRequest) -> Result<Response, ExtensionError> {
        let mut message = request.payload;
        match message.payload.as_text() {
            Some("fail") => Err(ExtensionError::new("refused", "asked to fail")),
            Some(text) => {
                message.payload = text.to_uppercase().into();
                Ok(Response::transform(message))
            }
            None => Ok(Response::unchanged()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_span_is_a_child_of_the_routers_call() {
    let receiver = OtlpReceiver::start().await;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(receiver.endpoint())
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("extension"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let subject = "beamline.ext.pre.upper.v1";
    let _task = beamline_sdk::spawn(client.clone(), subject, Upper, ServeOptions::default())
        .await
        .unwrap();

    let ask = async |text: &str, traceparent: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("traceparent", traceparent);
        h.insert("tracestate", "router=1");
        h.insert("Beamline-Extension-Id", "upper");
        let body = json!({"trace_id": "t", "tenant_id": "acme",
            "payload": {"tenant_id": "acme", "payload": text}, "metadata": {}, "config": {}});
        tokio::time::timeout(
            Duration::from_secs(10),
            client.request_with_headers(subject, h, body.to_string().into()),
        )
        .await
        .expect("answered within 10 s")
        .expect("a reply")
    };
    let ok = ask(
        "hi",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    .await;
    assert!(String::from_utf8_lossy(&ok.payload).contains("HI"));
    let failed = ask(
        "fail",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .await;
    assert!(failed.headers.is_some(), "an error reply");
    // Without a traceparent: no span at all.
    let plain = client
        .request(
            subject,
            json!({"payload": {"payload": "x"}}).to_string().into(),
        )
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&plain.payload).contains('X'));

    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .unwrap();
    let spans = receiver
        .wait_for(Duration::from_secs(30), "two handler spans", |s| {
            s.len() >= 2
        })
        .await;
    assert_eq!(spans.len(), 2, "one span per traced request: {spans:#?}");
    let by_trace = |t: &str| spans.iter().find(|s| s.trace_id == t).unwrap();
    let ok = by_trace("0af7651916cd43dd8448eb211c80319c");
    assert_eq!(
        ok.parent_span_id, "b7ad6b7169203331",
        "child of the router's call"
    );
    assert_eq!(ok.name, format!("handle {subject}"));
    assert_eq!(ok.kind, 2, "a server span");
    assert_eq!(ok.attr("beamline.extension.id"), Some("upper"));
    assert!(!ok.is_error());
    let failed = by_trace("4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(failed.parent_span_id, "00f067aa0ba902b7");
    assert!(failed.is_error(), "{failed:#?}");
    assert_eq!(failed.attr("beamline.error_code"), Some("refused"));
}
