//! The shipped deployment files: the alert rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`); the Grafana dashboard parses, has the runbook's
//! nine panels, the canary rollout panel and the `extension` variable, and every
//! metric its queries name is exported by a running router.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use beamline_test_support::NatsServer;
use common::*;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo(""))
        .output()
        .expect("promtool not found: install the Debian package prometheus (scripts/test does)");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_check_and_unit_tests_pass() {
    promtool(&[
        "check",
        "rules",
        "deploy/prometheus/router-alert-rules.yaml",
    ]);
    promtool(&[
        "test",
        "rules",
        "deploy/prometheus/tests/router-alert-rules.test.yaml",
    ]);
    let rules = std::fs::read_to_string(repo("deploy/prometheus/router-alert-rules.yaml")).unwrap();
    for alert in [
        "ExtensionErrorRateHigh",
        "ExtensionCircuitBreakerOpened",
        "ExtensionLatencyHighP95",
        "ExtensionLatencyHighP99",
        "ExtensionCircuitBreakerFrequentOpenings",
        "ExtensionRegistrySyncFailed",
        "ExtensionSuccessRateLow",
        "ExtensionRBACDenied",
        "ExtensionPayloadTooLarge",
        "ExtensionRetryLimitExceeded",
        "ExtensionRegistryRecordQuarantined",
        "ExtensionRolloutRolledBack",
        "ExtensionRolloutStuck",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
    // Every runbook_url points at an anchor that exists in docs/RUNBOOK.md.
    let runbook = std::fs::read_to_string(repo("docs/RUNBOOK.md")).unwrap();
    // GitHub-style heading slugs, plus explicit `<a id="…"></a>` anchors.
    let mut anchors: BTreeSet<String> = runbook
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .collect::<String>()
                .replace(' ', "-")
        })
        .collect();
    for part in runbook.split("<a id=\"").skip(1) {
        if let Some(id) = part.split('"').next() {
            anchors.insert(id.to_string());
        }
    }
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("runbook_url:"))
    {
        let anchor = line
            .split('#')
            .nth(1)
            .unwrap()
            .trim_matches(|c| c == '"' || c == '\'' || c == ' ');
        assert!(line.contains("docs/RUNBOOK.md#"), "{line}");
        assert!(
            anchors.contains(anchor),
            "anchor #{anchor} not in docs/RUNBOOK.md"
        );
    }
}

/// Metric names in a PromQL expression (identifiers starting with `router_`), with
/// histogram suffixes folded back to the family name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("router_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|n| n.ends_with("_ms")))
            .unwrap_or(name);
        out.insert(family.to_string());
        i = end;
    }
    out
}

#[tokio::test]
async fn the_dashboard_parses_and_names_only_exported_metrics() {
    let text =
        std::fs::read_to_string(repo("deploy/grafana/router-extensions-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let panels = dash["panels"].as_array().expect("panels");
    let beyond = |p: &&Value| {
        p["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("Beyond the runbook"))
    };
    assert_eq!(
        panels.iter().filter(|p| !beyond(p)).count(),
        9,
        "the runbook's nine panels"
    );
    let rollout = panels
        .iter()
        .find(|p| p["title"] == "Canary Rollouts")
        .expect("a rollout panel");
    assert!(beyond(&rollout));
    let rollout_queries = rollout["targets"].to_string();
    for name in [
        "router_extension_rollout_step",
        "router_extension_rollout_state",
    ] {
        assert!(rollout_queries.contains(name), "{name}: {rollout_queries}");
    }
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.contains(&"extension"), "{vars:?}");
    let mut used = BTreeSet::new();
    for p in panels {
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty());
        for t in targets {
            used.extend(metric_names(t["expr"].as_str().expect("expr")));
        }
    }
    let state_panel = panels
        .iter()
        .find(|p| p["type"] == "state-timeline")
        .expect("a state timeline");
    let mappings = state_panel["fieldConfig"]["defaults"]["mappings"].to_string();
    for word in ["closed", "half_open", "open"] {
        assert!(mappings.contains(word), "state mapping lacks {word}");
    }

    // A running router exports every one of them (the rollout panel's once a
    // rollout exists).
    let db = migrated_database().await;
    sqlx::raw_sql(SEED).execute(&db.pool().await).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules) \
           VALUES ('normalize_text', 'v2', 'beamline.ext.pre.normalize_text.v2', 100, 0, '{\"tenant_id\": []}'); \
         INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps) \
           VALUES ('normalize_text', 'v2', 'v1', '[5, 100]')",
    )
    .execute(&db.pool().await)
    .await
    .unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(
        dir.path(),
        db.url(),
        &nats.url(),
        "\n[canary]\nevaluation_interval_ms = 200\n",
    ));
    wait_until(20, "the rollout gauges", async || {
        http_get(&router.http, "/metrics")
            .1
            .contains("router_extension_rollout_step{extension_id=\"normalize_text\"} 5")
    })
    .await;
    let (_, page) = http_get(&router.http, "/metrics");
    for name in &used {
        assert!(
            page.contains(&format!("# TYPE {name} ")),
            "dashboard uses {name}, the router does not export it"
        );
    }
    assert!(used.len() >= 5, "{used:?}");
}

/// `scripts/check-deploy`: promtool on the rules and the example config, the
/// dashboard's queries parsed as PromQL, and both still matching the runbook's text.
#[test]
fn check_deploy_script_passes() {
    let out = Command::new("bash")
        .arg(repo("scripts/check-deploy"))
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "scripts/check-deploy failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
