//! One extension call on behalf of a step: resolve the version, check type, state and
//! tenant, encode the request, pass the breaker and the bulkhead, pick an instance,
//! call over NATS, and record what happened (health, breaker, metrics, log).

use std::time::{Duration, Instant};

use beamline_model::ExtensionType;
use beamline_model::wire::{ExtensionRequestRef, Reply};
use serde_json::{Map, Value};

use super::Pipeline;
use super::contract::{ExecutedExtension, StepStatus};
use super::state::RequestState;
use crate::balancer::SmoothWrr;
use crate::invoker::{Call, InvokeError};
use crate::observer::InvocationEvent;
use crate::trace::CallTrace;

/// What `executed_extensions` records of a call, apart from its outcome.
#[derive(Default)]
pub(crate) struct StepMeta {
    pub latency: Duration,
    pub version: Option<String>,
    pub instance: Option<String>,
}

impl StepMeta {
    /// The `executed_extensions` entry of a call that ended with `status`.
    pub fn entry(
        self,
        ext_type: ExtensionType,
        id: &str,
        status: StepStatus,
        error: Option<String>,
    ) -> ExecutedExtension {
        ExecutedExtension {
            ext_type,
            id: id.to_string(),
            status,
            latency_ms: self.latency.as_secs_f64() * 1000.0,
            version: self.version,
            instance: self.instance,
            error,
        }
    }
}

/// One step's call, before the stage decides what its outcome means.
pub(crate) struct StepRun {
    pub outcome: Result<Reply, InvokeError>,
    pub meta: StepMeta,
}

/// Which extension a step calls, and with what step config.
pub(crate) struct StepCall<'a> {
    pub ext_type: ExtensionType,
    pub id: &'a str,
    pub config: &'a Map<String, Value>,
    /// For a provider's extension: the policy's provider and its parameters.
    pub provider: Option<ProviderCall<'a>>,
}

/// The original's provider fields of a provider request.
pub(crate) struct ProviderCall<'a> {
    pub provider_id: &'a str,
    pub parameters: &'a Map<String, Value>,
}

impl Pipeline {
    /// Resolves, checks, balances and calls one extension.
    pub(crate) async fn invoke(&self, state: &RequestState, step: StepCall<'_>) -> StepRun {
        let StepCall {
            ext_type: expected,
            id,
            config,
            provider,
        } = step;
        let fail = |e: InvokeError, version: Option<String>| {
            crate::trace::refused(&state.trace, expected.as_str(), id, version.as_deref(), &e);
            StepRun {
                outcome: Err(e),
                meta: StepMeta {
                    version,
                    ..StepMeta::default()
                },
            }
        };
        let Some(entry) = state.snapshot.entry(id) else {
            return fail(InvokeError::NotFound, None);
        };
        let resolved = entry.resolve(&state.context);
        if resolved.ext_type != expected {
            return fail(
                InvokeError::WrongType {
                    expected: expected.to_string(),
                    actual: resolved.ext_type.to_string(),
                },
                None,
            );
        }
        if !resolved.enabled {
            return fail(InvokeError::Disabled, None);
        }
        let tenant = state.tenant_id();
        if let Some(Value::Array(allowed)) = resolved.metadata.get("allowed_tenants")
            && !allowed.iter().any(|t| t.as_str() == Some(tenant))
        {
            return fail(
                InvokeError::Extension {
                    code: "tenant_not_allowed".into(),
                    message: format!("tenant '{tenant}' is not in the extension's allowed_tenants"),
                },
                None,
            );
        }
        // The extension's own config (registry), overridden key by key by the step's.
        let merged;
        let config = if config.is_empty() {
            &resolved.config
        } else if resolved.config.is_empty() {
            config
        } else {
            let mut m = resolved.config.clone();
            m.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
            merged = m;
            &merged
        };
        // The original's names ride along where its extensions look for them: a
        // provider reads `prompt`, `parameters`, `context`; a post-processor
        // written to its document reads `message` and `context`.
        let post = expected == ExtensionType::Post;
        // A provider's prompt is text, whatever the payload (an object as JSON text).
        let prompt = provider.as_ref().map(|_| state.message.payload.to_text());
        let body = ExtensionRequestRef {
            trace_id: state.trace_id(),
            tenant_id: tenant,
            payload: &state.message,
            metadata: &state.context,
            config,
            provider_id: provider.as_ref().map(|p| p.provider_id),
            prompt: prompt.as_deref(),
            parameters: provider.as_ref().map(|p| p.parameters),
            message: post.then_some(&state.message),
            context: (post || provider.is_some()).then_some(&state.context),
        };
        // Sized once for the usual request (ids, context, a short text) plus the text.
        let mut buf = Vec::with_capacity(768 + state.message.payload.byte_len());
        let body = match serde_json::to_writer(&mut buf, &body) {
            Ok(()) => bytes::Bytes::from(buf),
            Err(e) => {
                return fail(
                    InvokeError::Transport(format!("cannot encode request: {e}")),
                    None,
                );
            }
        };
        let limits = &self.inner.limits;
        let max_payload = resolved
            .metadata
            .get("max_payload_size")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(limits.max_payload_bytes + limits.max_metadata_bytes);
        if body.len() > max_payload {
            self.inner.observer.payload_too_large(id);
            return fail(
                InvokeError::RequestTooLarge(format!(
                    "payload_too_large: request is {} bytes, the extension accepts {max_payload}",
                    body.len()
                )),
                None,
            );
        }

        let rt = self.inner.runtime.extension(id);
        let routed_version =
            (entry.base.version != resolved.version).then_some(resolved.version.as_str());
        let breaker = self
            .inner
            .runtime
            .breaker_for(&state.policy, id, routed_version);
        let now = self.inner.runtime.now();
        let (permit, transition) = match breaker.try_acquire(now) {
            Ok(p) => p,
            Err(_) => return fail(InvokeError::CircuitOpen, Some(resolved.version.clone())),
        };
        if let Some(t) = transition {
            self.breaker_changed(id, None, t);
        }
        // The bulkhead: a full extension refuses at once (the permit, dropped unused,
        // gives back a half-open probe slot without counting as an outcome).
        let Ok(_in_flight) = rt.in_flight.clone().try_acquire_owned() else {
            drop(permit);
            return fail(
                InvokeError::Overloaded(self.inner.config.max_in_flight_per_extension),
                Some(resolved.version.clone()),
            );
        };

        // Instances serve the base version; a routed version is reached on its own subject.
        let base_version = entry.base.version == resolved.version;
        let chosen = if base_version && !entry.instances.is_empty() {
            self.pick_instance(id, &entry.instances, &rt.balancer, now)
        } else {
            None
        };
        let subject = chosen.map_or(resolved.subject.as_str(), |i| i.subject.as_str());
        let instance = chosen.map(|i| i.instance_id.clone());

        let (outcome, stats) = self
            .inner
            .invoker
            .call(Call {
                extension: resolved,
                subject,
                body,
                trace_id: state.trace_id(),
                tenant_id: tenant,
                deadline: state.deadline,
                headers: self.inner.invoker.sends_headers(resolved),
                trace: CallTrace::new(&state.trace, instance.as_deref(), permit.admission()),
            })
            .await;
        let end = self.inner.runtime.now();
        let success = outcome.is_ok();
        let counts = outcome
            .as_ref()
            .err()
            .is_none_or(InvokeError::counts_against_extension);
        // Per-version calls for the canary judge, while the extension has an active
        // rollout (every router's judge loop keeps the flag).
        let versioned = rt.watched();
        if counts {
            rt.health.record(end, stats.latency, success);
            if versioned {
                rt.record_version(&resolved.version, stats.latency, success);
            }
            if let Some(t) = permit.record(success, end) {
                if versioned && t.to == crate::breaker::BreakerState::Open {
                    rt.version_breaker_opened(&resolved.version);
                }
                self.breaker_changed(id, None, t);
            }
            if let Some(inst) = &instance
                && let Ok((p, _)) = self
                    .inner
                    .runtime
                    .instance_breaker(id, inst)
                    .try_acquire(end)
                && let Some(t) = p.record(success, end)
            {
                self.breaker_changed(id, Some(inst), t);
            }
        }
        if stats.attempts > resolved.retry
            && matches!(
                outcome,
                Err(InvokeError::Timeout { .. } | InvokeError::NoResponders { .. })
            )
            && resolved.retry > 0
        {
            self.inner.observer.retry_limit_exceeded(id);
        }
        let status = match &outcome {
            Ok(_) => "success",
            Err(e) => e.status_label(),
        };
        self.inner.observer.invocation(&InvocationEvent {
            extension_id: id,
            ext_type: resolved.ext_type,
            version: &resolved.version,
            instance_id: instance.as_deref(),
            tenant_id: tenant,
            trace_id: state.trace_id(),
            status,
            latency: stats.latency,
            attempts: stats.attempts,
            error: outcome.as_ref().err().map(ToString::to_string),
        });
        tracing::debug!(
            trace_id = %state.trace_id(),
            extension_id = id,
            version = %resolved.version,
            instance = instance.as_deref().unwrap_or("-"),
            status,
            attempts = stats.attempts,
            latency_ms = stats.latency.as_secs_f64() * 1000.0,
            "extension invocation"
        );
        StepRun {
            outcome,
            meta: StepMeta {
                latency: stats.latency,
                version: Some(resolved.version.clone()),
                instance,
            },
        }
    }

    pub(crate) fn breaker_changed(
        &self,
        id: &str,
        instance: Option<&str>,
        t: crate::breaker::Transition,
    ) {
        tracing::warn!(
            extension_id = id,
            instance = instance.unwrap_or("-"),
            from = t.from.as_str(),
            to = t.to.as_str(),
            "circuit breaker state changed"
        );
        self.inner.observer.breaker_transition(id, instance, t);
    }

    /// Smooth WRR over enabled, not-unhealthy instances whose own breaker admits
    /// calls; none eligible → the first enabled instance; none enabled → `None` (the
    /// extension's own subject).
    fn pick_instance<'e>(
        &self,
        id: &str,
        instances: &'e [beamline_model::ExtensionInstance],
        balancer: &SmoothWrr,
        now: Instant,
    ) -> Option<&'e beamline_model::ExtensionInstance> {
        let eligible: Vec<&beamline_model::ExtensionInstance> = instances
            .iter()
            .filter(|i| {
                i.enabled
                    && i.health_status != beamline_model::InstanceHealth::Unhealthy
                    && !self
                        .inner
                        .runtime
                        .instance_breaker(id, &i.instance_id)
                        .is_refusing(now)
            })
            .collect();
        let chosen = balancer
            .pick(eligible.iter().map(|i| (i.instance_id.as_str(), i.weight)))
            .map(|k| eligible[k])
            .or_else(|| instances.iter().find(|i| i.enabled))?;
        self.inner
            .observer
            .instance_selected(id, &chosen.instance_id);
        Some(chosen)
    }
}
