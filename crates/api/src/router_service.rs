//! gRPC `beamline.flow.v1.Router/Decide`. W3C `traceparent` / `tracestate` metadata
//! continue the caller's trace: its trace id becomes the request's `trace_id`.

use beamline_model::ErrorCode;
use beamline_model::wire::{Message, Payload};
use beamline_pipeline::trace::Incoming;
use beamline_pipeline::{DecideError, DecideRequest, Decision, ExecutedExtension, Pipeline};
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use crate::proto;
use crate::proto::router_server::Router;

/// How pipeline failures map to gRPC status codes (`[grpc] status_codes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusCodes {
    /// gRPC's guidance: UNAVAILABLE (and DEADLINE_EXCEEDED) only where a retry of the
    /// same call can succeed, so clients that retry those retry nothing else.
    #[default]
    Grpc,
    /// As the original router: INTERNAL for every pipeline failure, INVALID_ARGUMENT
    /// and NOT_FOUND aside, for callers that depend on it.
    Original,
}

/// The Router service over a pipeline.
#[derive(Clone)]
pub struct RouterService {
    pipeline: Pipeline,
    /// Set when `[admin] decide_requires_key`: Decide then needs a key of any role.
    auth: Option<std::sync::Arc<crate::auth::Authenticator>>,
    status_codes: StatusCodes,
}

impl RouterService {
    pub fn new(pipeline: Pipeline) -> RouterService {
        RouterService {
            pipeline,
            auth: None,
            status_codes: StatusCodes::default(),
        }
    }

    /// Requires a valid API key (any role) on Decide.
    pub fn with_auth(mut self, auth: std::sync::Arc<crate::auth::Authenticator>) -> RouterService {
        self.auth = Some(auth);
        self
    }

    /// Chooses how failures map to status codes.
    pub fn with_status_codes(mut self, status_codes: StatusCodes) -> RouterService {
        self.status_codes = status_codes;
        self
    }
}

/// The gRPC code of a pipeline error (docs/PIPELINE.md has the table).
pub fn grpc_code(e: &DecideError, mode: StatusCodes) -> tonic::Code {
    use tonic::Code;
    match (e.code, mode) {
        (ErrorCode::InvalidRequest, _) => Code::InvalidArgument,
        (ErrorCode::PolicyNotFound | ErrorCode::ExtensionNotFound, _) => Code::NotFound,
        (_, StatusCodes::Original) => Code::Internal,
        (ErrorCode::ValidatorBlocked, _) => Code::FailedPrecondition,
        (ErrorCode::ExtensionTimeout | ErrorCode::DeadlineExceeded, _) => Code::DeadlineExceeded,
        (ErrorCode::ExtensionUnavailable, _) => Code::Unavailable,
        // No provider answered: a retry helps when they were out of reach, not when
        // the policy has none or the one it called answered an error.
        (ErrorCode::DecisionFailed, _) => match e.details.get("cause").and_then(Value::as_str) {
            Some("extension_unavailable" | "extension_timeout" | "deadline_exceeded") => {
                Code::Unavailable
            }
            Some("no_providers" | "extension_not_found" | "invalid_request") => {
                Code::FailedPrecondition
            }
            _ => Code::Internal,
        },
        // An extension answered with an error or garbage: the same request fails the
        // same way again.
        (
            ErrorCode::PreProcessorFailed
            | ErrorCode::PostProcessorFailed
            | ErrorCode::ExtensionError
            | ErrorCode::InvalidResponseFormat
            | ErrorCode::Internal,
            _,
        ) => Code::Internal,
    }
}

/// The gRPC status for a pipeline error: the message starts with the error code, and
/// the code is also in the `x-beamline-error-code` trailer for programs, whatever
/// the status code.
pub fn status_of(e: &DecideError, mode: StatusCodes) -> Status {
    let mut status = Status::new(grpc_code(e, mode), format!("{}: {}", e.code, e.message));
    if let Ok(v) = e.code.as_str().parse() {
        status.metadata_mut().insert("x-beamline-error-code", v);
    }
    status
}

fn invalid(message: impl Into<String>) -> Status {
    let e = DecideError {
        code: ErrorCode::InvalidRequest,
        message: message.into(),
        details: Map::new(),
        executed_extensions: Vec::new(),
    };
    status_of(&e, StatusCodes::default())
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
            payload_ref: None,
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
pub fn status_with_steps(e: DecideError, mode: StatusCodes) -> Status {
    let mut status = status_of(&e, mode);
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
        let incoming = Incoming::from_lookup("grpc", |k| {
            request.metadata().get(k).and_then(|v| v.to_str().ok())
        });
        let mut req = decide_request(request.into_inner())?;
        incoming.adopt(&mut req.message.trace_id);
        let trace_id = req.message.trace_id.clone();
        match self.pipeline.decide_with(req, incoming).await {
            Ok(d) => Ok(Response::new(route_decision(d))),
            Err(e) => {
                let mut status = status_with_steps(e, self.status_codes);
                if let Ok(v) = trace_id.parse() {
                    status.metadata_mut().insert("x-beamline-trace-id", v);
                }
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn error(code: ErrorCode, cause: Option<&str>) -> DecideError {
        let mut details = Map::new();
        if let Some(c) = cause {
            details.insert("cause".into(), Value::String(c.into()));
        }
        DecideError {
            code,
            message: "m".into(),
            details,
            executed_extensions: Vec::new(),
        }
    }

    #[test]
    fn every_error_code_has_its_status_in_both_modes() {
        use ErrorCode as E;
        // (code, cause, gRPC guidance, original)
        let table = [
            (
                E::InvalidRequest,
                None,
                Code::InvalidArgument,
                Code::InvalidArgument,
            ),
            (E::PolicyNotFound, None, Code::NotFound, Code::NotFound),
            (E::ExtensionNotFound, None, Code::NotFound, Code::NotFound),
            (
                E::ValidatorBlocked,
                Some("rejected"),
                Code::FailedPrecondition,
                Code::Internal,
            ),
            (
                E::ExtensionTimeout,
                None,
                Code::DeadlineExceeded,
                Code::Internal,
            ),
            (
                E::DeadlineExceeded,
                None,
                Code::DeadlineExceeded,
                Code::Internal,
            ),
            (
                E::ExtensionUnavailable,
                None,
                Code::Unavailable,
                Code::Internal,
            ),
            (
                E::DecisionFailed,
                Some("extension_unavailable"),
                Code::Unavailable,
                Code::Internal,
            ),
            (
                E::DecisionFailed,
                Some("extension_timeout"),
                Code::Unavailable,
                Code::Internal,
            ),
            (
                E::DecisionFailed,
                Some("no_providers"),
                Code::FailedPrecondition,
                Code::Internal,
            ),
            (
                E::DecisionFailed,
                Some("extension_error"),
                Code::Internal,
                Code::Internal,
            ),
            (E::PreProcessorFailed, None, Code::Internal, Code::Internal),
            (E::PostProcessorFailed, None, Code::Internal, Code::Internal),
            (E::ExtensionError, None, Code::Internal, Code::Internal),
            (
                E::InvalidResponseFormat,
                None,
                Code::Internal,
                Code::Internal,
            ),
            (E::Internal, None, Code::Internal, Code::Internal),
        ];
        for code in ErrorCode::ALL {
            assert!(table.iter().any(|t| t.0 == code), "{code} is in the table");
        }
        for (code, cause, grpc, original) in table {
            let e = error(code, cause);
            for (mode, expected) in [(StatusCodes::Grpc, grpc), (StatusCodes::Original, original)] {
                let s = status_of(&e, mode);
                assert_eq!(s.code(), expected, "{code} ({cause:?}) in {mode:?}");
                assert!(
                    s.message().starts_with(&format!("{code}: ")),
                    "{}",
                    s.message()
                );
                assert_eq!(
                    s.metadata()
                        .get("x-beamline-error-code")
                        .unwrap()
                        .to_str()
                        .unwrap(),
                    code.as_str()
                );
            }
        }
        // Nothing a retry cannot fix is UNAVAILABLE or ABORTED (what retrying clients retry).
        for (code, cause, grpc, _) in table {
            if matches!(grpc, Code::Unavailable) {
                assert!(
                    code == E::ExtensionUnavailable || cause.is_some_and(|c| c != "no_providers"),
                    "{code}"
                );
            }
            assert_ne!(grpc, Code::Aborted);
        }
    }
}
