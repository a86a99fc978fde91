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

/// A row that passes the database's CHECKs but not our validation is quarantined on
/// its own — named by table, key and field path, held at its last good version (or
/// absent) — while a change to another row in the same reload applies; fixed, it
/// leaves quarantine.
#[tokio::test]
async fn a_bad_row_is_quarantined_and_every_other_change_applies() {
    let (db, pool) = seeded().await;
    sqlx::query("INSERT INTO extensions (id, type, subject, timeout_ms) VALUES ('other', 'post', 'o.p', 100)")
        .execute(&pool)
        .await
        .unwrap();
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let good = registry.snapshot();
    assert_eq!(good.size(), 5);

    // (break, fix, needles in the message, the key's table and key, what serves)
    #[allow(clippy::type_complexity)]
    let cases: &[(&'static str, &'static str, &[&str], (&str, &str), &str)] = &[
        (
            "UPDATE extensions SET timeout_ms = 20000 WHERE id = 'normalize_text'",
            "UPDATE extensions SET timeout_ms = 100 WHERE id = 'normalize_text'",
            &["extensions[normalize_text].timeout_ms: ", "20000"],
            ("extensions", "normalize_text"),
            "last_good",
        ),
        (
            "UPDATE extensions SET subject = 'beamline.ext.*' WHERE id = 'mask_pii'",
            "UPDATE extensions SET subject = 'beamline.ext.post.mask_pii.v1' WHERE id = 'mask_pii'",
            &["extensions[mask_pii].subject: ", "wildcard"],
            ("extensions", "mask_pii"),
            "last_good",
        ),
        (
            "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules) \
             VALUES ('normalize_text', 'v2', 'a.b', 100, 0, '{\"tenant_id\": 5}')",
            "DELETE FROM extension_versions",
            &["extension_versions[normalize_text/v2].routing_rules.tenant_id: "],
            ("extension_versions", "normalize_text/v2"),
            "absent",
        ),
        (
            "INSERT INTO extension_instances (extension_id, instance_id, subject) VALUES ('pii_guard', 'bad id', 'a.b')",
            "DELETE FROM extension_instances",
            &["extension_instances[pii_guard/bad id].instance_id: "],
            ("extension_instances", "pii_guard/bad id"),
            "absent",
        ),
        (
            "UPDATE policies SET policy = '{\"pre\": [{\"id\": \"normalize_text\", \"mode\": \"mandatory\"}]}'",
            "UPDATE policies SET policy = '{}'",
            &[
                "policies[default/default].policy.pre[0].mode: ",
                "mandatory",
            ],
            ("policies", "default/default"),
            "last_good",
        ),
        (
            "UPDATE extensions SET retry = 7 WHERE id = 'test_provider'",
            "UPDATE extensions SET retry = 1 WHERE id = 'test_provider'",
            &["extensions[test_provider].retry: ", "retry_limit_exceeded"],
            ("extensions", "test_provider"),
            "last_good",
        ),
    ];
    for (n, (break_it, fix_it, needles, (table, key), serving)) in cases.iter().enumerate() {
        let before = registry.snapshot();
        sqlx::query(*break_it).execute(&pool).await.unwrap();
        let other_timeout = 200 + n as i32;
        sqlx::query("UPDATE extensions SET timeout_ms = $1 WHERE id = 'other'")
            .bind(other_timeout)
            .execute(&pool)
            .await
            .unwrap();
        registry
            .reload()
            .await
            .unwrap_or_else(|e| panic!("{break_it}: the reload failed: {e}"));
        let snap = registry.snapshot();
        assert_eq!(
            snap.lookup("other").unwrap().timeout_ms,
            other_timeout as u32,
            "{break_it}: the other change did not apply"
        );
        assert_eq!(
            snap.quarantine.len(),
            1,
            "{break_it}: {:?}",
            snap.quarantine
        );
        let q = serde_json::to_value(&snap.quarantine[0]).unwrap();
        assert_eq!(
            (q["table"].as_str().unwrap(), q["key"].as_str().unwrap()),
            (*table, *key)
        );
        assert_eq!(q["serving"], *serving, "{q}");
        for needle in *needles {
            assert!(
                q["error"].as_str().unwrap().contains(needle),
                "'{needle}' missing from: {q}"
            );
        }
        // What the bad row's key serves is exactly what it served before.
        if *table == "extensions" {
            assert!(Arc::ptr_eq(
                before.lookup(key).unwrap(),
                snap.lookup(key).unwrap()
            ));
        }
        if *table == "policies" {
            assert!(Arc::ptr_eq(
                before.policy("default", "default").unwrap(),
                snap.policy("default", "default").unwrap()
            ));
        }
        sqlx::query(*fix_it).execute(&pool).await.unwrap();
        registry.reload().await.unwrap();
        assert!(
            registry.snapshot().quarantine.is_empty(),
            "{break_it}: fixed but still quarantined"
        );
    }
    let (_, failed) = registry.sync_counts();
    assert_eq!(failed, 0, "a quarantined row is not a failed sync");
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
