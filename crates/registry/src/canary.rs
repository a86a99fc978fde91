//! Canary rollouts in PostgreSQL (migration 0004, DESIGN.md §12): the operator's
//! writes (`ext canary start|pause|resume|abort`), the per-version health every router
//! reports, and [`judge`] — one evaluation of one rollout and the move it leads to,
//! written in one transaction.
//!
//! Every move writes the candidate's `routing_rules` (when they change), the rollout
//! row, one `extension_rollout_history` row and `extension_audit_log` rows (one per
//! row written, `changed_by` the API key's name or `canary:<router id>` for the
//! judge), so the audit log reads the same whether an operator or the judge moved.
//!
//! The judge's functions take a connection, not a pool: the router that holds the
//! judge's advisory lock ([`JUDGE_LOCK_KEY`]) runs them on the very session that
//! holds the lock, so a router that lost its session (and with it the lock) cannot
//! write a move.

use std::time::Duration;

use beamline_model::canary::{
    self, Criteria, Decision, Judgement, Measurement, RolloutPlan, RolloutState, Step, WindowStats,
};
use beamline_model::{ExtensionRecord, Limits, RoutingRules, VersionRecord};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::database::VersionRow;
use crate::error::{Origin, RegistryError};
use crate::writes::{audit, no_traffic};

/// The advisory lock (`pg_try_advisory_lock(bigint)`) whose holder is the one judge.
/// "beamcana" in ASCII; `pg_locks` shows it as classid 1650811245, objid 1667329633.
pub const JUDGE_LOCK_KEY: i64 = 0x6265_616d_6361_6e61;

/// Terminal rollouts stay in [`for_metrics`] this long after they end, so an alert on
/// a rollback fires, and resolves by itself an hour later.
pub const ENDED_VISIBLE: Duration = Duration::from_secs(3600);

/// Version health rows older than this are pruned once no active rollout needs them.
pub const VERSION_HEALTH_RETENTION: Duration = Duration::from_secs(3600);

/// A rollout as stored.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub id: i64,
    pub extension_id: String,
    pub candidate_version: String,
    pub baseline_version: String,
    pub plan: RolloutPlan,
    pub state: RolloutState,
    pub current_step: usize,
    pub step_started_at: Option<DateTime<Utc>>,
    /// Seconds since `step_started_at`, by the database's clock (0 while pending).
    pub step_elapsed: Duration,
    pub written_rules: Option<Value>,
    pub baseline_reference: Option<WindowStats>,
    pub reason: Option<String>,
    pub judged_by: Option<String>,
    pub judged_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub created_by: Option<String>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: Option<String>,
    pub ended_at: Option<DateTime<Utc>>,
    /// When the last move (history row) happened.
    pub last_move_at: Option<DateTime<Utc>>,
}

impl Rollout {
    pub fn step(&self) -> Option<&Step> {
        self.plan.steps.get(self.current_step)
    }

    /// The share of tenants the candidate serves now, in percent (0 when it serves
    /// none or a tenant list; 100 once promoted).
    pub fn share_percent(&self) -> f64 {
        match self.state {
            RolloutState::Promoted => 100.0,
            RolloutState::RolledBack | RolloutState::Aborted | RolloutState::Pending => 0.0,
            RolloutState::Running | RolloutState::Paused => {
                self.step().and_then(Step::percent).unwrap_or(0.0)
            }
        }
    }

    /// The record as the audit log and the API show it.
    pub fn to_json(&self) -> Value {
        json!({
            "table": "extension_rollouts",
            "id": self.id,
            "extension_id": self.extension_id,
            "candidate_version": self.candidate_version,
            "baseline_version": self.baseline_version,
            "steps": self.plan.steps_json(),
            "min_calls_per_step": self.plan.min_calls_per_step,
            "step_duration_ms": self.plan.step_duration.as_millis() as u64,
            "criteria": self.plan.criteria,
            "state": self.state,
            "current_step": self.current_step,
            "step_started_at": self.step_started_at,
            "written_rules": self.written_rules,
            "reason": self.reason,
            "judged_by": self.judged_by,
            "judged_at": self.judged_at,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
            "ended_at": self.ended_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct RolloutRow {
    id: i64,
    extension_id: String,
    candidate_version: String,
    baseline_version: String,
    steps: Value,
    min_calls_per_step: i64,
    step_duration_ms: i64,
    criteria: Value,
    state: String,
    current_step: i32,
    step_started_at: Option<DateTime<Utc>>,
    step_elapsed_ms: Option<i64>,
    written_rules: Option<Value>,
    baseline_reference: Option<Value>,
    reason: Option<String>,
    judged_by: Option<String>,
    judged_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    created_by: Option<String>,
    updated_at: DateTime<Utc>,
    updated_by: Option<String>,
    ended_at: Option<DateTime<Utc>>,
    last_move_at: Option<DateTime<Utc>>,
}

const ROLLOUT_COLUMNS: &str = "r.id, r.extension_id, r.candidate_version, r.baseline_version, r.steps, \
    r.min_calls_per_step, (extract(epoch FROM r.step_duration) * 1000)::int8 AS step_duration_ms, \
    r.criteria, r.state, r.current_step, r.step_started_at, \
    (extract(epoch FROM clock_timestamp() - r.step_started_at) * 1000)::int8 AS step_elapsed_ms, \
    r.written_rules, r.baseline_reference, r.reason, r.judged_by, r.judged_at, r.created_at, \
    r.created_by, r.updated_at, r.updated_by, r.ended_at, \
    (SELECT max(h.at) FROM extension_rollout_history h WHERE h.rollout_id = r.id) AS last_move_at";

fn origin(id: i64) -> Origin {
    Origin::Row {
        table: "extension_rollouts",
        key: format!("id={id}"),
    }
}

impl RolloutRow {
    /// A row the CHECK constraints let in but our validation does not (hand-written
    /// SQL) is refused with its field.
    fn into_rollout(self) -> Result<Rollout, RegistryError> {
        let invalid = |error| RegistryError::Invalid {
            origin: origin(self.id),
            error,
        };
        let steps = canary::parse_steps(&self.steps).map_err(invalid)?;
        let criteria: Criteria = serde_json::from_value(self.criteria.clone()).map_err(|e| {
            invalid(beamline_model::ValidationError::new(
                "criteria",
                e.to_string(),
            ))
        })?;
        let plan = RolloutPlan {
            steps,
            min_calls_per_step: u64::try_from(self.min_calls_per_step).unwrap_or(1),
            step_duration: Duration::from_millis(u64::try_from(self.step_duration_ms).unwrap_or(0)),
            criteria,
        };
        // A plan written by hand in SQL gets the checks `start` makes (a last step
        // short of 100 % would otherwise "promote" a partial rollout).
        plan.validate().map_err(invalid)?;
        let state: RolloutState = self
            .state
            .parse()
            .map_err(|m: String| invalid(beamline_model::ValidationError::new("state", m)))?;
        Ok(Rollout {
            id: self.id,
            extension_id: self.extension_id,
            candidate_version: self.candidate_version,
            baseline_version: self.baseline_version,
            plan,
            state,
            current_step: usize::try_from(self.current_step).unwrap_or(0),
            step_started_at: self.step_started_at,
            step_elapsed: Duration::from_millis(
                self.step_elapsed_ms
                    .and_then(|ms| u64::try_from(ms).ok())
                    .unwrap_or(0),
            ),
            written_rules: self.written_rules,
            baseline_reference: self
                .baseline_reference
                .and_then(|v| serde_json::from_value(v).ok()),
            reason: self.reason,
            judged_by: self.judged_by,
            judged_at: self.judged_at,
            created_at: self.created_at,
            created_by: self.created_by,
            updated_at: self.updated_at,
            updated_by: self.updated_by,
            ended_at: self.ended_at,
            last_move_at: self.last_move_at,
        })
    }
}

/// One move in `extension_rollout_history`.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub action: String,
    pub from_state: Option<String>,
    pub to_state: String,
    pub step: i32,
    pub routing_rules: Option<Value>,
    pub measurements: Option<Value>,
    pub reason: Option<String>,
    pub actor: String,
}

/// `ext canary start`.
#[derive(Debug, Clone)]
pub struct StartRollout {
    pub extension_id: String,
    pub candidate_version: String,
    /// `None`: the extension's base record version.
    pub baseline_version: Option<String>,
    pub plan: RolloutPlan,
}

fn db_err(database: &str) -> impl Fn(sqlx::Error) -> RegistryError + '_ {
    move |e| RegistryError::from_sqlx(database, e)
}

#[allow(clippy::too_many_arguments)]
async fn history(
    conn: &mut PgConnection,
    database: &str,
    r: &Rollout,
    action: &str,
    from: Option<RolloutState>,
    to: RolloutState,
    step: usize,
    rules: Option<&Value>,
    measurements: Option<&Value>,
    reason: Option<&str>,
    actor: &str,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO extension_rollout_history \
         (rollout_id, extension_id, action, from_state, to_state, step, routing_rules, measurements, reason, actor) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(r.id)
    .bind(&r.extension_id)
    .bind(action)
    .bind(from.map(RolloutState::as_str))
    .bind(to.as_str())
    .bind(step as i32)
    .bind(rules)
    .bind(measurements)
    .bind(reason)
    .bind(actor)
    .execute(conn)
    .await
    .map(|_| ())
    .map_err(db_err(database))
}

async fn fetch(
    conn: &mut PgConnection,
    database: &str,
    filter: &'static str,
    bind: impl ToString,
    lock: bool,
) -> Result<Option<Rollout>, RegistryError> {
    // Built only from this file's constants; values are bound.
    let sql = format!(
        "SELECT {ROLLOUT_COLUMNS} FROM extension_rollouts r WHERE {filter} ORDER BY r.id DESC LIMIT 1{}",
        if lock { " FOR UPDATE OF r" } else { "" }
    );
    let row: Option<RolloutRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(bind.to_string())
        .fetch_optional(conn)
        .await
        .map_err(db_err(database))?;
    row.map(RolloutRow::into_rollout).transpose()
}

/// The extension's latest rollout (active or not).
pub async fn latest(
    pool: &PgPool,
    database: &str,
    extension_id: &str,
) -> Result<Option<Rollout>, RegistryError> {
    let mut conn = pool.acquire().await.map_err(db_err(database))?;
    fetch(
        &mut conn,
        database,
        "r.extension_id = $1",
        extension_id,
        false,
    )
    .await
}

/// A rollout's moves, oldest first.
pub async fn history_of(
    executor: &mut PgConnection,
    database: &str,
    rollout_id: i64,
) -> Result<Vec<HistoryEntry>, RegistryError> {
    sqlx::query_as(
        "SELECT at, action, from_state, to_state, step, routing_rules, measurements, reason, actor \
         FROM extension_rollout_history WHERE rollout_id = $1 ORDER BY id",
    )
    .bind(rollout_id)
    .fetch_all(executor)
    .await
    .map_err(db_err(database))
}

/// Rollouts the judge acts on: pending and running (paused ones wait for `resume`).
pub async fn judgeable(conn: &mut PgConnection, database: &str) -> Result<Vec<i64>, RegistryError> {
    sqlx::query_scalar(
        "SELECT id FROM extension_rollouts WHERE state IN ('pending', 'running') ORDER BY id",
    )
    .fetch_all(conn)
    .await
    .map_err(db_err(database))
}

/// What every router exports as metrics: each extension's latest rollout while it is
/// active, and for [`ENDED_VISIBLE`] after it ended. A row our validation refuses is
/// left out (and logged by the caller through the error list).
pub async fn for_metrics(
    pool: &PgPool,
    database: &str,
) -> Result<(Vec<Rollout>, Vec<RegistryError>), RegistryError> {
    let sql = format!(
        "SELECT DISTINCT ON (r.extension_id) {ROLLOUT_COLUMNS} FROM extension_rollouts r \
         WHERE r.ended_at IS NULL OR r.ended_at > clock_timestamp() - make_interval(secs => $1) \
         ORDER BY r.extension_id, r.id DESC"
    );
    // Built only from this file's constants; values are bound.
    let rows: Vec<RolloutRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(ENDED_VISIBLE.as_secs_f64())
        .fetch_all(pool)
        .await
        .map_err(db_err(database))?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for r in rows {
        match r.into_rollout() {
            Ok(r) => ok.push(r),
            Err(e) => bad.push(e),
        }
    }
    Ok((ok, bad))
}

/// The extension ids with an active rollout (routers report version health for these).
pub async fn active_extensions(
    pool: &PgPool,
    database: &str,
) -> Result<Vec<String>, RegistryError> {
    sqlx::query_scalar(
        "SELECT extension_id FROM extension_rollouts WHERE state IN ('pending', 'running', 'paused')",
    )
    .fetch_all(pool)
    .await
    .map_err(db_err(database))
}

type BaseRow = (String, String, String, i32, i32, bool, String, Value, Value);

async fn base_row(
    conn: &mut PgConnection,
    database: &str,
    id: &str,
    lock: &'static str,
) -> Result<Option<BaseRow>, RegistryError> {
    // `lock` is one of this file's constants; the id is bound.
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, type, subject, timeout_ms, retry, enabled, version, config, metadata \
         FROM extensions WHERE id = $1 {lock}"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
    .map_err(db_err(database))
}

fn base_json(r: &BaseRow) -> Value {
    json!({"id": r.0, "type": r.1, "subject": r.2, "timeout_ms": r.3, "retry": r.4,
           "enabled": r.5, "version": r.6, "config": r.7, "metadata": r.8})
}

async fn versions_of(
    conn: &mut PgConnection,
    database: &str,
    id: &str,
) -> Result<Vec<VersionRow>, RegistryError> {
    sqlx::query_as(
        "SELECT id, version, subject, timeout_ms, retry, config, metadata, routing_rules, enabled, created_at \
         FROM extension_versions WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_all(conn)
    .await
    .map_err(db_err(database))
}

fn version_json(v: &VersionRow) -> Value {
    json!({"table": "extension_versions", "id": v.0, "version": v.1, "subject": v.2,
           "timeout_ms": v.3, "retry": v.4, "config": v.5, "metadata": v.6,
           "routing_rules": v.7, "enabled": v.8})
}

/// Writes the candidate's routing rules (audited as an update of its version row).
async fn write_rules(
    conn: &mut PgConnection,
    database: &str,
    version: &VersionRow,
    rules: &Value,
    by: &str,
) -> Result<(), RegistryError> {
    if &version.7 == rules {
        return Ok(());
    }
    sqlx::query("UPDATE extension_versions SET routing_rules = $3 WHERE id = $1 AND version = $2")
        .bind(&version.0)
        .bind(&version.1)
        .bind(rules)
        .execute(&mut *conn)
        .await
        .map_err(db_err(database))?;
    let mut new = version.clone();
    new.7 = rules.clone();
    audit(
        conn,
        database,
        &version.0,
        "update",
        &version_json(version),
        &version_json(&new),
        by,
    )
    .await
}

/// The fields of a move written to the rollout row.
#[derive(Default)]
struct RowChange<'a> {
    state: Option<RolloutState>,
    step: Option<usize>,
    restart_step: bool,
    written_rules: Option<&'a Value>,
    baseline_reference: Option<&'a WindowStats>,
    reason: Option<&'a str>,
    judged_by: Option<&'a str>,
}

async fn update_row(
    conn: &mut PgConnection,
    database: &str,
    r: &Rollout,
    c: RowChange<'_>,
    by: &str,
) -> Result<Rollout, RegistryError> {
    let state = c.state.unwrap_or(r.state);
    sqlx::query(
        "UPDATE extension_rollouts SET \
           state = $2, current_step = $3, \
           step_started_at = CASE WHEN $4 THEN now() ELSE step_started_at END, \
           written_rules = coalesce($5, written_rules), \
           baseline_reference = coalesce($6, baseline_reference), \
           reason = coalesce($7, reason), \
           judged_by = coalesce($8, judged_by), \
           judged_at = CASE WHEN $8 IS NULL THEN judged_at ELSE now() END, \
           ended_at = CASE WHEN $9 THEN coalesce(ended_at, now()) ELSE NULL END, \
           updated_by = $10 \
         WHERE id = $1",
    )
    .bind(r.id)
    .bind(state.as_str())
    .bind(c.step.unwrap_or(r.current_step) as i32)
    .bind(c.restart_step)
    .bind(c.written_rules)
    .bind(
        c.baseline_reference
            .map(|b| serde_json::to_value(b).unwrap_or(Value::Null)),
    )
    .bind(c.reason)
    .bind(c.judged_by)
    .bind(state.is_terminal())
    .bind(by)
    .execute(&mut *conn)
    .await
    .map_err(db_err(database))?;
    let after = fetch(conn, database, "r.id = $1::int8", r.id, false)
        .await?
        .ok_or_else(|| RegistryError::NotFound(format!("rollout {} vanished", r.id)))?;
    audit(
        conn,
        database,
        &r.extension_id,
        "update",
        &r.to_json(),
        &after.to_json(),
        by,
    )
    .await?;
    Ok(after)
}

/// One move of a rollout, by the judge or an operator.
struct MoveRecord<'a> {
    action: &'static str,
    to: RolloutState,
    step: usize,
    /// The candidate's routing_rules this move wrote, if it wrote any.
    rules: Option<&'a Value>,
    /// What the judge measured, for a move it made on them.
    measured: Option<&'a Value>,
    reason: String,
    /// The move starts a step: the step's clock restarts.
    restart_step: bool,
    baseline_reference: Option<&'a WindowStats>,
    /// The judge that made the move; an operator's move leaves `judged_by` as it is.
    judged_by: Option<&'a str>,
}

impl<'a> MoveRecord<'a> {
    fn new(action: &'static str, to: RolloutState, step: usize, reason: String) -> Self {
        MoveRecord {
            action,
            to,
            step,
            rules: None,
            measured: None,
            reason,
            restart_step: false,
            baseline_reference: None,
            judged_by: None,
        }
    }
}

/// Records a move: its history row, then the rollout row changed to match (audited).
/// Returns the row after the move and the move as the judge reports it.
async fn record_move(
    conn: &mut PgConnection,
    database: &str,
    r: &Rollout,
    m: MoveRecord<'_>,
    by: &str,
) -> Result<(Rollout, Move), RegistryError> {
    history(
        conn,
        database,
        r,
        m.action,
        Some(r.state),
        m.to,
        m.step,
        m.rules,
        m.measured,
        Some(&m.reason),
        by,
    )
    .await?;
    let after = update_row(
        conn,
        database,
        r,
        RowChange {
            state: Some(m.to),
            step: Some(m.step),
            restart_step: m.restart_step,
            written_rules: m.rules,
            baseline_reference: m.baseline_reference,
            reason: Some(&m.reason),
            judged_by: m.judged_by,
        },
        by,
    )
    .await?;
    let moved = Move {
        action: m.action,
        from: r.state,
        to: m.to,
        step: m.step,
        reason: Some(m.reason),
    };
    Ok((after, moved))
}

/// Starts a rollout (state pending: the judge writes its first step at its next
/// evaluation). Refused when the extension already has an active rollout, when the
/// candidate does not exist, is disabled, already receives traffic, or would be
/// shadowed by another version resolved before it, and when the extension has
/// instances (they serve the base record, which a promotion would replace).
pub async fn start(
    pool: &PgPool,
    database: &str,
    req: StartRollout,
    by: &str,
) -> Result<Rollout, RegistryError> {
    let plan_origin = Origin::Request {
        name: "ext canary start".into(),
        item: None,
    };
    req.plan
        .validate()
        .map_err(|error| RegistryError::Invalid {
            origin: plan_origin,
            error,
        })?;
    let err = db_err(database);
    let mut tx = pool.begin().await.map_err(&err)?;
    let id = &req.extension_id;
    let Some(base) = base_row(&mut tx, database, id, "FOR UPDATE").await? else {
        return Err(RegistryError::NotFound(format!(
            "extension '{id}' not found"
        )));
    };
    if let Some(active) = fetch(
        &mut tx,
        database,
        "r.extension_id = $1 AND r.state IN ('pending', 'running', 'paused')",
        id,
        false,
    )
    .await?
    {
        return Err(RegistryError::Conflict(format!(
            "extension '{id}' already has an active rollout (id {}, {} → {}, {}): `ext canary abort {id}` first",
            active.id, active.baseline_version, active.candidate_version, active.state
        )));
    }
    let instances: i64 =
        sqlx::query_scalar("SELECT count(*) FROM extension_instances WHERE extension_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(&err)?;
    if instances > 0 {
        return Err(RegistryError::Unsupported(format!(
            "extension '{id}' has {instances} instance(s); instances serve the base record, so a promotion would leave them on the old version's subjects: roll out by hand (`ext rollout`), or remove the instances first"
        )));
    }
    let versions = versions_of(&mut tx, database, id).await?;
    let candidate = &req.candidate_version;
    let baseline = req
        .baseline_version
        .clone()
        .unwrap_or_else(|| base.6.clone());
    if candidate == &baseline {
        return Err(RegistryError::Unsupported(format!(
            "the candidate and the baseline are both '{candidate}'"
        )));
    }
    let Some(cand) = versions.iter().find(|v| &v.1 == candidate) else {
        return Err(RegistryError::NotFound(format!(
            "version '{candidate}' of extension '{id}' not found (add it with `ext version add`)"
        )));
    };
    if !cand.8 {
        return Err(RegistryError::Unsupported(format!(
            "version '{candidate}' of extension '{id}' is disabled"
        )));
    }
    if baseline != base.6 && !versions.iter().any(|v| v.1 == baseline) {
        return Err(RegistryError::NotFound(format!(
            "baseline version '{baseline}' of extension '{id}' not found (the base record is '{}')",
            base.6
        )));
    }
    let receives = |v: &VersionRow| {
        v.8 && RoutingRules::parse(&v.7)
            .map(|r| !r.matches_nothing())
            .unwrap_or(false)
    };
    if receives(cand) {
        return Err(RegistryError::Unsupported(format!(
            "version '{candidate}' already receives traffic (routing_rules {}): roll it back first (`ext rollback {id} --version {candidate}`), the rollout decides who it serves",
            cand.7
        )));
    }
    // Versions resolve newest first (created_at, then name): one resolved before the
    // candidate that routes tenants would take them before the candidate sees them.
    let newer: Vec<&str> = versions
        .iter()
        .filter(|v| &v.1 != candidate && receives(v))
        .filter(|v| match (v.9, cand.9) {
            (Some(a), Some(b)) => {
                a > b
                    || (a == b
                        && beamline_model::extension::compare_version_names(&v.1, &cand.1).is_gt())
            }
            _ => false,
        })
        .map(|v| v.1.as_str())
        .collect();
    if !newer.is_empty() {
        return Err(RegistryError::Unsupported(format!(
            "version(s) {} of extension '{id}' are resolved before '{candidate}' and route tenants: the candidate would not get them; roll those back first",
            newer.join(", ")
        )));
    }
    let row_id: i64 = sqlx::query_scalar(
        "INSERT INTO extension_rollouts (extension_id, candidate_version, baseline_version, steps, \
         min_calls_per_step, step_duration, criteria, created_by, updated_by) \
         VALUES ($1, $2, $3, $4, $5, make_interval(secs => $6), $7, $8, $8) RETURNING id",
    )
    .bind(id)
    .bind(candidate)
    .bind(&baseline)
    .bind(req.plan.steps_json())
    .bind(req.plan.min_calls_per_step as i64)
    .bind(req.plan.step_duration.as_secs_f64())
    .bind(serde_json::to_value(&req.plan.criteria).unwrap_or_else(|_| json!({})))
    .bind(by)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
            RegistryError::Conflict(format!(
                "extension '{id}' already has an active rollout (one at a time)"
            ))
        }
        _ => RegistryError::from_sqlx(database, e),
    })?;
    let r = fetch(&mut tx, database, "r.id = $1::int8", row_id, false)
        .await?
        .ok_or_else(|| RegistryError::NotFound("the new rollout vanished".into()))?;
    history(
        &mut tx,
        database,
        &r,
        "created",
        None,
        RolloutState::Pending,
        0,
        None,
        None,
        Some(&format!(
            "{baseline} → {candidate} in steps {}",
            req.plan.steps_json()
        )),
        by,
    )
    .await?;
    audit(
        &mut tx,
        database,
        id,
        "create",
        &Value::Null,
        &r.to_json(),
        by,
    )
    .await?;
    tx.commit().await.map_err(&err)?;
    Ok(r)
}

/// What `ext canary pause|resume|abort` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorMove {
    Pause,
    Resume,
    Abort,
}

/// Pauses, resumes or aborts the extension's active rollout. Resume writes the
/// current step's rules again and restarts the step (its window counts from now);
/// abort takes the candidate out of routing (`{"tenant_id": []}`).
pub async fn operator_move(
    pool: &PgPool,
    database: &str,
    extension_id: &str,
    mv: OperatorMove,
    by: &str,
) -> Result<Rollout, RegistryError> {
    let err = db_err(database);
    let mut tx = pool.begin().await.map_err(&err)?;
    let Some(r) = fetch(
        &mut tx,
        database,
        "r.extension_id = $1 AND r.state IN ('pending', 'running', 'paused')",
        extension_id,
        true,
    )
    .await?
    else {
        if base_row(&mut tx, database, extension_id, "")
            .await?
            .is_none()
        {
            return Err(RegistryError::NotFound(format!(
                "extension '{extension_id}' not found"
            )));
        }
        return Err(RegistryError::NotFound(format!(
            "extension '{extension_id}' has no active rollout (`ext canary status {extension_id}` shows the last one)"
        )));
    };
    let versions = versions_of(&mut tx, database, extension_id).await?;
    let candidate = versions.iter().find(|v| v.1 == r.candidate_version);
    let after = match mv {
        OperatorMove::Pause => {
            if r.state == RolloutState::Paused {
                return Err(RegistryError::Unsupported(format!(
                    "the rollout of '{extension_id}' is paused already"
                )));
            }
            let reason = format!("paused by {by}");
            let m = MoveRecord::new("paused", RolloutState::Paused, r.current_step, reason);
            record_move(&mut tx, database, &r, m, by).await?.0
        }
        OperatorMove::Resume => {
            if r.state != RolloutState::Paused {
                return Err(RegistryError::Unsupported(format!(
                    "the rollout of '{extension_id}' is {}, not paused",
                    r.state
                )));
            }
            let Some(candidate) = candidate else {
                return Err(RegistryError::NotFound(format!(
                    "version '{}' of extension '{extension_id}' no longer exists: abort the rollout",
                    r.candidate_version
                )));
            };
            let step = r.step().cloned().unwrap_or(Step::Share(0));
            let rules = step.routing_rules();
            write_rules(&mut tx, database, candidate, &rules, by).await?;
            let reason = format!("resumed by {by} at step {} ({step})", r.current_step + 1);
            let m = MoveRecord {
                rules: Some(&rules),
                restart_step: true,
                ..MoveRecord::new("resumed", RolloutState::Running, r.current_step, reason)
            };
            record_move(&mut tx, database, &r, m, by).await?.0
        }
        OperatorMove::Abort => {
            let rules = no_traffic();
            if let Some(candidate) = candidate {
                write_rules(&mut tx, database, candidate, &rules, by).await?;
            }
            let reason = format!("aborted by {by}");
            let m = MoveRecord {
                rules: Some(&rules),
                ..MoveRecord::new("aborted", RolloutState::Aborted, r.current_step, reason)
            };
            record_move(&mut tx, database, &r, m, by).await?.0
        }
    };
    tx.commit().await.map_err(&err)?;
    Ok(after)
}

/// Pauses the extension's rollout, if one is running or pending, because an operator
/// changed routing by hand (`ext rollout` / `ext rollback`), inside that change's
/// transaction. Returns the paused rollout's id.
pub(crate) async fn pause_for_manual_routing(
    conn: &mut PgConnection,
    database: &str,
    extension_id: &str,
    what: &str,
    by: &str,
) -> Result<Option<i64>, RegistryError> {
    let Some(r) = fetch(
        conn,
        database,
        "r.extension_id = $1 AND r.state IN ('pending', 'running')",
        extension_id,
        true,
    )
    .await?
    else {
        return Ok(None);
    };
    let reason = format!("paused: {what} by {by} (a manual routing change)");
    let m = MoveRecord::new("paused", RolloutState::Paused, r.current_step, reason);
    record_move(conn, database, &r, m, by).await?;
    Ok(Some(r.id))
}

/// One version's report from one router: calls since its previous report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionHealthRow {
    pub extension_id: String,
    pub version: String,
    pub calls: u64,
    pub errors: u64,
    pub latency: canary::LatencyHistogram,
    pub breaker_opened: u64,
}

/// Writes a batch of version reports (one statement).
pub async fn report_version_health(
    pool: &PgPool,
    database: &str,
    router_id: &str,
    rows: &[VersionHealthRow],
) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO extension_version_health \
           (extension_id, version, router_id, calls, errors, latency_buckets, breaker_opened) \
         SELECT u.e, u.v, $7, u.c, u.f, u.l, u.o FROM UNNEST($1::text[], $2::text[], $3::int8[], \
           $4::int8[], $5::jsonb[], $6::int4[]) AS u(e, v, c, f, l, o)",
    )
    .bind(
        rows.iter()
            .map(|r| r.extension_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.version.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.calls as i64).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.errors.min(r.calls) as i64)
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.latency.to_json()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.breaker_opened.min(i32::MAX as u64) as i32)
            .collect::<Vec<_>>(),
    )
    .bind(router_id)
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(db_err(database))
}

/// A version's calls reported after `since`, summed over routers; also how many
/// routers reported.
pub async fn window(
    conn: &mut PgConnection,
    database: &str,
    extension_id: &str,
    version: &str,
    since: DateTime<Utc>,
) -> Result<(WindowStats, i64), RegistryError> {
    let (calls, errors, opened, buckets, routers): (i64, i64, i64, Value, i64) = sqlx::query_as(
        "WITH w AS (SELECT * FROM extension_version_health \
                    WHERE extension_id = $1 AND version = $2 AND reported_at > $3), \
              b AS (SELECT key, sum(value::int8) AS n FROM w, jsonb_each_text(w.latency_buckets) GROUP BY key) \
         SELECT (SELECT coalesce(sum(calls), 0) FROM w)::int8, \
                (SELECT coalesce(sum(errors), 0) FROM w)::int8, \
                (SELECT coalesce(sum(breaker_opened), 0) FROM w)::int8, \
                coalesce((SELECT jsonb_object_agg(key, n) FROM b), '{}'::jsonb), \
                (SELECT count(DISTINCT router_id) FROM w)",
    )
    .bind(extension_id)
    .bind(version)
    .bind(since)
    .fetch_one(conn)
    .await
    .map_err(db_err(database))?;
    Ok((
        WindowStats {
            calls: calls.max(0) as u64,
            errors: errors.max(0) as u64,
            latency: canary::LatencyHistogram::from_json(&buckets),
            breaker_opened: opened.max(0) as u64,
        },
        routers,
    ))
}

/// Deletes version reports older than [`VERSION_HEALTH_RETENTION`] that no active
/// rollout's current step needs. Returns how many went.
pub async fn prune_version_health(
    conn: &mut PgConnection,
    database: &str,
) -> Result<u64, RegistryError> {
    sqlx::query(
        "DELETE FROM extension_version_health h \
         WHERE h.reported_at < clock_timestamp() - make_interval(secs => $1) \
           AND NOT EXISTS (SELECT 1 FROM extension_rollouts r \
                           WHERE r.extension_id = h.extension_id \
                             AND r.state IN ('pending', 'running', 'paused') \
                             AND h.reported_at > r.created_at)",
    )
    .bind(VERSION_HEALTH_RETENTION.as_secs_f64())
    .execute(conn)
    .await
    .map(|r| r.rows_affected())
    .map_err(db_err(database))
}

/// What the judge measured for a rollout's current step, with the routers that
/// reported.
#[derive(Debug, Clone)]
pub struct StepMeasurement {
    pub measurement: Measurement,
    /// The baseline's own window (before [`canary::choose_baseline`]).
    pub baseline_window: WindowStats,
    pub candidate_routers: i64,
    pub baseline_routers: i64,
}

/// Measures a running (or paused) rollout's current step.
pub async fn measure(
    conn: &mut PgConnection,
    database: &str,
    r: &Rollout,
) -> Result<StepMeasurement, RegistryError> {
    let since = r.step_started_at.unwrap_or(r.created_at);
    let (candidate, candidate_routers) =
        window(conn, database, &r.extension_id, &r.candidate_version, since).await?;
    let (baseline_window, baseline_routers) =
        window(conn, database, &r.extension_id, &r.baseline_version, since).await?;
    let (since_start, _) = window(
        conn,
        database,
        &r.extension_id,
        &r.candidate_version,
        r.created_at,
    )
    .await?;
    let (baseline, baseline_source) = canary::choose_baseline(
        baseline_window.clone(),
        r.baseline_reference.clone(),
        r.plan.min_calls_per_step,
    );
    Ok(StepMeasurement {
        measurement: Measurement {
            candidate,
            baseline,
            baseline_source,
            candidate_breaker_opened: since_start.breaker_opened,
            step_elapsed: r.step_elapsed,
        },
        baseline_window,
        candidate_routers,
        baseline_routers,
    })
}

fn stats_json(s: &WindowStats, routers: Option<i64>) -> Value {
    json!({
        "calls": s.calls,
        "errors": s.errors,
        "error_rate": s.error_rate(),
        "p95_latency_ms": s.p95_ms(),
        "breaker_opened": s.breaker_opened,
        "routers": routers,
    })
}

fn measurements_json(m: &StepMeasurement, j: &Judgement) -> Value {
    json!({
        "candidate": stats_json(&m.measurement.candidate, Some(m.candidate_routers)),
        "baseline": stats_json(&m.baseline_window, Some(m.baseline_routers)),
        "compared_baseline": stats_json(&m.measurement.baseline, None),
        "baseline_source": m.measurement.baseline_source,
        "candidate_breaker_opened_since_start": m.measurement.candidate_breaker_opened,
        "step_elapsed_ms": m.measurement.step_elapsed.as_millis() as u64,
        "criteria": j.criteria,
        "decision": j.decision,
    })
}

/// A move the judge made.
#[derive(Debug, Clone)]
pub struct Move {
    /// `started`, `advanced`, `promoted`, `rolled_back`, `paused`, `aborted`.
    pub action: &'static str,
    pub from: RolloutState,
    pub to: RolloutState,
    pub step: usize,
    pub reason: Option<String>,
}

/// The result of judging one rollout.
#[derive(Debug, Clone)]
pub struct JudgeOutcome {
    /// The rollout after the evaluation (`None`: it was no longer judgeable).
    pub rollout: Option<Rollout>,
    pub judgement: Option<Judgement>,
    pub moved: Option<Move>,
}

/// Judges rollout `id` and writes the move it leads to, in one transaction on
/// `conn` (the judge's lock session). `actor` names the judge in the history and
/// the audit log.
pub async fn judge(
    conn: &mut PgConnection,
    database: &str,
    id: i64,
    actor: &str,
    limits: &Limits,
) -> Result<JudgeOutcome, RegistryError> {
    use sqlx::Connection;
    let err = db_err(database);
    let mut tx = conn.begin().await.map_err(&err)?;
    let Some(r) = fetch(&mut tx, database, "r.id = $1::int8", id, true).await? else {
        return Ok(JudgeOutcome {
            rollout: None,
            judgement: None,
            moved: None,
        });
    };
    if !matches!(r.state, RolloutState::Pending | RolloutState::Running) {
        tx.commit().await.map_err(&err)?;
        return Ok(JudgeOutcome {
            rollout: Some(r),
            judgement: None,
            moved: None,
        });
    }
    let ext = r.extension_id.clone();
    let versions = versions_of(&mut tx, database, &ext).await?;
    let candidate = versions
        .iter()
        .find(|v| v.1 == r.candidate_version && v.8)
        .cloned();
    let mut moved = None;
    let mut judgement = None;
    let after = match (r.state, candidate) {
        (_, None) => {
            // Removed or disabled under the rollout: nothing left to judge.
            let reason = format!(
                "version '{}' was removed or disabled during the rollout",
                r.candidate_version
            );
            let rules = no_traffic();
            if let Some(v) = versions.iter().find(|v| v.1 == r.candidate_version) {
                write_rules(&mut tx, database, v, &rules, actor).await?;
            }
            let m = MoveRecord {
                rules: Some(&rules),
                judged_by: Some(actor),
                ..MoveRecord::new("aborted", RolloutState::Aborted, r.current_step, reason)
            };
            let (after, m) = record_move(&mut tx, database, &r, m, actor).await?;
            moved = Some(m);
            after
        }
        (RolloutState::Pending, Some(cand)) => {
            let step = r.plan.steps[0].clone();
            let rules = step.routing_rules();
            write_rules(&mut tx, database, &cand, &rules, actor).await?;
            let reason = format!("step 1 of {}: {step}", r.plan.steps.len());
            let m = MoveRecord {
                rules: Some(&rules),
                restart_step: true,
                judged_by: Some(actor),
                ..MoveRecord::new("started", RolloutState::Running, 0, reason)
            };
            let (after, m) = record_move(&mut tx, database, &r, m, actor).await?;
            moved = Some(m);
            after
        }
        (_, Some(cand)) => {
            if r.written_rules.as_ref() != Some(&cand.7) {
                let reason = format!(
                    "paused: the routing_rules of '{}' are {} but the rollout wrote {} (changed by hand: the runbook's SQL or `ext rollout`/`ext rollback`); `ext canary resume {ext}` writes the rollout's rules again",
                    r.candidate_version,
                    cand.7,
                    r.written_rules.clone().unwrap_or(Value::Null)
                );
                let m = MoveRecord {
                    judged_by: Some(actor),
                    ..MoveRecord::new("paused", RolloutState::Paused, r.current_step, reason)
                };
                let (after, m) = record_move(&mut tx, database, &r, m, actor).await?;
                moved = Some(m);
                after
            } else {
                let m = measure(&mut tx, database, &r).await?;
                let j = canary::evaluate(&r.plan, r.current_step, &m.measurement);
                let measured = measurements_json(&m, &j);
                let after = match &j.decision {
                    Decision::Wait(_) => {
                        sqlx::query(
                            "UPDATE extension_rollouts SET judged_by = $2, judged_at = now() WHERE id = $1",
                        )
                        .bind(r.id)
                        .bind(actor)
                        .execute(&mut *tx)
                        .await
                        .map_err(&err)?;
                        fetch(&mut tx, database, "r.id = $1::int8", r.id, false).await?
                    }
                    Decision::Advance => {
                        let next = r.current_step + 1;
                        let step = r.plan.steps[next].clone();
                        let rules = step.routing_rules();
                        write_rules(&mut tx, database, &cand, &rules, actor).await?;
                        let reason = format!("step {} of {}: {step}", next + 1, r.plan.steps.len());
                        let reference = (m.baseline_window.calls >= r.plan.min_calls_per_step)
                            .then_some(&m.baseline_window);
                        let mv = MoveRecord {
                            rules: Some(&rules),
                            measured: Some(&measured),
                            restart_step: true,
                            baseline_reference: reference,
                            judged_by: Some(actor),
                            ..MoveRecord::new("advanced", RolloutState::Running, next, reason)
                        };
                        let (after, mv) = record_move(&mut tx, database, &r, mv, actor).await?;
                        moved = Some(mv);
                        Some(after)
                    }
                    Decision::Promote => {
                        let reason = format!(
                            "every step passed: '{}' is now the base record of '{ext}'",
                            r.candidate_version
                        );
                        promote(&mut tx, database, &r, &cand, actor, limits).await?;
                        let all = json!({});
                        let mv = MoveRecord {
                            rules: Some(&all),
                            measured: Some(&measured),
                            judged_by: Some(actor),
                            ..MoveRecord::new(
                                "promoted",
                                RolloutState::Promoted,
                                r.current_step,
                                reason,
                            )
                        };
                        let (after, mv) = record_move(&mut tx, database, &r, mv, actor).await?;
                        moved = Some(mv);
                        Some(after)
                    }
                    Decision::RollBack(why) => {
                        let rules = no_traffic();
                        write_rules(&mut tx, database, &cand, &rules, actor).await?;
                        let reason = format!("rolled back at step {}: {why}", r.current_step + 1);
                        let mv = MoveRecord {
                            rules: Some(&rules),
                            measured: Some(&measured),
                            judged_by: Some(actor),
                            ..MoveRecord::new(
                                "rolled_back",
                                RolloutState::RolledBack,
                                r.current_step,
                                reason,
                            )
                        };
                        let (after, mv) = record_move(&mut tx, database, &r, mv, actor).await?;
                        moved = Some(mv);
                        Some(after)
                    }
                };
                judgement = Some(j);
                after.ok_or_else(|| RegistryError::NotFound(format!("rollout {id} vanished")))?
            }
        }
    };
    tx.commit().await.map_err(&err)?;
    Ok(JudgeOutcome {
        rollout: Some(after),
        judgement,
        moved,
    })
}

/// The candidate becomes the base record: the `extensions` row takes its subject,
/// timeout, retry, config, metadata and version name; the old base is kept as a
/// version row without traffic (unless a row of that version exists), so
/// `ext rollout ID --version OLD` can bring it back; the candidate's rules become
/// `{}`.
async fn promote(
    conn: &mut PgConnection,
    database: &str,
    r: &Rollout,
    cand: &VersionRow,
    by: &str,
    limits: &Limits,
) -> Result<(), RegistryError> {
    let ext = &r.extension_id;
    let Some(old) = base_row(conn, database, ext, "FOR UPDATE").await? else {
        return Err(RegistryError::NotFound(format!(
            "extension '{ext}' not found"
        )));
    };
    let record = ExtensionRecord {
        id: old.0.clone(),
        ext_type: old.1.clone(),
        subject: cand.2.clone(),
        timeout_ms: i64::from(cand.3),
        retry: i64::from(cand.4),
        enabled: old.5,
        version: cand.1.clone(),
        config: cand.5.clone(),
        metadata: cand.6.clone(),
    };
    let valid = record
        .validate(limits)
        .map_err(|error| RegistryError::Invalid {
            origin: Origin::Row {
                table: "extensions",
                key: format!("id='{ext}'"),
            },
            error,
        })?;
    // The old base, kept as a version without traffic.
    let kept = VersionRecord {
        id: old.0.clone(),
        version: old.6.clone(),
        subject: old.2.clone(),
        timeout_ms: i64::from(old.3),
        retry: i64::from(old.4),
        config: old.7.clone(),
        metadata: old.8.clone(),
        routing_rules: no_traffic(),
        enabled: true,
        created_at: None,
    };
    let inserted = sqlx::query(
        "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, config, metadata, routing_rules, enabled, created_at, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, true, now(), $9) ON CONFLICT (id, version) DO NOTHING",
    )
    .bind(&kept.id)
    .bind(&kept.version)
    .bind(&kept.subject)
    .bind(kept.timeout_ms as i32)
    .bind(kept.retry as i32)
    .bind(&kept.config)
    .bind(&kept.metadata)
    .bind(&kept.routing_rules)
    .bind(by)
    .execute(&mut *conn)
    .await
    .map_err(db_err(database))?;
    if inserted.rows_affected() > 0 {
        audit(
            conn,
            database,
            ext,
            "create",
            &Value::Null,
            &json!({"table": "extension_versions", "id": kept.id, "version": kept.version,
                    "subject": kept.subject, "timeout_ms": kept.timeout_ms, "retry": kept.retry,
                    "config": kept.config, "metadata": kept.metadata,
                    "routing_rules": kept.routing_rules, "enabled": true}),
            by,
        )
        .await?;
    }
    sqlx::query(
        "UPDATE extensions SET subject = $2, timeout_ms = $3, retry = $4, version = $5, config = $6, metadata = $7, updated_by = $8 WHERE id = $1",
    )
    .bind(ext)
    .bind(&valid.subject)
    .bind(valid.timeout_ms as i32)
    .bind(valid.retry as i32)
    .bind(&valid.version)
    .bind(Value::Object(valid.config.clone()))
    .bind(Value::Object(valid.metadata.clone()))
    .bind(by)
    .execute(&mut *conn)
    .await
    .map_err(db_err(database))?;
    let mut new = old.clone();
    new.2 = valid.subject.clone();
    new.3 = valid.timeout_ms as i32;
    new.4 = valid.retry as i32;
    new.6 = valid.version.clone();
    new.7 = Value::Object(valid.config.clone());
    new.8 = Value::Object(valid.metadata.clone());
    audit(
        conn,
        database,
        ext,
        "update",
        &base_json(&old),
        &base_json(&new),
        by,
    )
    .await?;
    write_rules(conn, database, cand, &json!({}), by).await
}

/// `ext canary status`: the latest rollout, its current step measured and judged
/// as the judge would, and its history.
pub async fn status(
    pool: &PgPool,
    database: &str,
    extension_id: &str,
) -> Result<Value, RegistryError> {
    let mut conn = pool.acquire().await.map_err(db_err(database))?;
    let Some(r) = fetch(
        &mut conn,
        database,
        "r.extension_id = $1",
        extension_id,
        false,
    )
    .await?
    else {
        if base_row(&mut conn, database, extension_id, "")
            .await?
            .is_none()
        {
            return Err(RegistryError::NotFound(format!(
                "extension '{extension_id}' not found"
            )));
        }
        return Err(RegistryError::NotFound(format!(
            "extension '{extension_id}' has no rollout (start one with `ext canary start {extension_id} --version V --steps 5,25,100`)"
        )));
    };
    let m = measure(&mut conn, database, &r).await?;
    let j = canary::evaluate(&r.plan, r.current_step, &m.measurement);
    let history = history_of(&mut conn, database, r.id).await?;
    let step = r.step();
    let next = match r.state {
        RolloutState::Running => serde_json::to_value(&j.decision).unwrap_or(Value::Null),
        RolloutState::Pending => {
            json!({"action": "wait", "reason": "waiting for the judge to write the first step (is [canary] enabled on a router?)"})
        }
        RolloutState::Paused => {
            json!({"action": "wait", "reason": format!("paused: `ext canary resume {extension_id}` to continue")})
        }
        _ => json!({"action": "none", "reason": "the rollout is over"}),
    };
    let mut candidate = stats_json(&m.measurement.candidate, Some(m.candidate_routers));
    candidate["breaker_opened_since_start"] = json!(m.measurement.candidate_breaker_opened);
    let mut baseline = stats_json(&m.baseline_window, Some(m.baseline_routers));
    let mut compared = json!({
        "source": m.measurement.baseline_source,
        "calls": m.measurement.baseline.calls,
        "error_rate": m.measurement.baseline.error_rate(),
        "p95_latency_ms": m.measurement.baseline.p95_ms(),
    });
    let mut criteria = serde_json::to_value(&j.criteria).unwrap_or(Value::Null);
    // An ended rollout shows what the judge measured when it made the final move,
    // not the window as it stands since.
    let mut measured = "now, over the current step's window";
    if r.state.is_terminal()
        && let Some(last) = history.last().and_then(|h| h.measurements.clone())
    {
        candidate = last["candidate"].clone();
        candidate["breaker_opened_since_start"] =
            last["candidate_breaker_opened_since_start"].clone();
        baseline = last["baseline"].clone();
        compared = last["compared_baseline"].clone();
        compared["source"] = last["baseline_source"].clone();
        criteria = last["criteria"].clone();
        measured = "at the final move";
    }
    candidate["version"] = json!(r.candidate_version);
    baseline["version"] = json!(r.baseline_version);
    Ok(json!({
        "extension_id": r.extension_id,
        "rollout_id": r.id,
        "state": r.state,
        "reason": r.reason,
        "candidate_version": r.candidate_version,
        "baseline_version": r.baseline_version,
        "step": {
            "index": r.current_step,
            "number": r.current_step + 1,
            "of": r.plan.steps.len(),
            "step": step.map(Step::to_json),
            "description": step.map(ToString::to_string),
            "share_percent": r.share_percent(),
            "started_at": r.step_started_at,
            "elapsed_ms": r.step_elapsed.as_millis() as u64,
        },
        "steps": r.plan.steps_json(),
        "min_calls_per_step": r.plan.min_calls_per_step,
        "step_duration_ms": r.plan.step_duration.as_millis() as u64,
        "criteria_config": r.plan.criteria,
        "measured": measured,
        "candidate": candidate,
        "baseline": baseline,
        "compared_baseline": compared,
        "criteria": criteria,
        "next": next,
        "written_rules": r.written_rules,
        "judged_by": r.judged_by,
        "judged_at": r.judged_at,
        "created_at": r.created_at,
        "created_by": r.created_by,
        "ended_at": r.ended_at,
        "history": history,
    }))
}
