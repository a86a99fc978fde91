//! `/metrics`, `/healthz`, `/readyz` of the running binary: every contract metric with
//! its type and labels, values that follow what happened, one breaker series per
//! extension, bounded tenants, and `promtool check metrics` accepting the page.

mod common;

use beamline_api::proto;
use beamline_api::proto::router_admin_client::RouterAdminClient;
use beamline_api::proto::router_client::RouterClient;
use beamline_test_support::NatsServer;
use common::*;

fn series<'a>(page: &'a str, name: &str) -> Vec<&'a str> {
    page.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        })
        .collect()
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn request(tenant: &str, text: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: "m".into(),
            tenant_id: tenant.into(),
            trace_id: "t".into(),
            message_type: "chat".into(),
            payload: text.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_follow_what_happens() {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        db.url(),
        &nats.url(),
        "\n[metrics]\nmax_tenants = 2\n",
    );
    let router = start(&config);

    assert_eq!(http_get(&router.http, "/healthz").0, 200);
    assert_eq!(http_get(&router.http, "/readyz").0, 200);

    // The reference extensions on the router's NATS.
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let ext_tasks = beamline_sdk::reference::spawn_all(nc.clone())
        .await
        .unwrap();
    let mut client = RouterClient::connect(router.addr.clone()).await.unwrap();
    for tenant in ["t1", "t2", "t3", "t4"] {
        client.decide(request(tenant, "hello")).await.unwrap();
    }
    assert!(
        client.decide(request("t1", "mail a@b.io")).await.is_err(),
        "pii is blocked"
    );
    // A viewer trying to reload: one RBAC denial on `registry`.
    let mut admin = RouterAdminClient::connect(router.addr.clone())
        .await
        .unwrap();
    let mut r = tonic::Request::new(proto::Empty {});
    r.metadata_mut()
        .insert("x-api-key", VIEWER_KEY.parse().unwrap());
    assert_eq!(
        admin.reload_registry(r).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );

    let (code, page) = http_get(&router.http, "/metrics");
    assert_eq!(code, 200);
    for (name, kind) in CONTRACT_METRICS {
        assert!(
            page.contains(&format!("# TYPE {name} {kind}")),
            "{name} ({kind}) missing"
        );
    }
    // Invocations by status, tenant bounded to 2 + _other.
    let inv = series(&page, "router_extension_invocation_total");
    let total: f64 = inv.iter().map(|l| value(l)).sum();
    assert_eq!(
        total,
        4.0 * 3.0 + 2.0,
        "4 full pipelines (pre, validator, post) + 1 blocked (pre, validator)\n{}",
        inv.join("\n")
    );
    assert!(
        inv.iter().any(|l| l.contains("tenant_id=\"_other\"")),
        "{}",
        inv.join("\n")
    );
    assert!(!inv.iter().any(|l| l.contains("tenant_id=\"t4\"")));
    assert!(
        inv.iter()
            .filter(|l| value(l) > 0.0)
            .all(|l| l.contains("status=\"success\"")),
        "pii_guard answered: a reject is a successful call\n{}",
        inv.join("\n")
    );
    // Latency histogram keeps the runbook's bounds.
    for le in ["10", "25", "50", "100", "200", "500", "1000"] {
        assert!(page.contains(&format!("router_extension_invocation_latency_ms_bucket{{extension_id=\"normalize_text\",type=\"pre\",le=\"{le}\"}}")), "bucket {le}");
    }
    // Exactly one breaker series per extension, closed = 0.
    let states = series(&page, "router_extension_circuit_breaker_state");
    assert_eq!(states.len(), 4, "{}", states.join("\n"));
    assert!(
        states
            .iter()
            .all(|l| l.contains("state=\"closed\"") && value(l) == 0.0)
    );
    // Registry size by source and type.
    let reg = series(&page, "router_extension_registry_extensions_total");
    assert_eq!(reg.iter().map(|l| value(l)).sum::<f64>(), 4.0);
    assert!(reg.iter().all(|l| l.contains("source=\"database\"")));
    assert!(
        series(&page, "router_extension_registry_sync_total")
            .iter()
            .any(|l| l.contains("success") && value(l) >= 1.0)
    );
    let denied: Vec<&str> = series(&page, "router_rbac_denied_total")
        .into_iter()
        .filter(|l| value(l) > 0.0)
        .collect();
    assert_eq!(
        denied,
        vec!["router_rbac_denied_total{resource=\"registry\"} 1"]
    );
    assert!(
        series(&page, "router_extension_version_invocation_total")
            .iter()
            .any(|l| l.contains("version=\"v1\""))
    );

    // Disable the provider's extension subject: calls fail until the breaker opens,
    // and the old `closed` series goes away.
    for t in ext_tasks {
        t.abort();
        let _ = t.await;
    }
    nc.flush().await.unwrap();
    // Wait until NATS has dropped the subscription: nobody answers any more.
    wait_until(10, "normalize_text has no responders", async || {
        matches!(
            nc.request("beamline.ext.pre.normalize_text.v1", "{}".into()).await,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders
        )
    })
    .await;
    for _ in 0..6 {
        let _ = client.decide(request("t1", "hello")).await;
    }
    let (_, page) = http_get(&router.http, "/metrics");
    let n: Vec<&str> = series(&page, "router_extension_circuit_breaker_state")
        .into_iter()
        .filter(|l| l.contains("extension_id=\"normalize_text\""))
        .collect();
    assert_eq!(
        n,
        vec![
            "router_extension_circuit_breaker_state{extension_id=\"normalize_text\",state=\"open\"} 2"
        ]
    );
    assert!(
        series(&page, "router_extension_circuit_breaker_opened_total")
            .iter()
            .any(|l| value(l) == 1.0)
    );
    assert!(
        series(&page, "router_extension_health_success_rate")
            .iter()
            .any(|l| l.contains("normalize_text") && value(l) < 0.9)
    );

    // promtool accepts the page as it is.
    let promtool = which("promtool")
        .expect("promtool not found: install the Debian package prometheus (scripts/test does)");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // promtool parses the page; its only remarks are naming-style lints on names that
    // DESIGN.md §7 fixes as a contract (the runbook's queries use them as printed).
    const CONTRACT_NAME_LINTS: &[&str] = &[
        "router_extension_health_latency_p95_ms metric names should not contain abbreviated units",
        "router_extension_invocation_latency_ms metric names should not contain abbreviated units",
        "router_extension_registry_extensions_total non-counter metrics should not have \"_total\" suffix",
    ];
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let other: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !CONTRACT_NAME_LINTS.contains(&l.trim()))
        .collect();
    assert!(
        other.is_empty(),
        "promtool check metrics complained:\n{}",
        other.join("\n")
    );
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([
                std::path::PathBuf::from("/usr/bin"),
                std::path::PathBuf::from("/usr/sbin"),
            ])
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

/// The failure counters move exactly when their event happens: an extension whose
/// retries are all spent, a request over an extension's `max_payload_size`, and an
/// instance picked by the load balancer.
#[tokio::test]
async fn failure_and_balancer_counters_increment() {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(
        r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry, metadata) VALUES
 ('gone', 'pre', 'counters.gone', 200, 1, '{}'),
 ('small', 'pre', 'counters.small', 1000, 0, '{"max_payload_size": 600}'),
 ('pool', 'pre', 'counters.pool', 1000, 0, '{}');
INSERT INTO extension_instances (extension_id, instance_id, subject, weight) VALUES
 ('pool', 'p1', 'counters.pool.p1', 1),
 ('pool', 'p2', 'counters.pool.p2', 1);
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
 ('retry', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "gone", "mode": "optional"}]}'),
 ('big', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "small", "mode": "optional"}]}'),
 ('lb', 'default', '{"providers": [{"name": "p"}], "pre": [{"id": "pool"}]}');
"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let nats = NatsServer::start();
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut exts = Vec::new();
    for subject in ["counters.small", "counters.pool.p1", "counters.pool.p2"] {
        exts.push(
            beamline_sdk::spawn(
                nc.clone(),
                subject,
                beamline_sdk::reference::NormalizeText,
                beamline_sdk::ServeOptions::default(),
            )
            .await
            .unwrap(),
        );
    }
    nc.flush().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let mut client = RouterClient::connect(router.addr.clone()).await.unwrap();
    let counter = |page: &str, name: &str, labels: &str| -> f64 {
        series(page, name)
            .iter()
            .filter(|l| l.contains(labels))
            .map(|l| value(l))
            .sum()
    };
    let (_, before) = http_get(&router.http, "/metrics");
    assert_eq!(
        counter(
            &before,
            "router_extension_retry_limit_exceeded_total",
            "extension_id=\"gone\""
        ),
        0.0
    );

    // gone: nobody listens, both attempts fail → one retry_limit_exceeded per call.
    for _ in 0..3 {
        client.decide(request("retry", "hello")).await.unwrap();
    }
    // small: a request over 600 bytes is refused before sending; a short one is not.
    client.decide(request("big", "short")).await.unwrap();
    client
        .decide(request("big", &"x".repeat(800)))
        .await
        .unwrap();
    // pool: every call picks an instance, alternating (equal weights).
    for _ in 0..4 {
        client.decide(request("lb", "hello")).await.unwrap();
    }

    let (_, page) = http_get(&router.http, "/metrics");
    assert_eq!(
        counter(
            &page,
            "router_extension_retry_limit_exceeded_total",
            "extension_id=\"gone\""
        ),
        3.0,
        "{}",
        series(&page, "router_extension_retry_limit_exceeded_total").join("\n")
    );
    assert_eq!(
        counter(
            &page,
            "router_extension_payload_too_large_total",
            "extension_id=\"small\""
        ),
        1.0,
        "{}",
        series(&page, "router_extension_payload_too_large_total").join("\n")
    );
    assert_eq!(
        counter(&page, "router_extension_payload_too_large_total", ""),
        1.0,
        "no other extension counted"
    );
    let lb = "router_extension_load_balancer_selection_total";
    for inst in ["p1", "p2"] {
        assert_eq!(
            counter(
                &page,
                lb,
                &format!("extension_id=\"pool\",instance_id=\"{inst}\"")
            ),
            2.0,
            "{}",
            series(&page, lb).join("\n")
        );
    }
    assert_eq!(
        counter(&page, lb, ""),
        4.0,
        "{}",
        series(&page, lb).join("\n")
    );
    drop(exts);
}
