//! The `extension_health` table: what routers report, and the runbook's manual reset.
//!
//! With several routers, each one *adds* the calls it saw since its last write to
//! `success_count` / `failure_count` (so those are cluster-wide totals), and overwrites
//! the rest — last times (the later wins), latency quantiles and breaker state — with
//! its own view: those columns are "the latest report of some router", whose id is in
//! `updated_by`. Every router writes inside a transaction marked
//! `beamline.writer = 'router'`, so a change made by anyone else that closes a breaker
//! is recognised (by a trigger) as an operator's reset, stamped in `manual_reset_at`
//! and announced on channel [`HEALTH_CHANNEL`].

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::error::RegistryError;

/// Channel announcing manual breaker resets (payload: the extension id).
pub const HEALTH_CHANNEL: &str = "beamline_health";

/// One router's report about one extension.
#[derive(Debug, Clone)]
pub struct HealthRow {
    pub extension_id: String,
    /// Successes since this router's previous write.
    pub success_delta: i64,
    /// Failures since this router's previous write.
    pub failure_delta: i64,
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    pub avg_latency_ms: Option<f64>,
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    pub circuit_breaker_state: String,
    pub circuit_breaker_opened_at: Option<DateTime<Utc>>,
    pub failure_threshold: i32,
    pub error_rate_threshold: f64,
    pub open_timeout_ms: i32,
    pub half_open_max_requests: i32,
}

/// Writes a batch of reports in one transaction.
pub async fn upsert(
    pool: &PgPool,
    database: &str,
    router_id: &str,
    rows: &[HealthRow],
) -> Result<(), RegistryError> {
    if rows.is_empty() {
        return Ok(());
    }
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    sqlx::query("SELECT set_config('beamline.writer', 'router', true)")
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    let col = |f: fn(&HealthRow) -> Option<f64>| rows.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        r#"
INSERT INTO extension_health AS h (
    extension_id, success_count, failure_count, last_success, last_failure,
    avg_latency_ms, p50_latency_ms, p95_latency_ms, p99_latency_ms,
    circuit_breaker_state, circuit_breaker_opened_at, failure_threshold,
    error_rate_threshold, open_timeout_ms, half_open_max_requests, updated_at, updated_by)
SELECT u.*, now(), $16 FROM UNNEST(
    $1::text[], $2::int8[], $3::int8[], $4::timestamptz[], $5::timestamptz[],
    $6::float8[], $7::float8[], $8::float8[], $9::float8[],
    $10::text[], $11::timestamptz[], $12::int4[], $13::float8[], $14::int4[], $15::int4[]) AS u
ON CONFLICT (extension_id) DO UPDATE SET
    success_count = h.success_count + EXCLUDED.success_count,
    failure_count = h.failure_count + EXCLUDED.failure_count,
    last_success = GREATEST(h.last_success, EXCLUDED.last_success),
    last_failure = GREATEST(h.last_failure, EXCLUDED.last_failure),
    avg_latency_ms = coalesce(EXCLUDED.avg_latency_ms, h.avg_latency_ms),
    p50_latency_ms = coalesce(EXCLUDED.p50_latency_ms, h.p50_latency_ms),
    p95_latency_ms = coalesce(EXCLUDED.p95_latency_ms, h.p95_latency_ms),
    p99_latency_ms = coalesce(EXCLUDED.p99_latency_ms, h.p99_latency_ms),
    circuit_breaker_state = EXCLUDED.circuit_breaker_state,
    circuit_breaker_opened_at = EXCLUDED.circuit_breaker_opened_at,
    failure_threshold = EXCLUDED.failure_threshold,
    error_rate_threshold = EXCLUDED.error_rate_threshold,
    open_timeout_ms = EXCLUDED.open_timeout_ms,
    half_open_max_requests = EXCLUDED.half_open_max_requests,
    updated_at = now(),
    updated_by = EXCLUDED.updated_by
"#,
    )
    .bind(
        rows.iter()
            .map(|r| r.extension_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.success_delta).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.failure_delta).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_success).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_failure).collect::<Vec<_>>())
    .bind(col(|r| r.avg_latency_ms))
    .bind(col(|r| r.p50_latency_ms))
    .bind(col(|r| r.p95_latency_ms))
    .bind(col(|r| r.p99_latency_ms))
    .bind(
        rows.iter()
            .map(|r| r.circuit_breaker_state.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.circuit_breaker_opened_at)
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.failure_threshold).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.error_rate_threshold)
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.open_timeout_ms).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.half_open_max_requests)
            .collect::<Vec<_>>(),
    )
    .bind(router_id)
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(())
}

/// Every recorded manual reset: (extension id, when).
pub async fn manual_resets(
    pool: &PgPool,
    database: &str,
) -> Result<Vec<(String, DateTime<Utc>)>, RegistryError> {
    sqlx::query_as(
        "SELECT extension_id, manual_reset_at FROM extension_health WHERE manual_reset_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| RegistryError::from_sqlx(database, e))
}

/// Records a reset made through the API (`breaker reset`), exactly as the runbook's
/// SQL would, so every router sees it.
pub async fn request_reset(
    pool: &PgPool,
    database: &str,
    extension_id: &str,
    by: &str,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO extension_health (extension_id, circuit_breaker_state, circuit_breaker_opened_at, updated_by) \
         VALUES ($1, 'closed', NULL, $2) \
         ON CONFLICT (extension_id) DO UPDATE SET circuit_breaker_state = 'closed', \
         circuit_breaker_opened_at = NULL, updated_by = $2, updated_at = now()",
    )
    .bind(extension_id)
    .bind(by)
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(|e| RegistryError::from_sqlx(database, e))
}
