//! The pre and post stages, one code path: each step may rewrite the message it is
//! given and add context keys; `mode` says whether its failure fails the request.
//! Post works on the provider's answer when a provider extension gave one.

use beamline_model::policy::{Mode, Step};
use beamline_model::wire::{Message, Payload, ProviderOutput, Reply};
use beamline_model::{ErrorCode, ExtensionType};
use serde_json::{Map, Value};

use super::Pipeline;
use super::contract::{DecideError, ExecutedExtension, StepStatus};
use super::invoke::{StepCall, StepRun};
use super::state::RequestState;
use crate::invoker::InvokeError;

impl Pipeline {
    /// Runs `steps` (the policy's pre or post list) in order on `state.message`.
    pub(crate) async fn transform_stage(
        &self,
        state: &mut RequestState,
        ext_type: ExtensionType,
        steps: &[Step],
    ) -> Result<(), DecideError> {
        for step in steps {
            state.check_deadline(ext_type.as_str())?;
            self.transform_step(state, ext_type, step).await?;
        }
        Ok(())
    }

    /// The post stage on a provider's answer: the steps see the answer as the
    /// message's content (with `metadata.provider_id`), and what they leave is the
    /// answer the caller gets. The request's message stays as the pre steps left it.
    pub(crate) async fn post_on_answer(
        &self,
        state: &mut RequestState,
        steps: &[Step],
        answer: &mut ProviderOutput,
    ) -> Result<(), DecideError> {
        if steps.is_empty() {
            return Ok(());
        }
        let output = std::mem::take(&mut answer.output);
        let had_output = !output.is_null();
        let mut metadata = Map::new();
        metadata.insert(
            "provider_id".into(),
            Value::String(answer.provider_id.clone()),
        );
        let answer_message = Message {
            message_id: state.message.message_id.clone(),
            tenant_id: state.message.tenant_id.clone(),
            trace_id: state.message.trace_id.clone(),
            message_type: state.message.message_type.clone(),
            payload: Payload::from_value(output).unwrap_or_default(),
            payload_ref: None,
            metadata,
        };
        let request = std::mem::replace(&mut state.message, answer_message);
        let result = self
            .transform_stage(state, ExtensionType::Post, steps)
            .await;
        let answered = std::mem::replace(&mut state.message, request);
        // An answer without output stays without one unless a step wrote some.
        if had_output || answered.payload != "" {
            answer.output = answered.payload.into_value();
        }
        result
    }

    async fn transform_step(
        &self,
        state: &mut RequestState,
        ext_type: ExtensionType,
        step: &Step,
    ) -> Result<(), DecideError> {
        let id = step.id.as_str();
        if state.dry_run || !step.when.evaluate(&state.context) {
            state
                .executed
                .push(ExecutedExtension::skipped(ext_type, id));
            return Ok(());
        }
        let call = StepCall {
            ext_type,
            id,
            config: &step.config,
            provider: None,
        };
        let StepRun { outcome, meta } = self.invoke(state, call).await;
        // Applied in place: `apply` checks everything before it changes anything.
        let applied = match outcome {
            Ok(Reply::Transform {
                message: update,
                metadata,
            }) => match update {
                Some(u) => u
                    .apply(&mut state.message)
                    .map(|()| metadata)
                    .map_err(|e| InvokeError::InvalidReply(e.to_string())),
                None => Ok(metadata),
            },
            Ok(_) => Err(InvokeError::InvalidReply("unexpected reply shape".into())),
            Err(e) => Err(e),
        };
        match applied {
            Ok(metadata) => {
                state.merge_context(metadata);
                state
                    .executed
                    .push(meta.entry(ext_type, id, StepStatus::Ok, None));
                Ok(())
            }
            Err(e) => {
                state.executed.push(meta.entry(
                    ext_type,
                    id,
                    StepStatus::Error,
                    Some(e.to_string()),
                ));
                if step.mode == Mode::Optional {
                    return Ok(());
                }
                let stage_code = if ext_type == ExtensionType::Pre {
                    ErrorCode::PreProcessorFailed
                } else {
                    ErrorCode::PostProcessorFailed
                };
                Err(DecideError::of_step(&e, stage_code, ext_type, id))
            }
        }
    }
}
