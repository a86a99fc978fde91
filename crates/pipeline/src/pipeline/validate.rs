//! The validator stage: each validator's verdict (or its call failing, which counts
//! as a reject) is handled by the step's `on_fail`: block, warn or ignore.

use beamline_model::policy::{OnFail, Validator};
use beamline_model::wire::{Reply, Verdict};
use beamline_model::{ErrorCode, ExtensionType};
use serde_json::Value;

use super::Pipeline;
use super::contract::{DecideError, ExecutedExtension, StepStatus};
use super::invoke::StepCall;
use super::state::RequestState;
use crate::invoker::InvokeError;

impl Pipeline {
    /// Runs the policy's validators in order on `state.message`.
    pub(crate) async fn validator_stage(
        &self,
        state: &mut RequestState,
        steps: &[Validator],
    ) -> Result<(), DecideError> {
        for step in steps {
            state.check_deadline("validators")?;
            self.validator_step(state, step).await?;
        }
        Ok(())
    }

    async fn validator_step(
        &self,
        state: &mut RequestState,
        step: &Validator,
    ) -> Result<(), DecideError> {
        const TYPE: ExtensionType = ExtensionType::Validator;
        if state.dry_run || !step.when.evaluate(&state.context) {
            state
                .executed
                .push(ExecutedExtension::skipped(TYPE, &step.id));
            return Ok(());
        }
        let call = StepCall {
            ext_type: TYPE,
            id: &step.id,
            config: &step.config,
            provider: None,
        };
        let run = self.invoke(state, call).await;
        // A reject and a failed call both count as a rejection (REFERENCE.md §4);
        // `cause` tells them apart.
        let rejection: Option<(String, &str, Option<InvokeError>, Value)> = match run.outcome {
            Ok(Reply::Verdict(Verdict::Ok)) => None,
            Ok(Reply::Verdict(Verdict::Reject { reason, details })) => {
                Some((reason, "rejected", None, details))
            }
            Ok(_) => Some((
                "invalid_response_format".into(),
                "error",
                Some(InvokeError::InvalidReply("not a verdict".into())),
                Value::Null,
            )),
            Err(e) => {
                let cause = match e.fallback_status() {
                    "timeout" => "timeout",
                    "unavailable" => "unavailable",
                    _ => "error",
                };
                Some((e.to_string(), cause, Some(e), Value::Null))
            }
        };
        let Some((reason, cause, failure, details)) = rejection else {
            state
                .executed
                .push(run.meta.entry(TYPE, &step.id, StepStatus::Ok, None));
            return Ok(());
        };
        if !details.is_null() {
            // Not echoed by default (it can hold what was blocked), but findable.
            tracing::debug!(
                trace_id = %state.trace_id(),
                extension_id = %step.id,
                reason = %reason,
                details = %details,
                "validator rejected the request"
            );
        }
        let status = match step.on_fail {
            OnFail::Warn => StepStatus::Warn,
            OnFail::Ignore => StepStatus::Ignore,
            OnFail::Block if failure.is_none() => StepStatus::Reject,
            OnFail::Block => StepStatus::Error,
        };
        state
            .executed
            .push(run.meta.entry(TYPE, &step.id, status, Some(reason.clone())));
        if step.on_fail != OnFail::Block {
            return Ok(());
        }
        Err(match &failure {
            Some(
                e @ (InvokeError::NotFound | InvokeError::WrongType { .. } | InvokeError::Deadline),
            ) => DecideError::of_step(e, ErrorCode::ValidatorBlocked, TYPE, &step.id),
            _ => {
                let mut err = DecideError::new(
                    ErrorCode::ValidatorBlocked,
                    format!("validator {} blocked the request: {reason}", step.id),
                )
                .detail("extension_id", step.id.clone())
                .detail("reason", reason)
                .detail("cause", cause);
                if self.inner.config.expose_validator_details && !details.is_null() {
                    err = err.detail("details", details);
                }
                match &failure {
                    Some(e) => err.extension_error(e),
                    None => err,
                }
            }
        })
    }
}
