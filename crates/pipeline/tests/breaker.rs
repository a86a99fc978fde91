//! Breaker transitions through the pipeline against real NATS, with time moved by the
//! pipeline's clock (never slept through), and health as operators read it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use beamline_model::ErrorCode;
use beamline_pipeline::BreakerState;
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response};
use common::*;
use serde_json::json;

/// Fails while `broken` is set.
struct Switch {
    broken: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

impl Handler for Switch {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        if self.broken.load(Ordering::Relaxed) {
            Err(ExtensionError::new("down", "switched off"))
        } else {
            Ok(Response::unchanged())
        }
    }
}

#[tokio::test]
async fn closed_open_half_open_closed_and_reopen() {
    let mut h = Harness::new(
        json!([ext("s", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "s"}]}),
    )
    .await;
    let broken = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicU64::new(0));
    h.serve(
        "s",
        Switch {
            broken: broken.clone(),
            hits: hits.clone(),
        },
    )
    .await;
    let rt = h.pipeline.runtime();

    for _ in 0..5 {
        assert_eq!(
            h.pipeline.decide(h.request("x")).await.unwrap_err().code,
            ErrorCode::PreProcessorFailed
        );
    }
    assert_eq!(rt.extension("s").breaker.state(), BreakerState::Open);
    // Open: fails at once with extension_unavailable and sends nothing.
    let before = hits.load(Ordering::Relaxed);
    let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::ExtensionUnavailable, "{e}");
    assert_eq!(
        hits.load(Ordering::Relaxed),
        before,
        "an open breaker sent a NATS request"
    );

    // After the open timeout, a probe goes through; it fails → open again.
    rt.advance_clock(Duration::from_secs(61));
    assert_eq!(
        h.pipeline.decide(h.request("x")).await.unwrap_err().code,
        ErrorCode::PreProcessorFailed
    );
    assert_eq!(hits.load(Ordering::Relaxed), before + 1);
    assert_eq!(rt.extension("s").breaker.state(), BreakerState::Open);
    assert_eq!(
        h.pipeline.decide(h.request("x")).await.unwrap_err().code,
        ErrorCode::ExtensionUnavailable
    );

    // Fixed; next timeout → probe succeeds → closed.
    broken.store(false, Ordering::Relaxed);
    rt.advance_clock(Duration::from_secs(61));
    h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(rt.extension("s").breaker.state(), BreakerState::Closed);
    h.pipeline.decide(h.request("x")).await.unwrap();

    let health = rt.health_of("s", rt.now());
    assert_eq!(
        (health.health.success_count, health.health.failure_count),
        (2, 6)
    );
    assert_eq!(health.circuit_breaker_state, "closed");
    assert_eq!(rt.extension("s").breaker.opened_total(), 2);
}

#[tokio::test]
async fn timeouts_and_garbage_count_as_failures_but_refusals_do_not() {
    let mut h = Harness::new(
        json!([ext("slow", "pre", 20, 0), ext("garbage", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "slow", "mode": "optional"},
                                                      {"id": "garbage", "mode": "optional"}]}),
    )
    .await;
    h.serve("slow", Slow(Duration::from_millis(300))).await;
    let _g = serve_raw(&h.client, &h.subject("garbage"), b"not json".to_vec()).await;
    for _ in 0..5 {
        let d = h.pipeline.decide(h.request("x")).await.unwrap();
        assert_eq!(
            d.executed_extensions
                .iter()
                .map(|e| e.status.as_str())
                .collect::<Vec<_>>(),
            vec!["error", "error"]
        );
    }
    let rt = h.pipeline.runtime();
    for id in ["slow", "garbage"] {
        assert_eq!(rt.extension(id).breaker.state(), BreakerState::Open, "{id}");
    }
    // Calls refused while open are not failures of the extension.
    for _ in 0..10 {
        h.pipeline.decide(h.request("x")).await.unwrap();
    }
    for id in ["slow", "garbage"] {
        let health = rt.health_of(id, rt.now()).health;
        assert_eq!((health.success_count, health.failure_count), (0, 5), "{id}");
    }
}

#[tokio::test]
async fn a_provider_with_an_open_breaker_is_skipped() {
    let mut h = Harness::new(
        json!([ext("pa", "provider", 1000, 0), ext("pb", "provider", 1000, 0)]),
        json!({"providers": [{"name": "a", "weight": 99, "extension": "pa"}, {"name": "b", "weight": 1, "extension": "pb"}]}),
    )
    .await;
    h.serve("pa", Fail).await;
    h.serve("pb", Provider("b")).await;
    let mut failures = 0;
    for _ in 0..20 {
        if h.pipeline.decide(h.request("x")).await.is_err() {
            failures += 1;
        }
    }
    assert!(failures >= 5);
    assert_eq!(
        h.pipeline.runtime().extension("pa").breaker.state(),
        BreakerState::Open
    );
    for _ in 0..10 {
        assert_eq!(
            h.pipeline.decide(h.request("x")).await.unwrap().provider_id,
            "b"
        );
    }
}

#[tokio::test]
async fn health_summary_counts_states() {
    let mut h = Harness::new(
        json!([ext("good", "pre", 1000, 0), ext("bad", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "good"}, {"id": "bad", "mode": "optional"}]}),
    )
    .await;
    h.serve("good", Tag("g")).await;
    h.serve("bad", Fail).await;
    for _ in 0..6 {
        h.pipeline.decide(h.request("x")).await.unwrap();
    }
    let rt = h.pipeline.runtime();
    let s = rt.summary(["good", "bad"].into_iter(), rt.now());
    assert_eq!((s.total, s.healthy, s.unhealthy, s.half_open), (2, 1, 1, 0));
    assert!(s.avg_latency_ms > 0.0);
    rt.advance_clock(Duration::from_secs(61));
    let _ = rt.extension("bad").breaker.try_acquire(rt.now()).unwrap();
    let s = rt.summary(["good", "bad"].into_iter(), rt.now());
    assert_eq!(s.half_open, 1);
}

#[tokio::test]
async fn a_policy_can_override_breaker_settings_with_breakers_of_its_own() {
    let mut h = Harness::new(
        json!([ext("s", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "s", "mode": "optional"}],
               "circuit_breaker": {"failure_threshold": 2, "timeout_seconds": 5}}),
    )
    .await;
    // A second policy of the same tenant with the global settings.
    std::fs::write(
        h.dir.path().join("policies/acme/lenient.json"),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "s", "mode": "optional"}]}).to_string(),
    )
    .unwrap();
    h.pipeline.registry().reload().await.unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    h.serve(
        "s",
        Switch {
            broken: Arc::new(AtomicBool::new(true)),
            hits: hits.clone(),
        },
    )
    .await;
    for _ in 0..2 {
        h.pipeline.decide(h.request("x")).await.unwrap();
    }
    assert_eq!(hits.load(Ordering::Relaxed), 2);
    // The strict policy's breaker opened after 2 failures…
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    assert!(
        d.executed_extensions[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("circuit breaker"),
        "{d:?}"
    );
    assert_eq!(hits.load(Ordering::Relaxed), 2);
    // …while the lenient policy still calls the extension (global threshold 5).
    let mut r = h.request("x");
    r.policy_id = "lenient".into();
    h.pipeline.decide(r).await.unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 3);
    assert_eq!(
        h.pipeline.runtime().extension("s").breaker.state(),
        BreakerState::Closed
    );
    // The strict one probes again after its own 5 s timeout.
    h.pipeline.runtime().advance_clock(Duration::from_secs(6));
    h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(hits.load(Ordering::Relaxed), 4);
}

/// A canary version that fails opens its own breaker: tenants still on the base
/// version keep being served, and operators see the extension as open.
#[tokio::test]
async fn a_failing_canary_version_does_not_cut_off_the_base_version() {
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
    h.serve("n.v2", Fail).await;
    for _ in 0..5 {
        assert!(
            h.pipeline
                .decide(h.request_for("premium", "x"))
                .await
                .is_err()
        );
    }
    let e = h
        .pipeline
        .decide(h.request_for("premium", "x"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code,
        ErrorCode::ExtensionUnavailable,
        "v2's breaker is open"
    );
    let d = h.pipeline.decide(h.request_for("acme", "x")).await.unwrap();
    assert_eq!(d.message.payload, "x+v1", "v1 tenants are unaffected");
    let rt = h.pipeline.runtime();
    assert_eq!(rt.health_of("n", rt.now()).circuit_breaker_state, "open");
    assert!(!rt.reset_breakers("n").is_empty());
    assert_eq!(rt.effective_state("n"), BreakerState::Closed);
}

/// Answers `n` times, then fails every call.
struct OkThenFail {
    n: u64,
    seen: AtomicU64,
}

impl Handler for OkThenFail {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        if self.seen.fetch_add(1, Ordering::Relaxed) < self.n {
            Ok(Response::unchanged())
        } else {
            Err(ExtensionError::new("late", "fails from now on"))
        }
    }
}

/// The error-rate rule trips on the rate, not on the count of failures: one failure
/// in ten calls (10 %) leaves the breaker closed; five of ten (50 %) open it.
#[tokio::test]
async fn the_error_rate_rule_compares_the_rate_with_its_threshold() {
    let breaker = beamline_pipeline::BreakerConfig {
        min_calls: 10,
        ..beamline_pipeline::BreakerConfig::default()
    };
    let mut h = Harness::with(
        json!([ext("s", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "s", "mode": "optional"}]}),
        breaker,
        beamline_model::Limits::default(),
    )
    .await;
    h.serve(
        "s",
        OkThenFail {
            n: 9,
            seen: AtomicU64::new(0),
        },
    )
    .await;
    for _ in 0..10 {
        h.pipeline.decide(h.request("x")).await.unwrap();
    }
    let rt = h.pipeline.runtime();
    assert_eq!(
        rt.extension("s").breaker.state(),
        BreakerState::Closed,
        "1 failure in 10 calls is under the 50 % threshold"
    );
    // Four more failures: 5 of 14 (36 %) and 4 consecutive: still closed; the fifth
    // consecutive failure opens it.
    for _ in 0..3 {
        h.pipeline.decide(h.request("x")).await.unwrap();
    }
    assert_eq!(rt.extension("s").breaker.state(), BreakerState::Closed);
    h.pipeline.decide(h.request("x")).await.unwrap();
    h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(rt.extension("s").breaker.state(), BreakerState::Open);
}

/// Records the `status` label and the error of every invocation.
#[derive(Default)]
struct Statuses(std::sync::Mutex<Vec<(String, &'static str)>>);

impl beamline_pipeline::Observer for Statuses {
    fn invocation(&self, event: &beamline_pipeline::InvocationEvent<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((event.extension_id.to_string(), event.status));
    }
}

/// The metric's `status` label: `success`, `timeout` for a timed-out call, `error`
/// for an error reply; a call refused by an open breaker carries its version in
/// executed_extensions.
#[tokio::test]
async fn invocation_status_labels_and_refused_calls_keep_their_version() {
    let mut h = Harness::new(
        json!([ext("ok", "pre", 1000, 0), ext("slow", "pre", 20, 0), ext("bad", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "ok"}, {"id": "slow", "mode": "optional"},
                                                      {"id": "bad", "mode": "optional"}]}),
    )
    .await;
    let seen = Arc::new(Statuses::default());
    h.pipeline = h.pipeline.clone().with_observer(seen.clone());
    h.serve("ok", Tag("ok")).await;
    h.serve("slow", Slow(Duration::from_millis(300))).await;
    h.serve("bad", Fail).await;
    h.pipeline.decide(h.request("x")).await.unwrap();
    assert_eq!(
        *seen.0.lock().unwrap(),
        vec![
            ("ok".to_string(), "success"),
            ("slow".to_string(), "timeout"),
            ("bad".to_string(), "error")
        ]
    );
    // Open bad's breaker (five failures), then look at a refused call's entry.
    for _ in 0..4 {
        h.pipeline.decide(h.request("x")).await.unwrap();
    }
    let rt = h.pipeline.runtime();
    assert_eq!(rt.extension("bad").breaker.state(), BreakerState::Open);
    let d = h.pipeline.decide(h.request("x")).await.unwrap();
    let refused = &d.executed_extensions[2];
    assert_eq!(refused.id, "bad");
    assert_eq!(refused.error.as_deref(), Some("circuit breaker is open"));
    assert_eq!(refused.version.as_deref(), Some("v1"));
}
