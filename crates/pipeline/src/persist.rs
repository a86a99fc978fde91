//! Health persistence: every `interval` (and at shutdown) the router adds its calls
//! since the last write to `extension_health` and overwrites its view of latency and
//! breaker state; manual resets written by operators (the runbook's SQL, or
//! `breaker reset`) close the live breakers — at once through NOTIFY on
//! `beamline_health`, or at the next interval if the notification was missed.
//! See `beamline_registry::health_store` for what the table means with several routers.

use std::collections::HashMap;
use std::time::Duration;

use beamline_registry::health_store::{self, HEALTH_CHANNEL, HealthRow};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::Pipeline;

/// This router's name in `extension_health.updated_by`.
pub fn router_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "router".to_string());
    format!("{host}:{}", std::process::id())
}

/// Writes health and applies manual resets.
pub struct HealthPersister {
    pipeline: Pipeline,
    router_id: String,
    written: HashMap<String, (u64, u64)>,
    resets_seen: HashMap<String, DateTime<Utc>>,
}

impl HealthPersister {
    pub fn new(pipeline: Pipeline) -> HealthPersister {
        HealthPersister {
            pipeline,
            router_id: router_id(),
            written: HashMap::new(),
            resets_seen: HashMap::new(),
        }
    }

    fn database(&self) -> Option<(sqlx::PgPool, String)> {
        let registry = self.pipeline.registry();
        let config = registry.config();
        if !config.db_enabled {
            return None;
        }
        registry.pool().map(|p| (p, config.database_display()))
    }

    /// One write of every extension with live state.
    pub async fn write(&mut self) -> Result<usize, beamline_registry::RegistryError> {
        let Some((pool, db)) = self.database() else {
            return Ok(0);
        };
        let rt = self.pipeline.runtime();
        let now = rt.now();
        let cfg = rt.breaker_config().clone();
        let mut rows = Vec::new();
        let mut totals = Vec::new();
        for (id, ext) in rt.extension_entries() {
            let h = ext.health.snapshot(now);
            let b = ext.breaker.snapshot(now);
            let (ps, pf) = self.written.get(&id).copied().unwrap_or((0, 0));
            let window = h.window_calls > 0;
            rows.push(HealthRow {
                extension_id: id.clone(),
                success_delta: h.success_count.saturating_sub(ps) as i64,
                failure_delta: h.failure_count.saturating_sub(pf) as i64,
                last_success: h.last_success,
                last_failure: h.last_failure,
                avg_latency_ms: window.then_some(h.avg_latency_ms),
                p50_latency_ms: window.then_some(h.p50_latency_ms),
                p95_latency_ms: window.then_some(h.p95_latency_ms),
                p99_latency_ms: window.then_some(h.p99_latency_ms),
                circuit_breaker_state: b.state.as_str().to_string(),
                circuit_breaker_opened_at: b.opened_at,
                failure_threshold: cfg.failure_threshold as i32,
                error_rate_threshold: cfg.error_rate_threshold,
                open_timeout_ms: (cfg.timeout_seconds * 1000).min(i32::MAX as u64) as i32,
                half_open_max_requests: cfg.half_open_max_requests as i32,
            });
            totals.push((id, (h.success_count, h.failure_count)));
        }
        let n = rows.len();
        health_store::upsert(&pool, &db, &self.router_id, &rows).await?;
        self.written.extend(totals);
        Ok(n)
    }

    /// Applies manual resets recorded since the last look.
    pub async fn apply_resets(&mut self) -> Result<usize, beamline_registry::RegistryError> {
        let Some((pool, db)) = self.database() else {
            return Ok(0);
        };
        let mut applied = 0;
        for (id, at) in health_store::manual_resets(&pool, &db).await? {
            if self.resets_seen.get(&id).is_some_and(|seen| *seen >= at) {
                continue;
            }
            self.resets_seen.insert(id.clone(), at);
            let changed = self.pipeline.runtime().reset_breakers(&id);
            for t in &changed {
                tracing::warn!(extension_id = %id, from = t.from.as_str(), to = t.to.as_str(), "circuit breaker reset by operator");
            }
            applied += 1;
        }
        Ok(applied)
    }

    /// Marks resets that already happened as seen, so a restarted router does not
    /// treat old resets as new (its breakers start closed anyway).
    pub async fn prime(&mut self) {
        if let Some((pool, db)) = self.database()
            && let Ok(resets) = health_store::manual_resets(&pool, &db).await
        {
            self.resets_seen.extend(resets);
        }
    }

    /// Runs until `shutdown`, then writes one last time.
    pub async fn run(mut self, interval: Duration, shutdown: CancellationToken) {
        self.prime().await;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listener: Option<PgListener> = None;
        let mut next_listen = tokio::time::Instant::now();
        loop {
            if listener.is_none()
                && tokio::time::Instant::now() >= next_listen
                && let Some((pool, _)) = self.database()
            {
                match listen(&pool).await {
                    Ok(l) => {
                        listener = Some(l);
                        let _ = self.apply_resets().await;
                    }
                    Err(_) => {
                        next_listen =
                            tokio::time::Instant::now() + interval.min(Duration::from_secs(5))
                    }
                }
            }
            let waiting = listener.is_none();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    if let Err(e) = self.write().await {
                        self.report_failure(&e, "extension_health write failed");
                    }
                    let _ = self.apply_resets().await;
                }
                _ = tokio::time::sleep_until(next_listen), if waiting => {}
                n = recv(&mut listener) => match n {
                    Ok(Some(_)) => {
                        if let Some(l) = listener.as_mut() {
                            while l.next_buffered().is_some() {}
                        }
                        let _ = self.apply_resets().await;
                    }
                    _ => listener = None,
                },
            }
        }
        match self.write().await {
            Ok(n) => tracing::info!(extensions = n, "extension_health written at shutdown"),
            Err(e) => self.report_failure(&e, "extension_health write at shutdown failed"),
        }
    }

    /// A failed write is a warning when the registry reads the database; otherwise
    /// (fixtures, such as the embedded default with no database anywhere) health
    /// persistence is best effort, and the failure is only logged at debug level.
    fn report_failure(&self, e: &beamline_registry::RegistryError, what: &str) {
        if self.pipeline.registry().config().uses_database() {
            tracing::warn!(error = %e, "{what}");
        } else {
            tracing::debug!(error = %e, "{what}");
        }
    }
}

async fn listen(pool: &sqlx::PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(HEALTH_CHANNEL).await?;
    Ok(l)
}

async fn recv(
    l: &mut Option<PgListener>,
) -> Result<Option<sqlx::postgres::PgNotification>, sqlx::Error> {
    match l {
        Some(l) => l.try_recv().await,
        None => std::future::pending().await,
    }
}
