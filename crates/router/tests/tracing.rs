//! Distributed tracing end to end (DESIGN.md §13): the real binary with `[tracing]
//! endpoint` pointing at an OTLP/gRPC receiver built from the official OpenTelemetry
//! protocol definitions (`beamline_test_support::OtlpReceiver`, what a Collector
//! receives), Node extensions written to the original's contract, and a Decide with a
//! W3C `traceparent` through each intake. What the receiver gets is asserted: the
//! caller's trace id, the parent links, one span per executed step with its
//! attributes, error status on a failed step; and the Node extension that reads
//! headers (`tests/conformance/trace_probe.js`) shows the `traceparent` it received.
//!
//! Needs Node.js and the npm packages of `tests/conformance/package-lock.json`
//! (`scripts/test` installs them and sets `BEAMLINE_CONFORMANCE_NODE_MODULES`).

mod common;

use std::process::Stdio;
use std::time::Duration;

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_test_support::{NatsServer, OtlpReceiver, ReceivedSpan};
use common::node::*;
use common::*;
use serde_json::{Value, json};

const SETUP_SQL: &str = r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry, enabled, config, metadata) VALUES
 ('trace_probe', 'pre', 'beamline.ext.pre.trace_probe.v1', 5000, 0, true, '{}', '{}');
UPDATE extensions SET timeout_ms = 5000;
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
 ('traced', 'default', '{"providers": [{"name": "test_provider", "weight": 100, "extension": "test_provider"}], "pre": [{"id": "trace_probe", "mode": "required"}, {"id": "normalize_text", "mode": "required"}], "validators": [{"id": "pii_guard", "on_fail": "block"}], "post": [{"id": "mask_pii", "mode": "required"}]}');
"#;

/// Caller ids, as a gateway would send them.
const TRACE_GRPC: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT_GRPC: &str = "b7ad6b7169203331";
const TRACE_NATS: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_NATS: &str = "00f067aa0ba902b7";

struct Setup {
    router: Router,
    nats: NatsServer,
    receiver: OtlpReceiver,
    probe: NodeExtension,
    _extensions: Vec<NodeExtension>,
    _db: beamline_test_support::TestDatabase,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let modules = node_modules();
    let receiver = OtlpReceiver::start().await;
    let nats = NatsServer::start();
    let db = migrated_database().await;
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    sqlx::raw_sql(SETUP_SQL).execute(&pool).await.unwrap();
    let probe = start_extension("trace_probe.js", &nats.url(), &modules);
    let extensions = [
        "normalize_text.js",
        "pii_guard.js",
        "test_provider.js",
        "mask_pii.js",
    ]
    .into_iter()
    .map(|f| start_extension(f, &nats.url(), &modules))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[tracing]
endpoint = "{}"
sample_ratio = 1.0
service_name = "router-under-test"
export_interval_ms = 100

[tracing.resource_attributes]
"deployment.environment" = "test"
"#,
        receiver.endpoint()
    );
    let config = write_config(dir.path(), db.url(), &nats.url(), &extra);
    let mut command = bin();
    // The per-call debug line, to see that a request's log lines carry its ids.
    command
        .env("RUST_LOG", "info,beamline_pipeline=debug")
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null());
    let router = start_command(command);
    Setup {
        router,
        nats,
        receiver,
        probe,
        _extensions: extensions,
        _db: db,
        _dir: dir,
    }
}

fn request(tenant: &str, text: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: "m-1".into(),
            tenant_id: tenant.into(),
            trace_id: String::new(),
            message_type: "chat".into(),
            payload: text.as_bytes().to_vec(),
            metadata: Default::default(),
            timestamp_ms: 0,
        }),
        policy_id: String::new(),
        context: Default::default(),
    }
}

/// The spans of one trace, once its Decide span (which ends last) has arrived.
async fn trace_of(receiver: &OtlpReceiver, trace_id: &str) -> Vec<ReceivedSpan> {
    receiver
        .wait_for(
            Duration::from_secs(60),
            &format!("the Decide span of trace {trace_id}"),
            |spans| {
                spans
                    .iter()
                    .any(|s| s.trace_id == trace_id && s.name == "Decide")
            },
        )
        .await
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one span {name:?} in {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

/// The next `traceparent` line the probe printed (bounded wait).
fn probe_saw(probe: &NodeExtension) -> (String, String) {
    let line = probe
        .lines
        .recv_timeout(Duration::from_secs(30))
        .expect("trace_probe.js printed what it received within 30 s");
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("traceparent"), "{line}");
    let traceparent = words.next().unwrap_or_default().to_string();
    assert_eq!(words.next(), Some("tracestate"), "{line}");
    (traceparent, words.next().unwrap_or_default().to_string())
}

// Several threads: the receiver keeps answering while the test blocks on a child's
// output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decide_continues_the_callers_trace_through_both_intakes() {
    let s = setup().await;
    let mut client = RouterClient::connect(s.router.addr.clone()).await.unwrap();

    // --- gRPC, traceparent and tracestate in the metadata, every step succeeding.
    let mut req = tonic::Request::new(request("traced", "  Hello   THERE "));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_GRPC}-{PARENT_GRPC}-01").parse().unwrap(),
    );
    req.metadata_mut()
        .insert("tracestate", "gateway=edge-1".parse().unwrap());
    let decision = client.decide(req).await.expect("decide").into_inner();
    let final_message = decision.final_message.expect("final message");
    assert_eq!(
        final_message.trace_id, TRACE_GRPC,
        "the caller's trace id is the request's"
    );

    let (traceparent, tracestate) = probe_saw(&s.probe);
    let spans = trace_of(&s.receiver, TRACE_GRPC).await;
    let decide = one(&spans, "Decide");
    assert_eq!(
        decide.parent_span_id, PARENT_GRPC,
        "child of the caller's span"
    );
    assert_eq!(decide.kind, 2, "a server span");
    assert!(!decide.is_error(), "{decide:#?}");
    assert_eq!(decide.attr("beamline.intake"), Some("grpc"));
    assert_eq!(decide.attr("beamline.tenant_id"), Some("traced"));
    assert_eq!(decide.attr("beamline.policy_id"), Some("default"));
    assert_eq!(decide.attr("beamline.provider_id"), Some("test_provider"));
    assert_eq!(decide.attr("trace_id"), Some(TRACE_GRPC));
    assert_eq!(
        decide.resource.get("service.name").map(String::as_str),
        Some("router-under-test")
    );
    assert_eq!(
        decide
            .resource
            .get("deployment.environment")
            .map(String::as_str),
        Some("test")
    );

    let selection = one(&spans, "provider selection");
    assert_eq!(selection.parent_span_id, decide.span_id);
    assert_eq!(
        selection.attr("beamline.provider_id"),
        Some("test_provider")
    );

    // One span per executed step, each a child of the Decide span (the provider's of
    // the selection), with what an SRE needs to find the slow or failing one.
    let steps = [
        ("pre trace_probe", "trace_probe", "pre", &decide.span_id),
        (
            "pre normalize_text",
            "normalize_text",
            "pre",
            &decide.span_id,
        ),
        (
            "validator pii_guard",
            "pii_guard",
            "validator",
            &decide.span_id,
        ),
        (
            "provider test_provider",
            "test_provider",
            "provider",
            &selection.span_id,
        ),
        ("post mask_pii", "mask_pii", "post", &decide.span_id),
    ];
    for (name, id, ext_type, parent) in steps {
        let step = one(&spans, name);
        assert_eq!(&step.parent_span_id, parent, "{name}: parent");
        assert_eq!(step.kind, 3, "{name}: a client span");
        assert!(!step.is_error(), "{name}: {step:#?}");
        assert_eq!(step.attr("beamline.extension.id"), Some(id), "{name}");
        assert_eq!(
            step.attr("beamline.extension.type"),
            Some(ext_type),
            "{name}"
        );
        assert_eq!(step.attr("beamline.attempt"), Some("1"), "{name}");
        assert_eq!(step.attr("beamline.status"), Some("success"), "{name}");
        assert_eq!(
            step.attr("beamline.breaker.state"),
            Some("closed"),
            "{name}"
        );
        assert_eq!(step.attr("messaging.system"), Some("nats"), "{name}");
        assert!(
            step.attr("beamline.extension.version").is_some(),
            "{name}: {step:#?}"
        );
        assert!(
            step.start_unix_nano >= decide.start_unix_nano
                && step.end_unix_nano <= decide.end_unix_nano,
            "{name} lies within the Decide span"
        );
    }
    assert_eq!(
        one(&spans, "validator pii_guard").attr("beamline.extension.instance"),
        Some("pii-a"),
        "the balancer's pick"
    );
    assert_eq!(
        spans.len(),
        7,
        "Decide, selection and five steps: {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    // The Node extension received the router's context: same trace, its own call's
    // span as parent, sampled; and the caller's tracestate.
    let probe_span = one(&spans, "pre trace_probe");
    assert_eq!(
        traceparent,
        format!("00-{TRACE_GRPC}-{}-01", probe_span.span_id),
        "traceparent in the NATS headers of the extension request"
    );
    assert_eq!(tracestate, "gateway=edge-1");

    // The request's log lines carry its trace id and span id.
    common::wait_until(30, "a log line of the request with its ids", async || {
        s.router.log.lock().unwrap().lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["message"] == "extension invocation"
                    && v["span"]["trace_id"] == TRACE_GRPC
                    && v["span"]["span_id"] == decide.span_id.as_str()
            })
        })
    })
    .await;

    // --- NATS intake, traceparent header, a required step failing.
    let nc = async_nats::connect(s.nats.url()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{TRACE_NATS}-{PARENT_NATS}-01").as_str(),
    );
    let body = json!({"version": "1", "request_id": "r-nats", "tenant_id": "traced",
        "trace_id": "the-body-id", "task": {"type": "chat", "payload": "please fail-probe"}});
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        nc.request_with_headers(
            "beamline.router.v1.decide",
            headers,
            serde_json::to_vec(&body).unwrap().into(),
        ),
    )
    .await
    .expect("the intake answered within 30 s")
    .expect("intake reply");
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "pre_processor_failed", "{reply}");
    assert_eq!(
        reply["context"]["trace_id"], TRACE_NATS,
        "the traceparent's trace id wins over the body's: {reply}"
    );

    let (traceparent, tracestate) = probe_saw(&s.probe);
    let spans = trace_of(&s.receiver, TRACE_NATS).await;
    let decide = one(&spans, "Decide");
    assert_eq!(decide.parent_span_id, PARENT_NATS);
    assert_eq!(decide.attr("beamline.intake"), Some("nats"));
    assert!(
        decide.is_error(),
        "a failed Decide is an error: {decide:#?}"
    );
    assert_eq!(
        decide.attr("beamline.error_code"),
        Some("pre_processor_failed")
    );
    assert!(
        decide.status_message.starts_with("pre_processor_failed"),
        "{decide:#?}"
    );
    let failed = one(&spans, "pre trace_probe");
    assert_eq!(failed.parent_span_id, decide.span_id);
    assert!(
        failed.is_error(),
        "the failed step is an error: {failed:#?}"
    );
    assert_eq!(failed.attr("beamline.status"), Some("error"));
    assert_eq!(failed.attr("beamline.error_code"), Some("extension_error"));
    assert_eq!(
        failed.attr("beamline.extension.error_code"),
        Some("probe_failed")
    );
    assert_eq!(
        spans.len(),
        2,
        "nothing ran after the failed required step: {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(
        traceparent,
        format!("00-{TRACE_NATS}-{}-01", failed.span_id)
    );
    assert_eq!(tracestate, "-", "no tracestate came, none is sent");

    // --- No traceparent: the router's own trace id is the OpenTelemetry one.
    let decision = client
        .decide(request("traced", "no context"))
        .await
        .expect("decide")
        .into_inner();
    let own = decision.final_message.expect("final message").trace_id;
    assert_eq!(own.len(), 32, "{own}");
    let (traceparent, _) = probe_saw(&s.probe);
    let spans = trace_of(&s.receiver, &own).await;
    let decide = one(&spans, "Decide");
    assert_eq!(decide.parent_span_id, "", "a root span");
    assert!(
        traceparent.starts_with(&format!("00-{own}-")),
        "{traceparent}"
    );

    // The registry's syncs are spans too.
    let syncs = s
        .receiver
        .wait_for(Duration::from_secs(30), "a registry sync span", |spans| {
            spans.iter().any(|s| s.name == "registry sync")
        })
        .await;
    let sync = syncs.iter().find(|s| s.name == "registry sync").unwrap();
    assert_eq!(
        sync.attr("beamline.registry.outcome"),
        Some("success"),
        "{sync:#?}"
    );
    assert!(
        sync.attr("beamline.registry.trigger").is_some(),
        "{sync:#?}"
    );
    assert!(sync.attr("beamline.registry.scope").is_some(), "{sync:#?}");
    assert!(sync.attr("beamline.registry.rows").is_some(), "{sync:#?}");

    // /metrics has the dropped-span counter (nothing dropped here).
    let (code, page) = http_get(&s.router.http, "/metrics");
    assert_eq!(code, 200);
    assert!(
        page.contains("router_tracing_spans_dropped_total{reason=\"queue_full\"} 0"),
        "{page}"
    );
}
