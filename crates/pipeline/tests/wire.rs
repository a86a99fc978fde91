//! The original's wire contract (REFERENCE.md §3a) against real NATS, extensions
//! answering raw JSON as one in another language would: the provider's request
//! fields, post on the provider's answer, replies read as the original writes them,
//! one trace id per request, and validator verdicts.

mod common;

use beamline_model::wire::Payload;
use beamline_model::{ErrorCode, Limits};
use beamline_pipeline::{BreakerConfig, PipelineConfig, StepStatus};
use common::*;
use serde_json::{Value, json};

fn statuses(d: &[beamline_pipeline::ExecutedExtension]) -> Vec<(&str, &'static str)> {
    d.iter()
        .map(|e| (e.id.as_str(), e.status.as_str()))
        .collect()
}

/// A provider as the original's test_provider: reads `prompt`, answers fractional usage.
fn original_provider(body: &Value) -> Value {
    let prompt = body["prompt"].as_str().unwrap_or("");
    let n = prompt.len() as f64 / 4.0;
    json!({"provider_id": "test_provider", "output": format!("Mock response to: {prompt}"),
           "usage": {"prompt_tokens": n, "completion_tokens": n + 0.5, "total_tokens": 2.0 * n + 0.5},
           "metadata": {"model": "mock"}})
}

#[tokio::test]
async fn the_provider_gets_the_originals_fields_and_post_runs_on_its_answer() {
    let h = Harness::new(
        json!([
            ext("up", "pre", 1000, 0),
            ext("prov", "provider", 1000, 0),
            ext("mask", "post", 1000, 0)
        ]),
        json!({"providers": [{"name": "openai", "extension": "prov",
                              "parameters": {"max_tokens": 512, "temperature": 0.2}}],
               "pre": [{"id": "up"}], "post": [{"id": "mask"}]}),
    )
    .await;
    let (_u, _) = serve_recording(&h.client, &h.subject("up"), |b| {
        json!({"payload": {"payload": b["payload"]["payload"].as_str().unwrap().to_uppercase()}})
    })
    .await;
    let (_p, provider_seen) =
        serve_recording(&h.client, &h.subject("prov"), original_provider).await;
    // Post as the original's mask_pii: reads payload.payload, answers payload + metadata.
    let (_m, post_seen) = serve_recording(&h.client, &h.subject("mask"), |b| {
        let mut message = b["payload"].clone();
        let text = message["payload"]
            .as_str()
            .unwrap()
            .replace("SECRET", "******");
        message["payload"] = json!(text);
        json!({"payload": message, "metadata": {"masked": true}})
    })
    .await;

    let mut r = h.request("say secret");
    r.context
        .insert("parameters".into(), json!(r#"{"temperature": 0.9}"#));
    let d = h.pipeline.decide(r).await.unwrap();

    let body = provider_seen.lock().unwrap()[0].body.clone();
    assert_eq!(body["provider_id"], "openai");
    assert_eq!(body["prompt"], "SAY SECRET", "the text after the pre steps");
    assert_eq!(
        body["parameters"],
        json!({"max_tokens": 512, "temperature": 0.9}),
        "the policy's parameters, overridden by the request's"
    );
    assert_eq!(body["context"], body["metadata"]);
    assert_eq!(body["context"]["tenant_id"], "acme");
    assert_eq!(
        body["payload"]["payload"], "SAY SECRET",
        "what it got before stays"
    );

    let post = post_seen.lock().unwrap()[0].body.clone();
    assert_eq!(post["payload"]["payload"], "Mock response to: SAY SECRET");
    assert_eq!(post["payload"]["metadata"]["provider_id"], "test_provider");
    assert_eq!(post["message"], post["payload"], "the document's shape too");
    assert_eq!(post["context"], post["metadata"]);

    let out = d.provider_output.unwrap();
    assert_eq!(out.output, json!("Mock response to: SAY ******"));
    assert_eq!(
        (out.prompt_tokens, out.completion_tokens, out.total_tokens),
        (3, 3, 6),
        "2.5 → 3 (rounded), 3.0, 5.5 → 6"
    );
    assert_eq!(
        d.message.payload, "SAY SECRET",
        "the request message after pre"
    );
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![("up", "ok"), ("prov", "ok"), ("mask", "ok")]
    );
}

#[tokio::test]
async fn json_answers_pass_as_is_and_may_be_replaced_as_is() {
    let h = Harness::new(
        json!([ext("prov", "provider", 1000, 0), ext("keep", "post", 1000, 0), ext("swap", "post", 1000, 0)]),
        json!({"providers": [{"name": "p", "extension": "prov"}], "post": [{"id": "keep"}, {"id": "swap"}]}),
    )
    .await;
    let (_p, _) = serve_recording(
        &h.client,
        &h.subject("prov"),
        |_| json!({"provider_id": "p", "output": {"choices": [{"text": "hi"}]}}),
    )
    .await;
    let (_k, keep_seen) = serve_recording(&h.client, &h.subject("keep"), |_| json!({})).await;
    // The document's reply shape: `message` / `context`.
    let (_s, _) = serve_recording(&h.client, &h.subject("swap"), |b| {
        let mut m = b["message"].clone();
        m["payload"]["choices"][0]["text"] = json!("bye");
        json!({"message": m, "context": {"swapped": true}})
    })
    .await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(
        keep_seen.lock().unwrap()[0].body["payload"]["payload"],
        json!({"choices": [{"text": "hi"}]}),
        "the JSON answer reaches post as JSON"
    );
    assert_eq!(
        d.provider_output.unwrap().output,
        json!({"choices": [{"text": "bye"}]})
    );
    assert_eq!(d.message.payload, "x");
}

#[tokio::test]
async fn without_a_provider_answer_post_runs_on_the_message() {
    let mut h = Harness::new(
        json!([ext("z", "post", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "post": [{"id": "z"}]}),
    )
    .await;
    h.serve("z", Tag("z")).await;
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(d.message.payload, "x+z");
    assert!(d.provider_output.is_none());
}

#[tokio::test]
async fn a_required_post_failing_on_the_answer_fails_the_request_and_dry_run_skips_it() {
    let h = Harness::new(
        json!([
            ext("prov", "provider", 1000, 0),
            ext("bad", "post", 1000, 0)
        ]),
        json!({"providers": [{"name": "p", "extension": "prov"}], "post": [{"id": "bad"}]}),
    )
    .await;
    let (_p, prov) = serve_recording(&h.client, &h.subject("prov"), original_provider).await;
    let (_b, _) = serve_recording(
        &h.client,
        &h.subject("bad"),
        |_| json!({"payload": {"payload": "x", "metadata": 5}}),
    )
    .await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PostProcessorFailed, "{e}");
    assert!(
        e.message.contains("bad") && e.message.contains("payload.metadata must be an object"),
        "names the extension and the field: {e}"
    );
    let mut r = h.request("x");
    r.context.insert("dry_run".into(), json!(true));
    let d = h.pipeline.decide(r).await.unwrap();
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![("prov", "skipped"), ("bad", "skipped")]
    );
    assert_eq!(prov.lock().unwrap().len(), 1, "dry run sent nothing");
}

#[tokio::test]
async fn unreadable_and_error_replies_name_the_extension_and_the_field() {
    let h = Harness::new(
        json!([ext("prov", "provider", 1000, 0)]),
        json!({"providers": [{"name": "p", "extension": "prov"}]}),
    )
    .await;
    let (_p, _) = serve_recording(&h.client, &h.subject("prov"), |b| {
        match b["prompt"].as_str() {
            Some("negative") => {
                json!({"provider_id": "p", "output": "x", "usage": {"prompt_tokens": -2}})
            }
            _ => json!({"provider_id": "p", "status": "error", "error_code": "rate_limited",
                        "error_message": "slow down"}),
        }
    })
    .await;
    let e = h.pipeline.decide(h.request("negative")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::DecisionFailed);
    assert!(
        e.message.contains("extension prov")
            && e.message
                .contains("usage.prompt_tokens must be a non-negative number"),
        "{e}"
    );
    assert!(!e.message.contains("u64"), "no Rust type: {e}");

    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(
        e.details["extension_error"],
        json!({"code": "rate_limited", "message": "slow down"}),
        "{e:?}"
    );
    assert_eq!(e.details["extension_id"], "prov");
}

#[tokio::test]
async fn one_trace_id_per_request_generated_when_the_caller_sends_none() {
    // Both opt in to the Beamline-* headers (off by default).
    let mut a = ext("a", "pre", 1000, 0);
    a["metadata"] = json!({"headers": true});
    let mut prov = ext("prov", "provider", 1000, 0);
    prov["metadata"] = json!({"headers": true});
    let h = Harness::new(
        json!([a, prov]),
        json!({"providers": [{"name": "p", "extension": "prov"}], "pre": [{"id": "a"}]}),
    )
    .await;
    let (_a, pre_seen) = serve_recording(&h.client, &h.subject("a"), |_| json!({})).await;
    let (_p, prov_seen) = serve_recording(&h.client, &h.subject("prov"), original_provider).await;
    let mut r = h.request("x");
    r.message.trace_id.clear();
    let d = h.pipeline.decide(r).await.unwrap();
    let trace = d.message.trace_id.clone();
    assert_eq!(trace.len(), 32, "generated: {trace}");
    assert!(trace.bytes().all(|b| b.is_ascii_hexdigit()));
    for seen in [&pre_seen, &prov_seen] {
        let s = seen.lock().unwrap()[0].clone();
        assert_eq!(s.headers["Beamline-Trace-Id"], trace);
        assert_eq!(s.body["trace_id"], trace.as_str());
        assert_eq!(s.body["payload"]["trace_id"], trace.as_str());
        assert_eq!(s.body["metadata"]["trace_id"], trace.as_str());
    }
    let mut r = h.request("x");
    r.message.trace_id.clear();
    let again = h.pipeline.decide(r).await.unwrap().message.trace_id;
    assert_ne!(again, trace, "a new one per request");
}

#[tokio::test]
async fn a_reject_reads_reject_with_its_cause_and_details_stay_private() {
    let policy = json!({"providers": [{"name": "p"}],
                        "validators": [{"id": "guard", "on_fail": "block"}]});
    let exts = json!([ext("guard", "validator", 1000, 0)]);
    let reject = |_: &Value| json!({"status": "reject", "reason": "pii_detected", "details": {"match": "123-45-6789"}});

    let h = Harness::new(exts.clone(), policy.clone()).await;
    let (_g, _) = serve_recording(&h.client, &h.subject("guard"), reject).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidatorBlocked);
    assert_eq!(e.details["cause"], "rejected");
    assert_eq!(e.details["reason"], "pii_detected");
    assert!(
        !e.details.contains_key("details"),
        "not echoed by default: {:?}",
        e.details
    );
    assert_eq!(e.executed_extensions[0].status, StepStatus::Reject);

    let h = Harness::custom(
        exts.clone(),
        policy.clone(),
        BreakerConfig::default(),
        Default::default(),
        PipelineConfig {
            expose_validator_details: true,
            invoker: fast_invoker(),
            ..PipelineConfig::default()
        },
        &beamline_test_support::nats_url(),
    )
    .await;
    let (_g, _) = serve_recording(&h.client, &h.subject("guard"), reject).await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.details["details"], json!({"match": "123-45-6789"}));

    // Timeout, nobody listening, and an error reply: each its own cause, status error.
    let mut h = Harness::new(
        json!([ext("slow", "validator", 50, 0)]),
        json!({"providers": [{"name": "p"}], "validators": [{"id": "slow"}]}),
    )
    .await;
    h.serve("slow", Slow(std::time::Duration::from_millis(1000)))
        .await;
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(
        (e.code, &e.details["cause"]),
        (ErrorCode::ValidatorBlocked, &json!("timeout"))
    );
    assert_eq!(e.executed_extensions[0].status, StepStatus::Error);
    for (id, cause) in [("gone", "unavailable"), ("err", "error")] {
        let h2 = Harness::new(
            json!([ext(id, "validator", 1000, 0)]),
            json!({"providers": [{"name": "p"}], "validators": [{"id": id}]}),
        )
        .await;
        let _e = if id == "err" {
            Some(
                serve_recording(&h2.client, &h2.subject("err"), |_| {
                    json!({"status": "error", "error_code": "model_down", "error_message": "no model"})
                })
                .await,
            )
        } else {
            None
        };
        let e = h2.pipeline.decide(h2.request("x")).await.unwrap_err();
        assert_eq!(e.details["cause"], cause, "{id}: {e:?}");
        assert_eq!(e.executed_extensions[0].status, StepStatus::Error);
        if id == "err" {
            assert_eq!(e.details["extension_error"]["code"], "model_down");
        }
    }
}

#[tokio::test]
async fn json_payloads_are_limited_like_text() {
    let h = Harness::new(json!([]), json!({"providers": [{"name": "p"}]})).await;
    let mut deep = json!(1);
    for _ in 0..20 {
        deep = json!({"k": deep});
    }
    let mut r = h.request("");
    r.message.payload = Payload::Json(deep);
    let e = h.pipeline.decide(r).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("message.payload"), "{e}");
}

/// `[pipeline] max_reply_bytes` is the largest reply accepted: a reply of exactly
/// that size is read, one byte more is refused.
#[tokio::test]
async fn a_reply_of_exactly_max_reply_bytes_is_accepted() {
    let reply = json!({"payload": "answer"}).to_string();
    let limit = reply.len();
    let config = PipelineConfig {
        invoker: beamline_pipeline::InvokerConfig {
            max_reply_bytes: limit,
            ..fast_invoker()
        },
        ..PipelineConfig::default()
    };
    for (name, body, ok) in [
        ("exact", reply.clone(), true),
        ("over", format!("{reply} "), false),
    ] {
        let h = Harness::custom(
            json!([ext(name, "pre", 1000, 0)]),
            json!({"providers": [{"name": "p"}], "pre": [{"id": name}]}),
            BreakerConfig::default(),
            Default::default(),
            config.clone(),
            &beamline_test_support::nats_url(),
        )
        .await;
        let _s = serve_raw(&h.client, &h.subject(name), body.into_bytes()).await;
        let r = h.pipeline.decide(h.request("x")).await;
        if ok {
            assert_eq!(r.unwrap().message.payload, "answer", "{name}");
        } else {
            let e = r.unwrap_err();
            assert!(
                e.message
                    .contains(&format!("more than the limit of {limit}")),
                "{name}: {e}"
            );
        }
    }
}

/// Sticky selection spreads tenants by weight: with two providers of weight 1, each
/// gets a share of 64 tenants (and each tenant always the same one).
#[tokio::test]
async fn sticky_spreads_tenants_across_providers_by_weight() {
    let h = Harness::new(
        json!([]),
        json!({"providers": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}], "sticky": true}),
    )
    .await;
    let mut per_provider = std::collections::BTreeMap::new();
    for t in 0..64 {
        let tenant = format!("tenant-{t}");
        h.policy_for(&tenant).await;
        let first = h
            .pipeline
            .decide(h.request_for(&tenant, "x"))
            .await
            .unwrap()
            .provider_id;
        let again = h
            .pipeline
            .decide(h.request_for(&tenant, "x"))
            .await
            .unwrap()
            .provider_id;
        assert_eq!(first, again, "{tenant} moved");
        *per_provider.entry(first).or_insert(0) += 1;
    }
    let (a, b) = (
        per_provider.get("a").copied().unwrap_or(0),
        per_provider.get("b").copied().unwrap_or(0),
    );
    assert!(a >= 16 && b >= 16, "a {a}, b {b} of 64 tenants");
}

/// A validator step naming a missing or mistyped extension fails with that code
/// (`extension_not_found`, `invalid_request`), not as a block by the validator.
#[tokio::test]
async fn a_missing_or_mistyped_validator_is_not_a_block() {
    for (validator, code) in [
        ("ghost", ErrorCode::ExtensionNotFound),
        ("a_pre", ErrorCode::InvalidRequest),
    ] {
        let h = Harness::new(
            json!([ext("a_pre", "pre", 1000, 0)]),
            json!({"providers": [{"name": "p"}], "validators": [{"id": validator, "on_fail": "block"}]}),
        )
        .await;
        let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
        assert_eq!(e.code, code, "{validator}: {e}");
        assert_eq!(e.details["extension_id"], validator);
    }
}

/// A fallback to the failing provider itself, with retries: the chain stops after
/// 2 × providers + 3 failed calls and the request fails with decision_failed.
#[tokio::test]
async fn a_fallback_to_the_same_provider_stops_after_the_hop_limit() {
    for (providers, calls) in [
        (json!([{"name": "a", "extension": "pa"}]), 6),
        (
            json!([{"name": "a", "weight": 1, "extension": "pa"}, {"name": "b", "weight": 0}]),
            8,
        ),
    ] {
        let h = Harness::with(
            json!([ext("pa", "provider", 1000, 0)]),
            json!({"providers": providers,
                   "fallbacks": [{"when": {"status": ["5xx"]}, "retry": 1, "to": "a"}]}),
            BreakerConfig {
                enabled: false,
                ..BreakerConfig::default()
            },
            Default::default(),
        )
        .await;
        let (_p, seen) = serve_recording(
            &h.client,
            &h.subject("pa"),
            |_| json!({"error": {"code": "down", "message": "always"}}),
        )
        .await;
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            h.pipeline.decide(h.request("x")),
        )
        .await
        .expect("the fallback chain ends")
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::DecisionFailed, "{e}");
        assert_eq!(seen.lock().unwrap().len(), calls, "{providers}");
        assert_eq!(e.executed_extensions.len(), calls);
    }
}

#[tokio::test]
async fn payload_refs_are_limited_like_payloads() {
    let limits = Limits {
        max_payload_bytes: 64,
        ..Limits::default()
    };
    let h = Harness::with(
        json!([]),
        json!({"providers": [{"name": "p"}]}),
        BreakerConfig::default(),
        limits,
    )
    .await;
    // A reference that fits passes; one over the size limit, or too deep, is refused.
    let mut r = h.request("");
    r.message.payload_ref = Some(json!("s3://bucket/key"));
    h.pipeline
        .decide(r)
        .await
        .expect("a small payload_ref passes");

    let mut r = h.request("");
    r.message.payload_ref = Some(json!({"url": "x".repeat(100)}));
    let e = h.pipeline.decide(r).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.starts_with("payload_too_large"), "{e}");

    let mut deep = json!(1);
    for _ in 0..20 {
        deep = json!([deep]);
    }
    let mut r = h.request("");
    r.message.payload_ref = Some(deep);
    let e = h.pipeline.decide(r).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("message.payload_ref"), "{e}");
}

#[tokio::test]
async fn an_optional_post_failing_on_the_answer_leaves_it_and_when_can_skip_it() {
    let h = Harness::new(
        json!([
            ext("prov", "provider", 1000, 0),
            ext("bad", "post", 1000, 0),
            ext("shout", "post", 1000, 0)
        ]),
        json!({"providers": [{"name": "p", "extension": "prov"}],
               "post": [{"id": "bad", "mode": "optional"},
                        {"id": "shout", "when": {"volume": "loud"}}]}),
    )
    .await;
    let (_p, _) = serve_recording(&h.client, &h.subject("prov"), original_provider).await;
    let (_b, _) = serve_recording(
        &h.client,
        &h.subject("bad"),
        |_| json!({"error": {"code": "boom", "message": "no"}}),
    )
    .await;
    let (_s, shout_seen) = serve_recording(&h.client, &h.subject("shout"), |b| {
        let text = b["payload"]["payload"]
            .as_str()
            .unwrap_or("")
            .to_uppercase();
        json!({"payload": {"payload": text}})
    })
    .await;

    let d = h.pipeline.decide(h.request("hi")).await.unwrap();
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![("prov", "ok"), ("bad", "error"), ("shout", "skipped")]
    );
    assert_eq!(
        d.provider_output.unwrap().output,
        "Mock response to: hi",
        "the failed optional post left the answer as the provider gave it"
    );
    assert!(shout_seen.lock().unwrap().is_empty(), "when was false");

    let mut r = h.request("hi");
    r.context.insert("volume".into(), json!("loud"));
    let d = h.pipeline.decide(r).await.unwrap();
    assert_eq!(
        statuses(&d.executed_extensions),
        vec![("prov", "ok"), ("bad", "error"), ("shout", "ok")]
    );
    assert_eq!(d.provider_output.unwrap().output, "MOCK RESPONSE TO: HI");
    assert_eq!(shout_seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn the_beamline_headers_go_only_to_extensions_that_want_them() {
    let mut with = ext("with", "pre", 1000, 0);
    with["metadata"] = json!({"headers": true});
    let h = Harness::new(
        json!([ext("plain", "pre", 1000, 0), with]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "plain"}, {"id": "with"}]}),
    )
    .await;
    let (_a, plain_seen) = serve_recording(&h.client, &h.subject("plain"), |_| json!({})).await;
    let (_b, with_seen) = serve_recording(&h.client, &h.subject("with"), |_| json!({})).await;
    h.pipeline.decide(h.request("x")).await.unwrap();
    let plain = plain_seen.lock().unwrap()[0].clone();
    assert!(plain.headers.is_empty(), "{:?}", plain.headers);
    assert_eq!(
        plain.body["trace_id"], "trace-1",
        "the body carries the ids"
    );
    assert_eq!(plain.body["tenant_id"], "acme");
    let with = with_seen.lock().unwrap()[0].clone();
    assert_eq!(with.headers["Beamline-Trace-Id"], "trace-1");
    assert_eq!(with.headers["Beamline-Tenant-Id"], "acme");
    assert_eq!(with.headers["Beamline-Extension-Id"], "with");
    assert_eq!(with.headers["Beamline-Extension-Version"], "v1");
}

#[tokio::test]
async fn extension_headers_on_sends_them_to_every_extension_but_those_that_say_no() {
    let mut without = ext("without", "pre", 1000, 0);
    without["metadata"] = json!({"headers": false});
    let config = PipelineConfig {
        invoker: beamline_pipeline::InvokerConfig {
            extension_headers: true,
            ..fast_invoker()
        },
        ..PipelineConfig::default()
    };
    let h = Harness::custom(
        json!([ext("plain", "pre", 1000, 0), without]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "plain"}, {"id": "without"}]}),
        BreakerConfig::default(),
        Limits::default(),
        config,
        &beamline_test_support::nats_url(),
    )
    .await;
    let (_a, plain_seen) = serve_recording(&h.client, &h.subject("plain"), |_| json!({})).await;
    let (_b, without_seen) = serve_recording(&h.client, &h.subject("without"), |_| json!({})).await;
    h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(
        plain_seen.lock().unwrap()[0].headers["Beamline-Extension-Id"],
        "plain"
    );
    assert!(without_seen.lock().unwrap()[0].headers.is_empty());
}
