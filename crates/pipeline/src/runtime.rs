//! Live per-extension state — breaker, health window, instance balancer — kept apart
//! from the registry snapshot so a reload never resets it.
//!
//! Lookups take the read lock of one shard of a sharded map for one hash probe;
//! entries are created on first use under that shard's write lock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::balancer::SmoothWrr;
use crate::breaker::{Breaker, BreakerConfig, BreakerSnapshot};
use crate::health::{Health, HealthSnapshot, VersionDelta, VersionDeltas};

/// A concurrent map of shared values, split into shards behind their own
/// reader-writer locks.
///
/// Reads take one shard's read lock for the length of a hash probe (no writer holds
/// it for longer than an insert), so the hot path never waits on other extensions'
/// traffic in practice; inserts touch one shard only, so creating the state of
/// 100 000 extensions is linear (the copy-on-write map this replaced copied the whole
/// map on every insert: 180 s at 50 000 entries).
pub struct ShardedMap<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    hasher: Hasher,
}

/// foldhash: keys are extension ids and instance names, a few bytes each, hashed on
/// every call; SipHash was 5 % of the pipeline's CPU in a profile. Seeded per
/// process, so the keys' layout is not predictable from outside.
type Hasher = foldhash::fast::RandomState;
type Shard<V> = HashMap<Box<str>, Arc<V>, Hasher>;

/// Shards: a power of two well above the cores a router runs on.
const SHARDS: usize = 64;

impl<V> Default for ShardedMap<V> {
    fn default() -> Self {
        let hasher = Hasher::default();
        ShardedMap {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::with_hasher(hasher.clone())))
                .collect(),
            hasher,
        }
    }
}

impl<V> ShardedMap<V> {
    #[inline]
    fn shard(&self, key: &str) -> &RwLock<Shard<V>> {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(key);
        // High bits: the shard's own map uses the low ones.
        &self.shards[(h >> 58) as usize & (SHARDS - 1)]
    }

    #[inline]
    pub fn get(&self, key: &str) -> Option<Arc<V>> {
        self.shard(key)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    pub fn get_or_insert_with(&self, key: &str, make: impl FnOnce() -> V) -> Arc<V> {
        if let Some(v) = self.get(key) {
            return v;
        }
        // A panic in `make` happens before the map is touched, so a poisoned lock
        // still guards a consistent map.
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        shard
            .entry(Box::from(key))
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> Vec<(String, Arc<V>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.iter().map(|(k, v)| (k.to_string(), v.clone())));
        }
        out
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything the router learns about one extension by calling it.
#[derive(Debug)]
pub struct ExtensionRuntime {
    pub breaker: Arc<Breaker>,
    pub health: Health,
    pub balancer: SmoothWrr,
    /// The bulkhead: calls in flight to this extension are bounded, so one slow
    /// extension cannot pile up unbounded waiting calls (memory, NATS inboxes) at the
    /// expense of the others.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Calls per version since the canary judge last took them; kept only while the
    /// extension has an active rollout ([`ExtensionRuntime::watched`]), a few
    /// entries at most.
    versions: std::sync::Mutex<Vec<(Box<str>, VersionDeltas)>>,
    /// The extension has an active canary rollout: its calls are counted per version
    /// for the judge. Off otherwise, so a call pays one relaxed load, no lock.
    watched: std::sync::atomic::AtomicBool,
}

impl ExtensionRuntime {
    /// Whether calls are counted per version for the canary judge.
    pub fn watched(&self) -> bool {
        self.watched.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn with_version<R>(&self, version: &str, f: impl FnOnce(&mut VersionDeltas) -> R) -> R {
        let mut list = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let i = match list.iter().position(|(v, _)| &**v == version) {
            Some(i) => i,
            None => {
                list.push((Box::from(version), VersionDeltas::default()));
                list.len() - 1
            }
        };
        f(&mut list[i].1)
    }

    /// Records one call of `version` for the canary judge.
    pub fn record_version(&self, version: &str, latency: Duration, success: bool) {
        self.with_version(version, |d| d.record(latency, success));
    }

    /// Records that the breaker guarding `version` opened.
    pub fn version_breaker_opened(&self, version: &str) {
        self.with_version(version, VersionDeltas::breaker_opened);
    }

    /// Every version's calls since the last take.
    pub fn take_versions(&self) -> Vec<(String, VersionDelta)> {
        let mut list = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        list.iter_mut()
            .filter_map(|(v, d)| d.take().map(|t| (v.to_string(), t)))
            .collect()
    }
}

/// Health and breaker of one extension, as operators see it (`health get`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtensionHealth {
    pub extension_id: String,
    #[serde(flatten)]
    pub health: HealthSnapshot,
    pub circuit_breaker_state: &'static str,
    pub circuit_breaker_opened_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip)]
    pub breaker: BreakerSnapshot,
}

/// `health summary`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HealthSummary {
    pub total: usize,
    pub healthy: usize,
    pub unhealthy: usize,
    pub half_open: usize,
    pub avg_success_rate: f64,
    pub avg_latency_ms: f64,
    pub avg_p95_latency_ms: f64,
}

/// Success rate below which a closed extension counts as unhealthy (the runbook's
/// `ExtensionSuccessRateLow` threshold).
pub const UNHEALTHY_SUCCESS_RATE: f64 = 0.9;

/// All live extension state.
pub struct RuntimeTable {
    /// Added to the real clock: lets tests move breaker and health time forward
    /// instead of sleeping through it.
    clock_offset_ms: std::sync::atomic::AtomicU64,
    extensions: ShardedMap<ExtensionRuntime>,
    instance_breakers: ShardedMap<Breaker>,
    policy_breakers: ShardedMap<Breaker>,
    version_breakers: ShardedMap<Breaker>,
    breaker_config: BreakerConfig,
    health_window: Duration,
    max_in_flight: usize,
}

/// Default bound of calls in flight per extension.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 512;

impl RuntimeTable {
    pub fn new(breaker_config: BreakerConfig) -> RuntimeTable {
        let health_window = Duration::from_secs(breaker_config.window_seconds);
        RuntimeTable {
            clock_offset_ms: std::sync::atomic::AtomicU64::new(0),
            extensions: ShardedMap::default(),
            instance_breakers: ShardedMap::default(),
            policy_breakers: ShardedMap::default(),
            version_breakers: ShardedMap::default(),
            breaker_config,
            health_window,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Sets the per-extension bound of calls in flight (before first use).
    pub fn with_max_in_flight(mut self, n: usize) -> RuntimeTable {
        self.max_in_flight = n.max(1);
        self
    }

    /// The pipeline's notion of now (the real clock plus any test offset).
    #[inline]
    pub fn now(&self) -> Instant {
        Instant::now()
            + Duration::from_millis(
                self.clock_offset_ms
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
    }

    /// Moves breaker and health time forward (tests).
    pub fn advance_clock(&self, by: Duration) {
        self.clock_offset_ms
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn breaker_config(&self) -> &BreakerConfig {
        &self.breaker_config
    }

    #[inline]
    pub fn extension(&self, id: &str) -> Arc<ExtensionRuntime> {
        self.extensions.get_or_insert_with(id, || ExtensionRuntime {
            breaker: Breaker::new(self.breaker_config.clone()),
            health: Health::new(self.health_window),
            balancer: SmoothWrr::new(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(self.max_in_flight)),
            versions: std::sync::Mutex::new(Vec::new()),
            watched: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Counts calls per version for exactly the extensions in `active` (those with
    /// an active canary rollout), and for no other.
    pub fn watch_versions(&self, active: &std::collections::HashSet<String>) {
        use std::sync::atomic::Ordering;
        for id in active {
            self.extension(id).watched.store(true, Ordering::Relaxed);
        }
        for (id, rt) in self.extensions.entries() {
            if !active.contains(&id) && rt.watched.swap(false, Ordering::Relaxed) {
                // Nothing left to report for it.
                let _ = rt.take_versions();
            }
        }
    }

    /// Every (extension, version, calls) recorded since the last take, for the
    /// canary judge's report.
    pub fn take_version_deltas(&self) -> Vec<(String, String, VersionDelta)> {
        let mut out = Vec::new();
        for (id, rt) in self.extensions.entries() {
            for (version, d) in rt.take_versions() {
                out.push((id.clone(), version, d));
            }
        }
        out
    }

    /// Existing state only (no entry is created for a mere read).
    pub fn existing(&self, id: &str) -> Option<Arc<ExtensionRuntime>> {
        self.extensions.get(id)
    }

    pub fn instance_breaker(&self, extension_id: &str, instance_id: &str) -> Arc<Breaker> {
        let key = format!("{extension_id}\u{1f}{instance_id}");
        self.instance_breakers
            .get_or_insert_with(&key, || Breaker::build(self.breaker_config.clone()))
    }

    /// The breaker guarding `extension_id` for calls made under `policy` to `version`.
    ///
    /// The base version uses the extension's own breaker; a routed version (a canary)
    /// has a breaker of its own, so a failing v2 cannot cut off the tenants still on v1.
    /// A policy that overrides breaker settings gets breakers of its own too (keyed by
    /// the settings, so an edited policy starts with a fresh breaker).
    pub fn breaker_for(
        &self,
        policy: &beamline_model::Policy,
        extension_id: &str,
        version: Option<&str>,
    ) -> Arc<Breaker> {
        match (&policy.document.circuit_breaker, version) {
            (None, None) => self.extension(extension_id).breaker.clone(),
            (None, Some(v)) => {
                let key = format!("{extension_id}\u{1f}{v}");
                self.version_breakers
                    .get_or_insert_with(&key, || Breaker::build(self.breaker_config.clone()))
            }
            (Some(overrides), v) => {
                let config = self.breaker_config.with_overrides(overrides);
                let key = format!(
                    "{}\u{1f}{}\u{1f}{extension_id}\u{1f}{}\u{1f}{config:?}",
                    policy.tenant_id,
                    policy.policy_id,
                    v.unwrap_or("")
                );
                self.policy_breakers
                    .get_or_insert_with(&key, || Breaker::build(config))
            }
        }
    }

    /// The state operators see for an extension: the worst of its own breaker and
    /// its versions' breakers (open > half_open > closed).
    pub fn effective_state(&self, extension_id: &str) -> crate::breaker::BreakerState {
        use crate::breaker::BreakerState as S;
        let rank = |s: S| match s {
            S::Closed => 0,
            S::HalfOpen => 1,
            S::Open => 2,
        };
        let prefix = format!("{extension_id}\u{1f}");
        let mut worst = self
            .existing(extension_id)
            .map(|x| x.breaker.state())
            .unwrap_or(S::Closed);
        for (key, b) in self.version_breakers.entries() {
            if key.starts_with(&prefix) && rank(b.state()) > rank(worst) {
                worst = b.state();
            }
        }
        worst
    }

    /// Closes every breaker guarding `extension_id` (its own, its instances', and
    /// policy-scoped ones): the operator's reset. Returns whether any was not closed.
    pub fn reset_breakers(&self, extension_id: &str) -> Vec<crate::breaker::Transition> {
        let mut changed = Vec::new();
        changed.extend(self.extension(extension_id).breaker.reset());
        let instance_prefix = format!("{extension_id}\u{1f}");
        for (key, b) in self.instance_breakers.entries() {
            if key.starts_with(&instance_prefix) {
                changed.extend(b.reset());
            }
        }
        for (key, b) in self.policy_breakers.entries() {
            if key.split('\u{1f}').nth(2) == Some(extension_id) {
                changed.extend(b.reset());
            }
        }
        for (key, b) in self.version_breakers.entries() {
            if key.starts_with(&instance_prefix) {
                changed.extend(b.reset());
            }
        }
        changed
    }

    /// Every extension with live state.
    pub fn extension_entries(&self) -> Vec<(String, Arc<ExtensionRuntime>)> {
        self.extensions.entries()
    }

    /// Health of one extension (an extension never called reports empty health).
    pub fn health_of(&self, id: &str, now: Instant) -> ExtensionHealth {
        let rt = self.extension(id);
        let mut breaker = rt.breaker.snapshot(now);
        breaker.state = self.effective_state(id);
        ExtensionHealth {
            extension_id: id.to_string(),
            health: rt.health.snapshot(now),
            circuit_breaker_state: breaker.state.as_str(),
            circuit_breaker_opened_at: breaker.opened_at,
            breaker,
        }
    }

    /// Aggregates over `ids` (normally every extension of the registry).
    pub fn summary<'a>(&self, ids: impl Iterator<Item = &'a str>, now: Instant) -> HealthSummary {
        let mut s = HealthSummary::default();
        let (mut rate, mut lat, mut p95, mut with_calls) = (0.0, 0.0, 0.0, 0usize);
        for id in ids {
            let h = self.health_of(id, now);
            s.total += 1;
            match h.breaker.state {
                crate::breaker::BreakerState::HalfOpen => s.half_open += 1,
                crate::breaker::BreakerState::Open => s.unhealthy += 1,
                crate::breaker::BreakerState::Closed => {
                    if h.health.window_calls > 0 && h.health.success_rate < UNHEALTHY_SUCCESS_RATE {
                        s.unhealthy += 1;
                    } else {
                        s.healthy += 1;
                    }
                }
            }
            rate += h.health.success_rate;
            if h.health.window_calls > 0 {
                with_calls += 1;
                lat += h.health.avg_latency_ms;
                p95 += h.health.p95_latency_ms;
            }
        }
        if s.total > 0 {
            s.avg_success_rate = rate / s.total as f64;
        }
        if with_calls > 0 {
            s.avg_latency_ms = lat / with_calls as f64;
            s.avg_p95_latency_ms = p95 / with_calls as f64;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn only_extensions_with_an_active_rollout_are_watched() {
        let table = RuntimeTable::new(crate::BreakerConfig::default());
        let a = table.extension("a");
        let b = table.extension("b");
        assert!(!a.watched() && !b.watched(), "nothing is watched at first");
        let active: std::collections::HashSet<String> = ["a".to_string()].into();
        table.watch_versions(&active);
        assert!(a.watched() && !b.watched());
        a.record_version("v2", Duration::from_millis(3), true);
        table.watch_versions(&Default::default());
        assert!(!a.watched());
        assert!(
            table.take_version_deltas().is_empty(),
            "a rollout that ended leaves nothing to report"
        );
    }

    /// Threads racing to create the same keys end up sharing one value per key, and
    /// `make` runs once per key.
    #[test]
    fn racing_inserts_create_each_value_once() {
        let map: Arc<ShardedMap<usize>> = Arc::new(ShardedMap::default());
        let made = Arc::new(AtomicUsize::new(0));
        let keys: Vec<String> = (0..2_000).map(|i| format!("ext_{i:05}")).collect();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (map, made, keys) = (map.clone(), made.clone(), keys.clone());
                std::thread::spawn(move || {
                    // Each thread walks all the keys in its own order (strides
                    // coprime with their number).
                    let stride = [1, 3, 7, 9][t];
                    let mut got = Vec::with_capacity(keys.len());
                    for i in 0..keys.len() {
                        let k = &keys[(i * stride) % keys.len()];
                        let v = map.get_or_insert_with(k, || {
                            made.fetch_add(1, Ordering::Relaxed);
                            k.len()
                        });
                        got.push((k.clone(), v));
                    }
                    got
                })
            })
            .collect();
        let results: Vec<_> = threads
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(made.load(Ordering::Relaxed), keys.len());
        assert_eq!(map.len(), keys.len());
        for got in &results {
            for (k, v) in got {
                let stored = map.get(k).expect("inserted");
                assert!(Arc::ptr_eq(v, &stored), "{k} has two values");
            }
        }
        let mut listed: Vec<String> = map.entries().into_iter().map(|(k, _)| k).collect();
        listed.sort();
        assert_eq!(listed, keys);
    }
}
