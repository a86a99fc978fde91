//! Conformance: extensions written as the original router's Node samples are
//! (`tests/conformance/*.js`: nats.js v2, no queue group, no headers read, REFERENCE.md
//! §3a), registered with the original's seed SQL, called through the real binary's two
//! intakes (NATS `beamline.router.v1.decide` and gRPC `Router/Decide`).
//!
//! The case to hold: a provider echoes an SSN-like string that passed the validator,
//! and the caller receives it masked by the post-processor.
//!
//! Needs Node.js and the npm packages of `tests/conformance/package-lock.json`, which
//! `scripts/test` installs into a cache directory and passes as
//! `BEAMLINE_CONFORMANCE_NODE_MODULES`. Without them this test fails and says how to
//! get them.

mod common;

use std::time::Duration;

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_test_support::NatsServer;
use common::node::*;
use common::*;
use serde_json::{Value, json};

/// The original's seed, one more post-processor written to its API document, and a
/// policy for tenant acme that calls the provider's extension and both post steps.
const SETUP_SQL: &str = r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry, enabled, config, metadata) VALUES
 ('sign_answer', 'post', 'beamline.ext.post.sign_answer.v1', 150, 0, true, '{}', '{}'),
 ('enrich_object', 'pre', 'beamline.ext.pre.enrich_object.v1', 150, 0, true, '{}', '{}');
-- Node's first calls may be slow on a busy machine: the runbook's way to raise timeouts.
UPDATE extensions SET timeout_ms = 5000;
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
 ('acme', 'default', '{"providers": [{"name": "test_provider", "weight": 100, "extension": "test_provider", "parameters": {"max_tokens": 512}}], "pre": [{"id": "normalize_text", "mode": "required"}], "validators": [{"id": "pii_guard", "on_fail": "block"}], "post": [{"id": "mask_pii", "mode": "required"}, {"id": "sign_answer", "mode": "required"}]}'),
-- Decision-only routing (no provider extension): post runs on the message.
 ('objects', 'default', '{"providers": [{"name": "upstream", "weight": 100}], "pre": [{"id": "normalize_text"}, {"id": "enrich_object"}], "validators": [{"id": "pii_guard"}], "post": [{"id": "mask_pii"}]}');
"#;

fn grpc_request(text: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: "m-1".into(),
            tenant_id: "acme".into(),
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

fn statuses(executed: &Value) -> Vec<(String, String)> {
    executed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The original's seed plus [`SETUP_SQL`] in a fresh database, every conformance
/// extension running, and the real binary serving both intakes.
struct Setup {
    router: Router,
    nats: NatsServer,
    _extensions: Vec<NodeExtension>,
    _db: beamline_test_support::TestDatabase,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let modules = node_modules();
    let nats = NatsServer::start();
    let db = migrated_database().await;
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    sqlx::raw_sql(SETUP_SQL).execute(&pool).await.unwrap();
    let extensions = [
        "normalize_text.js",
        "pii_guard.js",
        "test_provider.js",
        "mask_pii.js",
        "sign_answer.js",
        "enrich_object.js",
    ]
    .into_iter()
    .map(|f| start_extension(f, &nats.url(), &modules))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    Setup {
        router,
        nats,
        _extensions: extensions,
        _db: db,
        _dir: dir,
    }
}

/// Asks the NATS intake, waiting 30 s at most.
async fn ask(nc: &async_nats::Client, body: Value) -> Value {
    let msg = tokio::time::timeout(
        Duration::from_secs(30),
        nc.request(
            "beamline.router.v1.decide",
            serde_json::to_vec(&body).unwrap().into(),
        ),
    )
    .await
    .expect("intake answered within 30 s")
    .expect("intake reply");
    serde_json::from_slice::<Value>(&msg.payload).unwrap()
}

#[tokio::test]
async fn extensions_written_for_the_original_work_unchanged_through_both_intakes() {
    // Bound whole: the extensions and the database live as long as the test.
    let s = setup().await;
    let (router, nats) = (&s.router, &s.nats);

    // The NATS intake, the original's JSON contract, no trace id sent.
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let ask = |body: Value| {
        let nc = nc.clone();
        async move { ask(&nc, body).await }
    };
    let ok = ask(
        json!({"version": "1", "request_id": "r-1", "tenant_id": "acme",
        "task": {"type": "chat", "payload": "  My SSN is   123 45 6789  "}}),
    )
    .await;
    assert_eq!(ok["ok"], true, "{ok}");
    let decision = &ok["decision"];
    assert_eq!(
        statuses(&decision["executed_extensions"]),
        pairs(&[
            ("normalize_text", "ok"),
            ("pii_guard", "ok"),
            ("test_provider", "ok"),
            ("mask_pii", "ok"),
            ("sign_answer", "ok"),
        ]),
        "{ok}"
    );
    let output = &decision["provider_output"];
    assert_eq!(
        output["output"], "Mock response to: my ssn is ***-**-**** [reviewed]",
        "the provider read the prompt after pre; its echo of the SSN reached the caller masked: {ok}"
    );
    assert!(
        !ok.to_string().contains("Mock response to: my ssn is 123"),
        "{ok}"
    );
    // Fractional usage, rounded: 21 / 4 = 5.25, 39 / 4 = 9.75, 15.
    assert_eq!(
        (
            &output["prompt_tokens"],
            &output["completion_tokens"],
            &output["total_tokens"]
        ),
        (&json!(5), &json!(10), &json!(15)),
        "{output}"
    );
    let trace = ok["context"]["trace_id"].as_str().expect("a trace id");
    assert_eq!(trace.len(), 32, "generated: {trace}");
    assert_eq!(
        decision["metadata"]["seen_trace_id"], trace,
        "the provider got the trace id the reply carries"
    );
    assert_eq!(
        decision["metadata"]["max_tokens"], "512",
        "parameters from the policy"
    );
    assert_eq!(
        decision["message"]["payload"], "my ssn is 123 45 6789",
        "the request after pre"
    );

    // A validator's reject reads "reject", with its cause; its details stay private.
    let blocked = ask(
        json!({"version": "1", "request_id": "r-2", "tenant_id": "acme",
        "task": {"type": "chat", "payload": "my ssn is 123-45-6789"}}),
    )
    .await;
    assert_eq!(blocked["ok"], false, "{blocked}");
    let error = &blocked["error"];
    assert_eq!(error["code"], "validator_blocked", "{blocked}");
    assert_eq!(error["details"]["cause"], "rejected", "{blocked}");
    assert_eq!(error["details"]["reason"], "pii_detected", "{blocked}");
    assert!(error["details"].get("details").is_none(), "{blocked}");
    assert!(!blocked.to_string().contains("123-45-6789"), "{blocked}");
    assert_eq!(
        statuses(&error["details"]["executed_extensions"]),
        pairs(&[("normalize_text", "ok"), ("pii_guard", "reject")])
    );

    // The provider's error shape is an extension error whose code reaches the caller.
    let failed = ask(
        json!({"version": "1", "request_id": "r-3", "tenant_id": "acme",
        "task": {"type": "chat", "payload": "please explode"}}),
    )
    .await;
    assert_eq!(failed["error"]["code"], "decision_failed", "{failed}");
    assert_eq!(
        failed["error"]["details"]["extension_error"],
        json!({"code": "provider_exception", "message": "the mock model exploded"}),
        "{failed}"
    );

    // gRPC, the same request.
    let mut client = RouterClient::connect(router.addr.clone()).await.unwrap();
    let d = client
        .decide(grpc_request("  My SSN is   123 45 6789  "))
        .await
        .expect("decide")
        .into_inner();
    let out = d.provider_output.expect("provider output");
    assert_eq!(
        out.output_json,
        r#""Mock response to: my ssn is ***-**-**** [reviewed]""#
    );
    assert_eq!(
        (out.prompt_tokens, out.completion_tokens, out.total_tokens),
        (5, 10, 15)
    );
    let final_message = d.final_message.unwrap();
    assert_eq!(final_message.trace_id.len(), 32);
    assert_eq!(
        d.metadata["seen_trace_id"], final_message.trace_id,
        "one trace id: generated, sent to the extension, returned"
    );
    let statuses: Vec<(String, String)> = d
        .executed_extensions
        .iter()
        .map(|e| (e.id.clone(), e.status.clone()))
        .collect();
    assert!(statuses.iter().all(|(_, s)| s == "ok"), "{statuses:?}");

    let err = client
        .decide(grpc_request("my ssn is 123-45-6789"))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("validator_blocked: "),
        "{}",
        err.message()
    );
    assert_eq!(
        err.metadata()
            .get("x-beamline-error-code")
            .and_then(|v| v.to_str().ok()),
        Some("validator_blocked")
    );
    assert!(err.metadata().get("x-beamline-trace-id").is_some());
    drop(s);
}

#[tokio::test]
async fn object_payloads_and_payload_refs_through_a_node_pre_processor_and_back() {
    let s = setup().await;
    let nc = async_nats::connect(s.nats.url()).await.unwrap();
    let ok = ask(
        &nc,
        json!({"version": "1", "request_id": "o-1", "tenant_id": "objects",
               "task": {"type": "chat", "payload": {"text": "  Hi There  ", "items": [1, 2]}}}),
    )
    .await;
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(
        ok["decision"]["message"]["payload"],
        json!({"text": "  Hi There  ", "items": [1, 2], "enriched_by": "enrich_object"}),
        "the object reached the Node pre-processor as an object and came back as one \
         (normalize_text, text only, passed it through): {ok}"
    );
    assert_eq!(
        statuses(&ok["decision"]["executed_extensions"]),
        pairs(&[
            ("normalize_text", "ok"),
            ("enrich_object", "ok"),
            ("pii_guard", "ok"),
            ("mask_pii", "ok"),
        ])
    );

    let ok = ask(
        &nc,
        json!({"version": "1", "request_id": "o-2", "tenant_id": "objects",
               "task": {"type": "chat", "payload_ref": "s3://bucket/object-1"}}),
    )
    .await;
    assert_eq!(ok["ok"], true, "{ok}");
    let message = &ok["decision"]["message"];
    assert_eq!(message["payload_ref"], "s3://bucket/object-1", "{ok}");
    assert_eq!(
        message["metadata"]["seen_payload_ref"], "s3://bucket/object-1",
        "the extension got it untouched: {ok}"
    );

    // Limits apply to objects too: 60 keys is over the 50 a JSON object may have.
    let big: serde_json::Map<String, Value> =
        (0..60).map(|i| (format!("k{i}"), json!(i))).collect();
    let e = ask(
        &nc,
        json!({"version": "1", "request_id": "o-3", "tenant_id": "objects",
               "task": {"type": "chat", "payload": big}}),
    )
    .await;
    assert_eq!(e["error"]["code"], "invalid_request", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("message.payload"),
        "{e}"
    );
    drop(s);
}
