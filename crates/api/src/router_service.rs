//! gRPC `beamline.flow.v1.Router/Decide`.

use beamline_model::ErrorCode;
use beamline_model::wire::{Message, Payload};
use beamline_pipeline::{DecideError, DecideRequest, Decision, ExecutedExtension, Pipeline};
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use crate::proto;
use crate::proto::router_server::Router;

/// The Router service over a pipeline.
#[derive(Clone)]
pub struct RouterService {
    pipeline: Pipeline,
    /// Set when `[admin] decide_requires_key`: Decide then needs a key of any role.
    auth: Option<std::sync::Arc<crate::auth::Authenticator>>,
}

impl RouterService {
    pub fn new(pipeline: Pipeline) -> RouterService {
        RouterService {
            pipeline,
            auth: None,
        }
    }

    /// Requires a valid API key (any role) on Decide.
    pub fn with_auth(mut self, auth: std::sync::Arc<crate::auth::Authenticator>) -> RouterService {
        self.auth = Some(auth);
        self
    }
}

/// The gRPC status for a pipeline error: the message starts with the error code, and
/// the code is also in the `x-beamline-error-code` trailer for programs.
pub fn status_of(e: &DecideError) -> Status {
    let code = match e.code {
        ErrorCode::InvalidRequest => tonic::Code::InvalidArgument,
        ErrorCode::PolicyNotFound | ErrorCode::ExtensionNotFound => tonic::Code::NotFound,
        ErrorCode::ValidatorBlocked => tonic::Code::FailedPrecondition,
        ErrorCode::ExtensionTimeout | ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorCode::ExtensionUnavailable | ErrorCode::DecisionFailed => tonic::Code::Unavailable,
        ErrorCode::PreProcessorFailed
        | ErrorCode::PostProcessorFailed
        | ErrorCode::ExtensionError
        | ErrorCode::InvalidResponseFormat => tonic::Code::Aborted,
        ErrorCode::Internal => tonic::Code::Internal,
    };
    let mut status = Status::new(code, format!("{}: {}", e.code, e.message));
    if let Ok(v) = e.code.as_str().parse() {
        status.metadata_mut().insert("x-beamline-error-code", v);
    }
    status
}

fn invalid(message: impl Into<String>) -> Status {
    status_of(&DecideError {
        code: ErrorCode::InvalidRequest,
        message: message.into(),
        details: Map::new(),
        executed_extensions: Vec::new(),
    })
}

/// Converts the wire request; the payload must be UTF-8 text.
pub fn decide_request(req: proto::RouteRequest) -> Result<DecideRequest, Status> {
    let m = req.message.ok_or_else(|| invalid("message is required"))?;
    let payload = String::from_utf8(m.payload).map_err(|e| {
        invalid(format!(
            "message.payload must be UTF-8 text (invalid byte at {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let context: Map<String, Value> = req
        .context
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let request_id = context
        .get("request_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| m.message_id.clone());
    // One trace id per request: the caller's, or a new one (extensions, logs and
    // the reply all carry it).
    let trace_id = if m.trace_id.is_empty() {
        beamline_pipeline::new_trace_id()
    } else {
        m.trace_id
    };
    Ok(DecideRequest {
        request_id,
        message: Message {
            message_id: m.message_id,
            tenant_id: m.tenant_id,
            trace_id,
            message_type: m.message_type,
            payload: payload.into(),
            metadata: m
                .metadata
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        },
        policy_id: req.policy_id,
        context,
    })
}

fn string_map(map: &Map<String, Value>) -> std::collections::HashMap<String, String> {
    map.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            )
        })
        .collect()
}

/// Binary trailer of a failed Decide: the steps that ran before the failure, as an
/// encoded `RouteDecision` holding only `executed_extensions` (`decide --explain`
/// shows them; other clients may ignore it).
pub const EXECUTED_TRAILER: &str = "x-beamline-executed-bin";

fn executed_to_wire(steps: Vec<ExecutedExtension>) -> Vec<proto::ExecutedExtension> {
    steps
        .into_iter()
        .map(|e| proto::ExecutedExtension {
            r#type: e.ext_type.to_string(),
            id: e.id,
            status: e.status.as_str().to_string(),
            latency_ms: e.latency_ms,
            version: e.version.unwrap_or_default(),
            instance: e.instance.unwrap_or_default(),
            error: e.error.unwrap_or_default(),
        })
        .collect()
}

/// [`status_of`] plus the [`EXECUTED_TRAILER`] with the steps that ran.
pub fn status_with_steps(e: DecideError) -> Status {
    let mut status = status_of(&e);
    if !e.executed_extensions.is_empty() {
        let steps = proto::RouteDecision {
            executed_extensions: executed_to_wire(e.executed_extensions),
            ..Default::default()
        };
        status.metadata_mut().insert_bin(
            EXECUTED_TRAILER,
            tonic::metadata::MetadataValue::from_bytes(&prost::Message::encode_to_vec(&steps)),
        );
    }
    status
}

/// The steps a failed Decide ran, from its [`EXECUTED_TRAILER`] (empty without one).
pub fn executed_of(status: &Status) -> Vec<proto::ExecutedExtension> {
    status
        .metadata()
        .get_bin(EXECUTED_TRAILER)
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| <proto::RouteDecision as prost::Message>::decode(b).ok())
        .map(|d| d.executed_extensions)
        .unwrap_or_default()
}

/// Converts a decision to the wire.
pub fn route_decision(d: Decision) -> proto::RouteDecision {
    proto::RouteDecision {
        provider_id: d.provider_id,
        reason: d.reason,
        priority: d.priority,
        expected_latency_ms: d.expected_latency_ms,
        expected_cost: d.expected_cost,
        metadata: d.metadata.into_iter().collect(),
        final_message: Some(proto::Message {
            metadata: string_map(&d.message.metadata),
            message_id: d.message.message_id,
            tenant_id: d.message.tenant_id,
            trace_id: d.message.trace_id,
            message_type: d.message.message_type,
            payload: match d.message.payload {
                Payload::Text(text) => text.into_bytes(),
                Payload::Json(value) => value.to_string().into_bytes(),
            },
            timestamp_ms: chrono_now_ms(),
        }),
        executed_extensions: executed_to_wire(d.executed_extensions),
        provider_output: d.provider_output.map(|p| proto::ProviderOutput {
            provider_id: p.provider_id,
            output_json: p.output.to_string(),
            prompt_tokens: p.prompt_tokens,
            completion_tokens: p.completion_tokens,
            total_tokens: p.total_tokens,
        }),
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl Router for RouterService {
    async fn decide(
        &self,
        request: Request<proto::RouteRequest>,
    ) -> Result<Response<proto::RouteDecision>, Status> {
        if let Some(auth) = &self.auth {
            auth.authorize(request.metadata(), crate::auth::Role::Viewer, "decide")?;
        }
        let req = decide_request(request.into_inner())?;
        let trace_id = req.message.trace_id.clone();
        match self.pipeline.decide(req).await {
            Ok(d) => Ok(Response::new(route_decision(d))),
            Err(e) => {
                let mut status = status_with_steps(e);
                if let Ok(v) = trace_id.parse() {
                    status.metadata_mut().insert("x-beamline-trace-id", v);
                }
                Err(status)
            }
        }
    }
}
