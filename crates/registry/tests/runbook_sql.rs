//! Every SQL statement printed in the operations runbook runs unchanged against our
//! schema and has the effect the runbook promises once the registry reloads.
//!
//! The statements below are copied verbatim from
//! `docs/reference/EXTENSIONS_RUNBOOK.seed.md`; `every_runbook_statement_is_covered`
//! re-reads that file so a statement added to the runbook cannot go untested.

mod common;

use std::collections::BTreeSet;

use beamline_registry::SourceMode;
use beamline_test_support::TestDatabase;
use common::*;

const DISABLE: &str = "UPDATE extensions SET enabled = FALSE WHERE id = 'normalize_text';";
const ENABLE: &str = "UPDATE extensions SET enabled = TRUE WHERE id = 'normalize_text';";
const TIMEOUT_200: &str = "UPDATE extensions SET timeout_ms = 200 WHERE id = 'normalize_text';";
const RETRY_1: &str = "UPDATE extensions SET retry = 1 WHERE id = 'normalize_text';";
const CONFIG: &str =
    "UPDATE extensions SET config = '{\"max_length\": 1000}'::jsonb WHERE id = 'normalize_text';";
const INSERT_V2: &str = r#"INSERT INTO extension_versions (
    id, version, subject, timeout_ms, retry, config, metadata, routing_rules
) VALUES (
    'normalize_text',
    'v2',
    'beamline.ext.pre.normalize_text.v2',
    150,  -- Increased timeout
    1,    -- Added retry
    '{"max_length": 2000}'::jsonb,
    '{"description": "Normalize text v2 with improved handling"}'::jsonb,
    '{"tenant_id": ["premium_tenant"]}'::jsonb  -- Routing rules
);"#;
const WIDEN: &str = r#"UPDATE extension_versions
SET routing_rules = '{"tenant_id": ["premium_tenant", "standard_tenant"]}'::jsonb
WHERE id = 'normalize_text' AND version = 'v2';"#;
const ROLLOUT_ALL: &str = r#"UPDATE extension_versions
SET routing_rules = '{}'::jsonb  -- Empty = default for all
WHERE id = 'normalize_text' AND version = 'v2';"#;
const ROLLBACK: &str = r#"UPDATE extension_versions
SET routing_rules = '{"tenant_id": []}'::jsonb  -- Empty list = no match
WHERE id = 'normalize_text' AND version = 'v2';"#;
const DISABLE_V2_BASE: &str = r#"UPDATE extensions
SET enabled = FALSE
WHERE id = 'normalize_text' AND version = 'v2';"#;
const SELECT_EXTENSION: &str = "SELECT * FROM extensions WHERE id = 'normalize_text';";
const TIMEOUT_300: &str = "UPDATE extensions SET timeout_ms = 300 WHERE id = 'normalize_text';";
const RESET_BREAKER: &str = r#"UPDATE extension_health
SET circuit_breaker_state = 'closed',
    circuit_breaker_opened_at = NULL
WHERE extension_id = 'normalize_text';"#;
const SELECT_HEALTH: &str = "SELECT * FROM extension_health WHERE extension_id = 'normalize_text';";

/// Printed in the runbook's Quick Reference as a template with `...` placeholders; it
/// is not a runnable statement (INSERT_V2 is its runnable form).
const TEMPLATE_ONLY: &str =
    "INSERT INTO extension_versions (id, version, subject, ...) VALUES (...);";

const ALL: &[&str] = &[
    DISABLE,
    ENABLE,
    TIMEOUT_200,
    RETRY_1,
    CONFIG,
    INSERT_V2,
    WIDEN,
    ROLLOUT_ALL,
    ROLLBACK,
    DISABLE_V2_BASE,
    SELECT_EXTENSION,
    TIMEOUT_300,
    RESET_BREAKER,
    SELECT_HEALTH,
];

fn normalize(stmt: &str) -> String {
    stmt.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Statements of every ```sql block of the runbook, comment-only lines dropped.
fn runbook_statements() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/reference/EXTENSIONS_RUNBOOK.seed.md");
    let text = std::fs::read_to_string(&path).expect("runbook copy in docs/reference");
    let mut out = Vec::new();
    let mut in_sql = false;
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t == "```sql" {
            in_sql = true;
            continue;
        }
        if in_sql && t == "```" {
            in_sql = false;
            continue;
        }
        if !in_sql || t.is_empty() || t.starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if t.ends_with(';') || t.contains(";  --") {
            out.push(normalize(&current));
            current.clear();
        }
    }
    assert!(
        current.trim().is_empty(),
        "unterminated statement: {current}"
    );
    out
}

#[test]
fn every_runbook_statement_is_covered() {
    let ours: BTreeSet<String> = ALL.iter().map(|s| normalize(s)).collect();
    let found = runbook_statements();
    assert!(found.len() >= 15, "parsed only {} statements", found.len());
    for stmt in found {
        if stmt == normalize(TEMPLATE_ONLY) {
            continue;
        }
        assert!(
            ours.contains(&stmt),
            "runbook statement not exercised verbatim: {stmt}"
        );
    }
}

async fn run(pool: &sqlx::PgPool, stmt: &'static str) {
    sqlx::raw_sql(stmt)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("runbook statement failed: {e}\n{stmt}"));
}

/// The runbook's procedures, in order, against a real database, checking after each
/// reload what the runbook says the operator should see.
#[tokio::test]
async fn runbook_procedures_against_postgres() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    seed_original(&pool).await;
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    assert_eq!(registry.snapshot().size(), 4);

    let ext = |r: &beamline_registry::Registry| registry_lookup(r, "normalize_text");
    let tenant = |r: &beamline_registry::Registry, t: &str| {
        r.snapshot()
            .resolve("normalize_text", &[("tenant_id", t)])
            .unwrap()
            .version
            .clone()
    };

    // Enable/Disable Extension
    run(&pool, DISABLE).await;
    registry.reload().await.unwrap();
    assert!(!ext(&registry).enabled);
    run(&pool, ENABLE).await;
    registry.reload().await.unwrap();
    assert!(ext(&registry).enabled);

    // Update Extension Configuration
    run(&pool, TIMEOUT_200).await;
    run(&pool, RETRY_1).await;
    run(&pool, CONFIG).await;
    registry.reload().await.unwrap();
    let e = ext(&registry);
    assert_eq!((e.timeout_ms, e.retry), (200, 1));
    assert_eq!(e.config["max_length"], 1000);

    // Deploy New Extension Version
    run(&pool, INSERT_V2).await;
    registry.reload().await.unwrap();
    let v2 = registry
        .snapshot()
        .resolve("normalize_text", &[("tenant_id", "premium_tenant")])
        .unwrap()
        .clone();
    assert_eq!(
        (
            v2.version.as_str(),
            v2.subject.as_str(),
            v2.timeout_ms,
            v2.retry
        ),
        ("v2", "beamline.ext.pre.normalize_text.v2", 150, 1)
    );
    assert_eq!(tenant(&registry, "standard_tenant"), "v1");
    run(&pool, WIDEN).await;
    registry.reload().await.unwrap();
    assert_eq!(tenant(&registry, "standard_tenant"), "v2");
    assert_eq!(tenant(&registry, "free_tenant"), "v1");
    run(&pool, ROLLOUT_ALL).await;
    registry.reload().await.unwrap();
    assert_eq!(tenant(&registry, "free_tenant"), "v2");

    // Rollback Extension Version: must return v1 (the original returned v2).
    run(&pool, ROLLBACK).await;
    registry.reload().await.unwrap();
    assert_eq!(tenant(&registry, "premium_tenant"), "v1");
    // Step 5 matches no row (the base record is v1) and changes nothing.
    let affected = sqlx::raw_sql(DISABLE_V2_BASE)
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(affected, 0);
    registry.reload().await.unwrap();
    assert!(ext(&registry).enabled);

    // Troubleshooting
    let rows = sqlx::raw_sql(SELECT_EXTENSION)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    run(&pool, TIMEOUT_300).await;
    registry.reload().await.unwrap();
    assert_eq!(ext(&registry).timeout_ms, 300);

    sqlx::query(
        "INSERT INTO extension_health (extension_id, circuit_breaker_state, circuit_breaker_opened_at) \
         VALUES ('normalize_text', 'open', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    run(&pool, RESET_BREAKER).await;
    let rows = sqlx::raw_sql(SELECT_HEALTH).fetch_all(&pool).await.unwrap();
    assert_eq!(rows.len(), 1);
    let (state, opened): (String, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT circuit_breaker_state, circuit_breaker_opened_at FROM extension_health WHERE extension_id = 'normalize_text'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), opened), ("closed", None));
}

fn registry_lookup(
    r: &beamline_registry::Registry,
    id: &str,
) -> std::sync::Arc<beamline_model::Extension> {
    r.snapshot()
        .lookup(id)
        .unwrap_or_else(|| panic!("{id} not found"))
        .clone()
}
