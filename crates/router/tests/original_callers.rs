//! The original's callers against the real binary (REFERENCE.md §3b): its admin NATS
//! subjects, a Decide published without a reply subject, bare `authorization`, and
//! the gRPC status codes in both `[grpc] status_codes` modes. Each router runs
//! `serve --demo` (the reference extensions in-process) on a nats-server of its own.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use beamline_api::proto;
use beamline_api::proto::router_admin_client::RouterAdminClient;
use beamline_api::proto::router_client::RouterClient;
use beamline_test_support::NatsServer;
use common::*;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

/// The router's config; `nats_keys` and `grpc_keys` go into those tables, `extra`
/// at the end.
fn config(
    dir: &std::path::Path,
    nats: &NatsServer,
    nats_keys: &str,
    grpc_keys: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join("router.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[nats]
url = "{nats}"
{nats_keys}

[grpc]
listen = "127.0.0.1:0"
{grpc_keys}

[http]
listen = "127.0.0.1:0"

[log]
format = "json"
level = "info"

[[admin.api_keys]]
name = "vera-viewer"
role = "viewer"
key = "{VIEWER_KEY}"
{extra}
"#,
            nats = nats.url()
        ),
    )
    .unwrap();
    path
}

fn start_demo(config: &std::path::Path) -> Router {
    let mut command = bin();
    command.args(["serve", "--demo", "--config"]).arg(config);
    start_command(command)
}

/// A NATS request with a bounded wait; the reply as JSON.
async fn ask(
    nc: &async_nats::Client,
    subject: &str,
    headers: Option<async_nats::HeaderMap>,
    body: &str,
) -> Value {
    let request = async_nats::Request::new()
        .payload(body.to_string().into())
        .timeout(Some(Duration::from_secs(10)));
    let request = match headers {
        Some(h) => request.headers(h),
        None => request,
    };
    let msg = tokio::time::timeout(
        Duration::from_secs(15),
        nc.send_request(subject.to_string(), request),
    )
    .await
    .expect("answered within 15 s")
    .unwrap_or_else(|e| panic!("{subject}: {e}"));
    serde_json::from_slice(&msg.payload).unwrap()
}

/// Asks `beamline.router.v1.admin.<method>` without a key.
async fn admin(nc: &async_nats::Client, method: &str, body: &str) -> Value {
    ask(
        nc,
        &format!("beamline.router.v1.admin.{method}"),
        None,
        body,
    )
    .await
}

fn decide(tenant: &str, text: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            tenant_id: tenant.into(),
            message_type: "chat".into(),
            payload: text.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_admin_subjects_answer_in_the_originals_shapes() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start_demo(&config(dir.path(), &nats, "", "", ""));
    let nc = async_nats::connect(nats.url()).await.unwrap();

    // Some traffic first, so health has something to say.
    let mut grpc = RouterClient::connect(router.addr.clone()).await.unwrap();
    grpc.decide(decide("acme", "hello")).await.expect("decide");

    let h = admin(&nc, "get_extension_health", "").await;
    let health = h["health"].as_object().expect("{health: {...}}");
    assert_eq!(
        health.keys().collect::<Vec<_>>(),
        vec!["mask_pii", "normalize_text", "pii_guard", "test_provider"],
        "{h}"
    );
    let n = &health["normalize_text"];
    assert_eq!(n["status"], "healthy", "{n}");
    assert_eq!(n["success_count"], 1, "{n}");
    assert_eq!(n["circuit_breaker_state"], "closed", "{n}");

    let s = admin(&nc, "get_circuit_breaker_states", "{}").await;
    assert_eq!(s["states"]["pii_guard"], "closed", "{s}");
    assert_eq!(s["states"].as_object().unwrap().len(), 4, "{s}");
    // These two take any body, as the original's gateway sends whatever it has.
    let s = admin(&nc, "get_circuit_breaker_states", "not json").await;
    assert_eq!(s["states"].as_object().map(|m| m.len()), Some(4), "{s}");
    let h2 = admin(&nc, "get_extension_health", "[1, 2").await;
    assert_eq!(h2["health"].as_object().map(|m| m.len()), Some(4), "{h2}");

    // A dry run invokes nothing.
    let before = admin(&nc, "get_extension_health", "").await;
    let d = admin(
        &nc,
        "dry_run_pipeline",
        r#"{"tenant_id": "acme", "policy_id": "default", "payload": "  hi  "}"#,
    )
    .await;
    assert_eq!(d["ok"], true, "{d}");
    assert_eq!(
        d["result"]["decision"],
        json!({"provider_id": "test_provider", "reason": "weighted", "priority": 50}),
        "{d}"
    );
    assert_eq!(d["result"]["final_payload"], "  hi  ", "nothing ran: {d}");
    let steps = d["result"]["executed_extensions"].as_array().unwrap();
    assert_eq!(steps.len(), 4, "{d}");
    assert!(steps.iter().all(|s| s["status"] == "skipped"), "{d}");
    let after = admin(&nc, "get_extension_health", "").await;
    assert_eq!(
        before["health"]["normalize_text"]["success_count"],
        after["health"]["normalize_text"]["success_count"],
        "the dry run called nobody"
    );
    // An object payload stays an object.
    let d = admin(
        &nc,
        "dry_run_pipeline",
        r#"{"tenant_id": "acme", "policy_id": "default", "payload": {"text": "hi"}}"#,
    )
    .await;
    assert_eq!(d["result"]["final_payload"], json!({"text": "hi"}), "{d}");
    let d = admin(
        &nc,
        "dry_run_pipeline",
        r#"{"tenant_id": "acme", "policy_id": "nope", "payload": "x"}"#,
    )
    .await;
    assert_eq!(d["ok"], false, "{d}");
    assert_eq!(d["error"]["code"], "POLICY_NOT_FOUND", "{d}");
    let d = admin(
        &nc,
        "dry_run_pipeline",
        r#"{"tenant_id": "acme", "payload": "x"}"#,
    )
    .await;
    assert_eq!(
        d,
        json!({"error": {"code": "INVALID_ARGUMENT", "message": "policy_id is required"}})
    );

    let c = admin(
        &nc,
        "get_pipeline_complexity",
        r#"{"tenant_id": "acme", "policy_id": "default"}"#,
    )
    .await;
    assert_eq!(
        c,
        json!({"total_extensions": 3, "pre_count": 1, "validators_count": 1, "post_count": 1,
               "complexity_score": 0.45, "complexity_level": "medium", "estimated_latency_ms": 90,
               "recommended_limits": {"max_total": 4, "max_pre": 2, "max_validators": 2, "max_post": 2},
               "warnings": [], "recommendations": []})
    );
    let c = admin(&nc, "get_pipeline_complexity", "not json").await;
    assert_eq!(c["error"]["code"], "INVALID_ARGUMENT", "{c}");
    let c = admin(
        &nc,
        "get_pipeline_complexity",
        r#"{"tenant_id": "acme", "policy_id": "nope"}"#,
    )
    .await;
    assert_eq!(c["error"]["code"], "INVALID_ARGUMENT", "{c}");
    assert!(
        c["error"]["message"].as_str().unwrap().contains("'nope'"),
        "{c}"
    );
    drop(router);
}

#[tokio::test]
async fn a_decide_without_reply_subject_is_answered_on_the_reply_subject_and_counted() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start_demo(&config(dir.path(), &nats, "", "", ""));
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut replies = nc
        .subscribe("beamline.router.v1.decide.reply")
        .await
        .unwrap();
    nc.flush().await.unwrap();
    nc.publish(
        "beamline.router.v1.decide",
        r#"{"version": "1", "request_id": "fire-and-forget", "tenant_id": "acme",
            "task": {"type": "chat", "payload": {"text": "  Hello  "}}}"#
            .into(),
    )
    .await
    .unwrap();
    nc.flush().await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(15), replies.next())
        .await
        .expect("an answer on beamline.router.v1.decide.reply within 15 s")
        .unwrap();
    let reply: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["context"]["request_id"], "fire-and-forget");
    assert_eq!(
        reply["decision"]["message"]["payload"],
        json!({"text": "  Hello  "}),
        "an object payload stays an object (normalize_text handles text only): {reply}"
    );
    assert!(!reply.to_string().contains("null"), "no nulls: {reply}");
    wait_until(10, "the default reply counted", async || {
        http_get(&router.http, "/metrics")
            .1
            .lines()
            .any(|l| l == "router_decide_default_reply_total 1")
    })
    .await;
    drop(router);

    // The subject is configurable.
    let dir = tempfile::tempdir().unwrap();
    let router = start_demo(&config(
        dir.path(),
        &nats,
        "decide_reply_subject = \"gateway.decide.replies\"",
        "",
        "",
    ));
    let mut replies = nc.subscribe("gateway.decide.replies").await.unwrap();
    nc.flush().await.unwrap();
    nc.publish(
        "beamline.router.v1.decide",
        r#"{"version": "1", "request_id": "r2", "tenant_id": "acme", "task": {"type": "chat", "payload": "x"}}"#.into(),
    )
    .await
    .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(15), replies.next())
        .await
        .expect("an answer on the configured subject within 15 s")
        .unwrap();
    let reply: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reply["context"]["request_id"], "r2", "{reply}");
    drop(router);
}

#[tokio::test]
async fn keys_for_the_admin_subjects_and_bare_authorization() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start_demo(&config(
        dir.path(),
        &nats,
        "",
        "",
        "\n[admin]\nnats_requires_key = true\n",
    ));
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let subject = "beamline.router.v1.admin.get_circuit_breaker_states";
    let e = ask(&nc, subject, None, "").await;
    assert_eq!(e["error"]["code"], "UNAUTHENTICATED", "{e}");
    let mut wrong = async_nats::HeaderMap::new();
    wrong.insert("x-api-key", "not-a-key-at-all");
    assert_eq!(
        ask(&nc, subject, Some(wrong), "").await["error"]["code"],
        "UNAUTHENTICATED"
    );
    for (name, value) in [
        ("x-api-key", VIEWER_KEY.to_string()),
        ("Authorization", format!("Bearer {VIEWER_KEY}")),
        ("authorization", VIEWER_KEY.to_string()),
    ] {
        let mut h = async_nats::HeaderMap::new();
        h.insert(name, value.as_str());
        let ok = ask(&nc, subject, Some(h), "").await;
        assert!(ok["states"].is_object(), "{name}: {ok}");
    }

    // gRPC admin with a bare `authorization: KEY`, as the original accepted.
    let channel = tonic::transport::Channel::from_shared(router.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = RouterAdminClient::new(channel);
    let mut req = tonic::Request::new(proto::GetValidatorsHealthRequest::default());
    req.metadata_mut()
        .insert("authorization", VIEWER_KEY.parse().unwrap());
    admin
        .get_validators_health(req)
        .await
        .expect("a bare key is accepted");
    let mut req = tonic::Request::new(proto::GetValidatorsHealthRequest::default());
    req.metadata_mut()
        .insert("authorization", "wrong-key-0123456789".parse().unwrap());
    assert_eq!(
        admin.get_validators_health(req).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    drop(router);
}

#[tokio::test]
async fn grpc_status_codes_in_both_modes() {
    let nats = NatsServer::start();
    for (grpc_keys, blocked, not_found) in [
        ("", tonic::Code::FailedPrecondition, tonic::Code::NotFound),
        (
            "status_codes = \"original\"",
            tonic::Code::Internal,
            tonic::Code::NotFound,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = config(dir.path(), &nats, "", grpc_keys, "");
        let router = start_demo(&path);
        let mut grpc = RouterClient::connect(router.addr.clone()).await.unwrap();
        let e = grpc
            .decide(decide("acme", "mail me: jane@example.com"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), blocked, "{grpc_keys:?}: {}", e.message());
        assert!(
            e.message().starts_with("validator_blocked: "),
            "{}",
            e.message()
        );
        assert_eq!(
            e.metadata().get("x-beamline-error-code").unwrap(),
            "validator_blocked",
            "the code travels in the trailer in every mode"
        );
        let mut r = decide("acme", "x");
        r.policy_id = "nope".into();
        assert_eq!(grpc.decide(r).await.unwrap_err().code(), not_found);
        drop(router);
    }
}

/// Test extensions for the status-code table.
mod codes {
    use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response};
    use std::time::Duration;

    pub struct Unchanged;
    impl Handler for Unchanged {
        async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
            Ok(Response::unchanged())
        }
    }
    pub struct Slow;
    impl Handler for Slow {
        async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(Response::unchanged())
        }
    }
    pub struct Fail;
    impl Handler for Fail {
        async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
            Err(ExtensionError::new("boom", "deliberate failure"))
        }
    }
    pub struct Reject;
    impl Handler for Reject {
        async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
            Ok(Response::reject("nope", serde_json::json!({})))
        }
    }
}

const CODES_SEED: &str = r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry) VALUES
 ('ok_pre', 'pre', 'codes.ok_pre', 2000, 0),
 ('slow_pre', 'pre', 'codes.slow_pre', 100, 0),
 ('gone_pre', 'pre', 'codes.gone_pre', 1000, 0),
 ('fail_pre', 'pre', 'codes.fail_pre', 2000, 0),
 ('fail_post', 'post', 'codes.fail_post', 2000, 0),
 ('no_validator', 'validator', 'codes.no_validator', 2000, 0),
 ('gone_prov', 'provider', 'codes.gone_prov', 1000, 0),
 ('fail_prov', 'provider', 'codes.fail_prov', 2000, 0);
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
 ('blocked', 'default', '{"providers": [{"name": "p"}], "validators": [{"id": "no_validator", "on_fail": "block"}]}'),
 ('timeout', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "slow_pre"}]}'),
 ('unavailable', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "gone_pre"}]}'),
 ('ghost', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "ghost_pre"}]}'),
 ('prefail', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "fail_pre"}]}'),
 ('postfail', 'default', '{"providers": [{"name": "p"}], "post": [{"id": "fail_post"}]}'),
 ('provgone', 'default', '{"providers": [{"name": "p", "extension": "gone_prov"}]}'),
 ('provfail', 'default', '{"providers": [{"name": "p", "extension": "fail_prov"}]}'),
 ('noprov', 'default', '{"providers": [{"name": "p", "weight": 0}]}'),
 ('fine', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "ok_pre"}]}');
"#;

/// Every error code of docs/PIPELINE.md's table through the real binary, in both
/// `[grpc] status_codes` modes: the status code, the message's leading code, and the
/// `x-beamline-error-code` trailer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_gets_its_grpc_status_in_both_modes() {
    use tonic::Code;
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(CODES_SEED).execute(&pool).await.unwrap();
    let nats = NatsServer::start();
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let opts = beamline_sdk::ServeOptions::default;
    let _exts = [
        beamline_sdk::spawn(nc.clone(), "codes.ok_pre", codes::Unchanged, opts()).await,
        beamline_sdk::spawn(nc.clone(), "codes.slow_pre", codes::Slow, opts()).await,
        beamline_sdk::spawn(nc.clone(), "codes.fail_pre", codes::Fail, opts()).await,
        beamline_sdk::spawn(nc.clone(), "codes.fail_post", codes::Fail, opts()).await,
        beamline_sdk::spawn(nc.clone(), "codes.no_validator", codes::Reject, opts()).await,
        beamline_sdk::spawn(nc.clone(), "codes.fail_prov", codes::Fail, opts()).await,
    ]
    .map(Result::unwrap);
    nc.flush().await.unwrap();

    // (tenant, policy_id, context, error code, status in "grpc", status in "original")
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a str,
        Code,
        Code,
    );
    let cases: &[Case] = &[
        (
            "",
            "",
            &[],
            "invalid_request",
            Code::InvalidArgument,
            Code::InvalidArgument,
        ),
        (
            "fine",
            "nope",
            &[],
            "policy_not_found",
            Code::NotFound,
            Code::NotFound,
        ),
        (
            "ghost",
            "",
            &[],
            "extension_not_found",
            Code::NotFound,
            Code::NotFound,
        ),
        (
            "blocked",
            "",
            &[],
            "validator_blocked",
            Code::FailedPrecondition,
            Code::Internal,
        ),
        (
            "timeout",
            "",
            &[],
            "extension_timeout",
            Code::DeadlineExceeded,
            Code::Internal,
        ),
        (
            "fine",
            "",
            &[("deadline", "1000")],
            "deadline_exceeded",
            Code::DeadlineExceeded,
            Code::Internal,
        ),
        (
            "unavailable",
            "",
            &[],
            "extension_unavailable",
            Code::Unavailable,
            Code::Internal,
        ),
        (
            "prefail",
            "",
            &[],
            "pre_processor_failed",
            Code::Internal,
            Code::Internal,
        ),
        (
            "postfail",
            "",
            &[],
            "post_processor_failed",
            Code::Internal,
            Code::Internal,
        ),
        // decision_failed by cause: every provider out of reach, the provider
        // answered an error, no weighted provider.
        (
            "provgone",
            "",
            &[],
            "decision_failed",
            Code::Unavailable,
            Code::Internal,
        ),
        (
            "provfail",
            "",
            &[],
            "decision_failed",
            Code::Internal,
            Code::Internal,
        ),
        (
            "noprov",
            "",
            &[],
            "decision_failed",
            Code::FailedPrecondition,
            Code::Internal,
        ),
    ];
    for (mode, grpc_keys) in [("grpc", ""), ("original", "status_codes = \"original\"")] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), db.url(), &nats.url(), "");
        // write_config has a [grpc] table already: add the key to it.
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replacen("[grpc]\n", &format!("[grpc]\n{grpc_keys}\n"), 1);
        std::fs::write(&path, text).unwrap();
        let router = start(&path);
        let mut grpc = RouterClient::connect(router.addr.clone()).await.unwrap();
        // The sanity case: the policy that works does.
        grpc.decide(decide("fine", "x")).await.unwrap();
        for &(tenant, policy_id, context, code, in_grpc, in_original) in cases {
            let mut r = decide(tenant, "x");
            r.policy_id = policy_id.into();
            r.context = context
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let e = grpc.decide(r).await.unwrap_err();
            let want = if mode == "grpc" { in_grpc } else { in_original };
            assert_eq!(
                e.code(),
                want,
                "{mode}: tenant {tenant:?} ({code}): {}",
                e.message()
            );
            assert!(
                e.message().starts_with(&format!("{code}: ")),
                "{mode}: tenant {tenant:?}: {}",
                e.message()
            );
            assert_eq!(
                e.metadata()
                    .get("x-beamline-error-code")
                    .map(|v| v.to_str().unwrap()),
                Some(code),
                "{mode}: tenant {tenant:?}: the trailer"
            );
        }
        drop(router);
    }
}
