//! Faults: NATS killed and restarted under load (fail fast with documented codes,
//! reconnect, recover); bulkheads (a slow extension cannot hold more than its share of
//! calls, and a healthy extension keeps answering promptly meanwhile); hostile ids.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use beamline_model::{ErrorCode, Limits};
use beamline_pipeline::{BreakerConfig, PipelineConfig};
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::NatsServer;
use common::*;
use serde_json::json;

/// Sleeps, tracking how many calls it holds at once.
struct Gauge {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    sleep: Duration,
}

impl Handler for Gauge {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(self.sleep).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(Response::unchanged())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_under_load() {
    let mut nats = NatsServer::start();
    let config = PipelineConfig {
        invoker: fast_invoker(),
        ..PipelineConfig::default()
    };
    let mut h = Harness::custom(
        json!([ext("a", "pre", 500, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}]}),
        BreakerConfig::default(),
        Limits::default(),
        config,
        &nats.url(),
    )
    .await;
    // The extension has its own connection, as a separate service would.
    let ext_client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(nats.url())
        .await
        .unwrap();
    let _ext = beamline_sdk::spawn(
        ext_client.clone(),
        &h.subject("a"),
        Tag("a"),
        ServeOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        h.pipeline
            .decide(h.request("x"))
            .await
            .unwrap()
            .message
            .payload,
        "x+a"
    );

    nats.stop();
    // Wait until the router's client has noticed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(
        h.client.connection_state(),
        async_nats::connection::State::Connected
    ) {
        assert!(Instant::now() < deadline, "client never noticed the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While NATS is down: every call fails fast with a documented code.
    for _ in 0..20 {
        let t = Instant::now();
        let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::ExtensionUnavailable, "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "did not fail fast: {:?}",
            t.elapsed()
        );
    }
    // Refusals while disconnected are not the extension's fault: its breaker stays closed.
    let rt = h.pipeline.runtime();
    assert_eq!(rt.health_of("a", rt.now()).circuit_breaker_state, "closed");

    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(d) = h.pipeline.decide(h.request("x")).await {
            assert_eq!(d.message.payload, "x+a");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop_extensions().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_extension_is_bulkheaded_and_the_healthy_one_keeps_answering() {
    let config = PipelineConfig {
        invoker: fast_invoker(),
        max_in_flight_per_extension: 4,
        ..PipelineConfig::default()
    };
    let breaker = BreakerConfig {
        enabled: false,
        ..BreakerConfig::default()
    };
    let mut h = Harness::custom(
        json!([ext("slow", "pre", 300, 0), ext("fast", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "slow", "mode": "optional"}]}),
        breaker,
        Limits::default(),
        config,
        &beamline_test_support::nats_url(),
    )
    .await;
    std::fs::write(
        h.dir.path().join("policies/acme/fast.json"),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "fast"}]}).to_string(),
    )
    .unwrap();
    h.pipeline.registry().reload().await.unwrap();
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    h.serve(
        "slow",
        Gauge {
            now: now.clone(),
            max: max.clone(),
            sleep: Duration::from_secs(2),
        },
    )
    .await;
    h.serve("fast", Tag("f")).await;

    // 40 concurrent requests hammer the slow extension (all time out or are refused)…
    let mut slow = Vec::new();
    for _ in 0..40 {
        let (p, r) = (h.pipeline.clone(), h.request("x"));
        slow.push(tokio::spawn(async move { p.decide(r).await }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // …while the healthy extension is called: it never waits on the slow one.
    let mut lat = Vec::new();
    for _ in 0..50 {
        let mut r = h.request("x");
        r.policy_id = "fast".into();
        let t = Instant::now();
        h.pipeline.decide(r).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    assert!(
        p99 < Duration::from_millis(300),
        "healthy p99 {p99:?} reached the slow extension's timeout"
    );
    let mut refused = 0;
    for j in slow {
        let d = j.await.unwrap().unwrap();
        let e = d.executed_extensions[0].error.clone().unwrap_or_default();
        if e.contains("too many calls in flight") {
            refused += 1;
        }
    }
    assert!(
        max.load(Ordering::SeqCst) <= 4,
        "bulkhead let {} calls through",
        max.load(Ordering::SeqCst)
    );
    assert!(
        refused >= 30,
        "only {refused} of 40 refused by the bulkhead"
    );
}

#[tokio::test]
async fn hostile_ids_are_refused_before_anything_is_sent() {
    let mut h = Harness::new(
        json!([ext("a", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "a"}]}),
    )
    .await;
    let (handler, hits) = counted(Tag("a"));
    h.serve("a", handler).await;
    for (field, value) in [
        ("tenant", "acme\r\nX-Evil: 1"),
        ("tenant", "a b"),
        ("trace", "t\u{0}"),
        ("tenant", &"x".repeat(300)),
    ] {
        let mut r = h.request("x");
        match field {
            "tenant" => r.message.tenant_id = value.to_string(),
            _ => r.message.trace_id = value.to_string(),
        }
        assert_eq!(
            h.pipeline.decide(r).await.unwrap_err().code,
            ErrorCode::InvalidRequest,
            "{value:?}"
        );
    }
    let mut r = h.request("x");
    r.policy_id = "../../etc/passwd".into();
    assert_eq!(
        h.pipeline.decide(r).await.unwrap_err().code,
        ErrorCode::InvalidRequest
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 0);
}
