//! Decide: run a request through its tenant's policy — pre → validators → provider
//! selection → post — and return the decision with the final message.
//!
//! How a failing step ends (REFERENCE.md §4, with the original's defects fixed):
//!
//! | step | on failure |
//! |---|---|
//! | pre/post `required` | request fails: `extension_timeout`, `extension_unavailable` (breaker open, nobody listening), `extension_not_found`, `invalid_request` (wrong type, too large), `deadline_exceeded`, else `pre_processor_failed` / `post_processor_failed` |
//! | pre/post `optional` | skipped (status `error`), message unchanged |
//! | validator reject, or its call failing | `on_fail`: `block` → `validator_blocked` (`extension_not_found` / `invalid_request` for a missing or mistyped extension), `warn` → status `warn`, `ignore` → status `ignore` |
//! | provider extension | the policy's fallbacks; none left → `decision_failed` |
//!
//! `when` false → status `skipped`. `dry_run` skips every invocation. The deadline is
//! checked between stages and bounds every attempt.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beamline_model::policy::{Mode, OnFail, Policy, When};
use beamline_model::wire::{ExtensionRequestRef, Message, ProviderOutput, Reply, Verdict};
use beamline_model::{ErrorCode, ExtensionType, Limits};
use beamline_registry::{Registry, Snapshot};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::balancer::SmoothWrr;
use crate::breaker::BreakerConfig;
use crate::invoker::{Call, InvokeError, Invoker, InvokerConfig};
use crate::observer::{InvocationEvent, NoopObserver, Observer};
use crate::runtime::{RuntimeTable, ShardedMap};

/// `[pipeline]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Budget of a request that carries no `deadline`, milliseconds.
    pub default_request_timeout_ms: u64,
    /// Calls in flight to one extension at most (the bulkhead); more fail at once
    /// with `extension_unavailable`, sending nothing.
    pub max_in_flight_per_extension: usize,
    #[serde(flatten)]
    pub invoker: InvokerConfig,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            default_request_timeout_ms: 30_000,
            max_in_flight_per_extension: crate::runtime::DEFAULT_MAX_IN_FLIGHT,
            invoker: InvokerConfig::default(),
        }
    }
}

/// A request to decide.
#[derive(Debug, Clone, Default)]
pub struct DecideRequest {
    pub request_id: String,
    pub message: Message,
    /// Empty means `default`.
    pub policy_id: String,
    /// Caller context (constraints, metadata): `deadline` (epoch ms) and `dry_run`
    /// are read from here, and every key is visible to `when` and routing rules.
    pub context: Map<String, Value>,
}

/// Status of one executed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Ok,
    Warn,
    Ignore,
    Skipped,
    Error,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Ok => "ok",
            StepStatus::Warn => "warn",
            StepStatus::Ignore => "ignore",
            StepStatus::Skipped => "skipped",
            StepStatus::Error => "error",
        }
    }
}

/// One entry of `executed_extensions`, in execution order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutedExtension {
    #[serde(rename = "type")]
    pub ext_type: ExtensionType,
    pub id: String,
    pub status: StepStatus,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The outcome of a successful Decide.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub provider_id: String,
    pub reason: String,
    pub priority: i32,
    pub expected_latency_ms: i64,
    pub expected_cost: f64,
    pub metadata: BTreeMap<String, String>,
    pub executed_extensions: Vec<ExecutedExtension>,
    /// The message after pre and post processing: what the caller should forward.
    pub message: Message,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_output: Option<ProviderOutputView>,
}

/// A provider extension's answer as returned to the caller.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderOutputView {
    pub provider_id: String,
    pub output: Value,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl From<ProviderOutput> for ProviderOutputView {
    fn from(p: ProviderOutput) -> Self {
        ProviderOutputView {
            provider_id: p.provider_id,
            output: p.output,
            prompt_tokens: p.usage.prompt_tokens,
            completion_tokens: p.usage.completion_tokens,
        }
    }
}

/// A failed Decide: the code is the wire contract, the message names what failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecideError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Map<String, Value>,
    pub executed_extensions: Vec<ExecutedExtension>,
}

impl DecideError {
    fn new(code: ErrorCode, message: impl Into<String>) -> DecideError {
        DecideError {
            code,
            message: message.into(),
            details: Map::new(),
            executed_extensions: Vec::new(),
        }
    }

    fn detail(mut self, key: &str, value: impl Into<Value>) -> DecideError {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// Keys of the context that belong to the router; extension replies cannot change them.
const RESERVED_CONTEXT_KEYS: &[&str] = &["tenant_id", "policy_id", "request_id", "trace_id"];

/// The pipeline; cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    invoker: Invoker,
    runtime: RuntimeTable,
    providers: ShardedMap<SmoothWrr>,
    observer: Arc<dyn Observer>,
    config: PipelineConfig,
    limits: Limits,
}

/// What `executed_extensions` records of a call, apart from its outcome.
struct StepMeta {
    latency: Duration,
    version: Option<String>,
    instance: Option<String>,
}

/// One step's result, before the stage decides what it means.
struct StepRun {
    outcome: Result<Reply, InvokeError>,
    latency: Duration,
    version: Option<String>,
    instance: Option<String>,
}

impl Pipeline {
    pub fn new(
        registry: Registry,
        client: async_nats::Client,
        config: PipelineConfig,
        breaker: BreakerConfig,
        limits: Limits,
    ) -> Pipeline {
        Pipeline {
            inner: Arc::new(Inner {
                invoker: Invoker::new(client, config.invoker.clone(), limits.clone()),
                registry,
                runtime: RuntimeTable::new(breaker)
                    .with_max_in_flight(config.max_in_flight_per_extension),
                providers: ShardedMap::default(),
                observer: Arc::new(NoopObserver),
                config,
                limits,
            }),
        }
    }

    /// Replaces the observer (before the pipeline is shared).
    pub fn with_observer(self, observer: Arc<dyn Observer>) -> Pipeline {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|arc| Inner {
            registry: arc.registry.clone(),
            invoker: arc.invoker.clone(),
            runtime: RuntimeTable::new(arc.runtime.breaker_config().clone())
                .with_max_in_flight(arc.config.max_in_flight_per_extension),
            providers: ShardedMap::default(),
            observer: arc.observer.clone(),
            config: arc.config.clone(),
            limits: arc.limits.clone(),
        });
        Pipeline {
            inner: Arc::new(Inner { observer, ..inner }),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn runtime(&self) -> &RuntimeTable {
        &self.inner.runtime
    }

    pub fn nats(&self) -> &async_nats::Client {
        self.inner.invoker.client()
    }

    /// Runs the whole pipeline for one request.
    pub async fn decide(&self, request: DecideRequest) -> Result<Decision, DecideError> {
        let started = Instant::now();
        let snapshot = self.inner.registry.snapshot();
        let mut executed = Vec::new();
        let result = self.run(&snapshot, request, started, &mut executed).await;
        match result {
            Ok(mut d) => {
                d.executed_extensions = executed;
                Ok(d)
            }
            Err(mut e) => {
                e.executed_extensions = executed;
                Err(e)
            }
        }
    }

    async fn run(
        &self,
        snapshot: &Snapshot,
        request: DecideRequest,
        started: Instant,
        executed: &mut Vec<ExecutedExtension>,
    ) -> Result<Decision, DecideError> {
        let DecideRequest {
            request_id,
            mut message,
            policy_id,
            context,
        } = request;
        let tenant_id = message.tenant_id.clone();
        check_request_ids(&request_id, &message, &policy_id)?;
        let policy_id = if policy_id.is_empty() {
            "default".to_string()
        } else {
            policy_id
        };
        self.check_request_limits(&message, &context)?;

        let policy = snapshot
            .policy(&tenant_id, &policy_id)
            .cloned()
            .ok_or_else(|| {
                DecideError::new(
                    ErrorCode::PolicyNotFound,
                    format!("policy '{policy_id}' not found for tenant '{tenant_id}'"),
                )
                .detail("tenant_id", tenant_id.clone())
                .detail("policy_id", policy_id.clone())
            })?;

        let deadline = deadline_of(
            &context,
            started,
            self.inner.config.default_request_timeout_ms,
        )?;
        let dry_run = truthy(context.get("dry_run"));
        let mut ctx = context;
        ctx.insert("tenant_id".into(), Value::String(tenant_id.clone()));
        ctx.insert("policy_id".into(), Value::String(policy_id.clone()));
        ctx.insert("request_id".into(), Value::String(request_id.clone()));
        ctx.insert("trace_id".into(), Value::String(message.trace_id.clone()));
        if !message.message_type.is_empty() {
            ctx.entry("message_type")
                .or_insert_with(|| Value::String(message.message_type.clone()));
        }

        // pre
        for step in &policy.pre {
            self.check_deadline(deadline, "pre")?;
            self.transform_step(
                snapshot,
                &policy,
                ExtensionType::Pre,
                &step.id,
                step.mode,
                &step.config,
                &step.when,
                &mut ctx,
                &mut message,
                deadline,
                dry_run,
                executed,
            )
            .await?;
        }
        // validators
        for step in &policy.validators {
            self.check_deadline(deadline, "validators")?;
            self.validator_step(
                snapshot, &policy, step, &ctx, &message, deadline, dry_run, executed,
            )
            .await?;
        }
        // provider
        self.check_deadline(deadline, "provider")?;
        let (provider_id, reason, output) = self
            .select_provider(
                snapshot, &policy, &ctx, &message, deadline, dry_run, executed,
            )
            .await?;
        // post
        for step in &policy.post {
            self.check_deadline(deadline, "post")?;
            self.transform_step(
                snapshot,
                &policy,
                ExtensionType::Post,
                &step.id,
                step.mode,
                &step.config,
                &step.when,
                &mut ctx,
                &mut message,
                deadline,
                dry_run,
                executed,
            )
            .await?;
        }

        let mut metadata = BTreeMap::new();
        metadata.insert("policy_id".to_string(), policy_id);
        metadata.insert("tenant_id".to_string(), tenant_id);
        if dry_run {
            metadata.insert("dry_run".to_string(), "true".to_string());
        }
        let mut expected_latency_ms = 0;
        if let Some(out) = &output {
            for (k, v) in &out.metadata {
                metadata.entry(k.clone()).or_insert_with(|| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
        if let Some(ext) = policy
            .document
            .providers
            .iter()
            .find(|p| p.name == provider_id)
            .and_then(|p| p.extension.as_deref())
            && let Some(rt) = self.inner.runtime.existing(ext)
        {
            expected_latency_ms = rt
                .health
                .snapshot(self.inner.runtime.now())
                .p50_latency_ms
                .round() as i64;
        }
        Ok(Decision {
            provider_id,
            reason,
            priority: 50,
            expected_latency_ms,
            expected_cost: 0.0,
            metadata,
            executed_extensions: Vec::new(),
            message,
            provider_output: output.map(Into::into),
        })
    }

    fn check_request_limits(
        &self,
        message: &Message,
        context: &Map<String, Value>,
    ) -> Result<(), DecideError> {
        let l = &self.inner.limits;
        if message.payload.len() > l.max_payload_bytes {
            return Err(DecideError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "payload_too_large: payload is {} bytes, the limit is {} (limits.max_payload_bytes)",
                    message.payload.len(),
                    l.max_payload_bytes
                ),
            )
            .detail("limit", "max_payload_bytes"));
        }
        let meta = beamline_model::limits::json_len(&message.metadata)
            .saturating_add(beamline_model::limits::json_len(context));
        if meta > l.max_metadata_bytes {
            return Err(DecideError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "metadata_too_large: metadata and context are {meta} bytes, the limit is {} (limits.max_metadata_bytes)",
                    l.max_metadata_bytes
                ),
            )
            .detail("limit", "max_metadata_bytes"));
        }
        for (what, map) in [
            ("message.metadata", &message.metadata),
            ("context", context),
        ] {
            l.check_map_shape(map).map_err(|e| {
                DecideError::new(ErrorCode::InvalidRequest, format!("{what}: {}", e.reason))
                    .detail("limit", "json_shape")
            })?;
        }
        Ok(())
    }

    fn check_deadline(&self, deadline: Instant, stage: &str) -> Result<(), DecideError> {
        if Instant::now() >= deadline {
            return Err(DecideError::new(
                ErrorCode::DeadlineExceeded,
                format!("deadline passed before the {stage} stage"),
            )
            .detail("stage", stage.to_string()));
        }
        Ok(())
    }

    /// Resolves, checks, balances and calls one extension.
    #[allow(clippy::too_many_arguments)]
    async fn invoke(
        &self,
        snapshot: &Snapshot,
        policy: &Policy,
        expected: ExtensionType,
        id: &str,
        config: &Map<String, Value>,
        ctx: &Map<String, Value>,
        message: &Message,
        deadline: Instant,
    ) -> StepRun {
        let fail = |e: InvokeError| StepRun {
            outcome: Err(e),
            latency: Duration::ZERO,
            version: None,
            instance: None,
        };
        let Some(entry) = snapshot.entry(id) else {
            return fail(InvokeError::NotFound);
        };
        let resolved = entry.resolve(ctx).clone();
        if resolved.ext_type != expected {
            return fail(InvokeError::WrongType {
                expected: expected.to_string(),
                actual: resolved.ext_type.to_string(),
            });
        }
        if !resolved.enabled {
            return fail(InvokeError::Disabled);
        }
        let tenant = message.tenant_id.as_str();
        if let Some(Value::Array(allowed)) = resolved.metadata.get("allowed_tenants")
            && !allowed.iter().any(|t| t.as_str() == Some(tenant))
        {
            return fail(InvokeError::Extension {
                code: "tenant_not_allowed".into(),
                message: format!("tenant '{tenant}' is not in the extension's allowed_tenants"),
            });
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
        let body = ExtensionRequestRef {
            trace_id: &message.trace_id,
            tenant_id: &message.tenant_id,
            payload: message,
            metadata: ctx,
            config,
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => {
                return fail(InvokeError::Transport(format!(
                    "cannot encode request: {e}"
                )));
            }
        };
        let max_payload = resolved
            .metadata
            .get("max_payload_size")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or(self.inner.limits.max_payload_bytes + self.inner.limits.max_metadata_bytes);
        if body.len() > max_payload {
            self.inner.observer.payload_too_large(id);
            return fail(InvokeError::RequestTooLarge(format!(
                "payload_too_large: request is {} bytes, the extension accepts {max_payload}",
                body.len()
            )));
        }

        let rt = self.inner.runtime.extension(id);
        let routed_version =
            (entry.base.version != resolved.version).then_some(resolved.version.as_str());
        let breaker = self.inner.runtime.breaker_for(policy, id, routed_version);
        let now = self.inner.runtime.now();
        let (permit, transition) = match breaker.try_acquire(now) {
            Ok(p) => p,
            Err(_) => {
                let mut run = fail(InvokeError::CircuitOpen);
                run.version = Some(resolved.version.clone());
                return run;
            }
        };
        if let Some(t) = transition {
            self.breaker_changed(id, None, t);
        }
        // The bulkhead: a full extension refuses at once (the permit, dropped unused,
        // gives back a half-open probe slot without counting as an outcome).
        let Ok(_in_flight) = rt.in_flight.clone().try_acquire_owned() else {
            drop(permit);
            let mut run = fail(InvokeError::Overloaded(
                self.inner.config.max_in_flight_per_extension,
            ));
            run.version = Some(resolved.version.clone());
            return run;
        };

        // Instances serve the base version; a routed version is reached on its own subject.
        let base_version = entry.base.version == resolved.version;
        let (subject, instance) = if base_version && !entry.instances.is_empty() {
            self.pick_instance(id, &entry.instances, &rt.balancer, &resolved.subject, now)
        } else {
            (resolved.subject.clone(), None)
        };

        let (outcome, stats) = self
            .inner
            .invoker
            .call(Call {
                extension: &resolved,
                subject: &subject,
                body,
                trace_id: &message.trace_id,
                tenant_id: &message.tenant_id,
                deadline,
            })
            .await;
        let end = self.inner.runtime.now();
        let success = outcome.is_ok();
        let counts = outcome
            .as_ref()
            .err()
            .is_none_or(InvokeError::counts_against_extension);
        if counts {
            rt.health.record(end, stats.latency, success);
            if let Some(t) = permit.record(success, end) {
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
            tenant_id: &message.tenant_id,
            trace_id: &message.trace_id,
            status,
            latency: stats.latency,
            attempts: stats.attempts,
            error: outcome.as_ref().err().map(ToString::to_string),
        });
        tracing::debug!(
            trace_id = %message.trace_id,
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
            latency: stats.latency,
            version: Some(resolved.version.clone()),
            instance,
        }
    }

    fn breaker_changed(&self, id: &str, instance: Option<&str>, t: crate::breaker::Transition) {
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
    /// calls; none eligible → the first enabled instance; none enabled → the subject.
    fn pick_instance(
        &self,
        id: &str,
        instances: &[beamline_model::ExtensionInstance],
        balancer: &SmoothWrr,
        fallback_subject: &str,
        now: Instant,
    ) -> (String, Option<String>) {
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
            .or_else(|| instances.iter().find(|i| i.enabled));
        match chosen {
            Some(i) => {
                self.inner.observer.instance_selected(id, &i.instance_id);
                (i.subject.clone(), Some(i.instance_id.clone()))
            }
            None => (fallback_subject.to_string(), None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn transform_step(
        &self,
        snapshot: &Snapshot,
        policy: &Policy,
        ext_type: ExtensionType,
        id: &str,
        mode: Mode,
        config: &Map<String, Value>,
        when: &When,
        ctx: &mut Map<String, Value>,
        message: &mut Message,
        deadline: Instant,
        dry_run: bool,
        executed: &mut Vec<ExecutedExtension>,
    ) -> Result<(), DecideError> {
        let record = |status, run: Option<&StepMeta>, error: Option<String>| ExecutedExtension {
            ext_type,
            id: id.to_string(),
            status,
            latency_ms: run.map(|r| r.latency.as_secs_f64() * 1000.0).unwrap_or(0.0),
            version: run.and_then(|r| r.version.clone()),
            instance: run.and_then(|r| r.instance.clone()),
            error,
        };
        if dry_run || !when.evaluate(ctx) {
            executed.push(record(StepStatus::Skipped, None, None));
            return Ok(());
        }
        let run = self
            .invoke(
                snapshot, policy, ext_type, id, config, ctx, message, deadline,
            )
            .await;
        let StepRun {
            outcome,
            latency,
            version,
            instance,
        } = run;
        let run = StepMeta {
            latency,
            version,
            instance,
        };
        // Applied in place: `apply` checks everything before it changes anything.
        let applied = match outcome {
            Ok(Reply::Transform {
                message: update,
                metadata,
            }) => match update {
                Some(u) => u
                    .apply(message)
                    .map(|()| metadata)
                    .map_err(|e| InvokeError::InvalidReply(e.to_string())),
                None => Ok(metadata),
            },
            Ok(_) => Err(InvokeError::InvalidReply("unexpected reply shape".into())),
            Err(e) => Err(e),
        };
        match applied {
            Ok(metadata) => {
                for (k, v) in metadata {
                    if !RESERVED_CONTEXT_KEYS.contains(&k.as_str()) {
                        ctx.insert(k, v);
                    }
                }
                executed.push(record(StepStatus::Ok, Some(&run), None));
                Ok(())
            }
            Err(e) => {
                executed.push(record(StepStatus::Error, Some(&run), Some(e.to_string())));
                if mode == Mode::Optional {
                    return Ok(());
                }
                let stage_code = if ext_type == ExtensionType::Pre {
                    ErrorCode::PreProcessorFailed
                } else {
                    ErrorCode::PostProcessorFailed
                };
                Err(step_error(&e, stage_code, ext_type, id))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn validator_step(
        &self,
        snapshot: &Snapshot,
        policy: &Policy,
        step: &beamline_model::policy::Validator,
        ctx: &Map<String, Value>,
        message: &Message,
        deadline: Instant,
        dry_run: bool,
        executed: &mut Vec<ExecutedExtension>,
    ) -> Result<(), DecideError> {
        let mut entry = ExecutedExtension {
            ext_type: ExtensionType::Validator,
            id: step.id.clone(),
            status: StepStatus::Skipped,
            latency_ms: 0.0,
            version: None,
            instance: None,
            error: None,
        };
        if dry_run || !step.when.evaluate(ctx) {
            executed.push(entry);
            return Ok(());
        }
        let run = self
            .invoke(
                snapshot,
                policy,
                ExtensionType::Validator,
                &step.id,
                &step.config,
                ctx,
                message,
                deadline,
            )
            .await;
        entry.latency_ms = run.latency.as_secs_f64() * 1000.0;
        entry.version = run.version.clone();
        entry.instance = run.instance.clone();
        // A reject and a failed call both count as a rejection (REFERENCE.md §4).
        let rejection: Option<(String, Option<InvokeError>, Value)> = match run.outcome {
            Ok(Reply::Verdict(Verdict::Ok)) => None,
            Ok(Reply::Verdict(Verdict::Reject { reason, details })) => {
                Some((reason, None, details))
            }
            Ok(_) => Some((
                "invalid_response_format".into(),
                Some(InvokeError::InvalidReply("not a verdict".into())),
                Value::Null,
            )),
            Err(e) => Some((e.to_string(), Some(e), Value::Null)),
        };
        let Some((reason, failure, details)) = rejection else {
            entry.status = StepStatus::Ok;
            executed.push(entry);
            return Ok(());
        };
        entry.error = Some(reason.clone());
        match step.on_fail {
            OnFail::Warn => {
                entry.status = StepStatus::Warn;
                executed.push(entry);
                Ok(())
            }
            OnFail::Ignore => {
                entry.status = StepStatus::Ignore;
                executed.push(entry);
                Ok(())
            }
            OnFail::Block => {
                entry.status = StepStatus::Error;
                executed.push(entry);
                let err = match &failure {
                    Some(
                        e @ (InvokeError::NotFound
                        | InvokeError::WrongType { .. }
                        | InvokeError::Deadline),
                    ) => step_error(
                        e,
                        ErrorCode::ValidatorBlocked,
                        ExtensionType::Validator,
                        &step.id,
                    ),
                    _ => DecideError::new(
                        ErrorCode::ValidatorBlocked,
                        format!("validator {} blocked the request: {reason}", step.id),
                    )
                    .detail("extension_id", step.id.clone())
                    .detail("reason", reason)
                    .detail("details", details),
                };
                Err(err)
            }
        }
    }

    /// Picks a provider by weight (sticky per tenant when the policy says so),
    /// skipping providers whose extension's breaker is open, invokes its extension if
    /// it has one, and follows the policy's fallbacks on failure.
    #[allow(clippy::too_many_arguments)]
    async fn select_provider(
        &self,
        snapshot: &Snapshot,
        policy: &Policy,
        ctx: &Map<String, Value>,
        message: &Message,
        deadline: Instant,
        dry_run: bool,
        executed: &mut Vec<ExecutedExtension>,
    ) -> Result<(String, String, Option<ProviderOutput>), DecideError> {
        let providers = &policy.document.providers;
        let now = self.inner.runtime.now();
        let usable: Vec<usize> = (0..providers.len())
            .filter(|&i| providers[i].weight > 0)
            .filter(|&i| match &providers[i].extension {
                Some(ext) => self
                    .inner
                    .runtime
                    .existing(ext)
                    .is_none_or(|rt| !rt.breaker.is_refusing(now)),
                None => true,
            })
            .collect();
        if usable.is_empty() {
            return Err(DecideError::new(
                ErrorCode::DecisionFailed,
                if providers.is_empty() {
                    format!("policy '{}' has no providers", policy.policy_id)
                } else {
                    "no usable provider: every provider has weight 0 or an open circuit breaker"
                        .to_string()
                },
            ));
        }
        let (mut current, mut reason) = if policy.document.sticky {
            let total: u64 = usable.iter().map(|&i| u64::from(providers[i].weight)).sum();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            message.tenant_id.hash(&mut h);
            let mut point = h.finish() % total.max(1);
            let mut chosen = usable[0];
            for &i in &usable {
                let w = u64::from(providers[i].weight);
                if point < w {
                    chosen = i;
                    break;
                }
                point -= w;
            }
            (chosen, "sticky".to_string())
        } else {
            let key = format!("{}\u{1f}{}", policy.tenant_id, policy.policy_id);
            let wrr = self
                .inner
                .providers
                .get_or_insert_with(&key, SmoothWrr::new);
            let k = wrr
                .pick(
                    usable
                        .iter()
                        .map(|&i| (providers[i].name.as_str(), providers[i].weight)),
                )
                .unwrap_or(0);
            (usable[k], "weighted".to_string())
        };

        let mut retries_left: HashMap<usize, u32> = HashMap::new();
        let mut hops = 0;
        loop {
            let provider = &providers[current];
            let Some(ext) = provider.extension.as_deref() else {
                return Ok((provider.name.clone(), reason, None));
            };
            if dry_run {
                executed.push(ExecutedExtension {
                    ext_type: ExtensionType::Provider,
                    id: ext.to_string(),
                    status: StepStatus::Skipped,
                    latency_ms: 0.0,
                    version: None,
                    instance: None,
                    error: None,
                });
                return Ok((provider.name.clone(), reason, None));
            }
            self.check_deadline(deadline, "provider")?;
            let run = self
                .invoke(
                    snapshot,
                    policy,
                    ExtensionType::Provider,
                    ext,
                    &Map::new(),
                    ctx,
                    message,
                    deadline,
                )
                .await;
            let mut entry = ExecutedExtension {
                ext_type: ExtensionType::Provider,
                id: ext.to_string(),
                status: StepStatus::Ok,
                latency_ms: run.latency.as_secs_f64() * 1000.0,
                version: run.version.clone(),
                instance: run.instance.clone(),
                error: None,
            };
            let failure = match run.outcome {
                Ok(Reply::Provider(out)) => {
                    executed.push(entry);
                    return Ok((provider.name.clone(), reason, Some(out)));
                }
                Ok(_) => InvokeError::InvalidReply("not a provider reply".into()),
                Err(e) => e,
            };
            entry.status = StepStatus::Error;
            entry.error = Some(failure.to_string());
            executed.push(entry);
            // Fallback: the first whose `when` matches this failure's status.
            let status_ctx: Map<String, Value> = [(
                "status".to_string(),
                Value::String(failure.fallback_status().to_string()),
            )]
            .into_iter()
            .collect();
            let fallback = policy
                .fallbacks
                .iter()
                .find(|f| f.when.evaluate(&status_ctx));
            hops += 1;
            let next = fallback.and_then(|f| {
                let left = retries_left.entry(current).or_insert(f.retry);
                if *left > 0 {
                    *left -= 1;
                    Some(current)
                } else {
                    providers
                        .iter()
                        .position(|p| p.name == f.to)
                        .filter(|&i| i != current || f.retry > 0)
                }
            });
            match next {
                Some(i) if hops <= 2 * providers.len() + 3 => {
                    if i != current {
                        reason = format!(
                            "fallback from {} ({})",
                            provider.name,
                            failure.fallback_status()
                        );
                        tracing::warn!(
                            trace_id = %message.trace_id,
                            from = %provider.name,
                            to = %providers[i].name,
                            status = failure.fallback_status(),
                            "provider fallback"
                        );
                    }
                    current = i;
                }
                _ => {
                    return Err(DecideError::new(
                        ErrorCode::DecisionFailed,
                        format!(
                            "provider {} failed and no fallback applies: {failure}",
                            provider.name
                        ),
                    )
                    .detail("provider_id", provider.name.clone())
                    .detail("cause", failure.code().as_str()));
                }
            }
        }
    }
}

/// Ids a caller sends end up in NATS headers, log lines and metric labels: they must
/// be printable ASCII without spaces (and bounded), or the request is refused.
fn check_request_ids(
    request_id: &str,
    message: &Message,
    policy_id: &str,
) -> Result<(), DecideError> {
    let printable = |s: &str| s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    let check = |field: &str, value: &str, required: bool, max: usize| -> Result<(), DecideError> {
        if value.is_empty() {
            return if required {
                Err(DecideError::new(
                    ErrorCode::InvalidRequest,
                    format!("{field} is required"),
                ))
            } else {
                Ok(())
            };
        }
        if value.len() > max || !printable(value) {
            return Err(DecideError::new(
                ErrorCode::InvalidRequest,
                format!("{field} must be 1 to {max} printable ASCII characters without spaces"),
            )
            .detail("field", field.to_string()));
        }
        Ok(())
    };
    check("request_id", request_id, false, 255)?;
    check("message.tenant_id", &message.tenant_id, true, 255)?;
    check("message.trace_id", &message.trace_id, false, 128)?;
    check("message.message_id", &message.message_id, false, 255)?;
    check("message.message_type", &message.message_type, false, 128)?;
    if !policy_id.is_empty() {
        beamline_model::extension::check_id("policy_id", policy_id)
            .map_err(|e| DecideError::new(ErrorCode::InvalidRequest, e.to_string()))?;
    }
    Ok(())
}

/// Maps a required step's failure to the request's error.
fn step_error(
    e: &InvokeError,
    stage_code: ErrorCode,
    ext_type: ExtensionType,
    id: &str,
) -> DecideError {
    let code = match e {
        InvokeError::Timeout { .. } => ErrorCode::ExtensionTimeout,
        InvokeError::CircuitOpen
        | InvokeError::NoResponders { .. }
        | InvokeError::NatsDown
        | InvokeError::Overloaded(_) => ErrorCode::ExtensionUnavailable,
        InvokeError::NotFound => ErrorCode::ExtensionNotFound,
        InvokeError::WrongType { .. } | InvokeError::RequestTooLarge(_) => {
            ErrorCode::InvalidRequest
        }
        InvokeError::Deadline => ErrorCode::DeadlineExceeded,
        _ => stage_code,
    };
    let what = match e {
        InvokeError::NotFound => format!("extension '{id}' not found"),
        other => other.to_string(),
    };
    DecideError::new(code, format!("{ext_type} step {id} failed: {what}"))
        .detail("extension_id", id.to_string())
        .detail("stage", ext_type.as_str())
        .detail("cause", e.code().as_str())
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => matches!(s.as_str(), "true" | "1" | "yes"),
        Some(Value::Number(n)) => n.as_i64() == Some(1),
        _ => false,
    }
}

/// The request's deadline: `context.deadline` (epoch milliseconds, number or numeric
/// string), else the default budget from now.
fn deadline_of(
    ctx: &Map<String, Value>,
    started: Instant,
    default_ms: u64,
) -> Result<Instant, DecideError> {
    let Some(v) = ctx.get("deadline") else {
        return Ok(started + Duration::from_millis(default_ms));
    };
    let epoch_ms = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
    .ok_or_else(|| {
        DecideError::new(
            ErrorCode::InvalidRequest,
            format!("deadline must be epoch milliseconds, found {v}"),
        )
    })?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let left = epoch_ms - now_ms;
    if left <= 0 {
        return Err(DecideError::new(
            ErrorCode::DeadlineExceeded,
            "the request's deadline has already passed",
        ));
    }
    Ok(started + Duration::from_millis(left as u64))
}
