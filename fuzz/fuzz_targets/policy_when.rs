//! Policy `when` conditions and whole policy documents (`beamline_model::policy`).
//!
//! Input: a JSON value; optionally a 0xff byte and then a JSON object used as the
//! request context (without one, a fixed context with nested keys is used). The value
//! is parsed as a `when` and evaluated against the context, and parsed as a policy
//! document whose steps' and fallbacks' `when`s are evaluated too.
//! Must never panic; errors are fine.
#![no_main]

use beamline_model::policy::When;
use beamline_model::{Limits, Policy};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

fn default_context() -> Map<String, Value> {
    let Value::Object(m) = json!({
        "tenant_id": "acme", "policy_id": "default", "status": "timeout",
        "priority": 5, "score": 0.5, "big": 1e308, "neg": -9223372036854775808i64,
        "dry_run": true, "channel": "web", "tags": ["a", "b"],
        "user": {"tier": "gold", "age": 42, "geo": {"country": "DE"}},
        "a.b": "dotted",
    }) else {
        unreachable!()
    };
    m
}

fn check(when: &When, context: &Map<String, Value>) {
    let first = when.evaluate(context);
    assert_eq!(
        first,
        when.evaluate(context),
        "evaluate is not deterministic"
    );
    if when.conditions.is_empty() {
        assert!(first, "an empty `when` must hold");
    }
}

fuzz_target!(|data: &[u8]| {
    let (when_part, context_part) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(v) = serde_json::from_slice::<Value>(when_part) else {
        return;
    };
    let context = match context_part.and_then(|c| serde_json::from_slice::<Value>(c).ok()) {
        Some(Value::Object(m)) => m,
        _ => default_context(),
    };
    let limits = Limits::default();

    if let Ok(when) = When::parse(&v, &limits) {
        check(&when, &context);
        let again =
            When::parse_optional(Some(&v), &limits).expect("parse_optional agrees with parse");
        assert_eq!(again, when);
    }

    if let Ok(doc) = Policy::parse_document(v.clone())
        && let Ok(policy) = Policy::from_document("t", "p", true, doc, &limits)
    {
        let _ = policy.extension_refs();
        for step in policy.pre.iter().chain(policy.post.iter()) {
            check(&step.when, &context);
        }
        for validator in &policy.validators {
            check(&validator.when, &context);
        }
        for fallback in &policy.fallbacks {
            for status in ["timeout", "5xx", "unavailable"] {
                let mut c = Map::new();
                c.insert("status".into(), Value::String(status.into()));
                check(&fallback.when, &c);
            }
        }
    }
});
