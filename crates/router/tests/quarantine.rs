//! Quarantine with the real binary, PostgreSQL and NATS: a malformed policy row (the
//! original's document shape) is named in `registry status` with its field path,
//! counted in the gauge, and does not hold back a later change, which reaches every
//! router; `registry validate` and `registry diff` read the source and change nothing.

mod common;

use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_admin_client::RouterAdminClient;
use beamline_test_support::NatsServer;
use common::*;
use serde_json::Value;

/// The original's document shape: providers as strings.
const BAD_POLICY: &str = r#"INSERT INTO policies (tenant_id, policy_id, policy) VALUES
  ('acme', 'default', '{"providers": ["openai", "anthropic"], "pre": [{"id": "normalize_text"}]}')"#;
const FIELD_PATH: &str = "policies[acme/default].policy.providers[0]";

async fn admin(router: &Router) -> RouterAdminClient<tonic::transport::Channel> {
    RouterAdminClient::connect(router.addr.clone())
        .await
        .expect("admin connect")
}

fn with_key<T>(body: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut()
        .insert("x-api-key", ADMIN_KEY.parse().unwrap());
    r
}

async fn timeout_of(client: &mut RouterAdminClient<tonic::transport::Channel>) -> Option<u64> {
    let r = client
        .get_extension(with_key(proto::ExtensionIdRequest {
            id: "normalize_text".into(),
        }))
        .await
        .ok()?;
    let v = beamline_api::json::from_proto(r.get_ref().result.as_ref()?);
    v["timeout_ms"].as_u64()
}

/// How long after `since` each router serves `timeout_ms` for normalize_text, every
/// router polled at once on its own task.
async fn visible_everywhere(
    clients: &[RouterAdminClient<tonic::transport::Channel>],
    since: Instant,
    timeout_ms: u64,
) -> Vec<Duration> {
    let polls: Vec<_> = clients
        .iter()
        .cloned()
        .map(|mut c| {
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if timeout_of(&mut c).await == Some(timeout_ms) {
                        return since.elapsed();
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the timeout change never reached a router"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    for p in polls {
        seen.push(p.await.unwrap());
    }
    seen
}

/// A CLI command's table output (people's view).
fn table(router: &Router, args: &[&str]) -> String {
    let out = bin()
        .args(["--addr", &router.addr, "--api-key", VIEWER_KEY])
        .args(args)
        .output()
        .expect("cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn quarantine_gauge(router: &Router, table: &str) -> Option<f64> {
    let (_, body) = http_get(&router.http, "/metrics");
    let prefix = format!("router_extension_registry_quarantined{{table=\"{table}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Done-when of issue 13: a bad policy row plus a later `UPDATE extensions SET
/// timeout_ms = 200 WHERE id = 'normalize_text'` → the timeout reaches every router
/// (the measured latency is printed), and `registry status` names the bad row and
/// its field path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_row_does_not_hold_back_a_later_change_on_any_router() {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    let nats = NatsServer::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let routers: Vec<Router> = dirs
        .iter()
        .map(|d| start(&write_config(d.path(), db.url(), &nats.url(), "")))
        .collect();
    let mut clients: Vec<RouterAdminClient<tonic::transport::Channel>> = Vec::new();
    for r in &routers {
        clients.push(admin(r).await);
    }

    // Baseline from the same run: the same kind of change, nothing quarantined.
    let changed_at = Instant::now();
    sqlx::query("UPDATE extensions SET timeout_ms = 150 WHERE id = 'normalize_text'")
        .execute(&pool)
        .await
        .unwrap();
    let baseline = visible_everywhere(&clients, changed_at, 150).await;

    sqlx::raw_sql(BAD_POLICY).execute(&pool).await.unwrap();
    for r in &routers {
        wait_until(10, "the bad row is quarantined", async || {
            let s = r.json(Some(VIEWER_KEY), &["registry", "status"]);
            s["quarantined"].as_array().is_some_and(|q| !q.is_empty())
        })
        .await;
    }

    let changed_at = Instant::now();
    sqlx::query("UPDATE extensions SET timeout_ms = 200 WHERE id = 'normalize_text'")
        .execute(&pool)
        .await
        .unwrap();
    let seen = visible_everywhere(&clients, changed_at, 200).await;
    eprintln!(
        "MEASURED committed UPDATE → visible on each router: no quarantine {baseline:?}, one quarantined row {seen:?}"
    );

    for r in &routers {
        let s = r.json(Some(VIEWER_KEY), &["registry", "status"]);
        let q = &s["quarantined"];
        assert_eq!(q.as_array().unwrap().len(), 1, "{s}");
        assert_eq!(q[0]["table"], "policies");
        assert_eq!(q[0]["key"], "acme/default");
        assert_eq!(q[0]["field"], "policy.providers[0]");
        assert_eq!(q[0]["serving"], "absent");
        let error = q[0]["error"].as_str().unwrap();
        assert!(
            error.starts_with(FIELD_PATH)
                && error.contains("expected an object with \"name\", found the string \"openai\""),
            "{error}"
        );
        assert!(!error.contains("ProviderSpec") && !error.contains("struct"));
        assert!(q[0]["since"].is_string());
        assert_eq!(s["last_error"], Value::Null, "{s}");
        assert_eq!(s["sync_error_total"], 0, "{s}");
        assert_eq!(quarantine_gauge(r, "policies"), Some(1.0));
        assert_eq!(quarantine_gauge(r, "extensions"), Some(0.0));
        // The table view names the row too.
        let t = table(r, &["registry", "status"]);
        assert!(
            t.contains("quarantined  1") && t.contains(FIELD_PATH),
            "{t}"
        );
    }

    // `registry validate` lists it and fails (exit 9); a viewer may run it.
    let out = routers[0].cli(Some(VIEWER_KEY), &["registry", "validate"]);
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["source"], "database");
    assert!(v["location"].as_str().unwrap().contains(db.name()), "{v}");
    assert_eq!(
        v["invalid"][0]["error"].as_str().unwrap().split(':').next(),
        Some(FIELD_PATH)
    );

    // Fixed: out of quarantine on every router, gauge back to 0, validate passes.
    sqlx::query(
        r#"UPDATE policies SET policy = '{"providers": [{"name": "openai"}]}' WHERE tenant_id = 'acme'"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    for r in &routers {
        wait_until(10, "the fixed row leaves quarantine", async || {
            let s = r.json(Some(VIEWER_KEY), &["registry", "status"]);
            s["quarantined"].as_array().is_some_and(|q| q.is_empty())
        })
        .await;
        assert_eq!(quarantine_gauge(r, "policies"), Some(0.0));
    }
    let v = routers[0].json(Some(VIEWER_KEY), &["registry", "validate"]);
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["counts"]["policies"], 2, "{v}");
}

/// `registry status` shows the database `database_url` names (not the `db_*`
/// defaults), password masked.
#[tokio::test]
async fn status_shows_the_database_actually_used() {
    let db = migrated_database().await;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // The same database, reached with a password in the URL (trust ignores it).
    let url = db.url().replacen("postgres@", "postgres:s3cret-pw@", 1);
    assert!(url.contains("s3cret-pw"), "{url}");
    let router = start(&write_config(dir.path(), &url, &nats.url(), ""));
    let s = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    let text = s.to_string();
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert_eq!(s["config"]["db_name"], db.name(), "{s}");
    assert!(s["database"].as_str().unwrap().ends_with(db.name()), "{s}");
    assert!(s["database"].as_str().unwrap().contains("***"), "{s}");
    assert_eq!(s["db_state"], "connected");
}

/// `registry diff` shows what a reload would add, change and remove per table, and
/// changes nothing; after the reload it is empty.
#[tokio::test]
async fn diff_shows_what_a_reload_would_change_and_changes_nothing() {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let empty = router.json(Some(VIEWER_KEY), &["registry", "diff"]);
    assert_eq!(empty["changes"], 0, "{empty}");

    // Changes the router is not told about: the registry's triggers (NOTIFY) are
    // switched off for them, as if the notification had been lost.
    sqlx::raw_sql(
        r#"
ALTER TABLE extensions DISABLE TRIGGER USER;
ALTER TABLE extension_instances DISABLE TRIGGER USER;
ALTER TABLE policies DISABLE TRIGGER USER;
UPDATE extensions SET timeout_ms = 300, retry = 1 WHERE id = 'normalize_text';
INSERT INTO extensions (id, type, subject) VALUES ('fresh', 'post', 'beamline.ext.post.fresh');
DELETE FROM extension_instances WHERE instance_id = 'pii-a';
UPDATE extensions SET subject = 'beamline.>' WHERE id = 'mask_pii';
INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('acme', 'strict', '{"providers": [{"name": "p"}]}');
"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let before = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    let d = router.json(Some(VIEWER_KEY), &["registry", "diff"]);
    assert_eq!(
        d["extensions"]["added"],
        serde_json::json!(["fresh"]),
        "{d}"
    );
    assert_eq!(
        d["extensions"]["changed"][0]["key"], "normalize_text",
        "{d}"
    );
    assert_eq!(
        d["extensions"]["changed"][0]["fields"],
        serde_json::json!(["retry", "timeout_ms"]),
        "{d}"
    );
    assert_eq!(
        d["extension_instances"]["removed"],
        serde_json::json!(["pii_guard/pii-a"]),
        "{d}"
    );
    assert_eq!(
        d["policies"]["added"],
        serde_json::json!(["acme/strict"]),
        "{d}"
    );
    // The bad subject would be quarantined, mask_pii held as it is: not a change.
    assert_eq!(
        d["quarantine_entering"][0]["error"]
            .as_str()
            .unwrap()
            .split(':')
            .next(),
        Some("extensions[mask_pii].subject"),
        "{d}"
    );
    assert_eq!(d["changes"], 4, "{d}");
    // The table view, for people.
    let table = table(&router, &["registry", "diff"]);
    assert!(table.contains("changed  normalize_text"), "{table}");
    assert!(
        table.contains("would quarantine: extensions[mask_pii].subject"),
        "{table}"
    );
    // Nothing changed in the router.
    let after = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    assert_eq!(before["generation"], after["generation"]);
    assert_eq!(after["quarantined"], serde_json::json!([]));

    router.json(Some(OPERATOR_KEY), &["registry", "reload"]);
    let d = router.json(Some(VIEWER_KEY), &["registry", "diff"]);
    assert_eq!(d["changes"], 0, "{d}");
    assert_eq!(d["quarantine_entering"], serde_json::json!([]), "{d}");
}

/// A policy step on an extension that is quarantined and never had a good version
/// is answered like a dangling reference: `extension_not_found`, the rest served.
#[tokio::test]
async fn a_policy_naming_a_quarantined_extension_gets_extension_not_found() {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    // Passes the database's CHECKs, fails ours (a wildcard subject).
    sqlx::raw_sql(
        r#"
INSERT INTO extensions (id, type, subject) VALUES ('fresh_pre', 'pre', 'beamline.ext.pre.>');
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
  ('acme', 'default', '{"providers": [{"name": "test_provider"}], "pre": [{"id": "fresh_pre"}]}');
"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let s = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    assert_eq!(s["quarantined"][0]["key"], "fresh_pre", "{s}");
    assert_eq!(s["quarantined"][0]["serving"], "absent", "{s}");

    let out = router.cli(
        Some(VIEWER_KEY),
        &["decide", "--tenant", "acme", "--payload", "hi"],
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "extension_not_found", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fresh_pre"),
        "{v}"
    );
    // Other tenants are served by the good records.
    let out = router.cli(
        Some(VIEWER_KEY),
        &[
            "decide",
            "--tenant",
            "other",
            "--payload",
            "hi",
            "--dry-run",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// `registry validate` and `registry diff` read a fixture directory as they read
/// the database: each bad file named with its field path, nothing changed.
#[tokio::test]
async fn validate_and_diff_read_a_fixture_directory() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let fixtures = dir.path().join("extensions");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&fixtures).unwrap();
    std::fs::create_dir_all(policies.join("default")).unwrap();
    std::fs::write(
        fixtures.join("good.json"),
        r#"{"id": "good", "type": "pre", "subject": "beamline.ext.pre.good.v1"}"#,
    )
    .unwrap();
    std::fs::write(
        policies.join("default").join("default.json"),
        r#"{"providers": [{"name": "p"}], "pre": [{"id": "good"}]}"#,
    )
    .unwrap();
    let config = write_config(dir.path(), "postgres://127.0.0.1:1/none", &nats.url(), "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "source = \"database\"",
        &format!(
            "source = \"fixtures\"\nfixtures_dir = \"{}\"\npolicies_dir = \"{}\"",
            fixtures.display(),
            policies.display()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let router = start(&config);
    let v = router.json(Some(VIEWER_KEY), &["registry", "validate"]);
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["source"], "fixtures", "{v}");

    // A bad file and a new good one, not yet reloaded.
    std::fs::write(
        fixtures.join("bad.json"),
        r#"{"id": "bad", "type": "pre", "subject": "beamline.ext.pre.bad.v1", "timeout_ms": 0}"#,
    )
    .unwrap();
    std::fs::write(
        fixtures.join("other.json"),
        r#"{"id": "other", "type": "post", "subject": "beamline.ext.post.other.v1"}"#,
    )
    .unwrap();
    let out = router.cli(Some(VIEWER_KEY), &["registry", "validate"]);
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false, "{v}");
    let invalid = v["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), 1, "{v}");
    let error = invalid[0]["error"].as_str().unwrap();
    assert!(
        error.contains("bad.json") && error.contains("timeout_ms"),
        "names the file and the field: {error}"
    );

    let before = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    let d = router.json(Some(VIEWER_KEY), &["registry", "diff"]);
    assert_eq!(
        d["extensions"]["added"],
        serde_json::json!(["other"]),
        "{d}"
    );
    assert_eq!(d["changes"], 1, "{d}");
    assert!(
        d["quarantine_entering"][0]["error"]
            .as_str()
            .unwrap()
            .contains("bad.json"),
        "{d}"
    );
    let after = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    assert_eq!(
        before["generation"], after["generation"],
        "diff changed nothing"
    );
    assert!(
        router
            .json(Some(VIEWER_KEY), &["ext", "get", "good"])
            .is_object()
    );
}
