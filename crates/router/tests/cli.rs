//! The operator CLI end to end, against the real binary, PostgreSQL and NATS:
//! registering extensions, versions and instances, rollout and rollback (compared
//! with the runbook's SQL), the refusal in fixtures mode, roles, the audit rows,
//! `policy upsert`'s warning and `migrate --seed-default`.

mod common;

use std::process::Output;

use beamline_test_support::{NatsServer, TestDatabase};
use common::*;
use serde_json::{Value, json};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the command failed with `code` and said `says` on stderr.
fn refused(out: Output, code: i32, says: &str, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit code; stderr: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(says),
        "{what}: stderr lacks {says:?}: {}",
        stderr(&out)
    );
}

async fn audit_rows(pool: &sqlx::PgPool, id: &str) -> Vec<(String, String, Value, Value)> {
    sqlx::query_as(
        "SELECT action, changed_by, COALESCE(old_values, 'null'), COALESCE(new_values, 'null') \
         FROM extension_audit_log WHERE extension_id = $1 ORDER BY changed_at, id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn db_router(
    extra: &str,
) -> (
    TestDatabase,
    sqlx::PgPool,
    NatsServer,
    tempfile::TempDir,
    Router,
) {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), extra));
    (db, pool, nats, dir, router)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_versions_and_instances_are_registered_validated_and_audited() {
    let (_db, pool, _nats, dir, router) = db_router("").await;

    // ext add from flags, then visible at once.
    let added = router.json(
        Some(ADMIN_KEY),
        &[
            "ext",
            "add",
            "trim",
            "--type",
            "pre",
            "--subject",
            "acme.ext.trim",
            "--timeout-ms",
            "250",
            "--retry",
            "1",
            "--config",
            r#"{"max_length": 10}"#,
        ],
    );
    assert_eq!(added["changed_by"], "alice-admin");
    assert_eq!(added["reload"]["reloaded"], true, "{added}");
    let got = router.json(Some(VIEWER_KEY), &["ext", "get", "trim"]);
    assert_eq!(
        (
            got["type"].clone(),
            got["subject"].clone(),
            got["timeout_ms"].clone(),
            got["retry"].clone(),
            got["config"].clone()
        ),
        (
            json!("pre"),
            json!("acme.ext.trim"),
            json!(250),
            json!(1),
            json!({"max_length": 10})
        )
    );

    // ext add --file in the fixture format, with versions and instances.
    let file = dir.path().join("guard.json");
    std::fs::write(
        &file,
        json!([{"id": "guard", "type": "validator", "subject": "acme.ext.guard",
                "versions": [{"version": "v2", "subject": "acme.ext.guard.v2",
                              "routing_rules": {"tenant_id": ["premium_tenant"]}}],
                "instances": [{"instance_id": "a", "weight": 75}, {"instance_id": "b", "weight": 25}]}])
        .to_string(),
    )
    .unwrap();
    router.json(
        Some(ADMIN_KEY),
        &["ext", "add", "--file", file.to_str().unwrap()],
    );
    let resolved = router.json(
        Some(VIEWER_KEY),
        &[
            "ext",
            "resolve",
            "guard",
            "--context",
            "tenant_id=premium_tenant",
        ],
    );
    assert_eq!(resolved["version"], "v2");
    assert_eq!(resolved["subject"], "acme.ext.guard.v2");

    // Refusals: a duplicate, an invalid record (the field named), a viewer, an
    // operator on an admin command.
    refused(
        router.cli(
            Some(ADMIN_KEY),
            &["ext", "add", "trim", "--type", "pre", "--subject", "x.y"],
        ),
        6,
        "exists already",
        "duplicate",
    );
    refused(
        router.cli(
            Some(ADMIN_KEY),
            &[
                "ext",
                "add",
                "slow",
                "--type",
                "pre",
                "--subject",
                "x.y",
                "--timeout-ms",
                "9",
            ],
        ),
        2,
        "timeout_ms",
        "timeout out of range",
    );
    refused(
        router.cli(
            Some(ADMIN_KEY),
            &["ext", "add", "wild", "--type", "pre", "--subject", "x.*"],
        ),
        2,
        "subject",
        "wildcard subject",
    );
    let bad_file = dir.path().join("bad.json");
    std::fs::write(
        &bad_file,
        r#"{"id": "t", "type": "pre", "subject": "a.b", "timeout": 5}"#,
    )
    .unwrap();
    refused(
        router.cli(
            Some(ADMIN_KEY),
            &["ext", "add", "--file", bad_file.to_str().unwrap()],
        ),
        2,
        "bad.json",
        "unknown field names its file",
    );
    assert!(
        router
            .json(Some(VIEWER_KEY), &["ext", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|e| !["slow", "wild", "t"].contains(&e["id"].as_str().unwrap())),
        "a refused record was written"
    );

    // Versions.
    router.json(
        Some(ADMIN_KEY),
        &[
            "ext",
            "version",
            "add",
            "trim",
            "v2",
            "--subject",
            "acme.ext.trim.v2",
        ],
    );
    let versions = router.json(Some(VIEWER_KEY), &["ext", "version", "list", "trim"]);
    assert_eq!(versions[0]["version"], "v2");
    assert_eq!(versions[0]["routing_rules"], json!({"tenant_id": []}));
    assert_eq!(versions[0]["receives_traffic"], false);
    assert_eq!(
        versions[0]["timeout_ms"], 250,
        "inherited from the base record"
    );
    assert_eq!(versions[1]["base"], true);
    let base = router.json(
        Some(VIEWER_KEY),
        &["ext", "resolve", "trim", "--context", "tenant_id=acme"],
    );
    assert_eq!(base["version"], "v1", "a new version gets no traffic");
    router.json(
        Some(OPERATOR_KEY),
        &[
            "ext",
            "rollout",
            "trim",
            "--version",
            "v2",
            "--tenant",
            "acme",
        ],
    );
    assert_eq!(
        router.json(
            Some(VIEWER_KEY),
            &["ext", "resolve", "trim", "--context", "tenant_id=acme"]
        )["version"],
        "v2"
    );
    router.json(Some(OPERATOR_KEY), &["ext", "rollback", "trim"]);
    assert_eq!(
        router.json(
            Some(VIEWER_KEY),
            &["ext", "resolve", "trim", "--context", "tenant_id=acme"]
        )["version"],
        "v1"
    );
    refused(
        router.cli(Some(OPERATOR_KEY), &["ext", "rollback", "trim"]),
        6,
        "nothing to roll back",
        "rollback with no live version",
    );
    router.json(Some(ADMIN_KEY), &["ext", "version", "remove", "trim", "v2"]);
    refused(
        router.cli(Some(ADMIN_KEY), &["ext", "version", "remove", "trim", "v2"]),
        4,
        "not found",
        "removing a removed version",
    );

    // Instances.
    router.json(
        Some(ADMIN_KEY),
        &["ext", "instance", "add", "trim", "i1", "--weight", "60"],
    );
    router.json(
        Some(ADMIN_KEY),
        &[
            "ext",
            "instance",
            "add",
            "trim",
            "i2",
            "--subject",
            "acme.ext.trim.i2",
        ],
    );
    let set = router.json(
        Some(OPERATOR_KEY),
        &[
            "ext",
            "instance",
            "set",
            "trim",
            "i2",
            "--weight",
            "40",
            "--enabled",
            "false",
        ],
    );
    assert_eq!(set["previous"]["weight"], 100);
    refused(
        router.cli(
            Some(ADMIN_KEY),
            &["ext", "instance", "set", "trim", "i1", "--weight", "101"],
        ),
        2,
        "weight",
        "weight out of range",
    );
    router.json(
        Some(ADMIN_KEY),
        &["ext", "instance", "remove", "trim", "i1"],
    );
    let rows: Vec<(String, i32, bool, String)> = sqlx::query_as(
        "SELECT instance_id, weight, enabled, subject FROM extension_instances WHERE extension_id = 'trim'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![("i2".into(), 40, false, "acme.ext.trim.i2".into())]
    );

    // A viewer is refused every write; an operator the admin-only ones.
    let writes: &[&[&str]] = &[
        &["ext", "add", "v", "--type", "pre", "--subject", "a.b"],
        &["ext", "remove", "trim"],
        &["ext", "version", "add", "trim", "v3"],
        &["ext", "version", "remove", "trim", "v3"],
        &[
            "ext",
            "rollout",
            "guard",
            "--version",
            "v2",
            "--tenant",
            "t",
        ],
        &["ext", "rollback", "guard", "--version", "v2"],
        &["ext", "instance", "add", "trim", "i9"],
        &["ext", "instance", "set", "trim", "i2", "--weight", "1"],
        &["ext", "instance", "remove", "trim", "i2"],
    ];
    for args in writes {
        refused(
            router.cli(Some(VIEWER_KEY), args),
            5,
            "viewer",
            &format!("viewer {args:?}"),
        );
    }
    for args in [
        writes[0], writes[1], writes[2], writes[3], writes[6], writes[8],
    ] {
        refused(
            router.cli(Some(OPERATOR_KEY), args),
            5,
            "operator",
            &format!("operator {args:?}"),
        );
    }

    // ext remove: refused while a policy uses it, then forced.
    refused(
        router.cli(Some(ADMIN_KEY), &["ext", "remove", "pii_guard"]),
        6,
        "default/default (validators[0].id)",
        "remove while used",
    );
    router.json(Some(ADMIN_KEY), &["ext", "remove", "trim"]);
    refused(
        router.cli(Some(VIEWER_KEY), &["ext", "get", "trim"]),
        4,
        "extension 'trim' not found",
        "removed",
    );
    let gone: (i64,) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM extension_versions WHERE id = 'trim') + \
                (SELECT count(*) FROM extension_instances WHERE extension_id = 'trim')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(gone.0, 0, "versions and instances go with the extension");

    // One audit row per row written, with the key's name; nothing for refusals.
    let audit = audit_rows(&pool, "trim").await;
    let summary: Vec<(&str, &str, Option<&str>)> = audit
        .iter()
        .map(|(a, by, old, new)| {
            let row = if new.is_null() { old } else { new };
            (a.as_str(), by.as_str(), row["table"].as_str())
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("create", "alice-admin", None),
            ("create", "alice-admin", Some("extension_versions")),
            ("update", "oscar-operator", Some("extension_versions")),
            ("update", "oscar-operator", Some("extension_versions")),
            ("delete", "alice-admin", Some("extension_versions")),
            ("create", "alice-admin", Some("extension_instances")),
            ("create", "alice-admin", Some("extension_instances")),
            ("update", "oscar-operator", Some("extension_instances")),
            ("delete", "alice-admin", Some("extension_instances")),
            ("delete", "alice-admin", None),
        ]
    );
    assert_eq!(audit[2].3["routing_rules"], json!({"tenant_id": ["acme"]}));
    assert_eq!(audit[3].3["routing_rules"], json!({"tenant_id": []}));
    assert_eq!(audit[9].2["instances"][0]["instance_id"], "i2");
    let guard = audit_rows(&pool, "guard").await;
    assert_eq!(guard.len(), 1);
    assert_eq!(guard[0].3["versions"][0]["version"], "v2");
    assert_eq!(guard[0].3["instances"].as_array().unwrap().len(), 2);

    // health checks: the router's own (GetValidatorsHealth), all real.
    let checks = router.json(Some(VIEWER_KEY), &["health", "checks"]);
    let checks: Vec<(&str, &str)> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        checks,
        [
            ("grpc_health", "serving"),
            ("registry", "serving"),
            ("database", "serving"),
            ("nats", "serving")
        ]
    );

    // policy upsert: a provider named like a provider extension, without "extension".
    let policy = dir.path().join("p.json");
    std::fs::write(
        &policy,
        json!({"providers": [{"name": "test_provider"}]}).to_string(),
    )
    .unwrap();
    let out = router.cli(
        Some(ADMIN_KEY),
        &[
            "policy",
            "upsert",
            "acme",
            "gold",
            "--file",
            policy.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning:")
            && stderr(&out).contains("\"extension\": \"test_provider\""),
        "{}",
        stderr(&out)
    );
    std::fs::write(
        &policy,
        json!({"providers": [{"name": "test_provider", "extension": "test_provider"}]}).to_string(),
    )
    .unwrap();
    let out = router.cli(
        Some(ADMIN_KEY),
        &[
            "policy",
            "upsert",
            "acme",
            "gold",
            "--file",
            policy.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success() && !stderr(&out).contains("warning"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_in_fixtures_mode_with_edit_the_files() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "postgres://127.0.0.1:1/none", &nats.url(), "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("source = \"database\"", "source = \"fixtures\"");
    std::fs::write(&config, text).unwrap();
    let router = start(&config);
    let writes: &[&[&str]] = &[
        &["ext", "add", "v", "--type", "pre", "--subject", "a.b"],
        &["ext", "remove", "normalize_text", "--force"],
        &["ext", "version", "add", "normalize_text", "v2"],
        &["ext", "version", "remove", "normalize_text", "v2"],
        &[
            "ext",
            "rollout",
            "normalize_text",
            "--version",
            "v2",
            "--all-tenants",
        ],
        &["ext", "rollback", "normalize_text"],
        &["ext", "instance", "add", "normalize_text", "i"],
        &[
            "ext",
            "instance",
            "set",
            "normalize_text",
            "i",
            "--weight",
            "1",
        ],
        &["ext", "instance", "remove", "normalize_text", "i"],
        &["ext", "disable", "normalize_text"],
        &[
            "ext",
            "canary",
            "start",
            "normalize_text",
            "--version",
            "v2",
            "--steps",
            "5,25,100",
        ],
        &["ext", "canary", "pause", "normalize_text"],
        &["ext", "canary", "resume", "normalize_text"],
        &["ext", "canary", "abort", "normalize_text"],
    ];
    for args in writes {
        refused(
            router.cli(Some(ADMIN_KEY), args),
            6,
            "edit the files",
            &format!("{args:?}"),
        );
    }
    // Rollouts live in the database: none to show.
    refused(
        router.cli(
            Some(VIEWER_KEY),
            &["ext", "canary", "status", "normalize_text"],
        ),
        6,
        "canary rollouts live in the database",
        "canary status",
    );
    // The read-only ones work.
    let versions = router.json(
        Some(VIEWER_KEY),
        &["ext", "version", "list", "normalize_text"],
    );
    assert_eq!(versions.as_array().unwrap().len(), 1);
}

/// Runs the same rollout and rollback twice — once with the runbook's SQL verbatim
/// (plus `registry reload`, its step 6), once only with the CLI — and compares what
/// `ext resolve` answers at every step, for a tenant in each group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_and_rollback_by_cli_resolve_as_the_runbook_sql_does() {
    let nats = NatsServer::start();
    let mut routers = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..2 {
        let db = TestDatabase::create().await;
        let out = bin()
            .args(["migrate", "--seed-default", "--database-url", db.url()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let dir = tempfile::tempdir().unwrap();
        routers.push(start(&write_config(dir.path(), db.url(), &nats.url(), "")));
        let pool = db.pool().await;
        keep.push((db, dir, pool));
    }
    let (sql_router, cli_router) = (&routers[0], &routers[1]);
    let sql_pool = &keep[0].2;
    let cli_pool = &keep[1].2;
    let tenants = ["premium_tenant", "standard_tenant", "other_tenant"];
    let answers = |r: &Router| -> Vec<Value> {
        tenants
            .iter()
            .map(|t| {
                r.json(
                    Some(VIEWER_KEY),
                    &[
                        "ext",
                        "resolve",
                        "normalize_text",
                        "--context",
                        &format!("tenant_id={t}"),
                    ],
                )
            })
            .collect()
    };
    let compare = |step: &str, expect_versions: [&str; 3]| {
        let (a, b) = (answers(sql_router), answers(cli_router));
        assert_eq!(a, b, "after {step}: the SQL's and the CLI's answers differ");
        let versions: Vec<&str> = a.iter().map(|v| v["version"].as_str().unwrap()).collect();
        assert_eq!(versions, expect_versions, "after {step}");
    };
    let sql = async |statement: &'static str| {
        sqlx::raw_sql(statement).execute(sql_pool).await.unwrap();
        sql_router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    };
    compare("seeding", ["v1", "v1", "v1"]);

    // Step 1: prepare the new version for premium_tenant.
    sql(r#"
INSERT INTO extension_versions (
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
);"#)
    .await;
    cli_router.json(
        Some(ADMIN_KEY),
        &[
            "ext",
            "version",
            "add",
            "normalize_text",
            "v2",
            "--subject",
            "beamline.ext.pre.normalize_text.v2",
            "--timeout-ms",
            "150",
            "--retry",
            "1",
            "--config",
            r#"{"max_length": 2000}"#,
            "--metadata",
            r#"{"description": "Normalize text v2 with improved handling"}"#,
        ],
    );
    cli_router.json(
        Some(OPERATOR_KEY),
        &[
            "ext",
            "rollout",
            "normalize_text",
            "--version",
            "v2",
            "--tenant",
            "premium_tenant",
        ],
    );
    compare("step 1", ["v2", "v1", "v1"]);

    // Step 3: more tenants.
    sql(r#"
UPDATE extension_versions
SET routing_rules = '{"tenant_id": ["premium_tenant", "standard_tenant"]}'::jsonb
WHERE id = 'normalize_text' AND version = 'v2';"#)
    .await;
    cli_router.json(
        Some(OPERATOR_KEY),
        &[
            "ext",
            "rollout",
            "normalize_text",
            "--version",
            "v2",
            "--tenant",
            "standard_tenant",
        ],
    );
    compare("step 3", ["v2", "v2", "v1"]);

    // Step 5: every tenant.
    sql(r#"
UPDATE extension_versions
SET routing_rules = '{}'::jsonb  -- Empty = default for all
WHERE id = 'normalize_text' AND version = 'v2';"#)
    .await;
    cli_router.json(
        Some(OPERATOR_KEY),
        &[
            "ext",
            "rollout",
            "normalize_text",
            "--version",
            "v2",
            "--all-tenants",
        ],
    );
    compare("step 5", ["v2", "v2", "v2"]);

    // Rollback, step 2: revert the routing rules.
    sql(r#"
UPDATE extension_versions
SET routing_rules = '{"tenant_id": []}'::jsonb  -- Empty list = no match
WHERE id = 'normalize_text' AND version = 'v2';"#)
    .await;
    cli_router.json(Some(OPERATOR_KEY), &["ext", "rollback", "normalize_text"]);
    compare("rollback", ["v1", "v1", "v1"]);

    // The two databases hold the same version row, and the CLI's was audited.
    let row = async |pool: &sqlx::PgPool| -> (String, i32, i32, Value, Value, Value, bool) {
        sqlx::query_as(
            "SELECT subject, timeout_ms, retry, config, metadata, routing_rules, enabled \
             FROM extension_versions WHERE id = 'normalize_text' AND version = 'v2'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    assert_eq!(row(sql_pool).await, row(cli_pool).await);
    let audit = audit_rows(cli_pool, "normalize_text").await;
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|(a, by, _, _)| (a.as_str(), by.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("create", "migrate --seed-default"),
            ("create", "alice-admin"),
            ("update", "oscar-operator"),
            ("update", "oscar-operator"),
            ("update", "oscar-operator"),
            ("update", "oscar-operator"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_default_makes_database_mode_serve_the_default_policy() {
    let db = migrated_database().await;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), db.url(), &nats.url(), "");
    let mut command = bin();
    command.args(["serve", "--demo", "--config"]).arg(&config);
    let router = start_command(command);

    // No default policy yet: said at start, by registry status, and by Decide.
    let log = router.log.lock().unwrap().clone();
    assert!(
        log.contains("what will not work yet") && log.contains("no enabled policy 'default'"),
        "{log}"
    );
    let out = router.cli(Some(VIEWER_KEY), &["registry", "status"]);
    assert!(out.status.success());
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["warnings"]
            .to_string()
            .contains("no enabled policy 'default'"),
        "{status}"
    );
    assert!(stderr(&out).contains("warning: no enabled policy 'default'"));
    refused(
        router.cli(None, &["decide", "--tenant", "acme", "--payload", "hi"]),
        4,
        "policy_not_found",
        "decide before seeding",
    );

    // Seed while it runs: twice, the second keeps everything.
    let out = bin()
        .args(["migrate", "--seed-default", "--database-url", db.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    for record in [
        "seeded extension 'normalize_text'",
        "seeded extension 'test_provider'",
        "seeded policy 'default' of tenant 'default'",
    ] {
        assert!(text.contains(record), "{text}");
    }
    let again = bin()
        .args(["migrate", "--seed-default", "--database-url", db.url()])
        .output()
        .unwrap();
    let again = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again.matches("kept ").count(), 5, "{again}");
    assert!(!again.contains("seeded"), "{again}");

    wait_until(30, "the seeded policy is served", async || {
        router
            .cli(None, &["decide", "--tenant", "acme", "--payload", "hi"])
            .status
            .success()
    })
    .await;
    let d = router.json(
        None,
        &[
            "decide",
            "--tenant",
            "acme",
            "--payload",
            "  Hello   world  ",
        ],
    );
    let steps: Vec<&str> = d["executed_extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["normalize_text", "pii_guard", "test_provider", "mask_pii"]
    );
    let status = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    assert_eq!(status["warnings"], json!([]), "{status}");
}
