//! Prometheus metrics (DESIGN.md §7: names, types and labels are a contract), in the
//! text exposition format 0.0.4.
//!
//! Two kinds of series:
//! - events, counted as they happen through the pipeline's [`Observer`] hooks
//!   (invocations, latency, retries, breaker openings, versions, balancer picks, the
//!   security counters);
//! - state, read from the registry and the pipeline at scrape time (breaker state,
//!   health gauges, registry size and quarantine, instance health, sync, RBAC and
//!   dropped-span counters). These families are rebuilt on every scrape, so a breaker
//!   that changes state leaves exactly one series (`state` = the current one) and a
//!   removed extension leaves none.
//!
//! Canary rollouts (DESIGN.md §12) are state too, read from what the judge last saw
//! ([`beamline_pipeline::canary::CanaryBoard`]; every router reads the same table, so
//! every router exports the same series): `router_extension_rollout_state`
//! (`extension_id`, `state`) is one-hot — one series per state, 1 for the current one,
//! 0 for the other five — so `…{state="rolled_back"} == 1` selects rolled-back
//! rollouts; `router_extension_rollout_step` is the percent of tenants the candidate
//! serves (a tenant-list step, a rollback or an abort: 0; promoted: 100);
//! `router_extension_rollout_last_move_timestamp_seconds` is when the rollout last
//! moved (the "stuck" alert); `router_extension_rollout_judge` is 1 on the router
//! holding the judge's lock. A rollout is exported while active and for an hour after
//! it ended.
//!
//! `tenant_id` is bounded: the first [`MetricsConfig::max_tenants`] distinct tenants
//! keep their own label value, later ones are reported as `_other`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use beamline_pipeline::breaker::{BreakerState, Transition};
use beamline_pipeline::{InvocationEvent, Observer, Pipeline};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::{Deserialize, Serialize};

use crate::auth::Authenticator;

/// Latency buckets in milliseconds: the runbook's 10…1000 plus finer ones below 10
/// (loopback calls take well under a millisecond) and 2500/5000 for timeouts.
pub const LATENCY_BUCKETS_MS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// Label value for tenants past the cap.
pub const OTHER_TENANT: &str = "_other";

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Distinct `tenant_id` label values kept; later tenants count as `_other`.
    pub max_tenants: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { max_tenants: 100 }
    }
}

/// `{extension_id, type, status, tenant_id}`
pub struct InvocationLabels<'a> {
    pub extension_id: &'a str,
    pub ext_type: &'a str,
    pub status: &'a str,
    pub tenant_id: &'a str,
}

impl InvocationLabels<'_> {
    fn values(&self) -> [&str; 4] {
        [
            self.extension_id,
            self.ext_type,
            self.status,
            self.tenant_id,
        ]
    }
}

struct EventFamilies {
    invocation_total: IntCounterVec,
    invocation_latency_ms: HistogramVec,
    retries_total: IntCounterVec,
    breaker_opened_total: IntCounterVec,
    version_invocation_total: IntCounterVec,
    lb_selection_total: IntCounterVec,
    payload_too_large_total: IntCounterVec,
    retry_limit_exceeded_total: IntCounterVec,
    decide_default_reply_total: prometheus::IntCounter,
}

struct StateFamilies {
    breaker_state: IntGaugeVec,
    health_success_rate: GaugeVec,
    health_latency_p95_ms: GaugeVec,
    registry_extensions_total: IntGaugeVec,
    registry_sync_total: IntCounterVec,
    registry_quarantined: IntGaugeVec,
    instance_health: IntGaugeVec,
    rbac_denied_total: IntCounterVec,
    rollout_state: IntGaugeVec,
    rollout_step: GaugeVec,
    rollout_last_move: GaugeVec,
    rollout_judge: prometheus::IntGauge,
    tracing_spans_dropped_total: IntCounterVec,
}

/// All router metrics and their registry.
pub struct Metrics {
    registry: Registry,
    events: EventFamilies,
    state: StateFamilies,
    tenants: Mutex<HashSet<Arc<str>>>,
    max_tenants: usize,
    /// Counter values already exported for counters mirrored from elsewhere.
    mirrored: Mutex<HashMap<String, u64>>,
    scrape: Mutex<()>,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn int_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    pub fn new(config: &MetricsConfig) -> Arc<Metrics> {
        let r = Registry::new();
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "router_extension_invocation_latency_ms",
                "Extension call latency in milliseconds, retries included.",
            )
            .buckets(LATENCY_BUCKETS_MS.to_vec()),
            &["extension_id", "type"],
        )
        .expect("valid metric definition");
        r.register(Box::new(latency.clone()))
            .expect("metric registered once");
        let events = EventFamilies {
            invocation_total: counter(
                &r,
                "router_extension_invocation_total",
                "Extension calls by outcome.",
                &["extension_id", "type", "status", "tenant_id"],
            ),
            invocation_latency_ms: latency,
            retries_total: counter(
                &r,
                "router_extension_retries_total",
                "Extension calls by number of retries they needed.",
                &["extension_id", "retry_count"],
            ),
            breaker_opened_total: counter(
                &r,
                "router_extension_circuit_breaker_opened_total",
                "Times a circuit breaker opened.",
                &["extension_id"],
            ),
            version_invocation_total: counter(
                &r,
                "router_extension_version_invocation_total",
                "Extension calls by resolved version.",
                &["extension_id", "version"],
            ),
            lb_selection_total: counter(
                &r,
                "router_extension_load_balancer_selection_total",
                "Instance picks by the load balancer.",
                &["extension_id", "instance_id", "algorithm"],
            ),
            payload_too_large_total: counter(
                &r,
                "router_extension_payload_too_large_total",
                "Requests refused for exceeding an extension's payload limit.",
                &["extension_id"],
            ),
            retry_limit_exceeded_total: counter(
                &r,
                "router_extension_retry_limit_exceeded_total",
                "Calls that used every retry and still failed.",
                &["extension_id"],
            ),
            decide_default_reply_total: {
                let c = prometheus::IntCounter::new(
                    "router_decide_default_reply_total",
                    "NATS intake requests without a reply subject, answered on the default reply subject.",
                )
                .expect("valid metric definition");
                r.register(Box::new(c.clone()))
                    .expect("metric registered once");
                c
            },
        };
        let state = StateFamilies {
            breaker_state: int_gauge(
                &r,
                "router_extension_circuit_breaker_state",
                "Circuit breaker state: closed 0, half_open 1, open 2 (one series per extension).",
                &["extension_id", "state"],
            ),
            health_success_rate: gauge(
                &r,
                "router_extension_health_success_rate",
                "Success rate over the health window (1 when idle).",
                &["extension_id"],
            ),
            health_latency_p95_ms: gauge(
                &r,
                "router_extension_health_latency_p95_ms",
                "p95 latency over the health window, milliseconds.",
                &["extension_id"],
            ),
            registry_extensions_total: int_gauge(
                &r,
                "router_extension_registry_extensions_total",
                "Extensions in the serving snapshot.",
                &["source", "type"],
            ),
            registry_sync_total: counter(
                &r,
                "router_extension_registry_sync_total",
                "Registry syncs (reloads) by outcome.",
                &["status"],
            ),
            registry_quarantined: int_gauge(
                &r,
                "router_extension_registry_quarantined",
                "Records held out of the serving snapshot because they failed validation (DESIGN.md §4), by table.",
                &["table"],
            ),
            instance_health: int_gauge(
                &r,
                "router_extension_instance_health",
                "Instances by recorded health status (1 per instance).",
                &["extension_id", "instance_id", "health_status"],
            ),
            rbac_denied_total: counter(
                &r,
                "router_rbac_denied_total",
                "Admin calls refused for a role too small.",
                &["resource"],
            ),
            rollout_state: int_gauge(
                &r,
                "router_extension_rollout_state",
                "Canary rollout state, one-hot: 1 for the current state (pending, running, paused, promoted, rolled_back, aborted), 0 for the others.",
                &["extension_id", "state"],
            ),
            rollout_step: gauge(
                &r,
                "router_extension_rollout_step",
                "Percent of tenants the canary candidate serves (0 for a tenant-list step, a rollback or an abort; 100 once promoted).",
                &["extension_id"],
            ),
            rollout_last_move: gauge(
                &r,
                "router_extension_rollout_last_move_timestamp_seconds",
                "When the canary rollout last moved (created, started, advanced, paused, resumed, ended), Unix seconds.",
                &["extension_id"],
            ),
            rollout_judge: {
                let g = prometheus::IntGauge::new(
                    "router_extension_rollout_judge",
                    "1 when this router holds the canary judge's advisory lock.",
                )
                .expect("valid metric definition");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            tracing_spans_dropped_total: counter(
                &r,
                "router_tracing_spans_dropped_total",
                "Finished spans that never reached the OTLP collector: queue_full (the export queue was full) or export_failed (the collector refused or could not be reached).",
                &["reason"],
            ),
        };
        // Zero series for the labels every dashboard expects, so rates exist from the start.
        for s in ["success", "error"] {
            state.registry_sync_total.with_label_values(&[s]);
        }
        for (reason, _) in beamline_pipeline::trace::spans_dropped() {
            state
                .tracing_spans_dropped_total
                .with_label_values(&[reason.as_str()]);
        }
        Arc::new(Metrics {
            registry: r,
            events,
            state,
            tenants: Mutex::new(HashSet::new()),
            max_tenants: config.max_tenants,
            mirrored: Mutex::new(HashMap::new()),
            scrape: Mutex::new(()),
        })
    }

    /// The tenant label: the tenant itself while under the cap, else `_other`.
    pub fn tenant_label(&self, tenant: &str) -> Arc<str> {
        let mut seen = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = seen.get(tenant) {
            return known.clone();
        }
        if seen.len() < self.max_tenants {
            let label: Arc<str> = Arc::from(tenant);
            seen.insert(label.clone());
            return label;
        }
        Arc::from(OTHER_TENANT)
    }

    /// Adds `now - last exported` to a counter that mirrors a running total.
    fn mirror(&self, key: String, counter: prometheus::IntCounter, now: u64) {
        let mut m = self.mirrored.lock().unwrap_or_else(|p| p.into_inner());
        let last = m.entry(key).or_insert(0);
        if now > *last {
            counter.inc_by(now - *last);
            *last = now;
        }
    }

    /// Rebuilds the state families from the live system, then encodes everything.
    pub fn render(&self, pipeline: &Pipeline, auth: Option<&Authenticator>) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let s = &self.state;
        let registry = pipeline.registry();
        let snap = registry.snapshot();
        let rt = pipeline.runtime();
        let now = rt.now();

        s.breaker_state.reset();
        s.health_success_rate.reset();
        s.health_latency_p95_ms.reset();
        s.registry_extensions_total.reset();
        s.instance_health.reset();
        for ext in snap.list() {
            let id = ext.id.as_str();
            let (state, rate, p95) = match rt.existing(id) {
                Some(x) => {
                    let h = x.health.snapshot(now);
                    (rt.effective_state(id), h.success_rate, h.p95_latency_ms)
                }
                None => (BreakerState::Closed, 1.0, 0.0),
            };
            s.breaker_state
                .with_label_values(&[id, state.as_str()])
                .set(state.gauge_value());
            // Counters every extension has from the start (at 0), so rate() and alert
            // expressions find a series before the first event.
            let e = &self.events;
            let t = ext.ext_type.as_str();
            for status in ["success", "error", "timeout"] {
                // tenant_id "" = no tenant: a zero series so error-rate ratios have a
                // denominator per extension before any tenant called it.
                e.invocation_total.with_label_values(&[id, t, status, ""]);
            }
            e.invocation_latency_ms.with_label_values(&[id, t]);
            e.retries_total.with_label_values(&[id, "0"]);
            e.version_invocation_total
                .with_label_values(&[id, &ext.version]);
            e.breaker_opened_total.with_label_values(&[id]);
            e.payload_too_large_total.with_label_values(&[id]);
            e.retry_limit_exceeded_total.with_label_values(&[id]);
            s.health_success_rate.with_label_values(&[id]).set(rate);
            s.health_latency_p95_ms.with_label_values(&[id]).set(p95);
            for inst in snap.instances(id) {
                s.instance_health
                    .with_label_values(&[id, &inst.instance_id, inst.health_status.as_str()])
                    .set(1);
                self.events.lb_selection_total.with_label_values(&[
                    id,
                    &inst.instance_id,
                    "weighted_round_robin",
                ]);
            }
        }
        if snap.source != beamline_registry::ActiveSource::Empty {
            for (t, n) in snap.count_by_type() {
                s.registry_extensions_total
                    .with_label_values(&[snap.source.as_str(), t.as_str()])
                    .set(n as i64);
            }
        }
        // Every table always has a series (0 when clean), so the alert's expression
        // and a dashboard's sum find one from the start.
        for (table, n) in snap.quarantined_by_table() {
            s.registry_quarantined
                .with_label_values(&[table.as_str()])
                .set(n as i64);
        }
        s.rollout_state.reset();
        s.rollout_step.reset();
        s.rollout_last_move.reset();
        let board = pipeline.canary();
        s.rollout_judge.set(i64::from(board.is_judge()));
        for r in board.rollouts() {
            let id = r.extension_id.as_str();
            for state in beamline_model::canary::RolloutState::ALL {
                s.rollout_state
                    .with_label_values(&[id, state.as_str()])
                    .set(i64::from(state == r.state));
            }
            s.rollout_step
                .with_label_values(&[id])
                .set(r.share_percent());
            let moved = r.last_move_at.unwrap_or(r.created_at);
            s.rollout_last_move
                .with_label_values(&[id])
                .set(moved.timestamp_millis() as f64 / 1000.0);
        }
        let (ok, failed) = registry.sync_counts();
        self.mirror(
            "sync_success".into(),
            s.registry_sync_total.with_label_values(&["success"]),
            ok,
        );
        self.mirror(
            "sync_error".into(),
            s.registry_sync_total.with_label_values(&["error"]),
            failed,
        );
        for (reason, n) in beamline_pipeline::trace::spans_dropped() {
            self.mirror(
                format!("spans_dropped:{}", reason.as_str()),
                s.tracing_spans_dropped_total
                    .with_label_values(&[reason.as_str()]),
                n,
            );
        }
        if let Some(auth) = auth {
            for resource in crate::auth::RESOURCES {
                s.rbac_denied_total.with_label_values(&[resource]);
            }
            for (resource, n) in auth.denied_counts() {
                self.mirror(
                    format!("rbac:{resource}"),
                    s.rbac_denied_total.with_label_values(&[resource]),
                    n,
                );
            }
        }

        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Counts the pipeline's events.
pub struct MetricsObserver(pub Arc<Metrics>);

impl Observer for MetricsObserver {
    fn invocation(&self, e: &InvocationEvent<'_>) {
        let m = &self.0.events;
        let tenant = self.0.tenant_label(if e.tenant_id.is_empty() {
            "unknown"
        } else {
            e.tenant_id
        });
        let labels = InvocationLabels {
            extension_id: e.extension_id,
            ext_type: e.ext_type.as_str(),
            status: e.status,
            tenant_id: &tenant,
        };
        m.invocation_total.with_label_values(&labels.values()).inc();
        m.invocation_latency_ms
            .with_label_values(&[e.extension_id, e.ext_type.as_str()])
            .observe(e.latency.as_secs_f64() * 1000.0);
        // Attempts are at most retry + 1 ≤ 4 (the retry limit): no string is made.
        let retries = match e.attempts.saturating_sub(1) {
            0 => std::borrow::Cow::Borrowed("0"),
            1 => "1".into(),
            2 => "2".into(),
            3 => "3".into(),
            n => n.to_string().into(),
        };
        m.retries_total
            .with_label_values(&[e.extension_id, &retries])
            .inc();
        m.version_invocation_total
            .with_label_values(&[e.extension_id, e.version])
            .inc();
    }

    fn breaker_transition(&self, extension_id: &str, instance_id: Option<&str>, t: Transition) {
        if instance_id.is_none() && t.to == BreakerState::Open {
            self.0
                .events
                .breaker_opened_total
                .with_label_values(&[extension_id])
                .inc();
        }
    }

    fn instance_selected(&self, extension_id: &str, instance_id: &str) {
        self.0
            .events
            .lb_selection_total
            .with_label_values(&[extension_id, instance_id, "weighted_round_robin"])
            .inc();
    }

    fn payload_too_large(&self, extension_id: &str) {
        self.0
            .events
            .payload_too_large_total
            .with_label_values(&[extension_id])
            .inc();
    }

    fn retry_limit_exceeded(&self, extension_id: &str) {
        self.0
            .events
            .retry_limit_exceeded_total
            .with_label_values(&[extension_id])
            .inc();
    }

    fn decide_reply_defaulted(&self) {
        self.0.events.decide_default_reply_total.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_past_the_cap_are_other() {
        let m = Metrics::new(&MetricsConfig { max_tenants: 2 });
        assert_eq!(&*m.tenant_label("a"), "a");
        assert_eq!(&*m.tenant_label("b"), "b");
        assert_eq!(&*m.tenant_label("c"), OTHER_TENANT);
        assert_eq!(&*m.tenant_label("a"), "a");
    }
}
