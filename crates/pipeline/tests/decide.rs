//! Decide against real NATS with real SDK-built extensions: every mode and on_fail,
//! order and content of executed_extensions, deadline, dry_run, version routing,
//! providers and fallbacks, and each kind of bad input.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use beamline_model::{ErrorCode, Limits};
use beamline_pipeline::{BreakerConfig, StepStatus};
use common::*;
use serde_json::{Value, json};

fn statuses(executed: &[beamline_pipeline::ExecutedExtension]) -> Vec<(String, &'static str)> {
    executed
        .iter()
        .map(|e| (e.id.clone(), e.status.as_str()))
        .collect()
}

#[tokio::test]
async fn full_pipeline_in_order_with_final_message() {
    let mut h = Harness::new(
        json!([ext("a", "pre", 1000, 0), ext("b", "pre", 1000, 0), ext("v", "validator", 1000, 0),
               ext("prov", "provider", 1000, 0), ext("z", "post", 1000, 0)]),
        json!({"providers": [{"name": "p1", "weight": 1, "extension": "prov"}],
               "pre": [{"id": "a"}, {"id": "b"}], "validators": [{"id": "v"}], "post": [{"id": "z"}]}),
    )
    .await;
    h.serve("a", Tag("a")).await;
    h.serve("b", Tag("b")).await;
    h.serve("v", Verdict(true)).await;
    h.serve("prov", Provider("p1")).await;
    h.serve("z", Tag("z")).await;
    let d = h.pipeline.decide(h.request("hi")).await.unwrap();
    assert_eq!(
        d.message.payload, "hi+a+b",
        "pre in order; the final message is what the pre steps left"
    );
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![
            ("a".into(), "ok"),
            ("b".into(), "ok"),
            ("v".into(), "ok"),
            ("prov".into(), "ok"),
            ("z".into(), "ok")
        ]
    );
    assert_eq!(d.provider_id, "p1");
    assert_eq!(
        d.provider_output.unwrap().output,
        json!("p1 says hi+a+b+z"),
        "post ran on the provider's answer"
    );
    assert!(d.executed_extensions.iter().all(|e| e.latency_ms > 0.0));
    assert_eq!(d.executed_extensions[0].version.as_deref(), Some("v1"));
}

#[tokio::test]
async fn required_pre_failure_fails_and_optional_fails_open() {
    let exts = json!([ext("bad", "pre", 1000, 0), ext("good", "pre", 1000, 0)]);
    let mut h = Harness::new(exts.clone(), json!({"providers": [{"name": "p"}], "pre": [{"id": "bad", "mode": "required"}, {"id": "good"}]})).await;
    h.serve("bad", Fail).await;
    h.serve("good", Tag("g")).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PreProcessorFailed, "{e}");
    assert!(
        e.message.contains("bad") && e.message.contains("boom"),
        "{e}"
    );
    assert_eq!(
        statuses(&e.executed_extensions),
        vec![("bad".into(), "error")]
    );

    let mut h = Harness::new(exts, json!({"providers": [{"name": "p"}], "pre": [{"id": "bad", "mode": "optional"}, {"id": "good"}]})).await;
    h.serve("bad", Fail).await;
    h.serve("good", Tag("g")).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(
        d.message.payload, "x+g",
        "optional failure leaves the message unchanged"
    );
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![("bad".into(), "error"), ("good".into(), "ok")]
    );
}

#[tokio::test]
async fn post_modes() {
    let exts = json!([ext("bad", "post", 1000, 0)]);
    let mut h = Harness::new(
        exts.clone(),
        json!({"providers": [{"name": "p"}], "post": [{"id": "bad", "mode": "required"}]}),
    )
    .await;
    h.serve("bad", Fail).await;
    assert_eq!(
        h.pipeline.decide(h.request("x")).await.unwrap_err().code,
        ErrorCode::PostProcessorFailed
    );
    let mut h = Harness::new(
        exts,
        json!({"providers": [{"name": "p"}], "post": [{"id": "bad", "mode": "optional"}]}),
    )
    .await;
    h.serve("bad", Fail).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(d.executed_extensions[0].status, StepStatus::Error);
}

#[tokio::test]
async fn validator_on_fail_block_warn_ignore() {
    for (on_fail, expect) in [
        ("block", None),
        ("warn", Some("warn")),
        ("ignore", Some("ignore")),
    ] {
        let mut h = Harness::new(
            json!([ext("v", "validator", 1000, 0)]),
            json!({"providers": [{"name": "p"}], "validators": [{"id": "v", "on_fail": on_fail}]}),
        )
        .await;
        h.serve("v", Verdict(false)).await;
        let r = h.pipeline.decide(h.request("x")).await;
        match expect {
            None => {
                let e = r.unwrap_err();
                assert_eq!(e.code, ErrorCode::ValidatorBlocked);
                assert_eq!(e.details["reason"], "nope");
            }
            Some(s) => assert_eq!(r.unwrap().executed_extensions[0].status.as_str(), s),
        }
    }
    // A validator that times out counts as a reject.
    let mut h = Harness::new(
        json!([ext("v", "validator", 50, 0)]),
        json!({"providers": [{"name": "p"}], "validators": [{"id": "v", "on_fail": "block"}]}),
    )
    .await;
    h.serve("v", Slow(Duration::from_millis(500))).await;
    assert_eq!(
        h.pipeline.decide(h.request("x")).await.unwrap_err().code,
        ErrorCode::ValidatorBlocked
    );
}

#[tokio::test]
async fn when_conditions_skip_steps() {
    let mut h = Harness::new(
        json!([ext("a", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "a", "when": {"message_type": ["chat"]}}]}),
    )
    .await;
    h.serve("a", Tag("a")).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(d.executed_extensions[0].status, StepStatus::Ok);
    let mut r = h.request("x");
    r.message.message_type = "email".into();
    let d = h.pipeline.decide(r).await.unwrap();
    assert_eq!(d.executed_extensions[0].status, StepStatus::Skipped);
    assert_eq!(d.message.payload, "x");
}

#[tokio::test]
async fn retries_on_timeout_then_succeed() {
    let mut h = Harness::new(
        json!([ext("s", "pre", 300, 2)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "s"}]}),
    )
    .await;
    let (handler, hits) = counted(SlowFirst {
        n: 2,
        seen: AtomicU64::new(0),
    });
    h.serve("s", handler).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 3, "1 try + 2 retries");
    assert_eq!(d.executed_extensions[0].status, StepStatus::Ok);
    assert!(
        d.executed_extensions[0].latency_ms >= 600.0,
        "two 300 ms timeouts before the answer"
    );
}

#[tokio::test]
async fn retries_stop_at_the_limit_with_extension_timeout() {
    let mut h = Harness::new(
        json!([ext("s", "pre", 50, 1)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "s"}]}),
    )
    .await;
    let (handler, hits) = counted(Slow(Duration::from_secs(2)));
    h.serve("s", handler).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ExtensionTimeout, "{e}");
    assert_eq!(hits.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn no_responders_fails_at_once() {
    let h = Harness::new(
        json!([ext("gone", "pre", 5000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "gone"}]}),
    )
    .await;
    let t = Instant::now();
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ExtensionUnavailable, "{e}");
    assert_eq!(e.details["cause"], "extension_unavailable", "{e:?}");
    assert!(
        e.message.contains("no extension instance is listening"),
        "nobody listening, not a timeout: {e}"
    );
    // Relative to the extension's own timeout: a no-responders failure that waited
    // for the timeout would take the full 5 s.
    assert!(
        t.elapsed() < Duration::from_millis(5000),
        "no responders waited for the 5 s timeout: {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn deadline_bounds_the_call_and_is_checked_between_stages() {
    let mut h = Harness::new(
        json!([ext("s", "pre", 5000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "s"}]}),
    )
    .await;
    h.serve("s", Slow(Duration::from_secs(3))).await;
    let mut r = h.request("x");
    r.context.insert(
        "deadline".into(),
        json!(chrono::Utc::now().timestamp_millis() + 150),
    );
    let t = Instant::now();
    let e = h.pipeline.decide(r).await.unwrap_err();
    // Relative to the extension: it answers after 3 s and its timeout is 5 s, so only
    // the 150 ms deadline can have ended the attempt before either.
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "deadline did not bound the attempt: {:?}",
        t.elapsed()
    );
    // The attempt was sent and cut short by the deadline: a timed-out call
    // (`extension_timeout`); `deadline_exceeded` is for a deadline that passed before
    // a stage (below).
    assert_eq!(e.code, ErrorCode::ExtensionTimeout, "{e}");
    assert!(e.message.contains("1 attempt(s)"), "{e}");
    let mut r = h.request("x");
    r.context.insert(
        "deadline".into(),
        json!(chrono::Utc::now().timestamp_millis() - 1),
    );
    assert_eq!(
        h.pipeline.decide(r).await.unwrap_err().code,
        ErrorCode::DeadlineExceeded
    );
    let mut r = h.request("x");
    r.context.insert("deadline".into(), json!("soon"));
    assert_eq!(
        h.pipeline.decide(r).await.unwrap_err().code,
        ErrorCode::InvalidRequest
    );
}

#[tokio::test]
async fn dry_run_invokes_nothing() {
    let mut h = Harness::new(
        json!([ext("a", "pre", 1000, 0), ext("v", "validator", 1000, 0), ext("prov", "provider", 1000, 0)]),
        json!({"providers": [{"name": "p1", "extension": "prov"}], "pre": [{"id": "a"}], "validators": [{"id": "v"}]}),
    )
    .await;
    let (a, hits) = counted(Tag("a"));
    h.serve("a", a).await;
    let mut r = h.request("x");
    r.context.insert("dry_run".into(), json!(true));
    let d = h.pipeline.decide(r).await.unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 0);
    assert!(
        d.executed_extensions
            .iter()
            .all(|e| e.status == StepStatus::Skipped)
    );
    assert_eq!(d.executed_extensions.len(), 3);
    assert_eq!(d.provider_id, "p1");
    assert_eq!(d.metadata["dry_run"], "true");
}

#[tokio::test]
async fn version_routing_per_tenant() {
    let mut h = Harness::new(
        json!([{"id": "n", "type": "pre", "subject": "{p}.n.v1", "timeout_ms": 1000,
                "versions": [{"version": "v2", "subject": "{p}.n.v2", "routing_rules": {"tenant_id": ["premium"]}}]}]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "n"}]}),
    )
    .await;
    std::fs::create_dir_all(h.dir.path().join("policies/default")).unwrap();
    std::fs::copy(
        h.dir.path().join("policies/acme/default.json"),
        h.dir.path().join("policies/default/default.json"),
    )
    .unwrap();
    h.pipeline.registry().reload().await.unwrap();
    h.serve("n.v1", Tag("v1")).await;
    h.serve("n.v2", Tag("v2")).await;
    let d = h
        .pipeline
        .decide(h.request_for("premium", "x"))
        .await
        .unwrap();
    assert_eq!(
        (
            d.message.payload.as_text(),
            d.executed_extensions[0].version.as_deref()
        ),
        (Some("x+v2"), Some("v2"))
    );
    let d = h.pipeline.decide(h.request_for("acme", "x")).await.unwrap();
    assert_eq!(d.message.payload, "x+v1");
}

#[tokio::test]
async fn weighted_round_robin_is_exact_across_instances() {
    let mut h = Harness::new(
        json!([{"id": "n", "type": "pre", "subject": "{p}.n", "timeout_ms": 1000, "instances": [
            {"instance_id": "a", "subject": "{p}.n.a", "weight": 75},
            {"instance_id": "b", "subject": "{p}.n.b", "weight": 25},
            {"instance_id": "c", "subject": "{p}.n.c", "weight": 50, "enabled": false},
            {"instance_id": "d", "subject": "{p}.n.d", "weight": 50, "health_status": "unhealthy"}]}]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "n"}]}),
    )
    .await;
    let mut hits = Vec::new();
    for i in ["a", "b", "c", "d"] {
        let (handler, n) = counted(Tag("i"));
        h.serve(&format!("n.{i}"), handler).await;
        hits.push(n);
    }
    for _ in 0..100 {
        h.pipeline.decide(h.request("x")).await.unwrap();
    }
    let got: Vec<u64> = hits.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    assert_eq!(got, vec![75, 25, 0, 0]);
}

#[tokio::test]
async fn providers_by_weight_sticky_and_fallbacks() {
    let policy = json!({"providers": [{"name": "a", "weight": 70, "extension": "pa"}, {"name": "b", "weight": 30, "extension": "pb"}],
        "fallbacks": [{"when": {"status": ["timeout", "5xx"]}, "retry": 0, "to": "b"}]});
    let mut h = Harness::new(
        json!([
            ext("pa", "provider", 5000, 0),
            ext("pb", "provider", 1000, 0)
        ]),
        policy.clone(),
    )
    .await;
    h.serve("pa", Provider("a")).await;
    h.serve("pb", Provider("b")).await;
    let mut n = std::collections::HashMap::new();
    for _ in 0..100 {
        *n.entry(h.pipeline.decide(h.request("x")).await.unwrap().provider_id)
            .or_insert(0) += 1;
    }
    assert_eq!((n["a"], n["b"]), (70, 30));

    // a fails → fallback to b
    let mut h = Harness::new(
        json!([
            ext("pa", "provider", 100, 0),
            ext("pb", "provider", 1000, 0)
        ]),
        policy.clone(),
    )
    .await;
    h.serve("pa", Fail).await;
    h.serve("pb", Provider("b")).await;
    let mut saw_fallback = false;
    for _ in 0..4 {
        let d = h.pipeline.decide(h.request("x")).await.unwrap();
        assert_eq!(d.provider_id, "b");
        saw_fallback |= d.reason.starts_with("fallback");
    }
    assert!(saw_fallback);

    // sticky: the same tenant always lands on the same provider
    let mut sticky = policy;
    sticky["sticky"] = json!(true);
    let mut h = Harness::new(
        json!([
            ext("pa", "provider", 5000, 0),
            ext("pb", "provider", 5000, 0)
        ]),
        sticky,
    )
    .await;
    h.serve("pa", Provider("a")).await;
    h.serve("pb", Provider("b")).await;
    let first = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(first.reason, "sticky");
    for _ in 0..10 {
        assert_eq!(
            h.pipeline.decide(h.request("x")).await.unwrap().provider_id,
            first.provider_id
        );
    }
}

/// A required pre step whose reply is `body` fails with `pre_processor_failed`,
/// cause `extension_error` (an invalid reply is the extension's error), and a message
/// naming `invalid_response_format` and `what`.
async fn assert_invalid_reply(h: &Harness, name: &str, what: &str) {
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PreProcessorFailed, "{name}: {e}");
    assert_eq!(e.details["cause"], "extension_error", "{name}: {e:?}");
    assert_eq!(e.details["extension_id"], name, "{name}: {e:?}");
    assert!(
        e.message.contains("invalid_response_format") && e.message.contains(what),
        "{name}: {e}"
    );
    assert_eq!(
        statuses(&e.executed_extensions),
        vec![(name.into(), "error")]
    );
}

#[tokio::test]
async fn bad_extension_replies_get_documented_codes() {
    for (name, body, what) in [
        ("garbage", b"\x00\xffnot json".to_vec(), "reply is not JSON"),
        ("array", b"[1, 2, 3]".to_vec(), "object"),
        ("number", b"42".to_vec(), "object"),
    ] {
        let h = Harness::new(
            json!([ext(name, "pre", 1000, 0)]),
            json!({"providers": [{"name": "p"}], "pre": [{"id": name}]}),
        )
        .await;
        let _g = serve_raw(&h.client, &h.subject(name), body).await;
        assert_invalid_reply(&h, name, what).await;
    }
}

#[tokio::test]
async fn oversized_and_deep_replies_are_refused() {
    // The reply really travels: a nats-server of the test's own with an 8 MB
    // max_payload carries the 2 MiB reply, and the invoker's 1 MiB reply limit
    // (`[pipeline] max_reply_bytes`) refuses it.
    let nats = beamline_test_support::NatsServer::start_with_config("max_payload: 8MB\n");
    let huge = serde_json::to_vec(&json!({"payload": "x".repeat(2 * 1024 * 1024 - 200)})).unwrap();
    let huge_len = huge.len();
    assert!(huge_len > 2 * 1024 * 1024 - 200);
    let deep = {
        let mut v = json!(1);
        for _ in 0..50 {
            v = json!([v]);
        }
        serde_json::to_vec(&json!({"metadata": {"a": v}})).unwrap()
    };
    for (name, body, what) in [
        (
            "huge",
            huge,
            format!("reply is {huge_len} bytes, more than the limit of 1048576"),
        ),
        ("deep", deep, "deeper".to_string()),
    ] {
        let h = Harness::custom(
            json!([ext(name, "pre", 5000, 0)]),
            json!({"providers": [{"name": "p"}], "pre": [{"id": name}]}),
            BreakerConfig::default(),
            Limits::default(),
            beamline_pipeline::PipelineConfig {
                invoker: fast_invoker(),
                ..beamline_pipeline::PipelineConfig::default()
            },
            &nats.url(),
        )
        .await;
        let _s = serve_raw(&h.client, &h.subject(name), body).await;
        assert_invalid_reply(&h, name, &what).await;
    }
}

#[tokio::test]
async fn disabled_and_unknown_extensions() {
    let mut exts = vec![ext("off", "pre", 1000, 0)];
    exts[0]["enabled"] = json!(false);
    let mut h = Harness::new(
        Value::Array(exts.clone()),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "off"}]}),
    )
    .await;
    let (handler, hits) = counted(Tag("off"));
    h.serve("off", handler).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PreProcessorFailed);
    assert!(e.message.contains("disabled"), "{e}");
    assert_eq!(
        hits.load(Ordering::Relaxed),
        0,
        "a disabled extension is never called"
    );

    let h2 = Harness::new(Value::Array(exts), json!({"providers": [{"name": "p"}], "pre": [{"id": "off", "mode": "optional"}, {"id": "ghost", "mode": "optional"}]})).await;
    let d = h2.pipeline.decide(h2.request("x")).await.unwrap();
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![("off".into(), "error"), ("ghost".into(), "error")]
    );

    let h3 = Harness::new(
        json!([ext("v", "validator", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "ghost"}, {"id": "v"}]}),
    )
    .await;
    let e = h3.pipeline.decide(h3.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ExtensionNotFound, "{e}");
    let h4 = Harness::new(
        json!([ext("v", "validator", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "v"}]}),
    )
    .await;
    assert_eq!(
        h4.pipeline.decide(h4.request("x")).await.unwrap_err().code,
        ErrorCode::InvalidRequest
    );
}

#[tokio::test]
async fn an_extension_that_vanishes_mid_run() {
    let mut h = Harness::new(json!([ext("a", "pre", 2000, 0), ext("b", "pre", 2000, 0)]), json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}, {"id": "b", "mode": "optional"}]})).await;
    h.serve("a", Tag("a")).await;
    h.serve("b", Tag("b")).await;
    assert_eq!(
        h.pipeline
            .decide(h.request("x"))
            .await
            .unwrap()
            .message
            .payload,
        "x+a+b"
    );
    h.stop_extensions().await;
    wait_no_responders(&h.client, &h.subject("a")).await;
    // Nobody listens on a's subject any more: "no responders", documented as
    // extension_unavailable (not a timeout).
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ExtensionUnavailable, "{e}");
    assert_eq!(
        statuses(&e.executed_extensions),
        vec![("a".into(), "error")]
    );
}

#[tokio::test]
async fn request_limits_and_missing_policy() {
    let limits = Limits {
        max_payload_bytes: 10,
        ..Limits::default()
    };
    let h = Harness::with(
        json!([]),
        json!({"providers": [{"name": "p"}]}),
        BreakerConfig::default(),
        limits,
    )
    .await;
    let e = h
        .pipeline
        .decide(h.request("this is longer than ten bytes"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("max_payload_bytes"), "{e}");
    let mut r = h.request("ok");
    r.policy_id = "nope".into();
    let e = h.pipeline.decide(r).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PolicyNotFound);
    assert!(
        e.message.contains("nope") && e.message.contains("acme"),
        "{e}"
    );
    let mut r = h.request("ok");
    r.message.tenant_id.clear();
    assert_eq!(
        h.pipeline.decide(r).await.unwrap_err().code,
        ErrorCode::InvalidRequest
    );
}

#[tokio::test]
async fn decision_failed_when_no_provider_is_left() {
    // The provider's extension answers an error: decision_failed, cause
    // extension_error, the extension's own code and message passed on.
    let mut h = Harness::new(
        json!([ext("pa", "provider", 1000, 0)]),
        json!({"providers": [{"name": "a", "extension": "pa"}]}),
    )
    .await;
    h.serve("pa", Fail).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DecisionFailed, "{e}");
    assert_eq!(e.details["cause"], "extension_error", "{e:?}");
    assert_eq!(e.details["provider_id"], "a");
    assert_eq!(e.details["extension_id"], "pa");
    assert_eq!(
        e.details["extension_error"],
        json!({"code": "boom", "message": "deliberate failure"})
    );
    assert_eq!(
        statuses(&e.executed_extensions),
        vec![("pa".into(), "error")]
    );

    // Nobody listening: cause extension_unavailable.
    let h = Harness::new(
        json!([ext("pa", "provider", 1000, 0)]),
        json!({"providers": [{"name": "a", "extension": "pa"}]}),
    )
    .await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DecisionFailed, "{e}");
    assert_eq!(e.details["cause"], "extension_unavailable", "{e:?}");

    // Every provider weighs 0: cause no_providers, nothing invoked.
    let mut h = Harness::new(
        json!([ext("pa", "provider", 1000, 0)]),
        json!({"providers": [{"name": "a", "weight": 0, "extension": "pa"}]}),
    )
    .await;
    let (handler, hits) = counted(Provider("a"));
    h.serve("pa", handler).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DecisionFailed, "{e}");
    assert_eq!(e.details["cause"], "no_providers", "{e:?}");
    assert!(e.message.contains("weight 0"), "{e}");
    assert_eq!(hits.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn every_providers_breaker_open_is_decision_failed_unavailable() {
    let mut h = Harness::new(
        json!([ext("pa", "provider", 1000, 0)]),
        json!({"providers": [{"name": "a", "extension": "pa"}]}),
    )
    .await;
    h.serve("pa", Fail).await;
    // Five failures open the breaker (failure_threshold 5).
    for _ in 0..5 {
        let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
        assert_eq!(e.details["cause"], "extension_error", "{e:?}");
    }
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DecisionFailed, "{e}");
    assert_eq!(e.details["cause"], "extension_unavailable", "{e:?}");
    assert!(e.message.contains("open circuit breaker"), "{e}");
    assert!(e.executed_extensions.is_empty(), "nothing was called");
}

#[tokio::test]
async fn provider_fallbacks_retry_then_move_on() {
    // retry 2 on the same provider, then to b (weight 0: only reached by fallback).
    // No breaker, so that a's failures across requests do not open it.
    let mut h = Harness::with(
        json!([
            ext("pa", "provider", 1000, 0),
            ext("pb", "provider", 1000, 0)
        ]),
        json!({"providers": [{"name": "a", "weight": 100, "extension": "pa"},
                             {"name": "b", "weight": 0, "extension": "pb"}],
               "fallbacks": [{"when": {"status": ["5xx"]}, "retry": 2, "to": "b"}]}),
        BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        },
        Limits::default(),
    )
    .await;
    let (fa, a_hits) = counted(Fail);
    h.serve("pa", fa).await;
    h.serve("pb", Provider("b")).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(d.provider_id, "b");
    assert_eq!(d.reason, "fallback from a (5xx)");
    assert_eq!(
        a_hits.load(Ordering::Relaxed),
        3,
        "1 try + 2 fallback retries"
    );
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![
            ("pa".into(), "error"),
            ("pa".into(), "error"),
            ("pa".into(), "error"),
            ("pb".into(), "ok")
        ]
    );
    // The retries are per request: the next request retries a again.
    h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(a_hits.load(Ordering::Relaxed), 6);
}

#[tokio::test]
async fn provider_fallback_on_unavailable_and_when_nothing_is_left() {
    let exts = json!([
        ext("pa", "provider", 1000, 0),
        ext("pb", "provider", 1000, 0)
    ]);
    let providers = json!([{"name": "a", "weight": 100, "extension": "pa"},
                           {"name": "b", "weight": 0, "extension": "pb"}]);
    // a has nobody listening: status `unavailable` matches the fallback to b.
    let mut h = Harness::new(
        exts.clone(),
        json!({"providers": providers,
               "fallbacks": [{"when": {"status": ["unavailable"]}, "retry": 0, "to": "b"}]}),
    )
    .await;
    h.serve("pb", Provider("b")).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(
        (d.provider_id.as_str(), d.reason.as_str()),
        ("b", "fallback from a (unavailable)")
    );

    // The same failure with a fallback only for timeouts: nothing applies.
    let mut h = Harness::new(
        exts.clone(),
        json!({"providers": providers,
               "fallbacks": [{"when": {"status": ["timeout"]}, "retry": 0, "to": "b"}]}),
    )
    .await;
    let (pb, b_hits) = counted(Provider("b"));
    h.serve("pb", pb).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DecisionFailed, "{e}");
    assert_eq!(e.details["cause"], "extension_unavailable", "{e:?}");
    assert_eq!(e.details["provider_id"], "a");
    assert_eq!(b_hits.load(Ordering::Relaxed), 0, "no fallback matched");

    // a fails, the fallback goes to b, b fails too: nothing left (b's own failure
    // matches the same fallback, whose target is b itself with no retry).
    let mut h = Harness::new(
        exts,
        json!({"providers": providers,
               "fallbacks": [{"when": {"status": ["5xx"]}, "retry": 0, "to": "b"}]}),
    )
    .await;
    h.serve("pa", Fail).await;
    let (fb, b_hits) = counted(Fail);
    h.serve("pb", fb).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DecisionFailed, "{e}");
    assert_eq!(e.details["provider_id"], "b", "{e:?}");
    assert_eq!(e.details["cause"], "extension_error", "{e:?}");
    assert_eq!(b_hits.load(Ordering::Relaxed), 1);
    assert_eq!(
        statuses(&e.executed_extensions),
        vec![("pa".into(), "error"), ("pb".into(), "error")]
    );
}

#[tokio::test]
async fn allowed_tenants_refuses_other_tenants_before_sending() {
    let mut h = Harness::new(
        json!([{"id": "a", "type": "pre", "subject": "{p}.a", "timeout_ms": 1000,
                "metadata": {"allowed_tenants": ["acme"]}}]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}]}),
    )
    .await;
    h.policy_for("other").await;
    let (handler, hits) = counted(Tag("a"));
    h.serve("a", handler).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(d.message.payload, "x+a");
    let e = h
        .pipeline
        .decide(h.request_for("other", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::PreProcessorFailed, "{e}");
    assert_eq!(e.details["cause"], "extension_error", "{e:?}");
    assert_eq!(e.details["extension_error"]["code"], "tenant_not_allowed");
    assert!(e.message.contains("'other'"), "{e}");
    assert_eq!(
        hits.load(Ordering::Relaxed),
        1,
        "the refused call was never sent"
    );
}

#[tokio::test]
async fn per_extension_max_payload_size_is_enforced_and_counted() {
    let mut h = Harness::new(
        json!([{"id": "a", "type": "pre", "subject": "{p}.a", "timeout_ms": 1000,
                "metadata": {"max_payload_size": 600}}]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}]}),
    )
    .await;
    let seen = h.observe();
    let (handler, hits) = counted(Tag("a"));
    h.serve("a", handler).await;
    h.pipeline.decide(h.request("small")).await.unwrap();
    let e = h
        .pipeline
        .decide(h.request(&"x".repeat(700)))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest, "{e}");
    assert!(
        e.message.contains("payload_too_large") && e.message.contains("accepts 600"),
        "{e}"
    );
    assert_eq!(
        hits.load(Ordering::Relaxed),
        1,
        "the large request was not sent"
    );
    assert_eq!(
        *seen.payload_too_large.lock().unwrap(),
        vec!["a".to_string()]
    );
}

#[tokio::test]
async fn metadata_over_the_limit_is_metadata_too_large() {
    let limits = Limits {
        max_metadata_bytes: 200,
        ..Limits::default()
    };
    let mut h = Harness::with(
        json!([ext("a", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}]}),
        BreakerConfig::default(),
        limits,
    )
    .await;
    let (handler, hits) = counted(Tag("a"));
    h.serve("a", handler).await;
    let mut r = h.request("x");
    r.message
        .metadata
        .insert("note".into(), json!("m".repeat(100)));
    h.pipeline.decide(r).await.unwrap();
    let mut r = h.request("x");
    r.message
        .metadata
        .insert("note".into(), json!("m".repeat(300)));
    let e = h.pipeline.decide(r).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest, "{e}");
    assert!(e.message.starts_with("metadata_too_large"), "{e}");
    assert_eq!(e.details["limit"], "max_metadata_bytes");
    // Context counts too.
    let mut r = h.request("x");
    r.context.insert("note".into(), json!("c".repeat(300)));
    assert!(
        h.pipeline
            .decide(r)
            .await
            .unwrap_err()
            .message
            .starts_with("metadata_too_large")
    );
    assert_eq!(hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn no_eligible_instance_falls_back_to_the_first_enabled_then_the_subject() {
    // None eligible (disabled or unhealthy): the first enabled instance, b.
    let mut h = Harness::new(
        json!([{"id": "n", "type": "pre", "subject": "{p}.n", "timeout_ms": 1000, "instances": [
            {"instance_id": "a", "subject": "{p}.n.a", "weight": 50, "enabled": false},
            {"instance_id": "b", "subject": "{p}.n.b", "weight": 50, "health_status": "unhealthy"},
            {"instance_id": "c", "subject": "{p}.n.c", "weight": 50, "health_status": "unhealthy"}]}]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "n"}]}),
    )
    .await;
    let seen = h.observe();
    let mut hits = Vec::new();
    for i in ["a", "b", "c"] {
        let (handler, n) = counted(Tag("i"));
        h.serve(&format!("n.{i}"), handler).await;
        hits.push(n);
    }
    for _ in 0..5 {
        let d = h.pipeline.decide(h.request("x")).await.unwrap();
        assert_eq!(d.executed_extensions[0].instance.as_deref(), Some("b"));
    }
    let got: Vec<u64> = hits.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    assert_eq!(got, vec![0, 5, 0]);
    assert_eq!(seen.instance_selected.lock().unwrap().len(), 5);

    // No instance enabled: the extension's own subject, no instance recorded.
    let mut h = Harness::new(
        json!([{"id": "n", "type": "pre", "subject": "{p}.n", "timeout_ms": 1000, "instances": [
            {"instance_id": "a", "subject": "{p}.n.a", "weight": 50, "enabled": false}]}]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "n"}]}),
    )
    .await;
    let (base, base_hits) = counted(Tag("base"));
    h.serve("n", base).await;
    let (inst, inst_hits) = counted(Tag("a"));
    h.serve("n.a", inst).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(d.message.payload, "x+base");
    assert_eq!(d.executed_extensions[0].instance, None);
    assert_eq!(
        (
            base_hits.load(Ordering::Relaxed),
            inst_hits.load(Ordering::Relaxed)
        ),
        (1, 0)
    );
}

#[tokio::test]
async fn retry_limit_exceeded_is_reported_once_the_retries_are_spent() {
    let mut h = Harness::new(
        json!([ext("gone", "pre", 200, 1), ext("once", "pre", 200, 0), ext("s", "pre", 300, 2)]),
        json!({"providers": [{"name": "p"}],
               "pre": [{"id": "gone", "mode": "optional"}, {"id": "once", "mode": "optional"}, {"id": "s"}]}),
    )
    .await;
    let seen = h.observe();
    // s times out twice, then answers: its retries were enough, nothing reported.
    h.serve(
        "s",
        SlowFirst {
            n: 2,
            seen: AtomicU64::new(0),
        },
    )
    .await;
    h.pipeline.decide(h.request("x")).await.unwrap();
    // gone (retry 1) had nobody listening on both attempts; once has no retry to
    // exceed.
    assert_eq!(
        *seen.retry_limit_exceeded.lock().unwrap(),
        vec!["gone".to_string()]
    );
}

#[tokio::test]
async fn a_dry_run_leaves_the_weighted_turns_of_live_traffic_alone() {
    // Two providers without extensions, 1:1: live picks alternate a, b, a, b…
    let h = Harness::new(
        json!([]),
        json!({"providers": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}),
    )
    .await;
    let live = |h: &Harness| {
        let pipeline = h.pipeline.clone();
        let r = h.request("x");
        async move { pipeline.decide(r).await.unwrap().provider_id }
    };
    let first = live(&h).await;
    for _ in 0..3 {
        let mut r = h.request("x");
        r.context.insert("dry_run".into(), json!(true));
        let d = h.pipeline.decide(r).await.unwrap();
        assert_ne!(d.provider_id, first, "a dry run shows the next live pick");
    }
    let second = live(&h).await;
    assert_ne!(
        second, first,
        "three dry runs in between did not take live traffic's turns"
    );
}
