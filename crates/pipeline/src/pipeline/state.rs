//! One request on its way through the pipeline ([`RequestState`]): admitted once
//! (ids, limits, policy, deadline), then read and changed by every step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use beamline_model::policy::Policy;
use beamline_model::wire::Message;
use beamline_model::{ErrorCode, Limits};
use beamline_registry::Snapshot;
use serde_json::{Map, Value};

use super::contract::{DecideError, DecideRequest, ExecutedExtension};

/// Keys of the context that belong to the router; extension replies cannot change them.
const RESERVED_CONTEXT_KEYS: &[&str] = &["tenant_id", "policy_id", "request_id", "trace_id"];

/// Everything one request's steps read and change.
pub(crate) struct RequestState {
    /// The registry as it was when the request arrived: every step of one request
    /// sees the same records, whatever reloads happen meanwhile.
    pub snapshot: Arc<Snapshot>,
    pub policy: Arc<Policy>,
    pub policy_id: String,
    /// The message the current step works on.
    pub message: Message,
    /// The pipeline context: the caller's keys, the router's ids, and what
    /// extensions added.
    pub context: Map<String, Value>,
    pub deadline: Instant,
    /// Every invocation is skipped; the provider is still chosen.
    pub dry_run: bool,
    /// `executed_extensions`, in execution order.
    pub executed: Vec<ExecutedExtension>,
    /// The caller's trace context, passed on to every extension request.
    pub trace: crate::trace::Incoming,
}

impl RequestState {
    /// Checks the request and sets up its state: ids, limits, the policy, the
    /// deadline, and the router's keys in the context.
    pub fn admit(
        snapshot: Arc<Snapshot>,
        request: DecideRequest,
        started: Instant,
        default_timeout_ms: u64,
        limits: &Limits,
    ) -> Result<RequestState, DecideError> {
        let DecideRequest {
            request_id,
            mut message,
            policy_id,
            mut context,
        } = request;
        let tenant_id = message.tenant_id.clone();
        check_request_ids(&request_id, &message, &policy_id)?;
        // One trace id for the whole request: the caller's, or a new one.
        if message.trace_id.is_empty() {
            message.trace_id = super::contract::new_trace_id();
        }
        let policy_id = if policy_id.is_empty() {
            "default".to_string()
        } else {
            policy_id
        };
        check_request_limits(limits, &message, &context)?;
        read_parameters(limits, &mut context)?;

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

        let deadline = deadline_of(&context, started, default_timeout_ms)?;
        let dry_run = truthy(context.get("dry_run"));
        context.insert("tenant_id".into(), Value::String(tenant_id));
        context.insert("policy_id".into(), Value::String(policy_id.clone()));
        context.insert("request_id".into(), Value::String(request_id));
        context.insert("trace_id".into(), Value::String(message.trace_id.clone()));
        if !message.message_type.is_empty() {
            context
                .entry("message_type")
                .or_insert_with(|| Value::String(message.message_type.clone()));
        }
        Ok(RequestState {
            snapshot,
            policy,
            policy_id,
            message,
            context,
            deadline,
            dry_run,
            executed: Vec::new(),
            trace: Default::default(),
        })
    }

    pub fn tenant_id(&self) -> &str {
        &self.message.tenant_id
    }

    pub fn trace_id(&self) -> &str {
        &self.message.trace_id
    }

    /// Fails the request when its deadline passed before `stage` starts.
    pub fn check_deadline(&self, stage: &str) -> Result<(), DecideError> {
        if Instant::now() >= self.deadline {
            return Err(DecideError::new(
                ErrorCode::DeadlineExceeded,
                format!("deadline passed before the {stage} stage"),
            )
            .detail("stage", stage.to_string()));
        }
        Ok(())
    }

    /// Merges an extension's context keys, leaving the router's own untouched.
    pub fn merge_context(&mut self, metadata: Map<String, Value>) {
        for (k, v) in metadata {
            if !RESERVED_CONTEXT_KEYS.contains(&k.as_str()) {
                self.context.insert(k, v);
            }
        }
    }
}

fn check_request_limits(
    l: &Limits,
    message: &Message,
    context: &Map<String, Value>,
) -> Result<(), DecideError> {
    let payload_len = message.payload.byte_len().saturating_add(
        message
            .payload_ref
            .as_ref()
            .map_or(0, beamline_model::limits::json_len),
    );
    if payload_len > l.max_payload_bytes {
        return Err(DecideError::new(
            ErrorCode::InvalidRequest,
            format!(
                "payload_too_large: payload is {payload_len} bytes, the limit is {} (limits.max_payload_bytes)",
                l.max_payload_bytes
            ),
        )
        .detail("limit", "max_payload_bytes"));
    }
    let json_parts = [
        ("message.payload", message.payload.as_json()),
        ("message.payload_ref", message.payload_ref.as_ref()),
    ];
    for (what, value) in json_parts {
        if let Some(v) = value {
            l.check_json_shape(v).map_err(|e| {
                DecideError::new(ErrorCode::InvalidRequest, format!("{what}: {}", e.reason))
                    .detail("limit", "json_shape")
            })?;
        }
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

/// The request's provider `parameters` (context key): an object, or — since gRPC's
/// context holds strings — an object written as JSON text, read into the context
/// as an object.
fn read_parameters(limits: &Limits, context: &mut Map<String, Value>) -> Result<(), DecideError> {
    let refuse = |found: &str| {
        DecideError::new(
            ErrorCode::InvalidRequest,
            format!(
                "context.parameters must be an object (or an object written as JSON text), found {found}"
            ),
        )
        .detail("field", "context.parameters")
    };
    let parsed = match context.get("parameters") {
        None | Some(Value::Object(_)) => return Ok(()),
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(other) => return Err(refuse(beamline_model::limits::json_kind(&other))),
            Err(_) => return Err(refuse("text that is not JSON")),
        },
        Some(other) => return Err(refuse(beamline_model::limits::json_kind(other))),
    };
    limits.check_map_shape(&parsed).map_err(|e| {
        DecideError::new(
            ErrorCode::InvalidRequest,
            format!("context.parameters: {}", e.reason),
        )
        .detail("limit", "json_shape")
    })?;
    context.insert("parameters".into(), Value::Object(parsed));
    Ok(())
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
