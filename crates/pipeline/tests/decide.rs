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
        json!([ext("s", "pre", 100, 2)]),
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
    assert!(d.executed_extensions[0].latency_ms >= 200.0);
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
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "no responders must not wait for the 5 s timeout"
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
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "deadline did not bound the attempt"
    );
    assert!(
        matches!(
            e.code,
            ErrorCode::ExtensionTimeout | ErrorCode::DeadlineExceeded
        ),
        "{e}"
    );
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
            ext("pa", "provider", 100, 0),
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
            ext("pa", "provider", 1000, 0),
            ext("pb", "provider", 1000, 0)
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

#[tokio::test]
async fn bad_extension_replies_get_documented_codes() {
    let h = Harness::new(
        json!([
            ext("garbage", "pre", 1000, 0),
            ext("huge", "pre", 1000, 0),
            ext("array", "pre", 1000, 0)
        ]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "garbage"}]}),
    )
    .await;
    let _g = serve_raw(
        &h.client,
        &h.subject("garbage"),
        b"\x00\xffnot json".to_vec(),
    )
    .await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PreProcessorFailed);
    assert!(e.message.contains("invalid_response_format"), "{e}");
    let _ = h;
}

#[tokio::test]
async fn oversized_and_deep_replies_are_refused() {
    for (name, body) in [
        (
            "huge",
            serde_json::to_vec(&json!({"payload": "x".repeat(2 * 1024 * 1024 - 200)})).unwrap(),
        ),
        ("deep", {
            let mut v = json!(1);
            for _ in 0..50 {
                v = json!([v]);
            }
            serde_json::to_vec(&json!({"metadata": {"a": v}})).unwrap()
        }),
    ] {
        let h = Harness::new(
            json!([ext(name, "pre", 1000, 0)]),
            json!({"providers": [{"name": "p"}], "pre": [{"id": name}]}),
        )
        .await;
        let _s = serve_raw(&h.client, &h.subject(name), body).await;
        let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
        assert!(
            e.code == ErrorCode::PreProcessorFailed || e.code == ErrorCode::ExtensionTimeout,
            "{name}: {e}"
        );
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
    let mut h = Harness::new(json!([ext("a", "pre", 300, 0), ext("b", "pre", 300, 0)]), json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}, {"id": "b", "mode": "optional"}]})).await;
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
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert!(
        matches!(
            e.code,
            ErrorCode::ExtensionUnavailable | ErrorCode::ExtensionTimeout
        ),
        "{e}"
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
