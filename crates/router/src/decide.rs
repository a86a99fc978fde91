//! `beamline-router decide`: one request through a running router's pipeline
//! (gRPC `Router/Decide`), printed as a decision — and, with `--explain`, every step
//! that ran. A request the pipeline refuses is an answer, not a crash: it exits with
//! the code of its error class ([`Refused::exit_code`]), and `--output json` prints it
//! as `{"error": {"code", "message"}, "executed_extensions": […]}`.

use std::io::{IsTerminal, Read};

use anyhow::Context;
use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_model::ErrorCode;
use serde_json::{Value, json};

use crate::cli::{DecideArgs, Output};
use crate::ops;

/// A Decide the pipeline answered with an error code.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

impl Refused {
    /// The exit code of the error's class (see `decide --help`).
    pub fn exit_code(&self) -> u8 {
        match self.code {
            ErrorCode::InvalidRequest => 2,
            ErrorCode::PolicyNotFound | ErrorCode::ExtensionNotFound => 4,
            ErrorCode::ValidatorBlocked => 7,
            ErrorCode::ExtensionTimeout
            | ErrorCode::ExtensionUnavailable
            | ErrorCode::ExtensionError
            | ErrorCode::InvalidResponseFormat
            | ErrorCode::PreProcessorFailed
            | ErrorCode::PostProcessorFailed
            | ErrorCode::DeadlineExceeded
            | ErrorCode::DecisionFailed => 8,
            ErrorCode::Internal => 1,
        }
    }

    /// The pipeline's error code of a Decide status: from the `x-beamline-error-code`
    /// trailer, or the message's `code: ` prefix. `None` for a status that is not a
    /// pipeline answer (no key, router stopping, …).
    fn of(status: &tonic::Status) -> Option<Refused> {
        let from_trailer = status
            .metadata()
            .get("x-beamline-error-code")
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::parse);
        let (prefix, rest) = status
            .message()
            .split_once(": ")
            .unwrap_or((status.message(), ""));
        let from_message = ErrorCode::parse(prefix);
        let code = from_trailer.or(from_message)?;
        let message = if from_message == Some(code) {
            rest.to_string()
        } else {
            status.message().to_string()
        };
        Some(Refused { code, message })
    }
}

/// The request text: --payload, --file (or "-"), or standard input.
fn request_text(args: &DecideArgs) -> anyhow::Result<String> {
    if let Some(text) = &args.payload {
        return Ok(text.clone());
    }
    let from_stdin = || -> anyhow::Result<String> {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            anyhow::bail!(usage(
                "no request text: give --payload TEXT, --file FILE, or pipe it on standard input"
            ));
        }
        let mut text = String::new();
        stdin
            .lock()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        Ok(text)
    };
    match &args.file {
        Some(path) if path.as_os_str() == "-" => from_stdin(),
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read --file {}: {e}", path.display()))),
        None => from_stdin(),
    }
}

fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(tonic::Status::invalid_argument(message.into()))
}

fn message_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("cli-{nanos:x}")
}

pub async fn run(args: DecideArgs) -> anyhow::Result<()> {
    let payload = request_text(&args)?;
    let mut context: std::collections::HashMap<String, String> =
        args.context.iter().cloned().collect();
    context
        .entry("tenant_id".into())
        .or_insert_with(|| args.tenant.clone());
    if args.dry_run {
        context.insert("dry_run".into(), "true".into());
    }
    let request = proto::RouteRequest {
        message: Some(proto::Message {
            message_id: message_id(),
            tenant_id: args.tenant.clone(),
            trace_id: String::new(),
            message_type: args.message_type.clone(),
            payload: payload.into_bytes(),
            metadata: Default::default(),
            timestamp_ms: 0,
        }),
        policy_id: args.policy.clone(),
        context,
    };
    let connection = ops::Connection::open(&args.client).await?;
    let mut client = RouterClient::new(connection.channel.clone());
    let output = args.client.output;
    match client.decide(connection.request(request)).await {
        Ok(reply) => {
            let decision = decision_json(reply.into_inner());
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&decision)?),
                Output::Table => print!("{}", render_decision(&decision, args.explain)),
            }
            Ok(())
        }
        Err(status) => {
            let Some(refused) = Refused::of(&status) else {
                return Err(status.into());
            };
            let steps: Vec<Value> = beamline_api::router_service::executed_of(&status)
                .iter()
                .map(step_json)
                .collect();
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "error": {"code": refused.code.as_str(), "message": refused.message},
                        "executed_extensions": steps,
                    }))?
                ),
                Output::Table if args.explain => {
                    print!("{}", render_steps(&steps));
                }
                Output::Table => {}
            }
            Err(refused.into())
        }
    }
}

fn step_json(e: &proto::ExecutedExtension) -> Value {
    let opt = |s: &str| {
        if s.is_empty() {
            Value::Null
        } else {
            Value::String(s.to_string())
        }
    };
    json!({
        "type": e.r#type,
        "id": e.id,
        "version": opt(&e.version),
        "instance": opt(&e.instance),
        "status": e.status,
        "latency_ms": e.latency_ms,
        "error": opt(&e.error),
    })
}

/// The decision with snake_case names; the final message's payload as text and the
/// provider's output as JSON.
fn decision_json(d: proto::RouteDecision) -> Value {
    let mut metadata: Vec<(String, String)> = d.metadata.into_iter().collect();
    metadata.sort();
    let final_message = d.final_message.map(|m| {
        let mut meta: Vec<(String, String)> = m.metadata.into_iter().collect();
        meta.sort();
        json!({
            "message_id": m.message_id,
            "tenant_id": m.tenant_id,
            "trace_id": m.trace_id,
            "message_type": m.message_type,
            "payload": String::from_utf8_lossy(&m.payload),
            "metadata": meta.into_iter().map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<_, _>>(),
        })
    });
    let provider_output = d.provider_output.map(|p| {
        json!({
            "provider_id": p.provider_id,
            "output": serde_json::from_str::<Value>(&p.output_json).unwrap_or(Value::String(p.output_json)),
            "prompt_tokens": p.prompt_tokens,
            "completion_tokens": p.completion_tokens,
        })
    });
    json!({
        "provider_id": d.provider_id,
        "reason": d.reason,
        "priority": d.priority,
        "expected_latency_ms": d.expected_latency_ms,
        "expected_cost": d.expected_cost,
        "metadata": metadata.into_iter().map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<_, _>>(),
        "final_message": final_message,
        "provider_output": provider_output,
        "executed_extensions": d.executed_extensions.iter().map(step_json).collect::<Vec<_>>(),
    })
}

const STEP_COLUMNS: &[&str] = &[
    "type",
    "id",
    "version",
    "instance",
    "status",
    "latency_ms",
    "error",
];

fn render_steps(steps: &[Value]) -> String {
    let mut cols: Vec<&'static str> = STEP_COLUMNS.to_vec();
    if steps.iter().all(|s| s["error"].is_null()) {
        cols.retain(|c| *c != "error");
    }
    ops::render_columns(&Value::Array(steps.to_vec()), &cols)
}

fn render_decision(d: &Value, explain: bool) -> String {
    let mut out = String::new();
    if explain {
        let steps = d["executed_extensions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        out.push_str(&render_steps(&steps));
        out.push('\n');
    }
    // The decision first, then the message and answer, then the metadata.
    let mut fields: Vec<(String, Value)> = vec![
        ("provider_id".into(), d["provider_id"].clone()),
        ("reason".into(), d["reason"].clone()),
        ("priority".into(), d["priority"].clone()),
        ("message".into(), d["final_message"]["payload"].clone()),
    ];
    if !d["provider_output"].is_null() {
        fields.push(("output".into(), d["provider_output"]["output"].clone()));
        fields.push((
            "tokens".into(),
            Value::String(format!(
                "{} prompt, {} completion",
                d["provider_output"]["prompt_tokens"], d["provider_output"]["completion_tokens"]
            )),
        ));
    }
    if let Some(meta) = d["metadata"].as_object() {
        fields.extend(meta.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in fields {
        out.push_str(&format!("{k:<width$}  {}\n", ops::cell(&v)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_request_is_read_from_the_trailer_or_the_message() {
        let mut s = tonic::Status::failed_precondition(
            "validator_blocked: validator pii_guard blocked the request",
        );
        let r = Refused::of(&s).unwrap();
        assert_eq!(r.code, ErrorCode::ValidatorBlocked);
        assert_eq!(r.message, "validator pii_guard blocked the request");
        assert_eq!(r.exit_code(), 7);
        s.metadata_mut().insert(
            "x-beamline-error-code",
            "extension_timeout".parse().unwrap(),
        );
        assert_eq!(Refused::of(&s).unwrap().code, ErrorCode::ExtensionTimeout);
        assert!(Refused::of(&tonic::Status::unauthenticated("missing API key")).is_none());
    }

    #[test]
    fn explain_prints_the_steps_then_the_decision() {
        let d = decision_json(proto::RouteDecision {
            provider_id: "p".into(),
            reason: "weighted".into(),
            final_message: Some(proto::Message {
                payload: b"Hello world".to_vec(),
                ..Default::default()
            }),
            executed_extensions: vec![proto::ExecutedExtension {
                r#type: "pre".into(),
                id: "normalize_text".into(),
                status: "ok".into(),
                latency_ms: 0.5,
                version: "v1".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let text = render_decision(&d, true);
        let steps_at = text.find("normalize_text").unwrap();
        let decision_at = text.find("provider_id").unwrap();
        assert!(steps_at < decision_at, "{text}");
        assert!(text.contains("TYPE  ID"), "{text}");
        assert!(text.contains("message      Hello world"), "{text}");
        assert!(!render_decision(&d, false).contains("normalize_text"));
    }
}
