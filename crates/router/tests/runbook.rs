//! The runbook's procedures against the real binary, real PostgreSQL and real NATS:
//! health checks, hot reload, source switch, enable/disable, configuration update,
//! version rollout and rollback, manual breaker reset by SQL and by CLI, policy
//! management, health persistence — each through the CLI and the runbook's SQL.

mod common;

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_test_support::{NatsServer, TestDatabase};
use common::*;
use serde_json::{Value, json};

async fn setup() -> (TestDatabase, sqlx::PgPool, NatsServer, tempfile::TempDir) {
    let db = TestDatabase::create().await;
    let out = bin()
        .args(["migrate", "--database-url", db.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    (db, pool, NatsServer::start(), tempfile::tempdir().unwrap())
}

fn decide_request() -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: "m".into(),
            tenant_id: "acme".into(),
            trace_id: "t".into(),
            message_type: "chat".into(),
            payload: b"hello".to_vec(),
            ..Default::default()
        }),
        policy_id: String::new(),
        context: Default::default(),
    }
}

async fn ext(router: &Router, id: &str) -> Value {
    router.json(Some(VIEWER_KEY), &["ext", "get", id])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_procedures_through_the_cli_and_sql() {
    let (db, pool, nats, dir) = setup().await;
    let config = write_config(dir.path(), db.url(), &nats.url(), "");
    let mut router = start(&config);

    // Health Checks: registry status, test connection, lookup, lookup by type.
    let status = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    assert_eq!(
        (
            status["running"].clone(),
            status["size"].clone(),
            status["source"].clone()
        ),
        (json!(true), json!(4), json!("database"))
    );
    assert_eq!(status["db_state"], "connected");
    assert!(status["last_sync_at"].is_string());
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["registry", "test-connection"])["status"],
        "connected"
    );
    let n = ext(&router, "normalize_text").await;
    for (k, v) in [
        ("id", json!("normalize_text")),
        ("type", json!("pre")),
        ("subject", json!("beamline.ext.pre.normalize_text.v1")),
        ("timeout_ms", json!(100)),
        ("retry", json!(0)),
        ("enabled", json!(true)),
        ("version", json!("v1")),
    ] {
        assert_eq!(n[k], v, "field {k} of {n}");
    }
    assert!(n["config"].is_object() && n["metadata"].is_object());
    let pre = router.json(Some(VIEWER_KEY), &["ext", "list", "--type", "pre"]);
    assert_eq!(pre.as_array().unwrap().len(), 1);
    let missing = router.cli(Some(VIEWER_KEY), &["ext", "get", "nope"]);
    assert_eq!(missing.status.code(), Some(4));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "error: extension 'nope' not found"
    );

    // Enable/Disable via database + reload.
    sqlx::raw_sql("UPDATE extensions SET enabled = FALSE WHERE id = 'normalize_text';")
        .execute(&pool)
        .await
        .unwrap();
    router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    assert_eq!(ext(&router, "normalize_text").await["enabled"], false);
    sqlx::raw_sql("UPDATE extensions SET enabled = TRUE WHERE id = 'normalize_text';")
        .execute(&pool)
        .await
        .unwrap();
    router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    assert_eq!(ext(&router, "normalize_text").await["enabled"], true);

    // Update configuration via database; NOTIFY makes it live even without reload.
    sqlx::raw_sql("UPDATE extensions SET timeout_ms = 200 WHERE id = 'normalize_text';")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql("UPDATE extensions SET retry = 1 WHERE id = 'normalize_text';")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql("UPDATE extensions SET config = '{\"max_length\": 1000}'::jsonb WHERE id = 'normalize_text';").execute(&pool).await.unwrap();
    wait_until(5, "config update via NOTIFY", async || {
        let e = ext(&router, "normalize_text").await;
        e["timeout_ms"] == 200 && e["retry"] == 1 && e["config"]["max_length"] == 1000
    })
    .await;

    // The same through the CLI: written to the database, audit-logged, reloaded.
    let set = router.json(
        Some(ADMIN_KEY),
        &[
            "ext",
            "set",
            "normalize_text",
            "--timeout-ms",
            "300",
            "--config",
            "{\"max_length\": 2000}",
        ],
    );
    assert_eq!(set["extension"]["timeout_ms"], 300);
    assert_eq!(
        ext(&router, "normalize_text").await["config"]["max_length"],
        2000
    );
    router.json(Some(OPERATOR_KEY), &["ext", "disable", "normalize_text"]);
    assert_eq!(ext(&router, "normalize_text").await["enabled"], false);
    router.json(Some(OPERATOR_KEY), &["ext", "enable", "normalize_text"]);
    let audit: Vec<(String, String, Value, Value)> = sqlx::query_as(
        "SELECT action, changed_by, old_values, new_values FROM extension_audit_log WHERE extension_id = 'normalize_text' ORDER BY changed_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let actions: Vec<(&str, &str)> = audit.iter().map(|a| (a.0.as_str(), a.1.as_str())).collect();
    assert_eq!(
        actions,
        vec![
            ("update", "alice-admin"),
            ("disable", "oscar-operator"),
            ("enable", "oscar-operator")
        ]
    );
    assert_eq!(
        (
            audit[0].2["timeout_ms"].clone(),
            audit[0].3["timeout_ms"].clone()
        ),
        (json!(200), json!(300))
    );
    // Bad values are refused, naming the field, and change nothing.
    let bad = router.cli(
        Some(ADMIN_KEY),
        &["ext", "set", "normalize_text", "--timeout-ms", "99999"],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("timeout_ms"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // Roles: a viewer cannot write, no key cannot read.
    assert_eq!(
        router
            .cli(Some(VIEWER_KEY), &["ext", "disable", "normalize_text"])
            .status
            .code(),
        Some(5)
    );
    assert_eq!(
        router.cli(None, &["registry", "status"]).status.code(),
        Some(5)
    );
    assert_eq!(
        router
            .cli(Some("wrong-key-0000000000"), &["registry", "status"])
            .status
            .code(),
        Some(5)
    );

    // Rollout: v2 for premium, widen, all, rollback → v1.
    sqlx::raw_sql(
        r#"INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, config, metadata, routing_rules)
           VALUES ('normalize_text', 'v2', 'beamline.ext.pre.normalize_text.v2', 150, 1,
                   '{"max_length": 2000}'::jsonb, '{"description": "Normalize text v2 with improved handling"}'::jsonb,
                   '{"tenant_id": ["premium_tenant"]}'::jsonb);"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    let resolve = |tenant: &str| {
        router.json(
            Some(VIEWER_KEY),
            &[
                "ext",
                "resolve",
                "normalize_text",
                "--context",
                &format!("tenant_id={tenant}"),
            ],
        )
    };
    let v2 = resolve("premium_tenant");
    assert_eq!(
        (v2["version"].clone(), v2["subject"].clone()),
        (json!("v2"), json!("beamline.ext.pre.normalize_text.v2"))
    );
    assert_eq!(resolve("standard_tenant")["version"], "v1");
    sqlx::raw_sql("UPDATE extension_versions SET routing_rules = '{\"tenant_id\": [\"premium_tenant\", \"standard_tenant\"]}'::jsonb WHERE id = 'normalize_text' AND version = 'v2';").execute(&pool).await.unwrap();
    router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    assert_eq!(resolve("standard_tenant")["version"], "v2");
    sqlx::raw_sql("UPDATE extension_versions SET routing_rules = '{}'::jsonb WHERE id = 'normalize_text' AND version = 'v2';").execute(&pool).await.unwrap();
    router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    assert_eq!(resolve("anyone")["version"], "v2");
    sqlx::raw_sql("UPDATE extension_versions SET routing_rules = '{\"tenant_id\": []}'::jsonb WHERE id = 'normalize_text' AND version = 'v2';").execute(&pool).await.unwrap();
    router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    assert_eq!(resolve("premium_tenant")["version"], "v1");

    // Safely disable: which policies use it.
    let uses = router.json(Some(VIEWER_KEY), &["policy", "uses", "normalize_text"]);
    assert_eq!(
        uses,
        json!([{"tenant_id": "default", "policy_id": "default", "field": "pre[0].id", "enabled": true}])
    );

    // Circuit breaker: nothing listens on the subjects, so calls fail; 5 open it.
    let mut client = RouterClient::connect(router.addr.clone()).await.unwrap();
    for _ in 0..5 {
        assert!(client.decide(decide_request()).await.is_err());
    }
    let err = client.decide(decide_request()).await.unwrap_err();
    assert!(
        err.message().starts_with("extension_unavailable"),
        "{}",
        err.message()
    );
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["health", "get", "normalize_text"])["circuit_breaker_state"],
        "open"
    );
    // Persisted within a sync interval, as the runbook's SELECT shows.
    wait_until(10, "health persisted as open", async || {
        sqlx::query_scalar::<_, String>("SELECT circuit_breaker_state FROM extension_health WHERE extension_id = 'normalize_text'")
            .fetch_optional(&pool)
            .await
            .unwrap()
            .as_deref()
            == Some("open")
    })
    .await;
    // Manual reset by the runbook's SQL closes the live breaker.
    sqlx::raw_sql(
        "UPDATE extension_health\nSET circuit_breaker_state = 'closed',\n    circuit_breaker_opened_at = NULL\nWHERE extension_id = 'normalize_text';",
    )
    .execute(&pool)
    .await
    .unwrap();
    wait_until(5, "SQL reset reaches the live breaker", async || {
        router.json(Some(VIEWER_KEY), &["health", "get", "normalize_text"])["circuit_breaker_state"]
            == "closed"
    })
    .await;
    // Open it again; reset through the CLI.
    for _ in 0..5 {
        let _ = client.decide(decide_request()).await;
    }
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["health", "get", "normalize_text"])["circuit_breaker_state"],
        "open"
    );
    assert_eq!(
        router
            .cli(Some(VIEWER_KEY), &["breaker", "reset", "normalize_text"])
            .status
            .code(),
        Some(5)
    );
    let reset = router.json(Some(OPERATOR_KEY), &["breaker", "reset", "normalize_text"]);
    assert_eq!(
        (reset["was"].clone(), reset["propagated"].clone()),
        (json!(["open"]), json!(true))
    );
    let h = router.json(Some(VIEWER_KEY), &["health", "get", "normalize_text"]);
    assert_eq!(h["circuit_breaker_state"], "closed");
    for k in [
        "extension_id",
        "last_success",
        "last_failure",
        "success_count",
        "failure_count",
        "success_rate",
        "avg_latency_ms",
        "p50_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "circuit_breaker_state",
        "circuit_breaker_opened_at",
    ] {
        assert!(h.get(k).is_some(), "health lacks {k}: {h}");
    }
    assert_eq!(h["failure_count"], 10);
    let summary = router.json(Some(VIEWER_KEY), &["health", "summary"]);
    for k in [
        "total",
        "healthy",
        "unhealthy",
        "half_open",
        "avg_success_rate",
        "avg_latency_ms",
        "avg_p95_latency_ms",
    ] {
        assert!(summary.get(k).is_some(), "summary lacks {k}: {summary}");
    }
    assert_eq!(summary["total"], 4);
    assert_eq!(
        router
            .json(Some(VIEWER_KEY), &["health", "list"])
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Policies through the CLI.
    let file = dir.path().join("strict.json");
    std::fs::write(&file, json!({"providers": [{"name": "test_provider"}], "validators": [{"id": "pii_guard", "on_fail": "block"}]}).to_string()).unwrap();
    router.json(
        Some(ADMIN_KEY),
        &[
            "policy",
            "upsert",
            "acme",
            "strict",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    let got = router.json(Some(VIEWER_KEY), &["policy", "get", "acme", "strict"]);
    assert_eq!(got["policy"]["validators"][0]["id"], "pii_guard");
    assert_eq!(
        router
            .json(Some(VIEWER_KEY), &["policy", "list", "--tenant", "acme"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    std::fs::write(
        &file,
        json!({"pre": [{"id": "normalize_text", "mode": "mandatory"}]}).to_string(),
    )
    .unwrap();
    let bad = router.cli(
        Some(ADMIN_KEY),
        &[
            "policy",
            "upsert",
            "acme",
            "strict",
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("mandatory"));
    assert_eq!(
        router
            .cli(Some(OPERATOR_KEY), &["policy", "delete", "acme", "strict"])
            .status
            .code(),
        Some(5)
    );
    router.json(Some(ADMIN_KEY), &["policy", "delete", "acme", "strict"]);
    assert_eq!(
        router
            .cli(Some(VIEWER_KEY), &["policy", "get", "acme", "strict"])
            .status
            .code(),
        Some(4)
    );

    // Switch source live: fixtures (built-in), writes refused; back to database.
    let sw = router.json(Some(OPERATOR_KEY), &["registry", "source", "fixtures"]);
    assert_eq!(sw["status"]["active_source"], "fixtures");
    let refused = router.cli(Some(OPERATOR_KEY), &["ext", "disable", "normalize_text"]);
    assert_eq!(refused.status.code(), Some(6));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("edit the file"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    router.json(Some(OPERATOR_KEY), &["registry", "source", "database"]);
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["registry", "status"])["active_source"],
        "database"
    );
    assert_eq!(ext(&router, "normalize_text").await["timeout_ms"], 300);

    // Every failure is in extension_health after a graceful stop (that the stop
    // itself writes is shown by `the_graceful_stop_writes_what_no_periodic_write_did`).
    drop(client);
    assert!(router.terminate().success());
    let after: i64 = sqlx::query_scalar(
        "SELECT failure_count FROM extension_health WHERE extension_id = 'normalize_text'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(after, 10, "every failure persisted");
    let log = router.log.lock().unwrap().clone();
    assert!(
        log.contains("Extension Registry synced"),
        "sync line missing"
    );
}

#[tokio::test]
async fn the_table_output_is_for_people() {
    let (db, _pool, nats, dir) = setup().await;
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let out = bin()
        .args([
            "--addr",
            &router.addr,
            "--api-key",
            VIEWER_KEY,
            "ext",
            "list",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap().starts_with("ID"), "{text}");
    assert!(text.contains("normalize_text  pre"), "{text}");
    let down = bin()
        .args(["--addr", "http://127.0.0.1:1", "registry", "status"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("router unreachable"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// The shutdown write is the only write here: the periodic writer's interval (the sync
/// interval) is an hour, so the failures are in extension_health only if the graceful
/// stop wrote them.
#[tokio::test]
async fn the_graceful_stop_writes_what_no_periodic_write_did() {
    let (db, pool, nats, dir) = setup().await;
    let config = write_config(dir.path(), db.url(), &nats.url(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("sync_interval_seconds = 1\n"));
    std::fs::write(
        &config,
        text.replace(
            "sync_interval_seconds = 1\n",
            "sync_interval_seconds = 3600\n",
        ),
    )
    .unwrap();
    let mut router = start(&config);
    let mut client = RouterClient::connect(router.addr.clone()).await.unwrap();
    // Nothing listens on normalize_text's subject: three failed calls (the breaker
    // opens at five).
    for _ in 0..3 {
        let e = client.decide(decide_request()).await.unwrap_err();
        assert!(
            e.message().starts_with("extension_unavailable"),
            "{}",
            e.message()
        );
    }
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["health", "get", "normalize_text"])["failure_count"],
        3
    );
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT failure_count FROM extension_health WHERE extension_id = 'normalize_text'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    assert_eq!(count().await, None, "nothing written before the stop");
    drop(client);
    assert!(router.terminate().success());
    assert_eq!(
        count().await,
        Some(3),
        "the graceful stop wrote the three failures"
    );
    assert!(
        router
            .log
            .lock()
            .unwrap()
            .contains("extension_health written at shutdown"),
        "shutdown write not logged"
    );
}
