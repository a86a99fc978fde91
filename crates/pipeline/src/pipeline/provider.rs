//! Provider selection: pick by weight (or sticky per tenant), skip providers whose
//! breaker is open, invoke the provider's extension if it has one, and follow the
//! policy's fallbacks when it fails.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use beamline_model::wire::{ProviderOutput, Reply};
use beamline_model::{ErrorCode, ExtensionType};
use serde_json::{Map, Value};

use super::Pipeline;
use super::contract::{DecideError, ExecutedExtension, StepStatus};
use super::invoke::{ProviderCall, StepCall};
use super::state::RequestState;
use crate::balancer::SmoothWrr;
use crate::invoker::InvokeError;

/// The chosen provider, why, and its extension's answer when it has one.
pub(crate) struct Selection {
    pub provider_id: String,
    pub reason: String,
    pub output: Option<ProviderOutput>,
}

impl Pipeline {
    pub(crate) async fn select_provider(
        &self,
        state: &mut RequestState,
    ) -> Result<Selection, DecideError> {
        let policy = state.policy.clone();
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
            // Open breakers close again (a retry later can succeed); a policy without
            // a weighted provider stays so until someone edits it.
            let weighted = providers.iter().any(|p| p.weight > 0);
            return Err(DecideError::new(
                ErrorCode::DecisionFailed,
                if providers.is_empty() {
                    format!("policy '{}' has no providers", policy.policy_id)
                } else if weighted {
                    "no usable provider: every weighted provider's extension has an open circuit breaker"
                        .to_string()
                } else {
                    "no usable provider: every provider has weight 0".to_string()
                },
            )
            .detail(
                "cause",
                if weighted {
                    ErrorCode::ExtensionUnavailable.as_str()
                } else {
                    "no_providers"
                },
            ));
        }
        let (mut current, mut reason) = if policy.document.sticky {
            let total: u64 = usable.iter().map(|&i| u64::from(providers[i].weight)).sum();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            state.tenant_id().hash(&mut h);
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
            let candidates = usable
                .iter()
                .map(|&i| (providers[i].name.as_str(), providers[i].weight));
            // A dry run shows the pick without taking live traffic's turn.
            let k = if state.dry_run {
                wrr.peek(candidates)
            } else {
                wrr.pick(candidates)
            }
            .unwrap_or(0);
            (usable[k], "weighted".to_string())
        };

        let no_config = Map::new();
        let mut retries_left: HashMap<usize, u32> = HashMap::new();
        let mut hops = 0;
        loop {
            let provider = &providers[current];
            let chosen = |output| Selection {
                provider_id: provider.name.clone(),
                reason: reason.clone(),
                output,
            };
            let Some(ext) = provider.extension.as_deref() else {
                return Ok(chosen(None));
            };
            if state.dry_run {
                state
                    .executed
                    .push(ExecutedExtension::skipped(ExtensionType::Provider, ext));
                return Ok(chosen(None));
            }
            state.check_deadline("provider")?;
            // The policy's parameters, overridden key by key by the request's.
            let merged;
            let parameters = match state.context.get("parameters") {
                Some(Value::Object(own)) if !own.is_empty() => {
                    let mut m = provider.parameters.clone();
                    m.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
                    merged = m;
                    &merged
                }
                _ => &provider.parameters,
            };
            let call = StepCall {
                ext_type: ExtensionType::Provider,
                id: ext,
                config: &no_config,
                provider: Some(ProviderCall {
                    provider_id: &provider.name,
                    parameters,
                }),
            };
            let run = self.invoke(state, call).await;
            let failure = match run.outcome {
                Ok(Reply::Provider(out)) => {
                    state.executed.push(run.meta.entry(
                        ExtensionType::Provider,
                        ext,
                        StepStatus::Ok,
                        None,
                    ));
                    return Ok(chosen(Some(out)));
                }
                Ok(_) => InvokeError::InvalidReply("not a provider reply".into()),
                Err(e) => e,
            };
            state.executed.push(run.meta.entry(
                ExtensionType::Provider,
                ext,
                StepStatus::Error,
                Some(failure.to_string()),
            ));
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
                            trace_id = %state.trace_id(),
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
                            "provider {} (extension {ext}) failed and no fallback applies: {failure}",
                            provider.name
                        ),
                    )
                    .detail("provider_id", provider.name.clone())
                    .detail("extension_id", ext)
                    .detail("cause", failure.code().as_str())
                    .extension_error(&failure));
                }
            }
        }
    }
}
