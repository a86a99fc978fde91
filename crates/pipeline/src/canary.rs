//! The canary judge (DESIGN.md §12): runs in every router, acts in one.
//!
//! Every `[canary] evaluation_interval_ms` each router
//! 1. reads the rollouts (for the `router_extension_rollout_*` gauges, and to know
//!    which extensions have an active one);
//! 2. reports to `extension_version_health` the calls it made to every version of
//!    those extensions since its previous report (calls, errors, latency histogram,
//!    breaker openings), so the judge sums the whole cluster's traffic;
//! 3. tries to take the judge's PostgreSQL advisory lock
//!    ([`beamline_registry::canary::JUDGE_LOCK_KEY`]) on a connection of its own that
//!    it keeps; the router holding it judges every pending and running rollout
//!    ([`beamline_registry::canary::judge`]) and writes the moves *on that same
//!    session*. A router that loses the session loses the lock with it and can write
//!    nothing more; another router takes the lock at its next tick and continues
//!    from the row, where all the state is.
//!
//! Every wait on PostgreSQL is bounded ([`DB_BOUND`]); a bound that passes drops the
//! session (and so the lock), and the next tick starts over.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use beamline_model::canary::RolloutState;
use beamline_registry::canary::{self as store, JUDGE_LOCK_KEY, Rollout, VersionHealthRow};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::Pipeline;

/// Longest any one database step of a tick may take.
pub const DB_BOUND: Duration = Duration::from_secs(5);
/// Reports kept for a retry while the database is away, at most.
const MAX_PENDING_REPORTS: usize = 10_000;

/// `[canary]`: the judge of canary rollouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanaryConfig {
    /// Run the judge in this router: report per-version health of extensions under a
    /// rollout, and evaluate rollouts when this router holds the judge's lock. Turn
    /// it off only on routers whose traffic must not count (the others still judge).
    pub enabled: bool,
    /// How often the router reports and the lock holder evaluates, milliseconds
    /// (100..=3600000). A failing candidate is rolled back within about one interval
    /// (two, counting the report lag of other routers) of crossing its minimum calls.
    pub evaluation_interval_ms: u64,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            enabled: true,
            evaluation_interval_ms: 10_000,
        }
    }
}

impl CanaryConfig {
    /// Checks the values; the error is (key, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(100..=3_600_000).contains(&self.evaluation_interval_ms) {
            return Err((
                "evaluation_interval_ms".into(),
                format!(
                    "{} is out of range 100..=3600000",
                    self.evaluation_interval_ms
                ),
            ));
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.evaluation_interval_ms)
    }
}

/// What the judge last saw, for metrics and status: the rollouts and whether this
/// router holds the lock.
#[derive(Debug, Default)]
pub struct CanaryBoard {
    rollouts: Mutex<Vec<Rollout>>,
    judge: AtomicBool,
    seen: AtomicBool,
}

impl CanaryBoard {
    /// Each extension's latest rollout while active and for an hour after it ended
    /// ([`store::for_metrics`]), as of the last tick.
    pub fn rollouts(&self) -> Vec<Rollout> {
        self.rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether this router holds the judge's lock.
    pub fn is_judge(&self) -> bool {
        self.judge.load(Ordering::Relaxed)
    }

    /// Whether the judge has read the rollouts at least once.
    pub fn has_read(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    fn set(&self, rollouts: Vec<Rollout>) {
        *self.rollouts.lock().unwrap_or_else(|p| p.into_inner()) = rollouts;
        self.seen.store(true, Ordering::Relaxed);
    }
}

/// The judge task of one router.
pub struct Judge {
    pipeline: Pipeline,
    config: CanaryConfig,
    router_id: String,
    /// The dedicated session; it holds the lock when `holding`.
    session: Option<PgConnection>,
    holding: bool,
    /// Reports not written yet (the database was away).
    pending: HashMap<(String, String), VersionHealthRow>,
    ticks: u64,
    /// The last problem logged, so a lasting one is logged once.
    last_problem: Option<String>,
    /// Whether the current tick met a problem (else `last_problem` is forgotten).
    troubled: bool,
}

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(DB_BOUND, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {} ms",
            DB_BOUND.as_millis()
        )),
    }
}

impl Judge {
    pub fn new(pipeline: Pipeline, config: CanaryConfig) -> Judge {
        Judge {
            pipeline,
            config,
            router_id: crate::persist::router_id(),
            session: None,
            holding: false,
            pending: HashMap::new(),
            ticks: 0,
            last_problem: None,
            troubled: false,
        }
    }

    /// The name the judge writes into history and the audit log.
    pub fn actor(&self) -> String {
        format!("canary:{}", self.router_id)
    }

    fn database(&self) -> Option<(sqlx::PgPool, String)> {
        let registry = self.pipeline.registry();
        let config = registry.config();
        if !config.uses_database() {
            return None;
        }
        registry.pool().map(|p| (p, config.database_display()))
    }

    fn problem(&mut self, message: String) {
        self.troubled = true;
        if self.last_problem.as_ref() != Some(&message) {
            tracing::warn!(error = %message, "canary judge: {message}");
            self.last_problem = Some(message);
        }
    }

    /// Runs until `shutdown`, then reports once more and lets go of the lock.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let interval = self.config.interval();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => self.tick().await,
            }
        }
        if let Some((pool, db)) = self.database() {
            let active = self.active_extensions();
            if let Err(e) = self.report(&pool, &db, &active).await {
                tracing::debug!(error = %e, "canary judge: last report at shutdown failed");
            }
        }
        self.drop_session();
    }

    fn active_extensions(&self) -> HashSet<String> {
        self.pipeline
            .canary()
            .rollouts()
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.extension_id)
            .collect()
    }

    fn drop_session(&mut self) {
        if self.holding {
            tracing::info!(router = %self.router_id, "canary judge: this router no longer holds the judge's lock");
        }
        self.session = None;
        self.holding = false;
        self.pipeline.canary().judge.store(false, Ordering::Relaxed);
    }

    /// One evaluation interval's work.
    pub async fn tick(&mut self) {
        self.ticks += 1;
        self.troubled = false;
        self.work().await;
        if !self.troubled {
            self.last_problem = None;
        }
    }

    async fn work(&mut self) {
        let Some((pool, db)) = self.database() else {
            return;
        };
        match bounded("reading rollouts", store::for_metrics(&pool, &db)).await {
            Ok((rollouts, bad)) => {
                for e in bad {
                    self.problem(format!("a rollout row is invalid and ignored: {e}"));
                }
                self.pipeline.canary().set(rollouts);
            }
            Err(e) => {
                self.problem(e);
                return;
            }
        }
        let active = self.active_extensions();
        self.pipeline.runtime().watch_versions(&active);
        if let Err(e) = self.report(&pool, &db, &active).await {
            self.problem(e);
        }
        if active.is_empty() && !self.holding {
            // Nothing to judge: no session kept open for nothing.
            self.session = None;
            return;
        }
        if let Err(e) = self.take_lock().await {
            self.problem(e);
            self.drop_session();
            return;
        }
        if !self.holding {
            return;
        }
        if let Err(e) = self.judge_all(&db).await {
            self.problem(e);
            self.drop_session();
            return;
        }
        let prune_every = (300_000 / self.config.evaluation_interval_ms).max(1);
        if self.ticks.is_multiple_of(prune_every)
            && let Some(session) = self.session.as_mut()
        {
            match bounded(
                "pruning extension_version_health",
                store::prune_version_health(session, &db),
            )
            .await
            {
                Ok(n) if n > 0 => {
                    tracing::debug!(rows = n, "canary judge: pruned old version health")
                }
                Ok(_) => {}
                Err(e) => {
                    self.problem(e);
                    self.drop_session();
                }
            }
        }
    }

    /// Writes this router's calls of the versions of `active` extensions (others'
    /// calls are dropped: no rollout needs them).
    async fn report(
        &mut self,
        pool: &sqlx::PgPool,
        db: &str,
        active: &HashSet<String>,
    ) -> Result<(), String> {
        for (ext, version, d) in self.pipeline.runtime().take_version_deltas() {
            if !active.contains(&ext) {
                continue;
            }
            let row = self
                .pending
                .entry((ext.clone(), version.clone()))
                .or_insert_with(|| VersionHealthRow {
                    extension_id: ext,
                    version,
                    ..Default::default()
                });
            row.calls += d.calls;
            row.errors += d.errors;
            row.breaker_opened += d.breaker_opened;
            for (upper, n) in d.latency_us {
                row.latency.add(upper, n);
            }
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows: Vec<VersionHealthRow> = self.pending.values().cloned().collect();
        match bounded(
            "reporting extension_version_health",
            store::report_version_health(pool, db, &self.router_id, &rows),
        )
        .await
        {
            Ok(()) => {
                self.pending.clear();
                Ok(())
            }
            Err(e) => {
                if self.pending.len() > MAX_PENDING_REPORTS {
                    self.pending.clear();
                }
                Err(e)
            }
        }
    }

    /// Opens the session if needed and, unless it holds the lock already, tries to
    /// take it (never waits for it).
    async fn take_lock(&mut self) -> Result<(), String> {
        if self.holding {
            return Ok(());
        }
        if self.session.is_none() {
            let options = self
                .pipeline
                .registry()
                .config()
                .connect_options()
                .map_err(|e| e.to_string())?
                .application_name(&format!("beamline-router canary judge {}", self.router_id))
                // The lock lives as long as this session's backend: keepalives let the
                // server see a judge that vanished (cable cut, VM paused) within about
                // 25 s and end its backend, so another router can take the lock,
                // instead of waiting for the OS default of two hours.
                .options([
                    ("tcp_keepalives_idle", "10"),
                    ("tcp_keepalives_interval", "5"),
                    ("tcp_keepalives_count", "3"),
                ]);
            self.session = Some(
                bounded(
                    "connecting the judge's session",
                    PgConnection::connect_with(&options),
                )
                .await?,
            );
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let got: bool = bounded(
            "pg_try_advisory_lock",
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(JUDGE_LOCK_KEY)
                .fetch_one(&mut *session),
        )
        .await?;
        if got {
            self.holding = true;
            self.pipeline.canary().judge.store(true, Ordering::Relaxed);
            tracing::info!(router = %self.router_id, "canary judge: this router holds the judge's lock and evaluates rollouts");
        }
        Ok(())
    }

    async fn judge_all(&mut self, db: &str) -> Result<(), String> {
        let actor = self.actor();
        let limits = self.pipeline.registry().limits();
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let ids = bounded("listing rollouts to judge", store::judgeable(session, db)).await?;
        let mut unjudged = Vec::new();
        for id in ids {
            let outcome = match tokio::time::timeout(
                DB_BOUND,
                store::judge(session, db, id, &actor, &limits),
            )
            .await
            {
                Ok(Ok(o)) => o,
                Ok(Err(e)) if e.kind() == beamline_registry::ErrorKind::Unreachable => {
                    return Err(format!("judging rollout {id}: {e}"));
                }
                Ok(Err(e)) => {
                    // This rollout cannot be judged (a row our validation refuses, a
                    // candidate that does not validate as a base record, a statement
                    // the database refused; its transaction is rolled back): say so,
                    // judge the others, keep the lock.
                    unjudged.push(format!("cannot judge rollout {id}: {e}"));
                    continue;
                }
                Err(_) => {
                    return Err(format!(
                        "judging rollout {id}: no answer within {} ms",
                        DB_BOUND.as_millis()
                    ));
                }
            };
            if let (Some(m), Some(r)) = (&outcome.moved, &outcome.rollout) {
                log_move(r, m);
            }
        }
        for p in unjudged {
            self.problem(p);
        }
        Ok(())
    }
}

fn log_move(r: &Rollout, m: &store::Move) {
    let share = r.share_percent();
    let reason = m.reason.as_deref().unwrap_or("");
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                extension_id = %r.extension_id,
                rollout_id = r.id,
                candidate = %r.candidate_version,
                baseline = %r.baseline_version,
                action = m.action,
                from = m.from.as_str(),
                to = m.to.as_str(),
                step = m.step + 1,
                steps = r.plan.steps.len(),
                share_percent = share,
                reason,
                "canary rollout {}: {} {} → {}",
                m.action,
                r.extension_id,
                r.baseline_version,
                r.candidate_version
            )
        };
    }
    match m.to {
        RolloutState::RolledBack | RolloutState::Aborted | RolloutState::Paused => line!(warn),
        _ => line!(info),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c = CanaryConfig::default();
        assert!(c.enabled && c.evaluation_interval_ms == 10_000);
        assert!(c.validate().is_ok());
        let bad = CanaryConfig {
            evaluation_interval_ms: 50,
            ..c.clone()
        };
        assert_eq!(bad.validate().unwrap_err().0, "evaluation_interval_ms");
        let parsed: CanaryConfig =
            serde_json::from_str(r#"{"evaluation_interval_ms": 300}"#).unwrap();
        assert_eq!(
            (parsed.enabled, parsed.interval()),
            (true, Duration::from_millis(300))
        );
        assert!(serde_json::from_str::<CanaryConfig>(r#"{"interval": 3}"#).is_err());
    }
}
