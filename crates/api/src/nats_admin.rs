//! The original's admin NATS subjects (REFERENCE.md §3b), which its gateway calls for
//! its HTTP admin endpoints: extension health, breaker states, a dry run of a policy,
//! and a policy's complexity. Answered from the same live state as the gRPC admin
//! API, queue-grouped like the intake so one router of several answers, read-only —
//! so a key (in a NATS header) is needed only with `[admin] nats_requires_key`.
//!
//! Replies are the original's shapes; a request that cannot be read gets
//! `{"error": {"code": "INVALID_ARGUMENT", "message"}}` naming the field.

use std::sync::Arc;

use beamline_model::ErrorCode;
use beamline_model::policy::Policy;
use beamline_model::wire::{Message, Payload};
use beamline_pipeline::runtime::ExtensionHealth;
use beamline_pipeline::{BreakerState, DecideRequest, Pipeline};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::nats_intake::QUEUE_GROUP;

pub const HEALTH_SUBJECT: &str = "beamline.router.v1.admin.get_extension_health";
pub const BREAKERS_SUBJECT: &str = "beamline.router.v1.admin.get_circuit_breaker_states";
pub const DRY_RUN_SUBJECT: &str = "beamline.router.v1.admin.dry_run_pipeline";
pub const COMPLEXITY_SUBJECT: &str = "beamline.router.v1.admin.get_pipeline_complexity";
/// Every admin subject served.
pub const SUBJECTS: [&str; 4] = [
    HEALTH_SUBJECT,
    BREAKERS_SUBJECT,
    DRY_RUN_SUBJECT,
    COMPLEXITY_SUBJECT,
];

/// The original's soft limits (its performance report): 4 steps in all, 2 per kind.
const MAX_TOTAL: usize = 4;
const MAX_PER_KIND: usize = 2;
/// The original's estimate of one step's latency.
const MS_PER_STEP: usize = 30;
/// The original's p95 target for a pipeline.
const LATENCY_TARGET_MS: usize = 150;
/// Admin requests answered at once; more wait.
const MAX_IN_FLIGHT: usize = 64;

/// Answers the admin subjects.
#[derive(Clone)]
pub struct NatsAdmin {
    pipeline: Pipeline,
    /// Set when `[admin] nats_requires_key`.
    auth: Option<Arc<Authenticator>>,
}

fn error(code: &str, message: impl Into<String>) -> Value {
    json!({"error": {"code": code, "message": message.into()}})
}

fn invalid(message: impl Into<String>) -> Value {
    error("INVALID_ARGUMENT", message)
}

/// The request body as an object (an empty body is an empty object).
fn object(body: &[u8]) -> Result<Map<String, Value>, Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("the request must be a JSON object")),
        Err(e) => Err(invalid(format!("the request is not JSON: {e}"))),
    }
}

/// A required, non-empty string field.
fn required<'a>(req: &'a Map<String, Value>, field: &str) -> Result<&'a str, Value> {
    match req.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(invalid(format!("{field} is required")))
        }
        Some(_) => Err(invalid(format!("{field} must be a string"))),
    }
}

/// healthy at a success rate ≥ 0.95, degraded ≥ 0.80 (the original's thresholds);
/// an open breaker is unhealthy whatever the rate.
pub fn health_status(h: &ExtensionHealth) -> &'static str {
    if h.breaker.state == BreakerState::Open {
        "unhealthy"
    } else if h.health.success_rate >= 0.95 {
        "healthy"
    } else if h.health.success_rate >= 0.80 {
        "degraded"
    } else {
        "unhealthy"
    }
}

/// The original's code for a dry run that failed with `code` (invalid requests are
/// answered as `INVALID_ARGUMENT` before this).
fn dry_run_error_code(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::PolicyNotFound => "POLICY_NOT_FOUND",
        ErrorCode::Internal => "INTERNAL_ERROR",
        _ => "PIPELINE_ERROR",
    }
}

/// The original's complexity assessment of a policy's steps.
pub fn complexity(policy: &Policy) -> Value {
    let (pre, validators, post) = (policy.pre.len(), policy.validators.len(), policy.post.len());
    let total = pre + validators + post;
    // 0.6 for reaching the recommended total, +0.05 per kind over its limit (0.15 at
    // most), +0.04 per step over the total (0.20 at most); 1.0 at most.
    let base = (total as f64 / MAX_TOTAL as f64).min(1.0) * 0.6;
    let kinds_over = [pre, validators, post]
        .iter()
        .filter(|&&n| n > MAX_PER_KIND)
        .count();
    let per_kind = (kinds_over as f64 * 0.05).min(0.15);
    let over_total = (total.saturating_sub(MAX_TOTAL) as f64 * 0.04).min(0.20);
    let score = ((base + per_kind + over_total).min(1.0) * 100.0).round() / 100.0;
    let level = match score {
        s if s < 0.3 => "low",
        s if s < 0.6 => "medium",
        s if s < 0.8 => "high",
        _ => "very_high",
    };
    let latency = total * MS_PER_STEP;
    let mut warnings = Vec::new();
    let mut recommendations = Vec::new();
    if score > 0.8 {
        if total > MAX_TOTAL {
            warnings.push(format!("Pipeline has {total} extensions, recommended maximum is {MAX_TOTAL}. This may cause high latency."));
        }
        for (n, what, effect) in [
            (pre, "Pre-processors", "Consider reducing or parallelizing."),
            (
                validators,
                "Validators",
                "This may slow down request processing.",
            ),
            (
                post,
                "Post-processors",
                "Consider reducing or parallelizing.",
            ),
        ] {
            if n > MAX_PER_KIND {
                warnings.push(format!(
                    "{what} count ({n}) exceeds recommended limit ({MAX_PER_KIND}). {effect}"
                ));
            }
        }
        if latency > LATENCY_TARGET_MS {
            warnings.push(format!("Estimated pipeline latency ({latency}ms) exceeds recommended P95 target ({LATENCY_TARGET_MS}ms). Consider optimizing."));
        }
    }
    if score > 0.6 {
        if total > MAX_TOTAL {
            recommendations.push(format!(
                "Consider reducing total extensions to {MAX_TOTAL} or fewer for optimal performance"
            ));
        }
        for (n, advice) in [
            (
                pre,
                "Reduce pre-processors to 2 or fewer, or consider parallel execution",
            ),
            (
                validators,
                "Reduce validators to 2 or fewer for faster validation",
            ),
            (
                post,
                "Reduce post-processors to 2 or fewer, or consider parallel execution",
            ),
        ] {
            if n > MAX_PER_KIND {
                recommendations.push(advice.to_string());
            }
        }
    }
    json!({
        "total_extensions": total,
        "pre_count": pre,
        "validators_count": validators,
        "post_count": post,
        "complexity_score": score,
        "complexity_level": level,
        "estimated_latency_ms": latency,
        "recommended_limits": {
            "max_total": MAX_TOTAL,
            "max_pre": MAX_PER_KIND,
            "max_validators": MAX_PER_KIND,
            "max_post": MAX_PER_KIND,
        },
        "warnings": warnings,
        "recommendations": recommendations,
    })
}

impl NatsAdmin {
    pub fn new(pipeline: Pipeline) -> NatsAdmin {
        NatsAdmin {
            pipeline,
            auth: None,
        }
    }

    /// Requires a key of any role in a header (`[admin] nats_requires_key`).
    pub fn with_auth(mut self, auth: Arc<Authenticator>) -> NatsAdmin {
        self.auth = Some(auth);
        self
    }

    /// The answer to one request on `subject`.
    pub async fn handle(
        &self,
        subject: &str,
        headers: Option<&async_nats::HeaderMap>,
        body: &[u8],
    ) -> Value {
        if let Some(auth) = &self.auth
            && let Err(status) = auth.identify_nats(headers)
        {
            return error("UNAUTHENTICATED", status.message());
        }
        // Health and breaker states take any body (the original's gateway sends
        // whatever it has); the other two read theirs.
        let answer = match subject {
            HEALTH_SUBJECT => Ok(self.health()),
            BREAKERS_SUBJECT => Ok(self.breaker_states()),
            DRY_RUN_SUBJECT => match object(body) {
                Ok(req) => self.dry_run(&req).await,
                Err(e) => Err(e),
            },
            COMPLEXITY_SUBJECT => object(body).and_then(|req| self.complexity(&req)),
            other => Err(invalid(format!("unknown admin subject {other}"))),
        };
        answer.unwrap_or_else(|e| e)
    }

    fn health(&self) -> Value {
        let snap = self.pipeline.registry().snapshot();
        let rt = self.pipeline.runtime();
        let now = rt.now();
        let mut all = Map::new();
        for ext in snap.list() {
            let h = rt.health_of(&ext.id, now);
            let mut v = serde_json::to_value(&h).unwrap_or_else(|_| json!({}));
            v["status"] = Value::String(health_status(&h).into());
            all.insert(ext.id.clone(), v);
        }
        json!({"health": all})
    }

    fn breaker_states(&self) -> Value {
        let snap = self.pipeline.registry().snapshot();
        let rt = self.pipeline.runtime();
        let states: Map<String, Value> = snap
            .list()
            .iter()
            .map(|e| {
                (
                    e.id.clone(),
                    Value::String(rt.effective_state(&e.id).as_str().into()),
                )
            })
            .collect();
        json!({"states": states})
    }

    /// Runs the policy with `dry_run`: every step is skipped, nothing is invoked.
    async fn dry_run(&self, req: &Map<String, Value>) -> Result<Value, Value> {
        let tenant_id = required(req, "tenant_id")?;
        let policy_id = required(req, "policy_id")?;
        let payload = req
            .get("payload")
            .cloned()
            .and_then(Payload::from_value)
            .ok_or_else(|| invalid("payload is required"))?;
        let trace_id = beamline_pipeline::new_trace_id();
        let mut context = Map::new();
        context.insert("dry_run".into(), Value::Bool(true));
        let request = DecideRequest {
            request_id: format!("dry-run-{trace_id}"),
            message: Message {
                message_id: format!("dry-run-{trace_id}"),
                tenant_id: tenant_id.to_string(),
                trace_id,
                message_type: "dry_run".into(),
                payload,
                payload_ref: None,
                metadata: Map::new(),
            },
            policy_id: policy_id.to_string(),
            context,
        };
        match self.pipeline.decide(request).await {
            Ok(d) => Ok(json!({"ok": true, "result": {
                "decision": {"provider_id": d.provider_id, "reason": d.reason, "priority": d.priority},
                "executed_extensions": d.executed_extensions,
                "final_payload": d.message.payload,
            }})),
            Err(e) if e.code == ErrorCode::InvalidRequest => Err(invalid(e.message)),
            Err(e) => Ok(json!({"ok": false, "error": {
                "code": dry_run_error_code(e.code), "message": e.to_string()
            }})),
        }
    }

    fn complexity(&self, req: &Map<String, Value>) -> Result<Value, Value> {
        let tenant_id = required(req, "tenant_id")?;
        let policy_id = required(req, "policy_id")?;
        let snap = self.pipeline.registry().snapshot();
        let policy = snap.policy(tenant_id, policy_id).ok_or_else(|| {
            invalid(format!(
                "policy '{policy_id}' not found for tenant '{tenant_id}'"
            ))
        })?;
        Ok(complexity(policy))
    }
}

/// Subscribes to every admin subject (queue group `beamline-router`) and waits until
/// the server has them.
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<Vec<async_nats::Subscriber>, async_nats::Error> {
    let mut subs = Vec::with_capacity(SUBJECTS.len());
    for subject in SUBJECTS {
        subs.push(
            client
                .queue_subscribe(subject.to_string(), QUEUE_GROUP.to_string())
                .await?,
        );
    }
    client.flush().await?;
    crate::nats_intake::server_has_seen(client).await;
    Ok(subs)
}

/// Answers admin requests until `shutdown`, then lets the ones in flight finish. A
/// request without a reply subject gets no answer (there is no one to tell).
pub async fn serve(
    admin: NatsAdmin,
    client: async_nats::Client,
    subs: Vec<async_nats::Subscriber>,
    shutdown: CancellationToken,
) {
    let mut requests = futures::stream::select_all(subs);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = requests.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (admin, client) = (admin.clone(), client.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = admin
                .handle(msg.subject.as_str(), msg.headers.as_ref(), &msg.payload)
                .await;
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = client.publish(reply_to, body.into()).await {
                tracing::warn!(error = %e, subject = %msg.subject, "admin reply could not be sent");
            }
        });
    }
    for sub in requests.iter_mut() {
        let _ = sub.unsubscribe().await;
    }
    let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use beamline_model::Limits;
    use beamline_model::policy::PolicyDocument;

    fn policy(pre: usize, validators: usize, post: usize) -> Policy {
        let steps = |n: usize, k: &str| -> Vec<Value> {
            (0..n).map(|i| json!({"id": format!("{k}{i}")})).collect()
        };
        let doc: PolicyDocument = serde_json::from_value(json!({
            "providers": [{"name": "p"}],
            "pre": steps(pre, "a"), "validators": steps(validators, "v"), "post": steps(post, "z"),
        }))
        .unwrap();
        Policy::from_document("t", "p", true, doc, &Limits::default()).unwrap()
    }

    #[test]
    fn complexity_follows_the_originals_formula_and_thresholds() {
        let c = complexity(&policy(1, 1, 1));
        assert_eq!(c["total_extensions"], 3);
        assert_eq!(c["estimated_latency_ms"], 90);
        assert_eq!(c["complexity_score"], 0.45);
        assert_eq!(c["complexity_level"], "medium");
        assert_eq!(c["warnings"], json!([]));
        assert_eq!(c["recommendations"], json!([]));
        assert_eq!(
            c["recommended_limits"],
            json!({"max_total": 4, "max_pre": 2, "max_validators": 2, "max_post": 2})
        );

        // 3 + 2 + 2 = 7: 0.6 + 0.05 (pre over) + 0.12 (3 over the total) = 0.77.
        let c = complexity(&policy(3, 2, 2));
        assert_eq!(c["complexity_score"], 0.77);
        assert_eq!(c["complexity_level"], "high");
        assert_eq!(c["warnings"], json!([]), "warnings only above 0.8");
        assert_eq!(c["recommendations"].as_array().unwrap().len(), 2);

        // 3 + 3 + 3 = 9: 0.6 + 0.15 + 0.20 = 0.95.
        let c = complexity(&policy(3, 3, 3));
        assert_eq!(c["complexity_score"], 0.95);
        assert_eq!(c["complexity_level"], "very_high");
        let warnings = c["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 5, "{warnings:?}");
        assert!(warnings[4].as_str().unwrap().contains("270ms"));
    }

    fn health(success_rate: f64, state: BreakerState) -> ExtensionHealth {
        use beamline_pipeline::breaker::BreakerSnapshot;
        use beamline_pipeline::health::HealthSnapshot;
        ExtensionHealth {
            extension_id: "x".into(),
            health: HealthSnapshot {
                last_success: None,
                last_failure: None,
                success_count: 0,
                failure_count: 0,
                success_rate,
                window_calls: 100,
                avg_latency_ms: 0.0,
                p50_latency_ms: 0.0,
                p95_latency_ms: 0.0,
                p99_latency_ms: 0.0,
            },
            circuit_breaker_state: state.as_str(),
            circuit_breaker_opened_at: None,
            breaker: BreakerSnapshot {
                state,
                opened_at: None,
                consecutive_failures: 0,
                window_calls: 100,
                window_failures: 0,
                opened_total: 0,
            },
        }
    }

    #[test]
    fn health_status_follows_the_originals_thresholds() {
        let closed = BreakerState::Closed;
        assert_eq!(health_status(&health(1.0, closed)), "healthy");
        assert_eq!(health_status(&health(0.95, closed)), "healthy");
        assert_eq!(health_status(&health(0.949, closed)), "degraded");
        assert_eq!(health_status(&health(0.80, closed)), "degraded");
        assert_eq!(health_status(&health(0.799, closed)), "unhealthy");
        assert_eq!(health_status(&health(0.0, closed)), "unhealthy");
        assert_eq!(
            health_status(&health(1.0, BreakerState::HalfOpen)),
            "healthy"
        );
        assert_eq!(
            health_status(&health(1.0, BreakerState::Open)),
            "unhealthy",
            "an open breaker is unhealthy whatever the rate"
        );
    }

    #[test]
    fn dry_run_failures_carry_the_originals_codes() {
        assert_eq!(
            dry_run_error_code(ErrorCode::PolicyNotFound),
            "POLICY_NOT_FOUND"
        );
        assert_eq!(dry_run_error_code(ErrorCode::Internal), "INTERNAL_ERROR");
        for code in [
            ErrorCode::ValidatorBlocked,
            ErrorCode::DeadlineExceeded,
            ErrorCode::DecisionFailed,
            ErrorCode::ExtensionNotFound,
        ] {
            assert_eq!(dry_run_error_code(code), "PIPELINE_ERROR", "{code:?}");
        }
    }

    #[test]
    fn requests_that_cannot_be_read_name_what_is_wrong() {
        assert_eq!(object(b"").unwrap(), Map::new());
        assert_eq!(
            object(b"[1]").unwrap_err()["error"]["code"],
            "INVALID_ARGUMENT"
        );
        let req = object(br#"{"tenant_id": 5}"#).unwrap();
        assert_eq!(
            required(&req, "tenant_id").unwrap_err()["error"]["message"],
            "tenant_id must be a string"
        );
        assert_eq!(
            required(&req, "policy_id").unwrap_err()["error"]["message"],
            "policy_id is required"
        );
    }
}
