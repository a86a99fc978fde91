//! OpenTelemetry export (`[tracing]`, DESIGN.md §13): the router's spans (see
//! `beamline_pipeline::trace`) go through `tracing-opentelemetry` to an OTLP/gRPC
//! exporter, batched, sampled parent-based.
//!
//! Off unless `[tracing] endpoint` is set: then no exporter, no OpenTelemetry layer,
//! and the span switch stays off, so no request makes a span. On, the export never
//! holds up a request — finished spans go to a bounded queue, and what does not fit
//! is dropped and counted (`router_tracing_spans_dropped_total{reason="queue_full"}`),
//! as are batches the collector refuses or that time out (`reason="export_failed"`)
//! — and never holds up the stop longer than [`crate::serve::TRACING_BOUND`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use beamline_pipeline::trace::{self, DropReason};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use serde::{Deserialize, Serialize};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};

use crate::config::LogConfig;

/// `[tracing]`: where spans are exported, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC endpoint of an OpenTelemetry Collector, Jaeger or Tempo, e.g.
    /// `http://127.0.0.1:4317` (`https://` for TLS, verified against the system's
    /// roots and `tls_ca_file`). Empty (the default): tracing is off and no span is
    /// made.
    pub endpoint: String,
    /// Share of new traces kept, 0.0 to 1.0, for requests that come without a
    /// caller's `traceparent`. A caller's context decides for its own requests
    /// (parent-based): sampled stays sampled, unsampled stays unsampled.
    pub sample_ratio: f64,
    /// The spans' `service.name`.
    pub service_name: String,
    /// More resource attributes, e.g. `deployment.environment = "prod"`
    /// (`OTEL_RESOURCE_ATTRIBUTES` is read too; these win).
    pub resource_attributes: BTreeMap<String, String>,
    /// Finished spans waiting for export at most; more are dropped and counted in
    /// `router_tracing_spans_dropped_total{reason="queue_full"}`.
    pub max_queue_size: usize,
    /// Spans per export request at most.
    pub max_export_batch_size: usize,
    /// How often the queue is exported, milliseconds.
    pub export_interval_ms: u64,
    /// How long one export request may take, milliseconds.
    pub export_timeout_ms: u64,
    /// PEM CA bundle trusted for an `https://` endpoint, besides the system's roots.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            endpoint: String::new(),
            sample_ratio: 1.0,
            service_name: "beamline-router".to_string(),
            resource_attributes: BTreeMap::new(),
            max_queue_size: 2048,
            max_export_batch_size: 512,
            export_interval_ms: 1000,
            export_timeout_ms: 5000,
            tls_ca_file: None,
        }
    }
}

impl TracingConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoint.trim().is_empty()
    }

    /// Checks every key; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: String| Err((format!("tracing.{key}"), message));
        if !(self.sample_ratio.is_finite() && (0.0..=1.0).contains(&self.sample_ratio)) {
            return bad(
                "sample_ratio",
                format!("{} is out of range 0.0..=1.0", self.sample_ratio),
            );
        }
        if self.service_name.trim().is_empty() {
            return bad("service_name", "must not be empty".into());
        }
        if let Some(k) = self
            .resource_attributes
            .keys()
            .find(|k| k.trim().is_empty())
        {
            return bad(
                "resource_attributes",
                format!("attribute name {k:?} is empty"),
            );
        }
        if !(1..=1_000_000).contains(&self.max_queue_size) {
            return bad(
                "max_queue_size",
                format!("{} is out of range 1..=1000000", self.max_queue_size),
            );
        }
        if !(1..=self.max_queue_size).contains(&self.max_export_batch_size) {
            return bad(
                "max_export_batch_size",
                format!(
                    "{} is out of range 1..=max_queue_size ({})",
                    self.max_export_batch_size, self.max_queue_size
                ),
            );
        }
        for (key, v) in [
            ("export_interval_ms", self.export_interval_ms),
            ("export_timeout_ms", self.export_timeout_ms),
        ] {
            if !(1..=60_000).contains(&v) {
                return bad(key, format!("{v} is out of range 1..=60000"));
            }
        }
        if !self.enabled() {
            return Ok(());
        }
        let url = match url::Url::parse(self.endpoint.trim()) {
            Ok(u) => u,
            Err(e) => {
                return bad(
                    "endpoint",
                    format!(
                        "'{}' is not a URL like http://127.0.0.1:4317: {e}",
                        beamline_model::secret::redact_url(&self.endpoint)
                    ),
                );
            }
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return bad(
                "endpoint",
                format!(
                    "'{}' must be http://HOST:PORT or https://HOST:PORT (OTLP over gRPC)",
                    beamline_model::secret::redact_url(&self.endpoint)
                ),
            );
        }
        if let Some(ca) = &self.tls_ca_file {
            if url.scheme() != "https" {
                return bad("tls_ca_file", "needs an https:// endpoint".into());
            }
            std::fs::read(ca).map_err(|e| {
                (
                    "tracing.tls_ca_file".to_string(),
                    format!("cannot read {}: {e}", ca.display()),
                )
            })?;
        }
        Ok(())
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing.endpoint: cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("tracing.tls_ca_file: cannot read {path}: {message}")]
    CaFile { path: PathBuf, message: String },
}

/// The installed exporter; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Sets up logging, and tracing when `[tracing] endpoint` is set: exporter, tracer,
/// the `tracing` layer, then turns span making on.
pub fn init(log: &LogConfig, config: &TracingConfig) -> Result<Option<Telemetry>, TelemetryError> {
    if !config.enabled() {
        crate::logging::init(log);
        return Ok(None);
    }
    let provider = provider(config)?;
    let tracer = provider.tracer("beamline-router");
    // Only the router's own spans (and warnings, as span events); no code locations,
    // thread names or busy/idle timings: what a span costs stays small.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(
            Targets::new()
                .with_target(trace::TARGET, LevelFilter::TRACE)
                .with_target("beamline_sdk", LevelFilter::INFO)
                .with_default(LevelFilter::WARN),
        );
    if crate::logging::init_with(log, Some(Box::new(layer))) {
        // The pipeline decides per request, by the same rule as the sampler below,
        // so that an unsampled request makes no span at all.
        trace::set_sample_ratio(config.sample_ratio);
        trace::set_spans_enabled(true);
        tracing::info!(
            endpoint = %beamline_model::secret::redact_url(&config.endpoint),
            sample_ratio = config.sample_ratio,
            service_name = %config.service_name,
            "tracing: exporting spans over OTLP/gRPC"
        );
    }
    Ok(Some(Telemetry { provider }))
}

/// The tracer provider of `config`: OTLP/gRPC exporter, bounded batch processor,
/// parent-based ratio sampler, request-id trace ids, the resource.
pub fn provider(config: &TracingConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let endpoint = config.endpoint.trim();
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_millis(config.export_timeout_ms));
    if endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(path) = &config.tls_ca_file {
            let pem = std::fs::read(path).map_err(|e| TelemetryError::CaFile {
                path: path.clone(),
                message: e.to_string(),
            })?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        builder = builder.with_tls_config(tls);
    }
    let exporter = builder.build()?;
    let gate = Arc::new(Gate {
        pending: AtomicUsize::new(0),
        capacity: config.max_queue_size,
    });
    let batch = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        gate: gate.clone(),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size)
            .with_max_export_batch_size(config.max_export_batch_size)
            .with_scheduled_delay(Duration::from_millis(config.export_interval_ms))
            .build(),
    )
    .build();
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(Bounded { inner: batch, gate })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_id_generator(trace::RequestIdGenerator::default())
        .with_resource(resource)
        .build())
}

impl Telemetry {
    /// Exports what is queued and stops the exporter, for at most `bound` whatever
    /// the collector does (then the rest is abandoned).
    pub async fn shutdown(self, bound: Duration) {
        let provider = self.provider;
        let inner = bound.saturating_sub(Duration::from_millis(100));
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(inner));
        match tokio::time::timeout(bound, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(
                error = %e,
                bound_ms = bound.as_millis() as u64,
                "tracing: the last spans were not all exported at shutdown (collector unreachable or slow?); stopping anyway"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "tracing: the exporter's shutdown failed"),
            Err(_) => tracing::warn!(
                bound_ms = bound.as_millis() as u64,
                "tracing: the exporter did not stop within its bound; stopping anyway"
            ),
        }
    }
}

/// How many finished spans are queued or being exported; the queue's bound.
#[derive(Debug)]
struct Gate {
    pending: AtomicUsize,
    capacity: usize,
}

/// The batch processor behind a gate that counts what it drops: a span that would
/// not fit in the queue is dropped here and counted, so the queue itself never
/// overflows unseen.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    gate: Arc<Gate>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.gate.pending.fetch_add(1, Ordering::AcqRel) >= self.gate.capacity {
            self.gate.pending.fetch_sub(1, Ordering::AcqRel);
            trace::count_dropped(DropReason::QueueFull, 1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, telling the gate when spans leave the queue and counting the
/// batches that fail.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    gate: Arc<Gate>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let _ = self
            .gate
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(n))
            });
        let result = self.inner.export(batch).await;
        if result.is_err() {
            trace::count_dropped(DropReason::ExportFailed, n as u64);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use beamline_pipeline::trace::{TraceParent, remote_context};
    use beamline_test_support::OtlpReceiver;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn parent(flags: u8) -> opentelemetry::Context {
        remote_context(
            &TraceParent {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                parent_id: 0x00f067aa0ba902b7,
                flags,
            },
            None,
        )
    }

    /// Makes three finished spans through `provider`: a new trace, one under an
    /// unsampled caller, one under a sampled caller.
    fn three_spans(provider: &SdkTracerProvider) {
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let root = tracing::info_span!("new_trace");
            let _ = root.context();
            drop(root);
            for (name, flags) in [("unsampled_parent", 0), ("sampled_parent", 1)] {
                let span = tracing::info_span!("child", otel.name = name);
                span.set_parent(parent(flags)).unwrap();
                let _ = span.context();
            }
        });
    }

    async fn flush(provider: &SdkTracerProvider) {
        let p = provider.clone();
        tokio::task::spawn_blocking(move || p.force_flush())
            .await
            .unwrap()
            .unwrap();
    }

    fn names(receiver: &OtlpReceiver) -> Vec<String> {
        receiver.spans().into_iter().map(|s| s.name).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sampling_is_parent_based_and_ratio_0_exports_nothing_of_its_own() {
        let receiver = OtlpReceiver::start().await;
        let config = |ratio| TracingConfig {
            endpoint: receiver.endpoint(),
            sample_ratio: ratio,
            export_interval_ms: 60_000,
            ..TracingConfig::default()
        };
        // Ratio 0: new traces and unsampled callers export nothing; a sampled caller's
        // trace is kept (parent-based).
        let provider = provider(&config(0.0)).unwrap();
        three_spans(&provider);
        flush(&provider).await;
        assert_eq!(names(&receiver), ["sampled_parent"]);
        receiver.clear();
        // Ratio 1: everything but the unsampled caller's.
        let provider = super::provider(&config(1.0)).unwrap();
        three_spans(&provider);
        flush(&provider).await;
        let mut got = names(&receiver);
        got.sort();
        assert_eq!(got, ["new_trace", "sampled_parent"]);
        let spans = receiver.spans();
        let child = spans.iter().find(|s| s.name == "sampled_parent").unwrap();
        assert_eq!(child.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(child.parent_span_id, "00f067aa0ba902b7");
        assert_eq!(
            child.resource.get("service.name").map(String::as_str),
            Some("beamline-router")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_collector_drops_spans_and_counts_them_instead_of_waiting() {
        // A collector that never answers: TCP connects, nothing else happens.
        let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = TracingConfig {
            endpoint: format!("http://{}", black_hole.local_addr().unwrap()),
            max_queue_size: 4,
            max_export_batch_size: 4,
            export_interval_ms: 60_000,
            export_timeout_ms: 500,
            ..TracingConfig::default()
        };
        let dropped = |reason: DropReason| {
            trace::spans_dropped()
                .into_iter()
                .find(|(r, _)| *r == reason)
                .map_or(0, |(_, n)| n)
        };
        let (full_before, failed_before) = (
            dropped(DropReason::QueueFull),
            dropped(DropReason::ExportFailed),
        );
        let provider = provider(&config).unwrap();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..100 {
                let span = tracing::info_span!("work");
                let _ = span.context();
            }
        });
        // At most one batch is out (stuck) and one queued: the rest was dropped and
        // counted rather than waited for.
        let full = dropped(DropReason::QueueFull) - full_before;
        assert!(full >= 100 - 8, "{full} dropped for a full queue");
        // The batch that went out fails at its timeout and is counted too.
        let deadline = Instant::now() + Duration::from_secs(30);
        while dropped(DropReason::ExportFailed) == failed_before {
            assert!(Instant::now() < deadline, "the failed export was counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = provider.clone();
        let _ = tokio::task::spawn_blocking(move || {
            p.shutdown_with_timeout(Duration::from_millis(100))
        })
        .await;
        drop(black_hole);
    }
}
