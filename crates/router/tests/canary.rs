//! Progressive delivery (DESIGN.md §12) against real PostgreSQL, NATS and three
//! routers (the binary), with the extension's versions served by NATS responders in
//! this process:
//! - a healthy v2 is promoted through every step and becomes the base record;
//! - a v2 failing ~30 % of its calls, then a v3 five times slower, are rolled back on
//!   their own — not waiting for the (hour-long) step duration — while the tenants on
//!   v1 never see a failure and v1's breaker never opens;
//! - the router holding the judge's lock is killed mid-rollout and another one
//!   continues from the same step;
//! - a manual routing change (`ext rollback`, the runbook's SQL) pauses a rollout,
//!   and `ext canary pause|resume|abort` do what they say.
//!
//! Every wait polls for observable state (the rollout row, the CLI, /metrics) with a
//! generous deadline; nothing sleeps to synchronise and nothing asserts on time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::NatsServer;
use common::*;
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::transport::Channel;

/// A version of the extension: answers after `delay`, and fails the calls a
/// scrambled counter picks, `fail_percent` of them.
struct Version {
    delay: Duration,
    fail_percent: u64,
    calls: Arc<AtomicU64>,
}

impl Handler for Version {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.delay).await;
        // Scrambled so failures do not line up with the routers' round robin.
        if self.fail_percent > 0 && (n.wrapping_mul(2_654_435_761) >> 7) % 100 < self.fail_percent {
            return Err(ExtensionError::new("boom", "this version fails"));
        }
        Ok(Response::unchanged())
    }
}

const SEED: &str = r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry) VALUES ('work', 'pre', 'canary.v1', 2000, 0);
INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules)
  VALUES ('work', 'v2', 'canary.v2', 2000, 0, '{"tenant_id": []}');
INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('default', 'default',
  '{"providers": [{"name": "a", "weight": 100}], "pre": [{"id": "work", "mode": "optional"}]}');
"#;

/// How often the judge evaluates in these tests.
const INTERVAL: &str = "\n[canary]\nevaluation_interval_ms = 300\n";

struct Cluster {
    pool: PgPool,
    routers: Vec<Router>,
    clients: Vec<RouterClient<Channel>>,
    _db: beamline_test_support::TestDatabase,
    _nats: NatsServer,
    _dirs: Vec<tempfile::TempDir>,
    _nc: async_nats::Client,
    _exts: Vec<tokio::task::JoinHandle<()>>,
}

async fn cluster(versions: Vec<(&str, Version)>) -> Cluster {
    cluster_of(3, versions).await
}

async fn cluster_of(n: usize, versions: Vec<(&str, Version)>) -> Cluster {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
    let nats = NatsServer::start();
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut exts = Vec::new();
    for (subject, v) in versions {
        exts.push(
            beamline_sdk::spawn(nc.clone(), subject, v, ServeOptions::default())
                .await
                .unwrap(),
        );
    }
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let routers: Vec<Router> = dirs
        .iter()
        .map(|d| start(&write_config(d.path(), db.url(), &nats.url(), INTERVAL)))
        .collect();
    let mut clients = Vec::new();
    for r in &routers {
        wait_until(20, "router listening", async || {
            r.json(Some(VIEWER_KEY), &["registry", "status"])["listening"] == true
        })
        .await;
        clients.push(RouterClient::connect(r.addr.clone()).await.unwrap());
    }
    Cluster {
        pool,
        routers,
        clients,
        _db: db,
        _nats: nats,
        _dirs: dirs,
        _nc: nc,
        _exts: exts,
    }
}

fn version(delay_ms: u64, fail_percent: u64) -> Version {
    Version {
        delay: Duration::from_millis(delay_ms),
        fail_percent,
        calls: Arc::new(AtomicU64::new(0)),
    }
}

fn tenants() -> Vec<String> {
    (0..200).map(|i| format!("tenant-{i:03}")).collect()
}

/// One request's outcome: (tenant, version that served it, step status).
type Outcome = (String, String, String);

/// `per_router` requests to each of `clients` at once, tenants taken in turn from
/// `*next`.
async fn traffic(
    clients: &[RouterClient<Channel>],
    tenants: &[String],
    per_router: usize,
    next: &mut usize,
) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    for c in clients {
        let mut c = c.clone();
        let mine: Vec<String> = (0..per_router)
            .map(|i| tenants[(*next + i * clients.len()) % tenants.len()].clone())
            .collect();
        *next += 1;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for t in mine {
                let d = c
                    .decide(proto::RouteRequest {
                        message: Some(proto::Message {
                            tenant_id: t.clone(),
                            payload: b"hi".to_vec(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .expect("decide (the step is optional: a failing version never fails it)")
                    .into_inner();
                let step = &d.executed_extensions[0];
                out.push((t, step.version.clone(), step.status.clone()));
            }
            out
        }));
    }
    *next += per_router * clients.len();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// (state, current step, judged_by) of the extension's latest rollout.
async fn rollout(pool: &PgPool) -> (String, i32, Option<String>) {
    sqlx::query_as(
        "SELECT state, current_step, judged_by FROM extension_rollouts WHERE extension_id = 'work' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// (action, step, actor) of every move of the latest rollout.
async fn history(pool: &PgPool) -> Vec<(String, i32, String)> {
    sqlx::query_as(
        "SELECT action, step, actor FROM extension_rollout_history WHERE rollout_id = \
         (SELECT max(id) FROM extension_rollouts WHERE extension_id = 'work') ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn rules(pool: &PgPool, version: &str) -> Value {
    sqlx::query_scalar(
        "SELECT routing_rules FROM extension_versions WHERE id = 'work' AND version = $1",
    )
    .bind(version)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Sends traffic until the latest rollout's state is `state`; returns every outcome.
async fn drive_until(
    c: &Cluster,
    clients: &[RouterClient<Channel>],
    state: &str,
    secs: u64,
) -> Vec<Outcome> {
    let tenants = tenants();
    let mut next = 0;
    let mut all = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (now, step, _) = rollout(&c.pool).await;
        if now == state {
            return all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollout still {now} at step {} after {secs} s, wanted {state}: {:?}",
            step + 1,
            history(&c.pool).await
        );
        all.extend(traffic(clients, &tenants, 10, &mut next).await);
    }
}

fn start_canary(r: &Router, args: &[&str]) -> Value {
    let mut all = vec!["ext", "canary", "start", "work"];
    all.extend_from_slice(args);
    r.json(Some(OPERATOR_KEY), &all)
}

/// The gauge line's value from a router's /metrics, if present.
fn gauge(r: &Router, series: &str) -> Option<f64> {
    let (_, page) = http_get(&r.http, "/metrics");
    page.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_candidate_is_promoted_through_every_step_and_becomes_the_base() {
    let c = cluster(vec![
        ("canary.v1", version(1, 0)),
        ("canary.v2", version(1, 0)),
    ])
    .await;
    let started = start_canary(
        &c.routers[0],
        &[
            "--version",
            "v2",
            "--steps",
            "10,50,100",
            "--min-calls",
            "30",
            "--step-duration",
            "0s",
        ],
    );
    assert_eq!(started["rollout"]["state"], "pending", "{started}");
    assert_eq!(started["changed_by"], "oscar-operator");
    // A viewer may look but not start one.
    let out = c.routers[1].cli(
        Some(VIEWER_KEY),
        &[
            "ext",
            "canary",
            "start",
            "work",
            "--version",
            "v2",
            "--steps",
            "100",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "viewer refused");

    let outcomes = drive_until(&c, &c.clients, "promoted", 120).await;
    assert!(
        outcomes.iter().all(|(_, _, s)| s == "ok"),
        "a healthy rollout fails nobody"
    );
    assert!(outcomes.iter().any(|(_, v, _)| v == "v2"));

    let moves = history(&c.pool).await;
    assert_eq!(
        moves
            .iter()
            .map(|(a, s, _)| (a.as_str(), *s))
            .collect::<Vec<_>>(),
        vec![
            ("created", 0),
            ("started", 0),
            ("advanced", 1),
            ("advanced", 2),
            ("promoted", 2)
        ],
        "{moves:?}"
    );
    assert_eq!(moves[0].2, "oscar-operator");
    assert!(
        moves[1..]
            .iter()
            .all(|(_, _, by)| by.starts_with("canary:"))
    );
    let base: (String, String) =
        sqlx::query_as("SELECT version, subject FROM extensions WHERE id = 'work'")
            .fetch_one(&c.pool)
            .await
            .unwrap();
    assert_eq!(base, ("v2".into(), "canary.v2".into()));
    assert_eq!(rules(&c.pool, "v1").await, json!({"tenant_id": []}));
    // The judge summed all three routers' calls.
    let reporters: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT router_id) FROM extension_version_health WHERE extension_id = 'work' AND version = 'v2'",
    )
    .fetch_one(&c.pool)
    .await
    .unwrap();
    assert_eq!(reporters, 3);
    // Every router serves v2 to everyone now, as its base record.
    for r in &c.routers {
        wait_until(10, "the promotion reached every router", async || {
            r.json(Some(VIEWER_KEY), &["ext", "get", "work"])["version"] == "v2"
        })
        .await;
    }
    let after = traffic(&c.clients, &tenants(), 10, &mut 0).await;
    assert!(
        after.iter().all(|(_, v, s)| v == "v2" && s == "ok"),
        "{after:?}"
    );

    let status = c.routers[2].json(Some(VIEWER_KEY), &["ext", "canary", "status", "work"]);
    assert_eq!(status["state"], "promoted");
    assert_eq!(status["step"]["number"], 3);
    assert_eq!(status["history"].as_array().unwrap().len(), 5);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM extension_audit_log WHERE extension_id = 'work' AND changed_by LIKE 'canary:%'",
    )
    .fetch_one(&c.pool)
    .await
    .unwrap();
    assert!(audited >= 8, "{audited} audit rows by the judge");
    for r in &c.routers {
        wait_until(10, "metrics show the promotion", async || {
            gauge(
                r,
                "router_extension_rollout_state{extension_id=\"work\",state=\"promoted\"}",
            ) == Some(1.0)
                && gauge(r, "router_extension_rollout_step{extension_id=\"work\"}") == Some(100.0)
        })
        .await;
    }
    let judges: f64 = c
        .routers
        .iter()
        .map(|r| gauge(r, "router_extension_rollout_judge").unwrap_or(0.0))
        .sum();
    assert_eq!(judges, 1.0, "exactly one router judges");
    let table = c.routers[0].cli(
        Some(VIEWER_KEY),
        &["ext", "canary", "status", "work", "--output", "table"],
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{table:?}");
    assert!(
        text.contains("state      promoted") && text.contains("candidate"),
        "{text}"
    );
    eprintln!("{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_slow_candidates_are_rolled_back_and_v1_tenants_never_notice() {
    let c = cluster(vec![
        ("canary.v1", version(2, 0)),
        ("canary.v2", version(2, 30)),
        ("canary.v3", version(12, 0)),
    ])
    .await;
    // Step duration an hour: only a failed criterion can move these rollouts.
    let hour = [
        "--steps",
        "20,100",
        "--min-calls",
        "40",
        "--step-duration",
        "1h",
    ];
    let mut args = vec!["--version", "v2"];
    args.extend_from_slice(&hour);
    start_canary(&c.routers[1], &args);
    let outcomes = drive_until(&c, &c.clients, "rolled_back", 90).await;
    let on_v1: Vec<&Outcome> = outcomes.iter().filter(|o| o.1 == "v1").collect();
    let on_v2: Vec<&Outcome> = outcomes.iter().filter(|o| o.1 == "v2").collect();
    assert!(!on_v1.is_empty() && !on_v2.is_empty());
    assert!(
        on_v1.iter().all(|o| o.2 == "ok"),
        "a tenant on v1 saw a failure: {:?}",
        on_v1.iter().find(|o| o.2 != "ok")
    );
    assert!(on_v2.iter().any(|o| o.2 == "error"), "v2 really failed");
    assert_eq!(rules(&c.pool, "v2").await, json!({"tenant_id": []}));
    let moves = history(&c.pool).await;
    assert_eq!(
        moves.iter().map(|(a, _, _)| a.as_str()).collect::<Vec<_>>(),
        vec!["created", "started", "rolled_back"],
        "{moves:?}"
    );
    let status = c.routers[0].json(Some(VIEWER_KEY), &["ext", "canary", "status", "work"]);
    assert_eq!(status["state"], "rolled_back");
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.contains("error rate") || reason.contains("breaker opened"),
        "{reason}"
    );
    // Measured at the rollback: at least the minimum calls, and far more than a
    // tolerable error rate; the baseline's breaker never opened on any router.
    let (measured,): (Value,) = sqlx::query_as(
        "SELECT measurements FROM extension_rollout_history WHERE action = 'rolled_back' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&c.pool)
    .await
    .unwrap();
    assert!(
        measured["candidate"]["calls"].as_u64().unwrap() >= 40 || reason.contains("breaker"),
        "{measured}"
    );
    assert!(
        measured["candidate"]["error_rate"].as_f64().unwrap() > 0.15,
        "{measured}"
    );
    assert_eq!(measured["baseline"]["breaker_opened"], 0, "{measured}");
    assert_eq!(status["baseline"]["breaker_opened"], 0);
    for r in &c.routers {
        wait_until(10, "metrics show the rollback", async || {
            gauge(
                r,
                "router_extension_rollout_state{extension_id=\"work\",state=\"rolled_back\"}",
            ) == Some(1.0)
                && gauge(
                    r,
                    "router_extension_rollout_state{extension_id=\"work\",state=\"running\"}",
                ) == Some(0.0)
        })
        .await;
        wait_until(10, "every router routes everyone to v1 again", async || {
            r.json(
                Some(VIEWER_KEY),
                &["ext", "resolve", "work", "--context", "tenant_id=tenant-007"],
            )["version"]
                == "v1"
                && r.json(Some(VIEWER_KEY), &["ext", "version", "list", "work"])[0]["receives_traffic"]
                    == false
        })
        .await;
    }
    let after = traffic(&c.clients, &tenants(), 10, &mut 0).await;
    assert!(
        after.iter().all(|(_, v, s)| v == "v1" && s == "ok"),
        "{after:?}"
    );

    // A second rollout of the same extension: v3 answers five times slower.
    let added = c.routers[2].json(
        Some(ADMIN_KEY),
        &[
            "ext",
            "version",
            "add",
            "work",
            "v3",
            "--subject",
            "canary.v3",
        ],
    );
    assert_eq!(added["version"]["routing_rules"], json!({"tenant_id": []}));
    let mut args = vec!["--version", "v3", "--max-p95-ratio", "2"];
    args.extend_from_slice(&hour);
    start_canary(&c.routers[2], &args);
    let outcomes = drive_until(&c, &c.clients, "rolled_back", 90).await;
    assert!(outcomes.iter().all(|o| o.2 == "ok"), "slow is not failing");
    assert!(outcomes.iter().any(|o| o.1 == "v3"));
    let status = c.routers[1].json(Some(VIEWER_KEY), &["ext", "canary", "status", "work"]);
    assert_eq!(status["candidate_version"], "v3");
    assert!(
        status["reason"].as_str().unwrap().contains("p95 latency"),
        "{}",
        status["reason"]
    );
    let p95 = status["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "p95_latency_ms")
        .unwrap()
        .clone();
    assert_eq!(p95["ok"], false, "{p95}");
    assert_eq!(rules(&c.pool, "v3").await, json!({"tenant_id": []}));
    assert_eq!(
        sqlx::query_scalar::<_, String>("SELECT version FROM extensions WHERE id = 'work'")
            .fetch_one(&c.pool)
            .await
            .unwrap(),
        "v1",
        "nothing was promoted"
    );
    let table = c.routers[0].cli(
        Some(VIEWER_KEY),
        &["ext", "canary", "status", "work", "--output", "table"],
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{table:?}");
    assert!(text.contains("state      rolled_back"), "{text}");
    eprintln!("{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_judge_mid_rollout_another_router_continues_from_the_same_step() {
    let mut c = cluster(vec![
        ("canary.v1", version(1, 0)),
        ("canary.v2", version(1, 0)),
    ])
    .await;
    start_canary(
        &c.routers[0],
        &[
            "--version",
            "v2",
            "--steps",
            "20,60,100",
            "--min-calls",
            "200",
            "--step-duration",
            "0s",
        ],
    );
    // Traffic until the second step, then none: the step cannot pass while the judge
    // is being killed.
    let tenants = tenants();
    let mut next = 0;
    wait_until(120, "the rollout reaches its second step", async || {
        if rollout(&c.pool).await.1 >= 1 {
            return true;
        }
        traffic(&c.clients, &tenants, 10, &mut next).await;
        false
    })
    .await;
    let (state, step, judge) = rollout(&c.pool).await;
    assert_eq!(state, "running");
    let judge = judge.expect("judged");
    let pid: u32 = judge.rsplit(':').next().unwrap().parse().unwrap();
    let dead = c
        .routers
        .iter()
        .position(|r| r.child.id() == pid)
        .unwrap_or_else(|| panic!("{judge} is none of the routers"));
    c.routers[dead].child.kill().unwrap();
    c.routers[dead].child.wait().unwrap();
    let moves_before = history(&c.pool).await;

    let survivors: Vec<RouterClient<Channel>> = c
        .clients
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dead)
        .map(|(_, cl)| cl.clone())
        .collect();
    let outcomes = drive_until(&c, &survivors, "promoted", 120).await;
    assert!(outcomes.iter().all(|o| o.2 == "ok"));

    let moves = history(&c.pool).await;
    let after_kill = &moves[moves_before.len()..];
    assert!(!after_kill.is_empty(), "{moves:?}");
    assert!(
        after_kill.iter().all(|(_, _, by)| by != &judge),
        "the dead router moved: {moves:?}"
    );
    assert!(
        after_kill
            .iter()
            .all(|(a, _, _)| a != "started" && a != "created"),
        "restarted from scratch: {moves:?}"
    );
    // It went on from the step the dead judge left: the next move is to the step after.
    let (first_action, first_step, _) = &after_kill[0];
    match first_action.as_str() {
        "advanced" => assert_eq!(*first_step, step + 1, "{moves:?}"),
        "promoted" => assert_eq!(*first_step, step, "{moves:?}"),
        other => panic!("unexpected first move {other}: {moves:?}"),
    }
    let steps: Vec<i32> = moves
        .iter()
        .filter(|m| m.0 == "advanced")
        .map(|m| m.1)
        .collect();
    assert_eq!(steps, vec![1, 2], "each step once, in order: {moves:?}");
    let (_, _, last_judge) = rollout(&c.pool).await;
    assert_ne!(last_judge.as_deref(), Some(judge.as_str()));
    let status =
        c.routers[(dead + 1) % 3].json(Some(VIEWER_KEY), &["ext", "canary", "status", "work"]);
    assert_eq!(status["state"], "promoted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_routing_pauses_the_rollout_and_the_operator_resumes_or_aborts() {
    let c = cluster_of(
        1,
        vec![("canary.v1", version(1, 0)), ("canary.v2", version(1, 0))],
    )
    .await;
    let r = &c.routers[0];
    // Never enough calls to move on its own.
    let started = start_canary(
        r,
        &[
            "--version",
            "v2",
            "--steps",
            "10,100",
            "--min-calls",
            "100000",
        ],
    );
    let id = started["rollout"]["id"].clone();
    wait_until(20, "the judge starts the rollout", async || {
        rollout(&c.pool).await.0 == "running"
    })
    .await;
    assert_eq!(rules(&c.pool, "v2").await, json!({"share": 10}));

    // `ext rollback` of the candidate: paused in the same transaction.
    let back = r.json(
        Some(OPERATOR_KEY),
        &["ext", "rollback", "work", "--version", "v2"],
    );
    assert_eq!(back["paused_rollout"], id, "{back}");
    assert_eq!(rollout(&c.pool).await.0, "paused");
    let status = r.json(Some(VIEWER_KEY), &["ext", "canary", "status", "work"]);
    assert_eq!(status["state"], "paused");
    assert!(
        status["reason"]
            .as_str()
            .unwrap()
            .contains("`ext rollback`"),
        "{status}"
    );
    assert!(
        status["next"]["reason"]
            .as_str()
            .unwrap()
            .contains("resume")
    );

    let resumed = r.json(Some(OPERATOR_KEY), &["ext", "canary", "resume", "work"]);
    assert_eq!(resumed["rollout"]["state"], "running", "{resumed}");
    assert_eq!(rules(&c.pool, "v2").await, json!({"share": 10}));

    // The runbook's SQL on the candidate: the judge notices at its next evaluation.
    sqlx::raw_sql(
        r#"UPDATE extension_versions
SET routing_rules = '{"tenant_id": ["premium_tenant"]}'::jsonb
WHERE id = 'work' AND version = 'v2';"#,
    )
    .execute(&c.pool)
    .await
    .unwrap();
    wait_until(20, "the judge pauses on the manual change", async || {
        rollout(&c.pool).await.0 == "paused"
    })
    .await;
    let status = r.json(Some(VIEWER_KEY), &["ext", "canary", "status", "work"]);
    assert!(
        status["reason"]
            .as_str()
            .unwrap()
            .contains("changed by hand"),
        "{status}"
    );
    assert_eq!(
        rules(&c.pool, "v2").await,
        json!({"tenant_id": ["premium_tenant"]}),
        "a paused rollout leaves the operator's rules alone"
    );
    let out = r.cli(Some(OPERATOR_KEY), &["ext", "canary", "pause", "work"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = r.cli(Some(VIEWER_KEY), &["ext", "canary", "abort", "work"]);
    assert_eq!(out.status.code(), Some(5), "a viewer cannot abort");

    let aborted = r.json(Some(OPERATOR_KEY), &["ext", "canary", "abort", "work"]);
    assert_eq!(aborted["rollout"]["state"], "aborted", "{aborted}");
    assert_eq!(rules(&c.pool, "v2").await, json!({"tenant_id": []}));
    assert_eq!(
        history(&c.pool)
            .await
            .iter()
            .map(|(a, _, _)| a.as_str())
            .collect::<Vec<_>>(),
        vec![
            "created", "started", "paused", "resumed", "paused", "aborted"
        ]
    );
    wait_until(10, "metrics show the abort", async || {
        gauge(
            r,
            "router_extension_rollout_state{extension_id=\"work\",state=\"aborted\"}",
        ) == Some(1.0)
            && gauge(r, "router_extension_rollout_step{extension_id=\"work\"}") == Some(0.0)
    })
    .await;
    let out = r.cli(Some(OPERATOR_KEY), &["ext", "canary", "abort", "work"]);
    assert_eq!(out.status.code(), Some(4), "nothing active to abort");
}
