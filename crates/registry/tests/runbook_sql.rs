//! Every SQL statement printed in the operations runbook runs unchanged against our
//! schema and has the effect the runbook promises once the registry reloads.
//!
//! The statements below are copied verbatim from the seed runbook
//! (`docs/reference/EXTENSIONS_RUNBOOK.seed.md`) and from our own `docs/RUNBOOK.md`;
//! `every_runbook_statement_is_covered` and `every_docs_runbook_statement_is_covered`
//! re-read those files, so a statement added to either runbook cannot go untested.

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

// docs/RUNBOOK.md's own statements (beyond the seed's, which it repeats).
const ADD_SENTIMENT: &str = r#"INSERT INTO extensions (id, type, subject, timeout_ms, retry, config)
VALUES ('sentiment', 'validator', 'acme.ext.validate.sentiment.v1', 200, 1, '{"threshold": 0.8}');"#;
const ADD_SENTIMENT_INSTANCE: &str = r#"INSERT INTO extension_instances (extension_id, instance_id, subject, weight)
VALUES ('sentiment', 'a', 'acme.ext.validate.sentiment.v1', 75);"#;
const FIX_QUARANTINED_POLICY: &str = r#"UPDATE policies SET policy = '{"providers": [{"name": "openai"}, {"name": "anthropic"}]}'
    WHERE tenant_id = 'acme' AND policy_id = 'default';"#;
const DISABLE_V2: &str =
    "UPDATE extension_versions SET enabled = FALSE WHERE id = 'normalize_text' AND version = 'v2';";
const CHECK_PRIVILEGES: &str = "SELECT has_table_privilege('extensions', 'SELECT') AS read_extensions, has_table_privilege('extension_health', 'UPDATE') AS write_health;";
const INSERT_V2_RUNNABLE: &str = r#"INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, config, metadata, routing_rules)
VALUES ('normalize_text', 'v2', 'beamline.ext.pre.normalize_text.v2', 150, 1,
        '{"max_length": 2000}'::jsonb,
        '{"description": "Normalize text v2 with improved handling"}'::jsonb,
        '{"tenant_id": ["premium_tenant"]}'::jsonb);"#;

// Progressive delivery: which tenants a 10 % step takes, who judges, the rollout's
// history.
const SHARE_TENANTS: &str = r#"SELECT tenant_id FROM (SELECT DISTINCT tenant_id FROM policies) t
WHERE ('x' || left(encode(sha256(convert_to(tenant_id, 'UTF8')), 'hex'), 8))::bit(32)::bigint % 10000 < 10 * 100;"#;
const JUDGE_LOCK: &str = r#"SELECT a.application_name, a.client_addr, a.backend_start
FROM pg_locks l JOIN pg_stat_activity a USING (pid)
WHERE l.locktype = 'advisory' AND l.classid = 1650811245 AND l.objid = 1667329633;"#;
// (Printed under the comments "The extension's rollouts, newest first" and "Every
// move of the latest one", which the comparison leaves out.)
const ROLLOUTS: &str = r#"SELECT id, candidate_version, baseline_version, state, current_step, steps, reason, judged_by
FROM extension_rollouts WHERE extension_id = 'normalize_text' ORDER BY id DESC;"#;
const ROLLOUT_HISTORY: &str = r#"SELECT at, action, from_state, to_state, step, actor, reason
FROM extension_rollout_history
WHERE rollout_id = (SELECT max(id) FROM extension_rollouts WHERE extension_id = 'normalize_text')
ORDER BY id;"#;

/// docs/RUNBOOK.md's statements that the seed runbook does not have.
const DOCS_ONLY: &[&str] = &[
    SHARE_TENANTS,
    JUDGE_LOCK,
    ROLLOUTS,
    ROLLOUT_HISTORY,
    ADD_SENTIMENT,
    ADD_SENTIMENT_INSTANCE,
    FIX_QUARANTINED_POLICY,
    DISABLE_V2,
    CHECK_PRIVILEGES,
    INSERT_V2_RUNNABLE,
];

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

/// Statements of every ```sql block of the seed runbook.
fn runbook_statements() -> Vec<String> {
    statements_of("docs/reference/EXTENSIONS_RUNBOOK.seed.md")
}

/// Statements of every ```sql block of `doc` (relative to the repository root),
/// comment-only lines dropped.
fn statements_of(doc: &str) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(doc);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{doc}: {e}"));
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

#[test]
fn every_docs_runbook_statement_is_covered() {
    let ours: BTreeSet<String> = ALL.iter().chain(DOCS_ONLY).map(|s| normalize(s)).collect();
    let found = statements_of("docs/RUNBOOK.md");
    // 20 ```sql blocks when this was written; fewer parsed means the parser broke.
    assert!(found.len() >= 25, "parsed only {} statements", found.len());
    for stmt in &found {
        if *stmt == normalize(TEMPLATE_ONLY) {
            continue;
        }
        assert!(
            ours.contains(stmt),
            "docs/RUNBOOK.md statement not exercised verbatim: {stmt}"
        );
    }
    // And each of DOCS_ONLY is still printed there (no stale copy).
    for stmt in DOCS_ONLY {
        assert!(
            found.contains(&normalize(stmt)),
            "no longer in docs/RUNBOOK.md: {stmt}"
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

/// docs/RUNBOOK.md's own procedures, in order, against a real database: adding an
/// extension and its instance, fixing a quarantined policy, the runnable v2 insert,
/// stopping a version, and the permission check.
#[tokio::test]
async fn docs_runbook_procedures_against_postgres() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    seed_original(&pool).await;
    // The quarantine example's bad policy: providers that are not objects.
    sqlx::raw_sql(
        r#"INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('acme', 'default', '{"providers": ["openai", "anthropic"]}');"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let acme = |r: &beamline_registry::Registry| {
        r.snapshot()
            .policy("acme", "default")
            .map(|p| p.tenant_id.clone())
    };
    // acme's own policy is quarantined: the default tenant's serves in its place.
    assert_eq!(acme(&registry).as_deref(), Some("default"));
    let quarantined = registry.status().quarantined;
    assert_eq!(
        quarantined
            .iter()
            .map(|q| (q.key.as_str(), q.field.as_str()))
            .collect::<Vec<_>>(),
        vec![("acme/default", "policy.providers[0]")],
        "the runbook's example"
    );

    // Extension instances, via database.
    run(&pool, ADD_SENTIMENT).await;
    run(&pool, ADD_SENTIMENT_INSTANCE).await;
    registry.reload().await.unwrap();
    let s = registry_lookup(&registry, "sentiment");
    assert_eq!(
        (
            s.ext_type.as_str(),
            s.subject.as_str(),
            s.timeout_ms,
            s.retry
        ),
        ("validator", "acme.ext.validate.sentiment.v1", 200, 1)
    );
    assert_eq!(s.config["threshold"], 0.8);
    let instances = registry.snapshot().instances("sentiment").to_vec();
    assert_eq!(instances.len(), 1);
    assert_eq!(
        (instances[0].instance_id.as_str(), instances[0].weight),
        ("a", 75)
    );

    // Quarantine: the fix clears it and the policy serves.
    run(&pool, FIX_QUARANTINED_POLICY).await;
    registry.reload().await.unwrap();
    assert_eq!(
        acme(&registry).as_deref(),
        Some("acme"),
        "the fixed policy serves"
    );
    let policy = registry
        .snapshot()
        .policy("acme", "default")
        .expect("the fixed policy serves")
        .clone();
    let names: Vec<&str> = policy
        .document
        .providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, vec!["openai", "anthropic"]);
    assert!(registry.status().quarantined.is_empty());

    // Quick reference: the runnable v2 insert, then stopping v2 by its own flag.
    let premium = |r: &beamline_registry::Registry| {
        r.snapshot()
            .resolve("normalize_text", &[("tenant_id", "premium_tenant")])
            .unwrap()
            .version
            .clone()
    };
    run(&pool, INSERT_V2_RUNNABLE).await;
    registry.reload().await.unwrap();
    assert_eq!(premium(&registry), "v2");
    let affected = sqlx::raw_sql(DISABLE_V2)
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(affected, 1, "psql answers UPDATE 1");
    registry.reload().await.unwrap();
    assert_eq!(
        premium(&registry),
        "v1",
        "a disabled version is never selected"
    );

    // Progressive delivery's queries run as printed. The 10 % share of the tenants
    // is a subset of them, the same subset each time (a stable hash); no judge holds
    // the lock here, and no rollout exists yet.
    let share = || async {
        sqlx::query_scalar::<_, String>(SHARE_TENANTS)
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let first = share().await;
    assert_eq!(first, share().await);
    let tenants: Vec<String> = sqlx::query_scalar("SELECT DISTINCT tenant_id FROM policies")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(first.iter().all(|t| tenants.contains(t)), "{first:?}");
    assert!(
        sqlx::raw_sql(JUDGE_LOCK)
            .fetch_all(&pool)
            .await
            .unwrap()
            .is_empty(),
        "nobody judges in this test"
    );
    for stmt in [ROLLOUTS, ROLLOUT_HISTORY] {
        assert!(
            sqlx::raw_sql(stmt)
                .fetch_all(&pool)
                .await
                .unwrap()
                .is_empty()
        );
    }

    // Troubleshooting: the permission check answers true twice for the owner.
    let (read, write): (bool, bool) = sqlx::query_as(CHECK_PRIVILEGES)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((read, write), (true, true));
}
