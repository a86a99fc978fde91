//! What a caller of Decide hands in and gets back: the request, the decision, the
//! error, and the `executed_extensions` entries both of them carry.

use std::collections::BTreeMap;

use beamline_model::wire::{Message, ProviderOutput};
use beamline_model::{ErrorCode, ExtensionType};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::invoker::InvokeError;

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
    /// A validator said no and its `on_fail` is `block`.
    Reject,
    Error,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Ok => "ok",
            StepStatus::Warn => "warn",
            StepStatus::Ignore => "ignore",
            StepStatus::Skipped => "skipped",
            StepStatus::Reject => "reject",
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

impl ExecutedExtension {
    /// A step that sent nothing (`when` false, dry run).
    pub(crate) fn skipped(ext_type: ExtensionType, id: &str) -> ExecutedExtension {
        ExecutedExtension {
            ext_type,
            id: id.to_string(),
            status: StepStatus::Skipped,
            latency_ms: 0.0,
            version: None,
            instance: None,
            error: None,
        }
    }
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
    /// Left out when the provider gave none (no `null`s on the wire).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub output: Value,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl From<ProviderOutput> for ProviderOutputView {
    fn from(p: ProviderOutput) -> Self {
        ProviderOutputView {
            provider_id: p.provider_id,
            output: p.output,
            prompt_tokens: p.usage.prompt_tokens,
            completion_tokens: p.usage.completion_tokens,
            total_tokens: p.usage.total_tokens,
        }
    }
}

/// A fresh trace id (32 lowercase hex digits, the W3C trace-id form) for a request
/// whose caller sent none.
pub fn new_trace_id() -> String {
    use std::fmt::Write;
    let n: u128 = rand::random();
    let mut s = String::with_capacity(32);
    let _ = write!(s, "{n:032x}");
    s
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
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> DecideError {
        DecideError {
            code,
            message: message.into(),
            details: Map::new(),
            executed_extensions: Vec::new(),
        }
    }

    pub(crate) fn detail(mut self, key: &str, value: impl Into<Value>) -> DecideError {
        self.details.insert(key.to_string(), value.into());
        self
    }

    /// When the extension answered with an error of its own (`{"error": …}`, a
    /// provider's `status: error`, the NATS micro headers), its code and message go
    /// to the caller as `details.extension_error`.
    pub(crate) fn extension_error(self, e: &InvokeError) -> DecideError {
        match e {
            InvokeError::Extension { code, message } => self.detail(
                "extension_error",
                serde_json::json!({"code": code, "message": message}),
            ),
            _ => self,
        }
    }

    /// A step's failure as the request's error: the call's own code where it says
    /// more than the stage's (`stage_code`) would.
    pub(crate) fn of_step(
        e: &InvokeError,
        stage_code: ErrorCode,
        ext_type: ExtensionType,
        id: &str,
    ) -> DecideError {
        let code = match e.code() {
            // The call failed in a way only this stage can name.
            ErrorCode::ExtensionError => stage_code,
            code => code,
        };
        let what = match e {
            InvokeError::NotFound => format!("extension '{id}' not found"),
            other => other.to_string(),
        };
        DecideError::new(code, format!("{ext_type} step {id} failed: {what}"))
            .detail("extension_id", id.to_string())
            .detail("stage", ext_type.as_str())
            .detail("cause", e.code().as_str())
            .extension_error(e)
    }
}
