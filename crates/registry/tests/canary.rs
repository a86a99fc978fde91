//! Canary rollouts against PostgreSQL (migration 0004): the CHECK constraints, the
//! share rule resolved by a running registry exactly as the model hashes (and as the
//! documented SQL computes), and the judge's moves — start, advance, promote, roll
//! back, pause on a manual change (SQL or `ext rollout`), resume, abort — each with
//! its history and audit rows, measured from version health reported by several
//! routers.

mod common;

use std::time::Duration;

use beamline_model::canary::{LatencyHistogram, RolloutPlan, RolloutState, parse_steps_arg};
use beamline_model::routing::share_bucket;
use beamline_model::{Limits, RoutingRules};
use beamline_registry::SourceMode;
use beamline_registry::canary::{self, OperatorMove, StartRollout, VersionHealthRow};
use beamline_registry::writes::{self, Routing};
use beamline_test_support::TestDatabase;
use common::*;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

const DB: &str = "test";

async fn seeded() -> (TestDatabase, PgPool) {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    seed_original(&pool).await;
    sqlx::raw_sql(
        "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules) \
         VALUES ('normalize_text', 'v2', 'beamline.ext.pre.normalize_text.v2', 150, 1, '{\"tenant_id\": []}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    (db, pool)
}

fn plan(steps: &str, min_calls: u64) -> RolloutPlan {
    let mut p = RolloutPlan::new(parse_steps_arg(steps).unwrap());
    p.min_calls_per_step = min_calls;
    p.step_duration = Duration::ZERO;
    p
}

async fn begin(pool: &PgPool, steps: &str, min_calls: u64) -> canary::Rollout {
    canary::start(
        pool,
        DB,
        StartRollout {
            extension_id: "normalize_text".into(),
            candidate_version: "v2".into(),
            baseline_version: None,
            plan: plan(steps, min_calls),
        },
        "oscar",
    )
    .await
    .unwrap()
}

/// `calls` calls of `version` from `router`, every `fail_every`-th an error, all at
/// `latency_us`.
async fn report(
    pool: &PgPool,
    router: &str,
    version: &str,
    calls: u64,
    errors: u64,
    latency_us: u64,
) {
    let mut latency = LatencyHistogram::default();
    latency.add(latency_us, calls);
    canary::report_version_health(
        pool,
        DB,
        router,
        &[VersionHealthRow {
            extension_id: "normalize_text".into(),
            version: version.into(),
            calls,
            errors,
            latency,
            breaker_opened: 0,
        }],
    )
    .await
    .unwrap();
}

async fn judge(conn: &mut PgConnection, id: i64) -> canary::JudgeOutcome {
    canary::judge(conn, DB, id, "canary:test-router", &Limits::default())
        .await
        .unwrap()
}

async fn rules_of(pool: &PgPool, version: &str) -> Value {
    sqlx::query_scalar(
        "SELECT routing_rules FROM extension_versions WHERE id = 'normalize_text' AND version = $1",
    )
    .bind(version)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn actions(pool: &PgPool, id: i64) -> Vec<(String, i32, String)> {
    sqlx::query_as(
        "SELECT action, step, actor FROM extension_rollout_history WHERE rollout_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn check_constraints_keep_bad_rows_out() {
    let (_db, pool) = seeded().await;
    let bad = [
        // candidate = baseline
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps) VALUES ('normalize_text', 'v1', 'v1', '[100]')",
        // steps not an array, or empty
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps) VALUES ('normalize_text', 'v2', 'v1', '{}')",
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps) VALUES ('normalize_text', 'v2', 'v1', '[]')",
        // unknown state, step past the end, running without a start
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, state) VALUES ('normalize_text', 'v2', 'v1', '[100]', 'done')",
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, current_step) VALUES ('normalize_text', 'v2', 'v1', '[5, 100]', 2)",
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, state) VALUES ('normalize_text', 'v2', 'v1', '[100]', 'running')",
        // ended without a terminal state, terminal without ended_at
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, ended_at) VALUES ('normalize_text', 'v2', 'v1', '[100]', now())",
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, state, step_started_at) VALUES ('normalize_text', 'v2', 'v1', '[100]', 'promoted', now())",
        // unknown extension, zero minimum calls, negative duration
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps) VALUES ('nope', 'v2', 'v1', '[100]')",
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, min_calls_per_step) VALUES ('normalize_text', 'v2', 'v1', '[100]', 0)",
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, step_duration) VALUES ('normalize_text', 'v2', 'v1', '[100]', '-1 second')",
        // more errors than calls, negative counts, a histogram that is not an object
        "INSERT INTO extension_version_health (extension_id, version, router_id, calls, errors) VALUES ('normalize_text', 'v2', 'r', 1, 2)",
        "INSERT INTO extension_version_health (extension_id, version, router_id, calls, errors) VALUES ('normalize_text', 'v2', 'r', -1, 0)",
        "INSERT INTO extension_version_health (extension_id, version, router_id, calls, errors, latency_buckets) VALUES ('normalize_text', 'v2', 'r', 1, 0, '[]')",
    ];
    for sql in bad {
        assert!(
            sqlx::query(sql).execute(&pool).await.is_err(),
            "accepted: {sql}"
        );
    }
    // One active rollout per extension.
    let ok = "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps) VALUES ('normalize_text', 'v2', 'v1', '[5, 100]')";
    sqlx::query(ok).execute(&pool).await.unwrap();
    assert!(sqlx::query(ok).execute(&pool).await.is_err());
    // History: a known action is taken, an unknown one is not.
    let row = |action: &str| {
        format!(
            "INSERT INTO extension_rollout_history (rollout_id, extension_id, action, to_state, step, actor) \
             SELECT max(id), 'normalize_text', '{action}', 'running', 0, 'x' FROM extension_rollouts"
        )
    };
    sqlx::query(sqlx::AssertSqlSafe(row("started")))
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        sqlx::query(sqlx::AssertSqlSafe(row("exploded")))
            .execute(&pool)
            .await
            .is_err()
    );
}

/// The documented SQL (docs/REGISTRY.md) puts every tenant in the bucket the model
/// does, and a running registry routes `{"share": 30}` by that bucket.
#[tokio::test]
async fn share_rules_resolve_by_the_same_bucket_everywhere() {
    let (db, pool) = seeded().await;
    let tenants: Vec<String> = (0..300).map(|i| format!("tenant-{i:03}")).collect();
    let sql_buckets: Vec<i64> = sqlx::query_scalar(
        "SELECT ('x' || left(encode(sha256(convert_to(t, 'UTF8')), 'hex'), 8))::bit(32)::bigint % 10000 \
         FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
    )
    .bind(&tenants)
    .fetch_all(&pool)
    .await
    .unwrap();
    for (t, b) in tenants.iter().zip(&sql_buckets) {
        assert_eq!(i64::from(share_bucket(t)), *b, "{t}");
    }
    sqlx::query(
        "UPDATE extension_versions SET routing_rules = '{\"share\": 30}' WHERE id = 'normalize_text'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let snap = registry.snapshot();
    let mut on_v2 = 0;
    for (t, b) in tenants.iter().zip(&sql_buckets) {
        let v = &snap
            .resolve("normalize_text", &[("tenant_id", t.as_str())])
            .unwrap()
            .version;
        assert_eq!(v == "v2", *b < 3000, "{t} (bucket {b}) resolved to {v}");
        on_v2 += usize::from(v == "v2");
    }
    assert!(
        (60..=120).contains(&on_v2),
        "{on_v2} of 300 on a 30 % share"
    );
    // A share out of range is quarantined with its field path.
    sqlx::query(
        "UPDATE extension_versions SET routing_rules = '{\"share\": 130}' WHERE id = 'normalize_text'",
    )
    .execute(&pool)
    .await
    .unwrap();
    registry.reload().await.unwrap();
    let q = &registry.snapshot().quarantine;
    assert_eq!(q.len(), 1, "{q:?}");
    let shown = serde_json::to_string(&q[0]).unwrap();
    assert!(
        shown.contains("routing_rules.share") && shown.contains("0..=100"),
        "{shown}"
    );
}

/// Start → step 1 written → advanced on healthy calls summed over two routers →
/// promoted at 100 %: the base record is v2's, the old base is kept as a version
/// without traffic, and every move is in the history and the audit log.
#[tokio::test]
async fn a_healthy_candidate_is_promoted_step_by_step() {
    let (_db, pool) = seeded().await;
    let r = begin(&pool, "10,50,100", 20).await;
    assert_eq!(r.state, RolloutState::Pending);
    // A second rollout of the same extension is refused while this one is active.
    let again = canary::start(
        &pool,
        DB,
        StartRollout {
            extension_id: "normalize_text".into(),
            candidate_version: "v2".into(),
            baseline_version: None,
            plan: plan("100", 1),
        },
        "oscar",
    )
    .await
    .unwrap_err();
    assert!(
        again.to_string().contains("already has an active rollout"),
        "{again}"
    );

    let mut conn = PgConnection::connect(_db.url()).await.unwrap();
    let o = judge(&mut conn, r.id).await;
    assert_eq!(o.moved.as_ref().map(|m| m.action), Some("started"));
    assert_eq!(rules_of(&pool, "v2").await, json!({"share": 10}));

    // Too few calls: it waits.
    report(&pool, "router-a", "v2", 10, 0, 2000).await;
    report(&pool, "router-a", "v1", 90, 1, 2000).await;
    let o = judge(&mut conn, r.id).await;
    assert!(o.moved.is_none(), "{o:?}");
    assert_eq!(o.rollout.unwrap().current_step, 0);
    // Two routers together cross the minimum.
    report(&pool, "router-b", "v2", 10, 0, 2000).await;
    report(&pool, "router-b", "v1", 90, 0, 2000).await;
    let o = judge(&mut conn, r.id).await;
    assert_eq!(
        o.moved.as_ref().map(|m| m.action),
        Some("advanced"),
        "{o:?}"
    );
    assert_eq!(o.rollout.as_ref().unwrap().current_step, 1);
    assert_eq!(rules_of(&pool, "v2").await, json!({"share": 50}));
    // The new step's window starts empty.
    let o = judge(&mut conn, r.id).await;
    assert!(o.moved.is_none());
    report(&pool, "router-a", "v2", 25, 0, 2000).await;
    report(&pool, "router-a", "v1", 25, 0, 2000).await;
    let o = judge(&mut conn, r.id).await;
    assert_eq!(o.rollout.as_ref().unwrap().current_step, 2);
    assert_eq!(rules_of(&pool, "v2").await, json!({"share": 100}));
    // At 100 % the baseline gets nothing: compared against its last step's figures.
    report(&pool, "router-b", "v2", 30, 0, 2000).await;
    let o = judge(&mut conn, r.id).await;
    assert_eq!(
        o.moved.as_ref().map(|m| m.action),
        Some("promoted"),
        "{o:?}"
    );
    let after = o.rollout.unwrap();
    assert_eq!(after.state, RolloutState::Promoted);
    assert!(after.ended_at.is_some());

    let base: (String, String, i32, i32) = sqlx::query_as(
        "SELECT version, subject, timeout_ms, retry FROM extensions WHERE id = 'normalize_text'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        base,
        (
            "v2".into(),
            "beamline.ext.pre.normalize_text.v2".into(),
            150,
            1
        )
    );
    assert_eq!(rules_of(&pool, "v1").await, json!({"tenant_id": []}));
    assert_eq!(rules_of(&pool, "v2").await, json!({}));
    assert_eq!(
        actions(&pool, r.id)
            .await
            .iter()
            .map(|(a, s, _)| (a.as_str(), *s))
            .collect::<Vec<_>>(),
        vec![
            ("created", 0),
            ("started", 0),
            ("advanced", 1),
            ("advanced", 2),
            ("promoted", 2)
        ]
    );
    let audits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM extension_audit_log WHERE extension_id = 'normalize_text' AND changed_by = 'canary:test-router'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // started, 2 × advanced: rules + row; promoted: kept v1, base, rules, row.
    assert_eq!(audits, 2 + 2 * 2 + 4);
    // Finished: the judge leaves it alone; a new rollout may start.
    let o = judge(&mut conn, r.id).await;
    assert!(o.moved.is_none());
    let status = canary::status(&pool, DB, "normalize_text").await.unwrap();
    assert_eq!(status["state"], "promoted");
    assert_eq!(status["history"].as_array().unwrap().len(), 5);
}

/// 30 % errors cross the error criterion the moment the minimum calls are in, long
/// before the step duration: rolled back, the candidate routes nobody, and the
/// reason names the measurement.
#[tokio::test]
async fn a_failing_candidate_is_rolled_back_at_once() {
    let (_db, pool) = seeded().await;
    let mut p = plan("20,100", 50);
    p.step_duration = Duration::from_secs(3600);
    let r = canary::start(
        &pool,
        DB,
        StartRollout {
            extension_id: "normalize_text".into(),
            candidate_version: "v2".into(),
            baseline_version: Some("v1".into()),
            plan: p,
        },
        "oscar",
    )
    .await
    .unwrap();
    let mut conn = PgConnection::connect(_db.url()).await.unwrap();
    judge(&mut conn, r.id).await;
    report(&pool, "router-a", "v2", 30, 9, 2000).await;
    report(&pool, "router-a", "v1", 300, 3, 2000).await;
    let o = judge(&mut conn, r.id).await;
    assert!(o.moved.is_none(), "30 calls is under the minimum: {o:?}");
    report(&pool, "router-b", "v2", 30, 9, 2000).await;
    let o = judge(&mut conn, r.id).await;
    let m = o.moved.expect("rolled back");
    assert_eq!(m.action, "rolled_back");
    assert!(
        m.reason.as_deref().unwrap().contains("error rate 0.3000"),
        "{m:?}"
    );
    assert_eq!(rules_of(&pool, "v2").await, json!({"tenant_id": []}));
    let status = canary::status(&pool, DB, "normalize_text").await.unwrap();
    assert_eq!(status["state"], "rolled_back");
    assert_eq!(status["candidate"]["calls"], 60);
    assert_eq!(status["candidate"]["routers"], 2);
    let rate = status["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "error_rate")
        .unwrap()
        .clone();
    assert_eq!(rate["ok"], false, "{rate}");
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM extension_audit_log WHERE extension_id = 'normalize_text' \
         AND new_values->>'table' = 'extension_rollouts' AND new_values->>'state' = 'rolled_back' \
         AND changed_by = 'canary:test-router'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
}

/// The runbook's SQL on the candidate's rules, or `ext rollout` on any version of the
/// extension, pauses the rollout; resume writes the step's rules again; abort takes
/// the candidate out of routing.
#[tokio::test]
async fn manual_routing_changes_pause_and_the_operator_resumes_or_aborts() {
    let (_db, pool) = seeded().await;
    let r = begin(&pool, "10,100", 5).await;
    let mut conn = PgConnection::connect(_db.url()).await.unwrap();
    judge(&mut conn, r.id).await;
    // The runbook's rollback statement, verbatim.
    sqlx::raw_sql(
        r#"UPDATE extension_versions
SET routing_rules = '{"tenant_id": []}'::jsonb  -- Empty list = no match
WHERE id = 'normalize_text' AND version = 'v2';"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let o = judge(&mut conn, r.id).await;
    let m = o.moved.expect("paused");
    assert_eq!((m.action, m.to), ("paused", RolloutState::Paused));
    assert!(m.reason.unwrap().contains("changed by hand"));
    // Paused: the judge writes nothing.
    assert!(judge(&mut conn, r.id).await.moved.is_none());
    assert_eq!(rules_of(&pool, "v2").await, json!({"tenant_id": []}));
    let resumed = canary::operator_move(&pool, DB, "normalize_text", OperatorMove::Resume, "oscar")
        .await
        .unwrap();
    assert_eq!(resumed.state, RolloutState::Running);
    assert_eq!(rules_of(&pool, "v2").await, json!({"share": 10}));
    // `ext rollout` of the extension: paused in the same transaction.
    let o = writes::route_version(
        &pool,
        DB,
        "normalize_text",
        Some("v2"),
        &Routing::AddTenants(vec!["premium_tenant".into()]),
        "oscar",
        &Limits::default(),
    )
    .await;
    // {"share": 10} has no tenant_id list to add to: refused, nothing paused.
    assert!(o.is_err());
    let o = writes::route_version(
        &pool,
        DB,
        "normalize_text",
        Some("v2"),
        &Routing::NoTraffic,
        "oscar",
        &Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(o.paused_rollout, Some(r.id));
    let latest = canary::latest(&pool, DB, "normalize_text")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.state, RolloutState::Paused);
    assert!(latest.reason.unwrap().contains("`ext rollback`"));
    let err = canary::operator_move(&pool, DB, "normalize_text", OperatorMove::Pause, "oscar")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("paused already"), "{err}");
    canary::operator_move(&pool, DB, "normalize_text", OperatorMove::Resume, "oscar")
        .await
        .unwrap();
    let aborted = canary::operator_move(&pool, DB, "normalize_text", OperatorMove::Abort, "oscar")
        .await
        .unwrap();
    assert_eq!(aborted.state, RolloutState::Aborted);
    assert_eq!(rules_of(&pool, "v2").await, json!({"tenant_id": []}));
    assert!(
        RoutingRules::parse(&rules_of(&pool, "v2").await)
            .unwrap()
            .matches_nothing()
    );
    let err = canary::operator_move(&pool, DB, "normalize_text", OperatorMove::Abort, "oscar")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no active rollout"), "{err}");
    assert_eq!(
        actions(&pool, r.id)
            .await
            .iter()
            .map(|(a, _, _)| a.as_str())
            .collect::<Vec<_>>(),
        vec![
            "created", "started", "paused", "resumed", "paused", "resumed", "aborted"
        ]
    );
}

/// What `start` refuses, each with a reason an operator can act on.
#[tokio::test]
async fn start_refuses_what_cannot_work() {
    let (_db, pool) = seeded().await;
    let try_start = async |ext: &str, version: &str, steps: &str| {
        canary::start(
            &pool,
            DB,
            StartRollout {
                extension_id: ext.into(),
                candidate_version: version.into(),
                baseline_version: None,
                plan: plan(steps, 10),
            },
            "oscar",
        )
        .await
        .unwrap_err()
        .to_string()
    };
    assert!(try_start("nope", "v2", "100").await.contains("not found"));
    assert!(
        try_start("normalize_text", "v9", "100")
            .await
            .contains("not found")
    );
    assert!(
        try_start("normalize_text", "v1", "100")
            .await
            .contains("both 'v1'")
    );
    assert!(
        try_start("normalize_text", "v2", "5,25")
            .await
            .contains("steps[1]")
    );
    sqlx::query("UPDATE extension_versions SET routing_rules = '{\"tenant_id\": [\"a\"]}'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        try_start("normalize_text", "v2", "100")
            .await
            .contains("already receives traffic")
    );
    assert!(
        try_start("pii_guard", "v2", "100")
            .await
            .contains("not found"),
        "pii_guard has no v2"
    );
    sqlx::raw_sql(
        "INSERT INTO extension_instances (extension_id, instance_id, subject) VALUES ('mask_pii', 'a', 's.a'); \
         INSERT INTO extension_versions (id, version, subject, timeout_ms, retry) VALUES ('mask_pii', 'v2', 's.v2', 100, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(
        try_start("mask_pii", "v2", "100")
            .await
            .contains("instance")
    );
}

/// A row written by hand that passes the CHECKs but not our validation (a last step
/// short of 100 %) is refused with its field, by the judge and by status, instead of
/// being "promoted" at 25 %.
#[tokio::test]
async fn a_hand_written_rollout_our_validation_refuses_is_not_judged() {
    let (db, pool) = seeded().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps) \
         VALUES ('normalize_text', 'v2', 'v1', '[5, 25]') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut conn = PgConnection::connect(db.url()).await.unwrap();
    let err = canary::judge(&mut conn, DB, id, "canary:test-router", &Limits::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("steps[1]"), "{err}");
    assert_eq!(
        rules_of(&pool, "v2").await,
        json!({"tenant_id": []}),
        "nothing written"
    );
    let err = canary::status(&pool, DB, "normalize_text")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("extension_rollouts"), "{err}");
    let (ok, bad) = canary::for_metrics(&pool, DB).await.unwrap();
    assert!(ok.is_empty() && bad.len() == 1);
    // The connection is still usable for the next rollout.
    assert!(
        canary::judgeable(&mut conn, DB)
            .await
            .unwrap()
            .contains(&id)
    );
}
