//! The running registry: the current snapshot behind one atomic pointer, reloads, and
//! the sync task (periodic resync plus LISTEN/NOTIFY).
//!
//! A NOTIFY from the registry's triggers is answered by [`Registry::sync_changes`]:
//! only the records changed since the current snapshot's database position are read
//! again (migration 0003's change log) and every other entry is shared with the
//! current snapshot; anything else is a full reload.
//!
//! Readers call [`Registry::snapshot`] (one atomic load, never a lock, never a wait for
//! a reload). Writers — reloads from any trigger — are serialised by one async mutex;
//! each builds a whole new snapshot off to the side and swaps it in. A record that
//! fails validation is quarantined on its own (held at its last good version) and
//! does not fail the reload; a reload fails only when the source cannot be read, and
//! then changes nothing but the error counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use beamline_model::Limits;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{RegistryConfig, SourceMode};
use crate::database;
use crate::dataset::Dataset;
use crate::error::{ErrorKind, RegistryError};
use crate::fixtures;
use crate::quarantine::Quarantined;
use crate::snapshot::{ActiveSource, Counts, Snapshot};

/// Why a reload ran; shows in the `Extension Registry synced` log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Startup,
    Manual,
    Periodic,
    Notify,
    Reconnect,
    SourceChange,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Manual => "manual",
            Trigger::Periodic => "periodic",
            Trigger::Notify => "notify",
            Trigger::Reconnect => "reconnect",
            Trigger::SourceChange => "source_change",
        }
    }
}

/// What the database looked like at the last attempt to use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DbState {
    /// The configuration does not use a database.
    Disabled,
    /// Not tried yet.
    Unknown,
    Connected,
    Unreachable,
    SchemaMissing,
    Error,
}

/// The outcome of a successful reload.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub generation: u64,
    pub source: ActiveSource,
    pub counts: Counts,
    pub duration_ms: f64,
    pub warnings: Vec<String>,
    /// Set when `auto` fell back to fixtures; says why.
    pub fallback_reason: Option<String>,
    /// Set when only what changed since the last read was read again: how many
    /// extension and tenant keys. `None` for a full reload.
    pub changed_keys: Option<usize>,
    /// Records held out because they failed validation (see `registry status`).
    pub quarantined: Vec<Quarantined>,
}

/// Everything `registry status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryStatus {
    pub running: bool,
    /// Extensions in the current snapshot.
    pub size: usize,
    /// The configured source mode.
    pub source: SourceMode,
    /// Where the current snapshot came from.
    pub active_source: ActiveSource,
    pub loaded: bool,
    pub generation: u64,
    pub counts: Counts,
    pub db_state: DbState,
    pub database: Option<String>,
    pub last_sync_at: Option<DateTime<Utc>>,
    pub last_sync_trigger: Option<Trigger>,
    pub last_sync_duration_ms: Option<f64>,
    /// Why the last sync failed, while the failure stands (a later successful sync
    /// clears it into `resolved_error`).
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// The last failure that a later successful sync resolved.
    pub resolved_error: Option<ResolvedError>,
    /// Records held out of the snapshot because they failed validation (table, key,
    /// field path, reason, since); the snapshot serves their last good version or
    /// nothing.
    pub quarantined: Vec<Quarantined>,
    pub sync_success_total: u64,
    pub sync_error_total: u64,
    pub listening: bool,
    pub warnings: Vec<String>,
    pub sync_interval_seconds: u64,
    /// The `[extension_registry]` configuration, secrets redacted.
    pub config: RegistryConfig,
}

/// A sync failure and the later sync that ended it.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedError {
    pub error: String,
    pub at: Option<DateTime<Utc>>,
    pub resolved_at: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct SyncState {
    last_sync_at: Option<DateTime<Utc>>,
    last_sync_trigger: Option<Trigger>,
    last_sync_duration_ms: Option<f64>,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    resolved_error: Option<ResolvedError>,
}

struct Settings {
    config: RegistryConfig,
    limits: Limits,
    pool: Option<PgPool>,
}

struct Inner {
    snapshot: ArcSwap<Snapshot>,
    settings: RwLock<Settings>,
    reload_lock: tokio::sync::Mutex<()>,
    state: Mutex<SyncState>,
    db_state: Mutex<DbState>,
    sync_success: AtomicU64,
    sync_error: AtomicU64,
    generation: AtomicU64,
    listening: std::sync::atomic::AtomicBool,
    /// Wakes the sync task when the source changes.
    wake: Notify,
}

/// A handle to the running registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Registry {
    /// Builds a registry and loads it once. A failed first load is logged and kept in
    /// the status, not returned: the router starts, reports not-ready, and the sync
    /// task keeps trying. Only a configuration that cannot work is an error.
    pub async fn start(config: RegistryConfig, limits: Limits) -> Result<Registry, RegistryError> {
        let registry = Registry::new(config, limits)?;
        if let Err(e) = registry.reload_with(Trigger::Startup).await {
            tracing::error!(error = %e, "Extension Registry initial load failed; serving nothing until a sync succeeds");
        }
        Ok(registry)
    }

    /// Builds a registry without loading it.
    pub fn new(config: RegistryConfig, limits: Limits) -> Result<Registry, RegistryError> {
        config
            .validate()
            .map_err(|e| RegistryError::Unsupported(format!("extension_registry.{e}")))?;
        limits
            .validate()
            .map_err(|e| RegistryError::Unsupported(format!("limits.{e}")))?;
        let pool = if config.db_enabled {
            Some(database::lazy_pool(&config)?)
        } else {
            None
        };
        let db_state = if config.uses_database() {
            DbState::Unknown
        } else {
            DbState::Disabled
        };
        Ok(Registry {
            inner: Arc::new(Inner {
                snapshot: ArcSwap::from_pointee(Snapshot::empty()),
                settings: RwLock::new(Settings {
                    config,
                    limits,
                    pool,
                }),
                reload_lock: tokio::sync::Mutex::new(()),
                state: Mutex::new(SyncState::default()),
                db_state: Mutex::new(db_state),
                sync_success: AtomicU64::new(0),
                sync_error: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                listening: std::sync::atomic::AtomicBool::new(false),
                wake: Notify::new(),
            }),
        })
    }

    /// The current snapshot: one atomic load, never blocked by a reload.
    #[inline]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// A cheaper borrow of the current snapshot for short reads on the hot path.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.snapshot.load()
    }

    /// Whether a snapshot has been loaded from any source.
    pub fn is_loaded(&self) -> bool {
        self.inner.snapshot.load().source != ActiveSource::Empty
    }

    /// The pool, when the configuration has a database.
    pub fn pool(&self) -> Option<PgPool> {
        self.read_settings().pool.clone()
    }

    pub fn limits(&self) -> Limits {
        self.read_settings().limits.clone()
    }

    pub fn config(&self) -> RegistryConfig {
        self.read_settings().config.clone()
    }

    /// Configuration, limits and pool as they are now.
    pub(crate) fn settings_now(&self) -> (RegistryConfig, Limits, Option<PgPool>) {
        let s = self.read_settings();
        (s.config.clone(), s.limits.clone(), s.pool.clone())
    }

    fn read_settings(&self) -> std::sync::RwLockReadGuard<'_, Settings> {
        // A panic while holding the lock cannot leave Settings half-written (every
        // write replaces whole fields), so a poisoned lock is still safe to read.
        self.inner
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// `router_extension_registry:reload()`.
    pub async fn reload(&self) -> Result<ReloadReport, RegistryError> {
        self.reload_with(Trigger::Manual).await
    }

    /// Reloads from the current source, swapping the snapshot only on success.
    pub async fn reload_with(&self, trigger: Trigger) -> Result<ReloadReport, RegistryError> {
        in_sync_span(trigger, async {
            let _serial = self.inner.reload_lock.lock().await;
            self.reload_locked(trigger).await
        })
        .await
    }

    /// Reads only what changed in the database since the current snapshot's
    /// position (migration 0003's `registry_changes`) and swaps in a snapshot that
    /// shares every other entry with the current one — what a NOTIFY costs,
    /// independent of the registry's size, and still exactly the database's state at
    /// one instant. Falls back to a full reload when there is nothing to patch (the
    /// current snapshot is not from the database, or older than the change log keeps),
    /// when a change must be read whole, or when the change log cannot be read.
    pub async fn sync_changes(&self, trigger: Trigger) -> Result<ReloadReport, RegistryError> {
        in_sync_span(trigger, self.sync_changes_serial(trigger)).await
    }

    async fn sync_changes_serial(&self, trigger: Trigger) -> Result<ReloadReport, RegistryError> {
        let _serial = self.inner.reload_lock.lock().await;
        let (config, limits, pool) = {
            let s = self.read_settings();
            (s.config.clone(), s.limits.clone(), s.pool.clone())
        };
        let current = self.inner.snapshot.load_full();
        let fresh = Utc::now().signed_duration_since(current.loaded_at) < CHANGE_LOG_TRUST;
        let (Some(pool), Some(since), true, true) = (
            pool,
            current.position.as_deref(),
            config.uses_database() && current.source == ActiveSource::Database,
            fresh,
        ) else {
            return self.reload_locked(trigger).await;
        };
        let started = Instant::now();
        let database = config.database_display();
        let result = database::load_changes_since(&pool, &database, since).await;
        self.note_db_result(&result);
        let (changes, data) = match result {
            Ok(database::Changes::Keys(changes, data)) => (changes, data),
            Ok(database::Changes::Everything) => return self.reload_locked(trigger).await,
            Err(e) if e.kind() != ErrorKind::Unreachable => {
                // A schema without the change log (migrations not applied yet), or an
                // error worth reporting through the full reload's own path.
                tracing::debug!(error = %e, "Extension Registry cannot read registry_changes; reloading fully");
                return self.reload_locked(trigger).await;
            }
            Err(e) => return self.finish(trigger, &config, started, Err(e), Some(0)),
        };
        if changes.is_empty() {
            // Nothing the registry serves changed (a notification raced a sync that
            // already read it): the current snapshot is still exact, and the sync
            // succeeded — it counts as one, so the sync-failure ratio the alerts
            // watch keeps its denominator.
            let mut report = self.report_of(&current, Some(0));
            report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            self.record_success(trigger, Utc::now(), report.duration_ms);
            record_sync_span(Some(0), Ok(&report));
            tracing::debug!(
                trigger = trigger.as_str(),
                generation = current.generation,
                "Extension Registry: nothing changed since the last read"
            );
            return Ok(report);
        }
        let generation = self.inner.generation.load(Ordering::Relaxed) + 1;
        let built = current
            .apply_changes(data, &changes, &limits, generation)
            .map(|s| (s, None));
        self.finish(trigger, &config, started, built, Some(changes.len()))
    }

    fn record_success(&self, trigger: Trigger, at: DateTime<Utc>, duration_ms: f64) {
        self.inner.sync_success.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock_state();
        st.last_sync_at = Some(at);
        st.last_sync_trigger = Some(trigger);
        st.last_sync_duration_ms = Some(duration_ms);
        if let Some(error) = st.last_error.take() {
            tracing::info!(resolved = %error, "Extension Registry sync succeeded again; the last error is resolved");
            st.resolved_error = Some(ResolvedError {
                error,
                at: st.last_error_at.take(),
                resolved_at: at,
            });
        }
    }

    fn report_of(&self, snapshot: &Snapshot, changed_keys: Option<usize>) -> ReloadReport {
        ReloadReport {
            generation: snapshot.generation,
            source: snapshot.source,
            counts: snapshot.counts,
            duration_ms: 0.0,
            warnings: snapshot.warnings.clone(),
            fallback_reason: None,
            changed_keys,
            quarantined: snapshot.quarantine.clone(),
        }
    }

    async fn reload_locked(&self, trigger: Trigger) -> Result<ReloadReport, RegistryError> {
        let started = Instant::now();
        let (config, limits, pool) = {
            let s = self.read_settings();
            (s.config.clone(), s.limits.clone(), s.pool.clone())
        };
        let result = self.read_source(&config, pool.as_ref()).await;
        let current = self.inner.snapshot.load_full();
        let built = result.map(|(data, source, fallback_reason)| {
            let generation = self.inner.generation.load(Ordering::Relaxed) + 1;
            (
                Snapshot::rebuild(data, &limits, source, generation, &current),
                fallback_reason,
            )
        });
        self.finish(trigger, &config, started, built, None)
    }

    /// Swaps in a built snapshot and records the sync, or records why there is none.
    fn finish(
        &self,
        trigger: Trigger,
        config: &RegistryConfig,
        started: Instant,
        built: Result<(Snapshot, Option<String>), RegistryError>,
        changed_keys: Option<usize>,
    ) -> Result<ReloadReport, RegistryError> {
        let elapsed = started.elapsed();
        let now = Utc::now();
        match built {
            Ok((mut snapshot, fallback_reason)) => {
                snapshot.load_duration = elapsed;
                snapshot.loaded_at = now;
                if changed_keys.is_none() {
                    for w in &snapshot.warnings {
                        tracing::warn!(warning = %w, "a policy will not work as written");
                    }
                }
                let report = ReloadReport {
                    generation: snapshot.generation,
                    source: snapshot.source,
                    counts: snapshot.counts,
                    duration_ms: elapsed.as_secs_f64() * 1000.0,
                    warnings: snapshot.warnings.clone(),
                    fallback_reason,
                    changed_keys,
                    quarantined: snapshot.quarantine.clone(),
                };
                self.inner
                    .generation
                    .store(snapshot.generation, Ordering::Relaxed);
                let replaced = self.inner.snapshot.swap(Arc::new(snapshot));
                log_quarantine_changes(&replaced, &self.inner.snapshot.load());
                self.record_success(trigger, now, report.duration_ms);
                tracing::info!(
                    source = report.source.as_str(),
                    mode = config.source.as_str(),
                    trigger = trigger.as_str(),
                    scope = if changed_keys.is_some() {
                        "changes"
                    } else {
                        "full"
                    },
                    changed_keys = changed_keys.unwrap_or(0),
                    generation = report.generation,
                    extensions = report.counts.extensions,
                    versions = report.counts.versions,
                    instances = report.counts.instances,
                    policies = report.counts.policies,
                    duration_ms = report.duration_ms,
                    "Extension Registry synced"
                );
                record_sync_span(changed_keys, Ok(&report));
                Ok(report)
            }
            Err(e) => {
                self.inner.sync_error.fetch_add(1, Ordering::Relaxed);
                {
                    let mut st = self.lock_state();
                    st.last_error = Some(e.to_string());
                    st.last_error_at = Some(now);
                }
                let current = self.inner.snapshot.load();
                tracing::error!(
                    error = %e,
                    trigger = trigger.as_str(),
                    scope = if changed_keys.is_some() { "changes" } else { "full" },
                    serving_generation = current.generation,
                    serving_source = current.source.as_str(),
                    "Extension Registry sync failed; the previous snapshot keeps serving"
                );
                record_sync_span(changed_keys, Err(&e));
                Err(e)
            }
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_db_state(&self, state: DbState) {
        *self
            .inner
            .db_state
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = state;
    }

    fn db_state(&self) -> DbState {
        *self
            .inner
            .db_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn read_database(
        &self,
        config: &RegistryConfig,
        pool: Option<&PgPool>,
    ) -> Result<Dataset, RegistryError> {
        let Some(pool) = pool else {
            return Err(RegistryError::Unsupported(
                "the database is disabled (db_enabled = false)".into(),
            ));
        };
        let result = database::load(pool, &config.database_display()).await;
        self.note_db_result(&result);
        result
    }

    fn note_db_result<T>(&self, result: &Result<T, RegistryError>) {
        self.set_db_state(match result {
            Ok(_) => DbState::Connected,
            Err(e) => match e.kind() {
                ErrorKind::Unreachable => DbState::Unreachable,
                ErrorKind::SchemaMissing => DbState::SchemaMissing,
                _ => DbState::Error,
            },
        });
    }

    /// Reads the configured source, applying auto's fallback rule: fixtures only while
    /// the database is unreachable *and* no database snapshot has been loaded — once
    /// the router has seen the database's state it keeps serving that (newer, and the
    /// truth) rather than stepping back to development fixtures.
    pub(crate) async fn read_source(
        &self,
        config: &RegistryConfig,
        pool: Option<&PgPool>,
    ) -> Result<(Dataset, ActiveSource, Option<String>), RegistryError> {
        let fixtures = || -> Result<Dataset, RegistryError> {
            match (&config.fixtures_dir, &config.policies_dir) {
                (Some(dir), pdir) => fixtures::load_dir(dir, pdir.as_deref()),
                (None, Some(pdir)) => {
                    let mut data = fixtures::load_builtin(false)?;
                    fixtures::load_policies(pdir, &mut data)?;
                    Ok(data)
                }
                (None, None) => fixtures::load_builtin(true),
            }
        };
        match config.source {
            SourceMode::Fixtures => Ok((fixtures()?, ActiveSource::Fixtures, None)),
            SourceMode::Database => Ok((
                self.read_database(config, pool).await?,
                ActiveSource::Database,
                None,
            )),
            SourceMode::Auto => {
                if !config.db_enabled {
                    return Ok((
                        fixtures()?,
                        ActiveSource::Fixtures,
                        Some("db_enabled = false".into()),
                    ));
                }
                match self.read_database(config, pool).await {
                    Ok(data) => Ok((data, ActiveSource::Database, None)),
                    Err(e) if e.kind() == ErrorKind::Unreachable => {
                        if self.inner.snapshot.load().source == ActiveSource::Database {
                            return Err(e);
                        }
                        tracing::warn!(
                            error = %e,
                            "Extension Registry: database unreachable in auto mode, falling back to fixtures"
                        );
                        Ok((fixtures()?, ActiveSource::Fixtures, Some(e.to_string())))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// `router_extension_registry_db:test_connection()`.
    pub async fn test_connection(&self) -> Result<(), RegistryError> {
        let (pool, database) = {
            let s = self.read_settings();
            (s.pool.clone(), s.config.database_display())
        };
        let Some(pool) = pool else {
            return Err(RegistryError::Unsupported(
                "the database is disabled (db_enabled = false)".into(),
            ));
        };
        let result = database::test_connection(&pool, &database).await;
        if self.read_settings().config.uses_database() {
            self.set_db_state(match &result {
                Ok(()) => DbState::Connected,
                Err(e) if e.kind() == ErrorKind::Unreachable => DbState::Unreachable,
                Err(_) => DbState::Error,
            });
        }
        result
    }

    /// Switches the source mode live, then reloads from it. The switch stands even if
    /// that reload fails (the previous snapshot keeps serving and the sync task keeps
    /// trying), exactly as if the router had started with the new mode.
    pub async fn set_source(&self, source: SourceMode) -> Result<ReloadReport, RegistryError> {
        {
            let mut s = self
                .inner
                .settings
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if source == SourceMode::Database && !s.config.db_enabled {
                return Err(RegistryError::Unsupported(
                    "cannot switch to database: db_enabled = false in the configuration".into(),
                ));
            }
            s.config.source = source;
        }
        self.set_db_state(if self.read_settings().config.uses_database() {
            DbState::Unknown
        } else {
            DbState::Disabled
        });
        self.inner.wake.notify_one();
        self.reload_with(Trigger::SourceChange).await
    }

    pub fn status(&self) -> RegistryStatus {
        let snap = self.inner.snapshot.load();
        let st = self.lock_state();
        let s = self.read_settings();
        RegistryStatus {
            running: true,
            size: snap.size(),
            source: s.config.source,
            active_source: snap.source,
            loaded: snap.source != ActiveSource::Empty,
            generation: snap.generation,
            counts: snap.counts,
            db_state: self.db_state(),
            database: s.config.db_enabled.then(|| s.config.database_display()),
            last_sync_at: st.last_sync_at,
            last_sync_trigger: st.last_sync_trigger,
            last_sync_duration_ms: st.last_sync_duration_ms,
            last_error: st.last_error.clone(),
            last_error_at: st.last_error_at,
            resolved_error: st.resolved_error.clone(),
            quarantined: snap.quarantine.clone(),
            sync_success_total: self.inner.sync_success.load(Ordering::Relaxed),
            sync_error_total: self.inner.sync_error.load(Ordering::Relaxed),
            listening: self.inner.listening.load(Ordering::Relaxed),
            warnings: snap.warnings.clone(),
            sync_interval_seconds: s.config.sync_interval_seconds,
            config: s.config.as_used(),
        }
    }

    /// Sync counters (success, error) since start.
    pub fn sync_counts(&self) -> (u64, u64) {
        (
            self.inner.sync_success.load(Ordering::Relaxed),
            self.inner.sync_error.load(Ordering::Relaxed),
        )
    }

    /// Starts the sync task; it stops when `shutdown` is cancelled.
    pub fn spawn_sync(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let registry = self.clone();
        tokio::spawn(async move { registry.run_sync(shutdown).await })
    }

    /// Periodic full resync, plus LISTEN on [`database::NOTIFY_CHANNEL`] while the
    /// source uses the database. A lost LISTEN connection is re-established with
    /// backoff, and every (re)connection is followed by a full reload, since
    /// notifications sent while it was down are gone.
    pub async fn run_sync(&self, shutdown: CancellationToken) {
        let interval = self.read_settings().config.sync_interval();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listener: Option<PgListener> = None;
        let mut backoff = Duration::from_millis(200);
        let mut next_attempt = tokio::time::Instant::now();
        loop {
            let (wants_db, pool) = {
                let s = self.read_settings();
                (s.config.uses_database(), s.pool.clone())
            };
            if !wants_db && listener.is_some() {
                listener = None;
                self.inner.listening.store(false, Ordering::Relaxed);
            }
            if wants_db
                && listener.is_none()
                && tokio::time::Instant::now() >= next_attempt
                && let Some(pool) = &pool
            {
                let attempt = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = listen(pool) => r,
                };
                match attempt {
                    Ok(l) => {
                        listener = Some(l);
                        self.inner.listening.store(true, Ordering::Relaxed);
                        backoff = Duration::from_millis(200);
                        tracing::info!(
                            channel = database::NOTIFY_CHANNEL,
                            "Extension Registry listening for changes"
                        );
                        let _ = self.reload_with(Trigger::Reconnect).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Extension Registry cannot LISTEN yet");
                        next_attempt = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(interval);
                    }
                }
            }
            let retry_listen = wants_db && listener.is_none();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    if self.reload_with(Trigger::Periodic).await.is_ok()
                        && self.inner.snapshot.load().source == ActiveSource::Database
                        && let Some(pool) = &pool
                    {
                        self.prune_change_log(pool).await;
                    }
                }
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep_until(next_attempt), if retry_listen => {}
                received = recv(&mut listener) => match received {
                    Ok(Some(first)) => {
                        // Fold a burst of notifications into one read of what
                        // changed (or one full reload, if any of them asks for it).
                        let mut logged = database::is_logged_change(first.payload());
                        if let Some(l) = listener.as_mut() {
                            while let Some(n) = l.next_buffered() {
                                logged &= database::is_logged_change(n.payload());
                            }
                        }
                        let _ = if logged {
                            self.sync_changes(Trigger::Notify).await
                        } else {
                            self.reload_with(Trigger::Notify).await
                        };
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!("Extension Registry lost its LISTEN connection; reconnecting");
                        listener = None;
                        self.inner.listening.store(false, Ordering::Relaxed);
                        next_attempt = tokio::time::Instant::now();
                    }
                },
            }
        }
        self.inner.listening.store(false, Ordering::Relaxed);
    }
}

/// One line per record that entered quarantine (an error: someone must fix it) and
/// per record that left it (fixed, or deleted).
/// Runs one sync in its span (`registry_sync`, DESIGN.md §13) when spans are on.
async fn in_sync_span<T>(trigger: Trigger, sync: impl std::future::Future<Output = T>) -> T {
    if !beamline_model::trace::spans_enabled() {
        return sync.await;
    }
    let span = tracing::info_span!(
        target: "beamline_trace",
        "registry_sync",
        otel.name = "registry sync",
        beamline.registry.trigger = trigger.as_str(),
        beamline.registry.scope = tracing::field::Empty,
        beamline.registry.rows = tracing::field::Empty,
        beamline.registry.outcome = tracing::field::Empty,
        beamline.registry.generation = tracing::field::Empty,
        beamline.registry.source = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    tracing::Instrument::instrument(sync, span).await
}

/// What a sync did, on its span: scope, rows read (every row of a full reload, the
/// changed keys of a change sync), outcome.
fn record_sync_span(changed_keys: Option<usize>, outcome: Result<&ReloadReport, &RegistryError>) {
    if !beamline_model::trace::spans_enabled() {
        return;
    }
    let span = tracing::Span::current();
    if span.metadata().is_none_or(|m| m.name() != "registry_sync") {
        return;
    }
    span.record(
        "beamline.registry.scope",
        if changed_keys.is_some() {
            "changes"
        } else {
            "full"
        },
    );
    match outcome {
        Ok(report) => {
            let c = &report.counts;
            let rows = changed_keys.unwrap_or(c.extensions + c.versions + c.instances + c.policies);
            span.record("beamline.registry.rows", rows as u64);
            span.record("beamline.registry.outcome", "success");
            span.record("beamline.registry.generation", report.generation);
            span.record("beamline.registry.source", report.source.as_str());
        }
        Err(e) => {
            span.record("beamline.registry.outcome", "error");
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", tracing::field::display(e));
        }
    }
}

fn log_quarantine_changes(before: &Snapshot, after: &Snapshot) {
    let key = |q: &Quarantined| (q.table, q.key.clone(), q.error.clone());
    let old: std::collections::HashSet<_> = before.quarantine.iter().map(key).collect();
    let new: std::collections::HashSet<_> = after.quarantine.iter().map(key).collect();
    for q in &after.quarantine {
        if !old.contains(&key(q)) {
            tracing::error!(
                table = q.table.as_str(),
                key = %q.key,
                field = %q.field,
                serving = q.serving.as_str(),
                error = %q.error,
                "Extension Registry: record quarantined; it keeps its last good version (or stays absent) until fixed"
            );
        }
    }
    let still: std::collections::HashSet<_> = after
        .quarantine
        .iter()
        .map(|q| (q.table, q.key.clone()))
        .collect();
    for q in &before.quarantine {
        if !new.contains(&key(q)) && !still.contains(&(q.table, q.key.clone())) {
            tracing::info!(
                table = q.table.as_str(),
                key = %q.key,
                "Extension Registry: record left quarantine"
            );
        }
    }
}

impl Registry {
    /// Keeps `registry_changes` to the last hour. Any router may do it; a failure
    /// (a schema from before migration 0003) costs nothing but a debug line.
    async fn prune_change_log(&self, pool: &PgPool) {
        let database = self.read_settings().config.database_display();
        match database::prune_changes(pool, &database).await {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "pruned registry_changes"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot prune registry_changes"),
        }
    }
}

/// How long a snapshot's position is trusted for reading only the changes since:
/// half the hour `registry_changes` keeps, so no change it needs can have been pruned.
const CHANGE_LOG_TRUST: chrono::TimeDelta = chrono::TimeDelta::minutes(30);

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(database::NOTIFY_CHANNEL).await?;
    Ok(l)
}

async fn recv(
    listener: &mut Option<PgListener>,
) -> Result<Option<sqlx::postgres::PgNotification>, sqlx::Error> {
    match listener {
        Some(l) => l.try_recv().await,
        None => std::future::pending().await,
    }
}
