//! The PostgreSQL source: rows our validation refuses, a database without the schema,
//! an unreachable database, and policies read from the `policies` table.

mod common;

use std::sync::Arc;

use beamline_registry::{ActiveSource, DbState, ErrorKind, SourceMode};
use beamline_test_support::{TestDatabase, free_port};
use common::*;

async fn seeded() -> (TestDatabase, sqlx::PgPool) {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    seed_original(&pool).await;
    (db, pool)
}

/// Rows that pass the database's CHECKs but not our validation refuse the reload,
/// naming table, row and field; the previous snapshot keeps serving.
#[tokio::test]
async fn a_bad_row_refuses_the_reload_and_keeps_the_snapshot() {
    let (db, pool) = seeded().await;
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let good = registry.snapshot();
    assert_eq!(good.size(), 4);

    let cases: &[(&'static str, &'static str, &[&str])] = &[
        (
            "UPDATE extensions SET timeout_ms = 20000 WHERE id = 'normalize_text'",
            "UPDATE extensions SET timeout_ms = 100 WHERE id = 'normalize_text'",
            &[
                "table extensions",
                "id='normalize_text'",
                "timeout_ms",
                "20000",
            ],
        ),
        (
            "UPDATE extensions SET subject = 'beamline.ext.*' WHERE id = 'mask_pii'",
            "UPDATE extensions SET subject = 'beamline.ext.post.mask_pii.v1' WHERE id = 'mask_pii'",
            &["table extensions", "id='mask_pii'", "subject", "wildcard"],
        ),
        (
            "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules) \
             VALUES ('normalize_text', 'v2', 'a.b', 100, 0, '{\"tenant_id\": 5}')",
            "DELETE FROM extension_versions",
            &[
                "table extension_versions",
                "(id='normalize_text', version='v2')",
                "routing_rules.tenant_id",
            ],
        ),
        (
            "INSERT INTO extension_instances (extension_id, instance_id, subject) VALUES ('pii_guard', 'bad id', 'a.b')",
            "DELETE FROM extension_instances",
            &["table extension_instances", "instance_id"],
        ),
        (
            "UPDATE policies SET policy = '{\"pre\": [{\"id\": \"normalize_text\", \"mode\": \"mandatory\"}]}'",
            "UPDATE policies SET policy = '{}'",
            &[
                "table policies",
                "(tenant_id='default', policy_id='default')",
                "mandatory",
            ],
        ),
        (
            "UPDATE extensions SET retry = 7 WHERE id = 'test_provider'",
            "UPDATE extensions SET retry = 1 WHERE id = 'test_provider'",
            &["retry", "retry_limit_exceeded"],
        ),
    ];
    for (break_it, fix_it, needles) in cases {
        sqlx::query(*break_it).execute(&pool).await.unwrap();
        let err = registry.reload().await.expect_err(break_it);
        assert_eq!(err.kind(), ErrorKind::InvalidData, "{err}");
        let msg = err.to_string();
        for n in *needles {
            assert!(msg.contains(n), "'{n}' missing from: {msg}");
        }
        assert!(
            Arc::ptr_eq(&good, &registry.snapshot()),
            "snapshot replaced after: {break_it}"
        );
        sqlx::query(*fix_it).execute(&pool).await.unwrap();
    }
    let (ok, failed) = registry.sync_counts();
    assert_eq!(failed, cases.len() as u64);
    registry.reload().await.unwrap();
    assert_eq!(registry.sync_counts().0, ok + 1);
}

#[tokio::test]
async fn the_database_check_constraints_keep_unusable_rows_out() {
    let (_db, pool) = seeded().await;
    for bad in [
        "INSERT INTO extensions (id, type, subject) VALUES ('x', 'preprocessor', 'a')",
        "INSERT INTO extensions (id, type, subject, timeout_ms) VALUES ('x', 'pre', 'a', 0)",
        "INSERT INTO extensions (id, type, subject, retry) VALUES ('x', 'pre', 'a', -1)",
        "INSERT INTO extensions (id, type, subject, config) VALUES ('x', 'pre', 'a', '[]')",
        "INSERT INTO extension_instances (extension_id, instance_id, subject, weight) VALUES ('pii_guard', 'i', 'a', 101)",
        "INSERT INTO extension_instances (extension_id, instance_id, subject, health_status) VALUES ('pii_guard', 'i', 'a', 'sick')",
        "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry) VALUES ('ghost', 'v2', 'a', 1, 0)",
        "INSERT INTO extension_health (extension_id, circuit_breaker_state) VALUES ('x', 'ajar')",
    ] {
        assert!(
            sqlx::query(bad).execute(&pool).await.is_err(),
            "accepted: {bad}"
        );
    }
}

#[tokio::test]
async fn policies_come_from_the_database_in_database_mode() {
    let (db, pool) = seeded().await;
    sqlx::query(
        "INSERT INTO policies (tenant_id, policy_id, policy, enabled) VALUES \
         ('acme', 'strict', '{\"validators\": [{\"id\": \"pii_guard\", \"on_fail\": \"block\"}]}', true), \
         ('acme', 'off', '{}', false)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let snap = registry.snapshot();
    assert_eq!(snap.counts.policies, 3);
    assert_eq!(
        snap.policy("acme", "strict").unwrap().validators[0].id,
        "pii_guard"
    );
    assert!(
        snap.policy("acme", "off").is_none(),
        "disabled policies do not serve"
    );
    assert_eq!(snap.policy("acme", "default").unwrap().tenant_id, "default");
}

#[tokio::test]
async fn a_database_without_the_schema_says_to_migrate() {
    let db = TestDatabase::create().await;
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    assert!(!registry.is_loaded());
    let err = registry.reload().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SchemaMissing, "{err}");
    assert!(err.to_string().contains("beamline-router migrate"), "{err}");
    assert_eq!(registry.status().db_state, DbState::SchemaMissing);
}

#[tokio::test]
async fn an_unreachable_database_leaves_the_router_up_and_not_ready() {
    let url = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/nowhere",
        free_port()
    );
    let registry = start(db_config(&url, SourceMode::Database)).await;
    assert!(!registry.is_loaded());
    assert_eq!(registry.snapshot().source, ActiveSource::Empty);
    let err = registry.reload().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable);
    assert!(err.is_retryable());
    let status = registry.status();
    assert_eq!(status.db_state, DbState::Unreachable);
    let shown = format!("{} {}", err, serde_json::to_string(&status).unwrap());
    assert!(!shown.contains("hunter2"), "password leaked: {shown}");
    assert!(registry.test_connection().await.is_err());
}

#[tokio::test]
async fn migrate_is_idempotent_and_test_connection_answers() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    migrate(&pool).await;
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    registry.test_connection().await.unwrap();
    assert_eq!(registry.status().db_state, DbState::Connected);
    assert_eq!(registry.snapshot().size(), 0);
    assert!(
        registry.is_loaded(),
        "an empty registry is still a loaded one"
    );
}

/// Routers' own writes never count as resets; the runbook's SQL and `breaker reset`
/// do, and say who made them.
#[tokio::test]
async fn manual_resets_are_recognised_and_attributed() {
    use beamline_registry::health_store::{self, HealthRow};
    let (_db, pool) = seeded().await;
    let row = |state: &str| HealthRow {
        extension_id: "normalize_text".into(),
        success_delta: 3,
        failure_delta: 5,
        last_success: None,
        last_failure: Some(chrono::Utc::now()),
        avg_latency_ms: Some(1.0),
        p50_latency_ms: Some(1.0),
        p95_latency_ms: Some(2.0),
        p99_latency_ms: Some(3.0),
        circuit_breaker_state: state.into(),
        circuit_breaker_opened_at: None,
        failure_threshold: 5,
        error_rate_threshold: 0.5,
        open_timeout_ms: 60_000,
        half_open_max_requests: 3,
    };
    health_store::upsert(&pool, "test", "router-a:1", &[row("closed")])
        .await
        .unwrap();
    health_store::upsert(&pool, "test", "router-b:2", &[row("open")])
        .await
        .unwrap();
    assert!(
        health_store::manual_resets(&pool, "test")
            .await
            .unwrap()
            .is_empty(),
        "router writes are not resets"
    );
    let (s, f, by): (i64, i64, String) =
        sqlx::query_as("SELECT success_count, failure_count, updated_by FROM extension_health WHERE extension_id = 'normalize_text'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (s, f, by.as_str()),
        (6, 10, "router-b:2"),
        "counts add up across routers"
    );

    sqlx::raw_sql("UPDATE extension_health\nSET circuit_breaker_state = 'closed',\n    circuit_breaker_opened_at = NULL\nWHERE extension_id = 'normalize_text';")
        .execute(&pool)
        .await
        .unwrap();
    let resets = health_store::manual_resets(&pool, "test").await.unwrap();
    assert_eq!(resets.len(), 1);
    let by: String = sqlx::query_scalar(
        "SELECT updated_by FROM extension_health WHERE extension_id = 'normalize_text'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(by, "sql:postgres");

    health_store::request_reset(&pool, "test", "normalize_text", "alice")
        .await
        .unwrap();
    let again = health_store::manual_resets(&pool, "test").await.unwrap();
    assert!(again[0].1 > resets[0].1, "a new reset is a new timestamp");
    let by: String = sqlx::query_scalar(
        "SELECT updated_by FROM extension_health WHERE extension_id = 'normalize_text'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(by, "alice");
}
