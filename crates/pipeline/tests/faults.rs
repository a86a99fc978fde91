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
        json!([ext("a", "pre", 5000, 0)]),
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
    wait_connected(&ext_client).await;
    ext_client
        .flush()
        .await
        .expect("the extension's subscription reaches NATS");
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
    // While NATS is down: every call fails fast with a documented code — refused
    // before sending (not connected), so it never waits out the extension's 5 s
    // timeout.
    for _ in 0..20 {
        let t = Instant::now();
        let e = h.pipeline.decide(h.request("x")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::ExtensionUnavailable, "{e}");
        assert!(e.message.contains("not connected to NATS"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(5000),
            "waited for the extension's timeout: {:?}",
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
        json!([ext("slow", "pre", 1000, 0), ext("fast", "pre", 1000, 0)]),
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
    // Wait until the slow extension holds its full share (4) of calls.
    let deadline = Instant::now() + Duration::from_secs(10);
    while now.load(Ordering::SeqCst) < 4 {
        assert!(
            Instant::now() < deadline,
            "the slow extension never held 4 calls"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
    let mut refused = 0;
    let mut slow_sent = Vec::new();
    for j in slow {
        let d = j.await.unwrap().unwrap();
        let step = &d.executed_extensions[0];
        let e = step.error.clone().unwrap_or_default();
        if e.contains("too many calls in flight") {
            refused += 1;
        } else {
            slow_sent.push(Duration::from_secs_f64(step.latency_ms / 1000.0));
        }
    }
    // Relative, in the same run: the healthy calls' median is below the fastest call
    // the slow extension was actually sent (each waited for its 1 s timeout).
    let healthy_median = lat[lat.len() / 2];
    let slow_min = slow_sent
        .iter()
        .min()
        .copied()
        .expect("some slow calls were sent");
    assert!(
        healthy_median < slow_min,
        "healthy median {healthy_median:?} is not below the slow extension's {slow_min:?}"
    );
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

/// Fails every other call.
struct HalfTheTime(std::sync::atomic::AtomicU64);

impl Handler for HalfTheTime {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        if self.0.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            Err(ExtensionError::new("flaky", "every other call fails"))
        } else {
            Ok(Response::unchanged())
        }
    }
}

/// An extension failing half the time: every request is answered, with success or a
/// documented code, and the error-rate rule of the breaker trips once the window has
/// enough calls.
#[tokio::test]
async fn an_extension_failing_half_the_time() {
    let breaker = BreakerConfig {
        min_calls: 10,
        ..BreakerConfig::default()
    };
    let config = PipelineConfig {
        invoker: fast_invoker(),
        ..PipelineConfig::default()
    };
    let mut h = Harness::custom(
        json!([ext("f", "pre", 1000, 0)]),
        json!({"providers": [{"name": "p"}], "pre": [{"id": "f"}]}),
        breaker,
        Limits::default(),
        config,
        &beamline_test_support::nats_url(),
    )
    .await;
    h.serve("f", HalfTheTime(std::sync::atomic::AtomicU64::new(0)))
        .await;
    let (mut ok, mut failed, mut refused) = (0, 0, 0);
    for _ in 0..40 {
        match h.pipeline.decide(h.request("x")).await {
            Ok(_) => ok += 1,
            Err(e) if e.code == ErrorCode::PreProcessorFailed => failed += 1,
            Err(e) if e.code == ErrorCode::ExtensionUnavailable => refused += 1,
            Err(e) => panic!("undocumented outcome: {e}"),
        }
    }
    assert!(
        ok >= 4 && failed >= 5,
        "ok {ok}, failed {failed}, refused {refused}"
    );
    assert!(
        refused > 0,
        "a 50 % error rate over ≥ 10 calls opens the breaker"
    );
}

/// A storm of registry writes while requests flow: every request is answered with
/// success or a documented code, and the router ends on the last committed state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_registry_writes_during_load() {
    use beamline_model::SecretUrl;
    use beamline_registry::{Registry, RegistryConfig, SourceMode};
    use beamline_test_support::TestDatabase;
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    beamline_registry::database::migrate(&pool, "test")
        .await
        .unwrap();
    let prefix = format!("storm{}", std::process::id());
    sqlx::query(
        "INSERT INTO extensions (id, type, subject, timeout_ms) VALUES ('s', 'pre', $1, 1000)",
    )
    .bind(format!("{prefix}.s"))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('acme', 'default', '{\"providers\": [{\"name\": \"p\"}], \"pre\": [{\"id\": \"s\"}]}')")
        .execute(&pool)
        .await
        .unwrap();
    let registry = Registry::start(
        RegistryConfig {
            source: SourceMode::Database,
            database_url: Some(SecretUrl::new(db.url())),
            ..RegistryConfig::default()
        },
        Limits::default(),
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let sync = registry.spawn_sync(stop.clone());
    let client = async_nats::connect(beamline_test_support::nats_url())
        .await
        .unwrap();
    let _ext = beamline_sdk::spawn(
        client.clone(),
        &format!("{prefix}.s"),
        Tag("s"),
        ServeOptions::default(),
    )
    .await
    .unwrap();
    let pipeline = beamline_pipeline::Pipeline::new(
        registry.clone(),
        client,
        PipelineConfig {
            invoker: fast_invoker(),
            ..PipelineConfig::default()
        },
        BreakerConfig::default(),
        Limits::default(),
    );
    let load = {
        let p = pipeline.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut outcomes = (0, 0);
            // The timeouts the registry held while requests were answered: more than
            // the first shows that writes landed during the load.
            let mut states = std::collections::BTreeSet::new();
            let (mut n, until) = (0, Instant::now() + Duration::from_secs(30));
            // At least 300 requests, and on until a write has been seen.
            while n < 300 || (states.len() < 2 && Instant::now() < until) {
                n += 1;
                states.insert(registry.snapshot().lookup("s").map(|e| e.timeout_ms));
                let r = beamline_pipeline::DecideRequest {
                    request_id: "r".into(),
                    message: beamline_model::wire::Message {
                        tenant_id: "acme".into(),
                        payload: "x".into(),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                match p.decide(r).await {
                    Ok(_) => outcomes.0 += 1,
                    Err(e) if e.code == ErrorCode::PreProcessorFailed => outcomes.1 += 1,
                    Err(e) => panic!("undocumented outcome during the storm: {e}"),
                }
            }
            (n, outcomes, states)
        })
    };
    for i in 0..200 {
        // Flip enabled and the timeout; every write is a valid record.
        sqlx::query("UPDATE extensions SET timeout_ms = $1, enabled = $2 WHERE id = 's'")
            .bind(100 + i)
            .bind(i % 10 != 9)
            .execute(&pool)
            .await
            .unwrap();
    }
    let (n, (ok, disabled), states) = load.await.unwrap();
    assert_eq!(ok + disabled, n);
    assert!(ok > 0);
    assert!(
        states.len() >= 2,
        "no write reached the registry while requests flowed: {states:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.snapshot().lookup("s").unwrap().timeout_ms != 299 {
        assert!(Instant::now() < deadline, "the last write never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !registry.snapshot().lookup("s").unwrap().enabled,
        "the last write (i = 199) disabled it"
    );
    stop.cancel();
    sync.await.unwrap();
}
