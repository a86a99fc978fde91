//! Graceful shutdown (no accepted request goes unanswered, health persisted, exit 0)
//! and scale-out (three routers on one PostgreSQL and one NATS: a committed change
//! reaches all three, they decide alike, and the NATS intake spreads across them).

mod common;

use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::{NatsServer, TestDatabase};
use common::*;
use serde_json::{Value, json};

struct Slow(Duration);
impl Handler for Slow {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        tokio::time::sleep(self.0).await;
        Ok(Response::unchanged())
    }
}

/// Slow, counting the calls it has received (so a test can wait until they are in
/// flight).
struct SlowCounted(Duration, std::sync::Arc<std::sync::atomic::AtomicUsize>);
impl Handler for SlowCounted {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.0).await;
        Ok(Response::unchanged())
    }
}

const CLUSTER_SEED: &str = r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry) VALUES ('work', 'pre', 'cluster.work', 3000, 0);
INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules)
  VALUES ('work', 'v2', 'cluster.work', 3000, 0, '{"tenant_id": ["premium_tenant"]}');
INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('default', 'default',
  '{"providers": [{"name": "a", "weight": 50}, {"name": "b", "weight": 50}], "sticky": true, "pre": [{"id": "work"}]}');
"#;

async fn setup() -> (TestDatabase, sqlx::PgPool, NatsServer) {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(CLUSTER_SEED).execute(&pool).await.unwrap();
    (db, pool, NatsServer::start())
}

fn request(tenant: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            tenant_id: tenant.into(),
            payload: b"hi".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_persists_health() {
    let (db, pool, nats) = setup().await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _ext = beamline_sdk::spawn(
        nc.clone(),
        "cluster.work",
        SlowCounted(Duration::from_millis(700), received.clone()),
        ServeOptions::default(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let client = RouterClient::connect(router.addr.clone()).await.unwrap();

    let mut grpc = Vec::new();
    for _ in 0..20 {
        let mut c = client.clone();
        grpc.push(tokio::spawn(async move { c.decide(request("acme")).await }));
    }
    let mut intake = Vec::new();
    for i in 0..10 {
        let nc = nc.clone();
        intake.push(tokio::spawn(async move {
            let body = json!({"version": "1", "request_id": format!("r{i}"), "tenant_id": "acme", "task": {"type": "chat", "payload": "hi"}});
            nc.request("beamline.router.v1.decide", serde_json::to_vec(&body).unwrap().into()).await
        }));
    }
    // Every request is in flight: the extension has received all 30 calls (and
    // answers each 700 ms later), so SIGTERM lands while they are being served.
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.load(std::sync::atomic::Ordering::SeqCst) < 30 {
        if Instant::now() > deadline {
            panic!(
                "only {} of 30 calls reached the extension in 20 s (finished: {} gRPC, {} intake)",
                received.load(std::sync::atomic::Ordering::SeqCst),
                grpc.iter().filter(|j| j.is_finished()).count(),
                intake.iter().filter(|j| j.is_finished()).count(),
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopping = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(router.child.id() as i32, libc::SIGTERM) };
    for j in grpc {
        let d = j
            .await
            .unwrap()
            .expect("an accepted gRPC request was not answered");
        assert_eq!(d.into_inner().executed_extensions[0].status, "ok");
    }
    for j in intake {
        let msg = j
            .await
            .unwrap()
            .expect("an accepted intake request was not answered");
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["ok"], true, "{v}");
    }
    let status = router.wait_exit();
    assert!(status.success(), "exit {status:?}");
    assert!(stopping.elapsed() < Duration::from_secs(30));
    let successes: i64 = sqlx::query_scalar(
        "SELECT success_count FROM extension_health WHERE extension_id = 'work'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        successes, 30,
        "every call made before shutdown is in extension_health"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_routers_share_one_database_and_one_nats() {
    let (db, pool, nats) = setup().await;
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let _ext = beamline_sdk::spawn(
        nc.clone(),
        "cluster.work",
        Slow(Duration::from_millis(1)),
        ServeOptions::default(),
    )
    .await
    .unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let routers: Vec<Router> = dirs
        .iter()
        .map(|d| start(&write_config(d.path(), db.url(), &nats.url(), "")))
        .collect();
    for r in &routers {
        wait_until(10, "listening", async || {
            r.json(Some(VIEWER_KEY), &["registry", "status"])["listening"] == true
        })
        .await;
    }

    // A committed change reaches all three (NOTIFY), timed per router.
    let committed = Instant::now();
    sqlx::query("UPDATE extensions SET timeout_ms = 2500 WHERE id = 'work'")
        .execute(&pool)
        .await
        .unwrap();
    let mut seen = Vec::new();
    for r in &routers {
        wait_until(10, "change visible", async || {
            r.json(Some(VIEWER_KEY), &["ext", "get", "work"])["timeout_ms"] == 2500
        })
        .await;
        seen.push(committed.elapsed());
    }
    eprintln!("commit → visible on routers 1..3 (upper bounds, polled through the CLI): {seen:?}");

    // Same version and provider decisions everywhere.
    let mut versions = Vec::new();
    let mut providers = Vec::new();
    for r in &routers {
        versions.push(
            r.json(
                Some(VIEWER_KEY),
                &[
                    "ext",
                    "resolve",
                    "work",
                    "--context",
                    "tenant_id=premium_tenant",
                ],
            )["version"]
                .clone(),
        );
        let mut c = RouterClient::connect(r.addr.clone()).await.unwrap();
        providers.push(
            c.decide(request("tenant-42"))
                .await
                .unwrap()
                .into_inner()
                .provider_id,
        );
    }
    assert_eq!(versions, vec![json!("v2"); 3]);
    assert!(providers.windows(2).all(|w| w[0] == w[1]), "{providers:?}");

    // The NATS intake's queue group spreads requests across the routers.
    for i in 0..90 {
        let body = json!({"version": "1", "request_id": format!("q{i}"), "tenant_id": "acme", "task": {"type": "chat", "payload": "hi"}});
        let msg = nc
            .request(
                "beamline.router.v1.decide",
                serde_json::to_vec(&body).unwrap().into(),
            )
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["ok"], true, "{v}");
    }
    let mut served = Vec::new();
    for r in &routers {
        served.push(
            r.json(Some(VIEWER_KEY), &["health", "get", "work"])["success_count"]
                .as_i64()
                .unwrap(),
        );
    }
    assert_eq!(served.iter().sum::<i64>(), 90 + 3, "{served:?}");
    assert!(
        served.iter().all(|n| *n > 3),
        "every router took part: {served:?}"
    );
}

/// `breaker reset` on one router closes the breaker of the other routers on the same
/// database too (the reset is recorded in extension_health and announced by NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_reset_reaches_the_other_routers() {
    let (db, _pool, nats) = setup().await;
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let routers: Vec<Router> = dirs
        .iter()
        .map(|d| start(&write_config(d.path(), db.url(), &nats.url(), "")))
        .collect();
    let state = |r: &Router| {
        r.json(Some(VIEWER_KEY), &["health", "get", "work"])["circuit_breaker_state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Nothing listens on cluster.work: five failed calls open each router's breaker.
    for r in &routers {
        wait_until(10, "listening", async || {
            r.json(Some(VIEWER_KEY), &["registry", "status"])["listening"] == true
        })
        .await;
        let mut c = RouterClient::connect(r.addr.clone()).await.unwrap();
        for _ in 0..5 {
            let e = c.decide(request("acme")).await.unwrap_err();
            assert!(
                e.message().starts_with("extension_unavailable"),
                "{}",
                e.message()
            );
        }
        assert_eq!(state(r), "open");
    }
    let reset = routers[0].json(Some(OPERATOR_KEY), &["breaker", "reset", "work"]);
    assert_eq!(reset["propagated"], true, "{reset}");
    assert_eq!(state(&routers[0]), "closed");
    // The other router's breaker would stay open for its 60 s open timeout; it closes
    // long before that only if the reset reached it.
    wait_until(15, "the reset reaches the second router", async || {
        state(&routers[1]) == "closed"
    })
    .await;
    assert!(
        routers[1]
            .log
            .lock()
            .unwrap()
            .contains("circuit breaker reset by operator"),
        "the second router logs the reset"
    );
}
