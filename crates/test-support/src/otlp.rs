//! An OTLP/gRPC trace receiver for tests, built from the official OpenTelemetry
//! protocol definitions (`opentelemetry-proto`): it answers `TraceService/Export` as
//! an OpenTelemetry Collector would and keeps every span it receives, flattened into
//! [`ReceivedSpan`]s (ids in hex, attributes as text), for the test to assert on.
//!
//! It serves on the runtime it was started in: use a multi-threaded one when the test
//! also blocks its thread (waiting on a child process), or exports may time out.
//!
//! ```no_run
//! # async fn t() {
//! let receiver = beamline_test_support::OtlpReceiver::start().await;
//! // … point `[tracing] endpoint` at receiver.endpoint() …
//! let spans = receiver
//!     .wait_for(std::time::Duration::from_secs(30), "a decide span", |s| {
//!         s.iter().any(|s| s.name == "Decide")
//!     })
//!     .await;
//! # }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One received span.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// The span's name (`Decide`, `pre normalize_text`, …).
    pub name: String,
    /// `SPAN_KIND_*` of the protocol: 1 internal, 2 server, 3 client.
    pub kind: i32,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// The status's description (errors).
    pub status_message: String,
    /// The span's attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// The names of its events.
    pub events: Vec<String>,
    /// The resource's attributes (`service.name`, …).
    pub resource: BTreeMap<String, String>,
    /// Start, nanoseconds since the epoch.
    pub start_unix_nano: u64,
    /// End, nanoseconds since the epoch.
    pub end_unix_nano: u64,
}

impl ReceivedSpan {
    /// The attribute `key` as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    /// Whether its status is ERROR.
    pub fn is_error(&self) -> bool {
        self.status_code == 2
    }
}

#[derive(Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    requests: usize,
}

struct Service(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let status = s.status.unwrap_or_default();
                    got.push(ReceivedSpan {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name,
                        kind: s.kind,
                        status_code: status.code,
                        status_message: status.message,
                        attributes: attributes(&s.attributes),
                        events: s.events.into_iter().map(|e| e.name).collect(),
                        resource: resource.clone(),
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                    });
                }
            }
        }
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        r.requests += 1;
        r.spans.extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| text(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A running receiver on 127.0.0.1; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// Binds a free port on 127.0.0.1 and serves OTLP/gRPC traces there.
    pub async fn start() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("OTLP receiver: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("OTLP receiver: local address");
        let received = Arc::new(Mutex::new(Received::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(Service(received.clone()));
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        OtlpReceiver {
            addr,
            received,
            stop: Some(stop),
            task,
        }
    }

    /// `http://127.0.0.1:PORT`: what `[tracing] endpoint` takes.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.lock().spans.clone()
    }

    /// Export requests answered so far.
    pub fn requests(&self) -> usize {
        self.lock().requests
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        let mut r = self.lock();
        r.spans.clear();
        r.requests = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds for the spans received (polling), and returns them;
    /// panics naming `what` after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if Instant::now() >= deadline {
                panic!(
                    "OTLP receiver: timed out after {timeout:?} waiting for {what}; received {} span(s): {:#?}",
                    spans.len(),
                    spans
                        .iter()
                        .map(|s| (&s.name, &s.trace_id, &s.span_id, &s.parent_span_id))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}
