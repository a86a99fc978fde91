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
//!
//! This file holds the [`Pipeline`] and the order of the stages. Beside it, in
//! `pipeline/`: `state.rs` (one request's state), `invoke.rs` (one extension call),
//! one file per stage — `transform.rs` (pre and post), `validate.rs`, `provider.rs` —
//! and `contract.rs` (what callers hand in and get back).

mod contract;
mod invoke;
mod provider;
mod state;
mod transform;
mod validate;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use beamline_model::{ExtensionType, Limits};
use beamline_registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use contract::{
    DecideError, DecideRequest, Decision, ExecutedExtension, ProviderOutputView, StepStatus,
    new_trace_id,
};

use crate::balancer::SmoothWrr;
use crate::breaker::BreakerConfig;
use crate::invoker::{Invoker, InvokerConfig};
use crate::observer::{NoopObserver, Observer};
use crate::runtime::{RuntimeTable, ShardedMap};
use crate::trace::{self, Incoming};
use provider::Selection;
use state::RequestState;

/// `[pipeline]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Budget of a request that carries no `deadline`, milliseconds.
    pub default_request_timeout_ms: u64,
    /// Calls in flight to one extension at most (the bulkhead); more fail at once
    /// with `extension_unavailable`, sending nothing.
    pub max_in_flight_per_extension: usize,
    /// Echo a blocking validator's `details` to the caller (`validator_blocked`
    /// details). Off by default: they can hold the very data that was blocked. They
    /// are always logged at debug.
    pub expose_validator_details: bool,
    #[serde(flatten)]
    pub invoker: InvokerConfig,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            default_request_timeout_ms: 30_000,
            max_in_flight_per_extension: crate::runtime::DEFAULT_MAX_IN_FLIGHT,
            expose_validator_details: false,
            invoker: InvokerConfig::default(),
        }
    }
}

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
    canary: Arc<crate::canary::CanaryBoard>,
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
                canary: Arc::default(),
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
            canary: arc.canary.clone(),
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

    /// What the canary judge last saw (rollouts, whether this router judges).
    pub fn canary(&self) -> &crate::canary::CanaryBoard {
        &self.inner.canary
    }

    /// Where the pipeline reports what it does; the intakes report through it too.
    pub fn observer(&self) -> &dyn Observer {
        &*self.inner.observer
    }

    pub fn nats(&self) -> &async_nats::Client {
        self.inner.invoker.client()
    }

    /// Runs the whole pipeline for one request.
    pub async fn decide(&self, request: DecideRequest) -> Result<Decision, DecideError> {
        self.decide_with(request, Incoming::default()).await
    }

    /// [`Pipeline::decide`] for a request that came with its caller's trace context
    /// (`traceparent`, `tracestate`); traced when spans are on ([`crate::trace`]).
    pub async fn decide_with(
        &self,
        mut request: DecideRequest,
        incoming: Incoming,
    ) -> Result<Decision, DecideError> {
        let mut incoming = incoming;
        let span = trace::decide_span(&mut request, &incoming);
        incoming.recording = !span.is_none();
        let result = trace::within(&span, self.admit_and_run(request, incoming)).await;
        trace::decide_ended(&span, &result);
        result
    }

    async fn admit_and_run(
        &self,
        request: DecideRequest,
        incoming: Incoming,
    ) -> Result<Decision, DecideError> {
        let started = Instant::now();
        let mut state = RequestState::admit(
            self.inner.registry.snapshot(),
            request,
            started,
            self.inner.config.default_request_timeout_ms,
            &self.inner.limits,
        )?;
        state.trace = incoming;
        match self.run(&mut state).await {
            Ok(mut d) => {
                d.executed_extensions = std::mem::take(&mut state.executed);
                Ok(d)
            }
            Err(mut e) => {
                e.executed_extensions = std::mem::take(&mut state.executed);
                Err(e)
            }
        }
    }

    /// The stages in order, each checking the deadline before it starts.
    async fn run(&self, state: &mut RequestState) -> Result<Decision, DecideError> {
        let policy = state.policy.clone();
        self.transform_stage(state, ExtensionType::Pre, &policy.pre)
            .await?;
        self.validator_stage(state, &policy.validators).await?;
        state.check_deadline("provider")?;
        let span = trace::provider_span(&state.trace);
        let selection = trace::within(&span, self.select_provider(state)).await;
        trace::provider_ended(&span, &selection, |s| (&s.provider_id, &s.reason));
        let mut selection = selection?;
        // Post runs on the provider's answer when there is one, else on the message.
        match selection.output.as_mut() {
            Some(answer) => self.post_on_answer(state, &policy.post, answer).await?,
            None => {
                self.transform_stage(state, ExtensionType::Post, &policy.post)
                    .await?
            }
        }
        Ok(self.decision(state, selection))
    }

    /// The decision for a request that went through every stage.
    fn decision(&self, state: &mut RequestState, selection: Selection) -> Decision {
        let Selection {
            provider_id,
            reason,
            output,
        } = selection;
        let mut metadata = BTreeMap::new();
        metadata.insert("policy_id".to_string(), state.policy_id.clone());
        metadata.insert("tenant_id".to_string(), state.tenant_id().to_string());
        if state.dry_run {
            metadata.insert("dry_run".to_string(), "true".to_string());
        }
        if let Some(out) = &output {
            for (k, v) in &out.metadata {
                metadata.entry(k.clone()).or_insert_with(|| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
        let mut expected_latency_ms = 0;
        if let Some(ext) = state
            .policy
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
        Decision {
            provider_id,
            reason,
            priority: 50,
            expected_latency_ms,
            expected_cost: 0.0,
            metadata,
            executed_extensions: Vec::new(),
            message: std::mem::take(&mut state.message),
            provider_output: output.map(Into::into),
        }
    }
}
