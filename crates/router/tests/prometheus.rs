//! End to end with a real Prometheus: it scrapes a running router while extensions
//! succeed, fail and time out; the runbook's PromQL returns the expected values and
//! the shipped alert rules load and fire where they should (their `for:` durations
//! shortened so the test does not wait minutes).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::{NatsServer, free_port};
use common::*;
use serde_json::Value;

/// The process, and the directory holding its config and data (removed on drop).
struct Prometheus(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Ok_;
impl Handler for Ok_ {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Ok(Response::unchanged())
    }
}
struct Fails;
impl Handler for Fails {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Err(ExtensionError::new("down", "always"))
    }
}
struct Slow;
impl Handler for Slow {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Ok(Response::unchanged())
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Instant query; returns `data.result`.
fn query(prom: &str, promql: &str) -> Vec<Value> {
    let (code, body) = http_get(
        prom,
        &format!("/api/v1/query?query={}", percent_encode(promql)),
    );
    assert_eq!(code, 200, "{promql}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn by_label(result: &[Value], label: &str) -> std::collections::BTreeMap<String, f64> {
    result
        .iter()
        .map(|r| {
            let key = r["metric"][label].as_str().unwrap_or("").to_string();
            let v: f64 = r["value"][1].as_str().unwrap().parse().unwrap_or(f64::NAN);
            (key, v)
        })
        .collect()
}

fn start_prometheus(router_http: &str) -> (Prometheus, String) {
    let dir = tempfile::tempdir().unwrap();
    let rules_src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus/router-alert-rules.yaml"
    ))
    .expect("deploy/prometheus/router-alert-rules.yaml");
    // Same rules, without the waiting: `for:` becomes 0s.
    let rules: String = rules_src
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                l.split("for:").next().unwrap().to_string() + "for: 0s"
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
    let target = router_http.trim_start_matches("http://");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yaml\nscrape_configs:\n  - job_name: router\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    // The free port may be taken before Prometheus binds it: then Prometheus exits,
    // and it is started again on another port.
    let mut dir = Some(dir);
    for attempt in 1..=5 {
        let port = free_port();
        let data = dir.as_ref().map(|d| d.path().to_path_buf()).unwrap();
        let mut child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                data.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.join(format!("data{attempt}")).display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "prometheus not found: install the Debian package prometheus (scripts/test does)",
            );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                break; // exited: most likely the port was taken
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && http_get(&url, "/-/ready").0 == 200
            {
                return (Prometheus(child, dir.take().unwrap()), url);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("prometheus did not become ready on any of 5 ports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_promql_and_alerts_on_real_series() {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(
        r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry) VALUES
 ('good', 'pre', 'prom.good', 1000, 0),
 ('broken', 'pre', 'prom.broken', 1000, 0),
 ('slow', 'post', 'prom.slow', 100, 1),
 ('spare', 'validator', 'prom.spare', 1000, 0),
 ('quarantined', 'pre', 'prom.q', 99999, 0);
INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('default', 'default',
 '{"providers": [{"name": "p"}], "pre": [{"id": "good"}, {"id": "broken", "mode": "optional"}], "post": [{"id": "slow", "mode": "optional"}]}');
"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), db.url(), &nats.url(), ""));
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let _t = [
        beamline_sdk::spawn(nc.clone(), "prom.good", Ok_, ServeOptions::default())
            .await
            .unwrap(),
        beamline_sdk::spawn(nc.clone(), "prom.broken", Fails, ServeOptions::default())
            .await
            .unwrap(),
        beamline_sdk::spawn(nc.clone(), "prom.slow", Slow, ServeOptions::default())
            .await
            .unwrap(),
    ];
    let (_prom, prom) = start_prometheus(&router.http);

    // Wait for Prometheus to have scraped the idle router (zero series), so the
    // counters' increase from 0 is seen.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = query(
            &prom,
            "router_extension_invocation_total{extension_id=\"broken\",status=\"error\"}",
        );
        if !up.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the router"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // …and scraped it at least twice more before the traffic, so every rate sees
    // the counters start from the idle router.
    let deadline = Instant::now() + Duration::from_secs(20);
    while query(&prom, "count_over_time(up{job=\"router\"}[1m]) >= 3").is_empty() {
        assert!(Instant::now() < deadline, "prometheus stopped scraping");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = RouterClient::connect(router.addr.clone()).await.unwrap();
    let request = || proto::RouteRequest {
        message: Some(proto::Message {
            tenant_id: "acme".into(),
            payload: b"hi".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Traffic for a while: good succeeds, broken errors (its breaker opens after 5),
    // slow times out (its breaker opens too).
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        client
            .decide(request())
            .await
            .expect("optional failures do not fail the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let Prometheus scrape the final state (its last sample of good's successes is
    // the router's own count) and evaluate the rules on it (the alerts below fire).
    let (_, page) = http_get(&router.http, "/metrics");
    let good_line = "router_extension_invocation_total{extension_id=\"good\"";
    let good_now: f64 = page
        .lines()
        .filter(|l| l.starts_with(good_line) && l.contains("status=\"success\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(good_now > 0.0, "no successes counted:\n{page}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scraped = query(
            &prom,
            "sum(router_extension_invocation_total{extension_id=\"good\",status=\"success\"})",
        );
        let caught_up = scraped
            .first()
            .and_then(|r| r["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok())
            == Some(good_now);
        let (_, alerts) = http_get(&prom, "/api/v1/alerts");
        let evaluated = [
            "ExtensionErrorRateHigh",
            "ExtensionLatencyHighP99",
            "ExtensionRegistryRecordQuarantined",
        ]
        .iter()
        .all(|name| alerts.contains(&format!("\"alertname\":\"{name}\"")));
        if caught_up && evaluated {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never caught up with the router: scraped {scraped:?}, router {good_now}; alerts {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Error rate per extension.
    let err = by_label(
        &query(
            &prom,
            "sum(rate(router_extension_invocation_total{status=\"error\"}[5m])) by (extension_id) /\nsum(rate(router_extension_invocation_total[5m])) by (extension_id)",
        ),
        "extension_id",
    );
    assert_eq!(err.get("broken"), Some(&1.0), "{err:?}");
    assert_eq!(err.get("good"), Some(&0.0), "{err:?}");
    assert_eq!(
        err.get("slow"),
        Some(&0.0),
        "timeouts are status=timeout, not error: {err:?}"
    );
    let success = by_label(
        &query(
            &prom,
            "sum(rate(router_extension_invocation_total{status=\"success\"}[5m])) by (extension_id) /\nsum(rate(router_extension_invocation_total[5m])) by (extension_id)",
        ),
        "extension_id",
    );
    assert_eq!(success.get("good"), Some(&1.0), "{success:?}");
    // p95 / p99 latency: slow's calls time out at 100 ms.
    for q in [0.95, 0.99] {
        let p = by_label(
            &query(
                &prom,
                &format!(
                    "histogram_quantile({q}, \n  sum(rate(router_extension_invocation_latency_ms_bucket[5m])) by (extension_id, le)\n)"
                ),
            ),
            "extension_id",
        );
        let slow = p["slow"];
        // Two attempts of 100 ms each (retry 1), plus a jittered backoff.
        assert!(
            (200.0..=500.0).contains(&slow),
            "p{q} of slow = {slow} ({p:?})"
        );
        // Relative, in the same run: the healthy extension is far below the slow one.
        assert!(
            p["good"] * 4.0 < slow,
            "p{q} of good = {} is not far below slow's {slow} ({p:?})",
            p["good"]
        );
    }
    // Average latency and retry rate per extension.
    let avg = by_label(
        &query(
            &prom,
            "sum(rate(router_extension_invocation_latency_ms_sum[5m])) by (extension_id) /\nsum(rate(router_extension_invocation_latency_ms_count[5m])) by (extension_id)",
        ),
        "extension_id",
    );
    assert!(
        avg["slow"] >= 200.0 && avg["good"] * 4.0 < avg["slow"],
        "{avg:?}"
    );
    let retry = by_label(
        &query(
            &prom,
            "sum(rate(router_extension_retries_total{retry_count!=\"0\"}[5m])) by (extension_id) /\nsum(rate(router_extension_retries_total[5m])) by (extension_id)",
        ),
        "extension_id",
    );
    assert_eq!(
        retry.get("slow"),
        Some(&1.0),
        "every slow call retried once: {retry:?}"
    );
    assert!(!retry.contains_key("good"), "{retry:?}");
    let p95_gauge = by_label(
        &query(&prom, "router_extension_health_latency_p95_ms > 100"),
        "extension_id",
    );
    assert!(
        p95_gauge.contains_key("slow") && !p95_gauge.contains_key("good"),
        "{p95_gauge:?}"
    );
    // Open circuits: broken and slow.
    let open = query(
        &prom,
        "count(router_extension_circuit_breaker_state{state=\"open\"})",
    );
    assert_eq!(open[0]["value"][1], "2", "{open:?}");
    let opened = by_label(
        &query(
            &prom,
            "sum(rate(router_extension_circuit_breaker_opened_total[5m])) by (extension_id)",
        ),
        "extension_id",
    );
    assert!(
        opened["broken"] > 0.0 && opened["good"] == 0.0,
        "{opened:?}"
    );
    // Sync success rate and registry size by type.
    let sync = query(
        &prom,
        "sum(rate(router_extension_registry_sync_total{status=\"success\"}[5m])) /\nsum(rate(router_extension_registry_sync_total[5m]))",
    );
    assert_eq!(sync[0]["value"][1], "1", "{sync:?}");
    let total = query(&prom, "sum(router_extension_registry_extensions_total)");
    assert_eq!(total[0]["value"][1], "4");
    let by_source = by_label(
        &query(
            &prom,
            "sum(router_extension_registry_extensions_total) by (source)",
        ),
        "source",
    );
    assert_eq!(by_source.get("database"), Some(&4.0), "{by_source:?}");
    let by_type = by_label(
        &query(
            &prom,
            "sum(router_extension_registry_extensions_total) by (type)",
        ),
        "type",
    );
    assert_eq!(
        (
            by_type["pre"],
            by_type["post"],
            by_type["validator"],
            by_type["provider"]
        ),
        (2.0, 1.0, 1.0, 0.0)
    );
    let low = by_label(
        &query(&prom, "router_extension_health_success_rate < 0.9"),
        "extension_id",
    );
    assert!(
        low.contains_key("broken") && !low.contains_key("good"),
        "{low:?}"
    );

    // The shipped alert rules loaded, and fire where they should.
    let (_, rules) = http_get(&prom, "/api/v1/rules");
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let names: Vec<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| {
            g["rules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(names.len(), 13, "{names:?}");
    let (_, alerts) = http_get(&prom, "/api/v1/alerts");
    let alerts: Value = serde_json::from_str(&alerts).unwrap();
    let firing: Vec<(String, String)> = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap().to_string(),
                a["labels"]["extension_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    let fires = |name: &str, ext: &str| firing.iter().any(|(n, e)| n == name && e == ext);
    assert!(fires("ExtensionErrorRateHigh", "broken"), "{firing:?}");
    assert!(
        fires("ExtensionCircuitBreakerOpened", "broken"),
        "{firing:?}"
    );
    assert!(fires("ExtensionSuccessRateLow", "broken"), "{firing:?}");
    assert!(fires("ExtensionLatencyHighP95", "slow"), "{firing:?}");
    assert!(fires("ExtensionLatencyHighP99", "slow"), "{firing:?}");
    assert!(
        !firing.iter().any(|(_, e)| e == "good"),
        "nothing fires for the healthy extension: {firing:?}"
    );
    assert!(
        !firing
            .iter()
            .any(|(n, _)| n == "ExtensionRegistrySyncFailed"),
        "{firing:?}"
    );
    // The row whose timeout is out of range is quarantined (and absent: the totals
    // above count four extensions), counted by table, and alerted on.
    let quarantined = by_label(
        &query(
            &prom,
            "max(router_extension_registry_quarantined) by (table)",
        ),
        "table",
    );
    assert_eq!(quarantined.get("extensions"), Some(&1.0), "{quarantined:?}");
    assert_eq!(quarantined.get("policies"), Some(&0.0), "{quarantined:?}");
    let quarantine_alert = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| {
            a["labels"]["alertname"] == "ExtensionRegistryRecordQuarantined"
                && a["state"] == "firing"
        })
        .unwrap_or_else(|| panic!("no quarantine alert: {alerts}"));
    assert_eq!(quarantine_alert["labels"]["table"], "extensions");
}
