//! NATS intake `beamline.router.v1.decide`: the original's JSON request/reply contract
//! (REFERENCE.md §3), served with a queue group so several routers share the load.
//!
//! Request: `{"version": "1", "request_id", "trace_id", "tenant_id", "task": {"type",
//! "payload" | "payload_ref"}, "policy_id", "constraints": {...}, "metadata": {...}}`;
//! `task.payload` is text or any JSON (an object stays an object end to end), and
//! `task.payload_ref` — a reference to content kept elsewhere — may stand in for it.
//! Reply: `{"ok": true, "decision": {...}, "context": {...}}` or
//! `{"ok": false, "error": {"code", "message", "details"}, "context": {...}}`, keys
//! without a value left out (no `null`s), as the original wrote them. A request
//! without a reply subject is answered on [`DEFAULT_REPLY_SUBJECT`] (configurable),
//! where the original published it, and counted.

use std::sync::Arc;

use beamline_model::ErrorCode;
use beamline_model::wire::{Message, Payload};
use beamline_pipeline::{DecideError, DecideRequest, Decision, Pipeline};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The subject the router listens on.
pub const DECIDE_SUBJECT: &str = "beamline.router.v1.decide";
/// The queue group routers share.
pub const QUEUE_GROUP: &str = "beamline-router";
/// Largest request body accepted on the intake.
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// Where a request without a reply subject is answered (the original's subject).
pub const DEFAULT_REPLY_SUBJECT: &str = "beamline.router.v1.decide.reply";

/// How the intake serves.
#[derive(Debug, Clone)]
pub struct IntakeOptions {
    /// Requests handled at once; more wait.
    pub max_in_flight: usize,
    /// Where requests without a reply subject are answered.
    pub default_reply_subject: String,
}

impl Default for IntakeOptions {
    fn default() -> Self {
        IntakeOptions {
            max_in_flight: 1024,
            default_reply_subject: DEFAULT_REPLY_SUBJECT.to_string(),
        }
    }
}

/// The request's ids as the reply's `context` carries them: present keys only.
fn reply_context(request_id: Option<&str>, trace_id: Option<&str>) -> Value {
    let mut c = Map::new();
    for (k, v) in [("request_id", request_id), ("trace_id", trace_id)] {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            c.insert(k.into(), Value::String(v.to_string()));
        }
    }
    Value::Object(c)
}

fn error_reply(
    code: ErrorCode,
    message: &str,
    details: Map<String, Value>,
    context: &Value,
) -> Value {
    let mut error = Map::new();
    error.insert("code".into(), Value::String(code.as_str().into()));
    error.insert("message".into(), Value::String(message.into()));
    if !details.is_empty() {
        error.insert("details".into(), Value::Object(details));
    }
    json!({"ok": false, "error": error, "context": context})
}

/// Parses the JSON contract into a pipeline request; the error names the field.
pub fn parse_request(body: &[u8]) -> Result<(DecideRequest, Value), (String, Value)> {
    let empty = || Value::Object(Map::new());
    let v: Value =
        serde_json::from_slice(body).map_err(|e| (format!("request is not JSON: {e}"), empty()))?;
    let Value::Object(obj) = v else {
        return Err(("request must be a JSON object".into(), empty()));
    };
    let get_str = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let context = reply_context(
        get_str("request_id").as_deref(),
        get_str("trace_id").as_deref(),
    );
    let fail = |m: String| (m, context.clone());
    if let Some(version) = obj.get("version")
        && version != &json!("1")
        && version != &json!(1)
    {
        return Err(fail(format!(
            "unsupported version {version}; expected \"1\""
        )));
    }
    let request_id = get_str("request_id")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail("request_id is required".into()))?;
    let tenant_id = get_str("tenant_id")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail("tenant_id is required".into()))?;
    let task = obj
        .get("task")
        .and_then(Value::as_object)
        .ok_or_else(|| fail("task is required (an object with type and payload)".into()))?;
    let task_type = task
        .get("type")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail("task.type is required".into()))?;
    let payload_ref = task.get("payload_ref").filter(|v| !v.is_null()).cloned();
    let payload = match task.get("payload").cloned().and_then(Payload::from_value) {
        Some(p) => p,
        None if payload_ref.is_some() => Payload::default(),
        None => {
            return Err(fail(
                "task.payload (or task.payload_ref) is required".into(),
            ));
        }
    };
    let mut ctx = Map::new();
    for key in ["constraints", "metadata"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => ctx.extend(m.iter().map(|(k, v)| (k.clone(), v.clone()))),
            Some(_) => return Err(fail(format!("{key} must be an object"))),
        }
    }
    let metadata = obj
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    // One trace id per request: the caller's, or a new one, in the reply's context
    // as everywhere else.
    let trace_id = get_str("trace_id")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(beamline_pipeline::new_trace_id);
    let context = reply_context(Some(&request_id), Some(&trace_id));
    Ok((
        DecideRequest {
            request_id: request_id.clone(),
            message: Message {
                message_id: request_id,
                tenant_id,
                trace_id,
                message_type: task_type.to_string(),
                payload,
                payload_ref,
                metadata,
            },
            policy_id: get_str("policy_id").unwrap_or_default(),
            context: ctx,
        },
        context,
    ))
}

/// The reply for a pipeline outcome.
pub fn reply(result: Result<Decision, DecideError>, context: &Value) -> Value {
    match result {
        Ok(d) => {
            let mut decision = json!({
                "provider_id": d.provider_id,
                "priority": d.priority,
                "expected_latency_ms": d.expected_latency_ms,
                "expected_cost": d.expected_cost,
                "reason": d.reason,
                "metadata": d.metadata,
                "executed_extensions": d.executed_extensions,
                "message": d.message,
            });
            if let Some(out) = d.provider_output {
                decision["provider_output"] = serde_json::to_value(out).unwrap_or_default();
            }
            json!({"ok": true, "decision": decision, "context": context})
        }
        Err(e) => {
            let mut details = e.details;
            if let Ok(steps) = serde_json::to_value(&e.executed_extensions) {
                details.insert("executed_extensions".into(), steps);
            }
            error_reply(e.code, &e.message, details, context)
        }
    }
}

/// Answers one intake message body.
pub async fn handle(pipeline: &Pipeline, body: &[u8]) -> Value {
    if body.len() > MAX_REQUEST_BYTES {
        return error_reply(
            ErrorCode::InvalidRequest,
            &format!(
                "request is {} bytes, the intake accepts {MAX_REQUEST_BYTES}",
                body.len()
            ),
            Map::new(),
            &Value::Object(Map::new()),
        );
    }
    match parse_request(body) {
        Err((message, context)) => {
            error_reply(ErrorCode::InvalidRequest, &message, Map::new(), &context)
        }
        Ok((request, context)) => reply(pipeline.decide(request).await, &context),
    }
}

/// Serves the intake until `shutdown`; then stops taking requests and lets the ones
/// in flight finish.
pub async fn serve(
    pipeline: Pipeline,
    client: async_nats::Client,
    options: IntakeOptions,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let sub = subscribe(&client).await?;
    serve_subscription(pipeline, client, sub, options, shutdown).await
}

/// Subscribes to the intake (queue group) and waits until the server has it, so a
/// router that announces itself is already reachable on the intake.
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, async_nats::Error> {
    let sub = client
        .queue_subscribe(DECIDE_SUBJECT.to_string(), QUEUE_GROUP.to_string())
        .await?;
    client.flush().await?;
    server_has_seen(client).await;
    Ok(sub)
}

/// The subject of the request [`server_has_seen`] sends (nobody answers it).
pub const READY_PROBE_PREFIX: &str = "beamline.ext.router-ready";

/// Waits (at most 2 s) until the server has processed everything this client sent
/// before. `flush` only writes to the socket: a subscription it "flushed" may not be
/// in force yet when another connection publishes. The server handles one
/// connection's commands in order, so the answer to a request sent now — "no
/// responders", since nobody listens on the probe subject — proves the earlier
/// subscriptions are. The probe is under `beamline.ext.>`, which the router may
/// publish to anyway (DEPLOYMENT.md); any outcome ends the wait, so a server that
/// refuses it only costs the 2 s.
pub async fn server_has_seen(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let id = inbox.rsplit('.').next().unwrap_or("probe");
    let request = async_nats::Request::new()
        .payload(bytes::Bytes::new())
        .timeout(Some(std::time::Duration::from_secs(2)));
    if let Err(e) = client
        .send_request(format!("{READY_PROBE_PREFIX}.{id}"), request)
        .await
        && e.kind() != async_nats::RequestErrorKind::NoResponders
    {
        tracing::debug!(error = %e, "NATS subscription round trip did not complete");
    }
}

/// Answers requests arriving on `sub` until `shutdown`, then drains.
pub async fn serve_subscription(
    pipeline: Pipeline,
    client: async_nats::Client,
    mut sub: async_nats::Subscriber,
    options: IntakeOptions,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let max_in_flight = options.max_in_flight.max(1);
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let default_reply: async_nats::Subject = options.default_reply_subject.into();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let reply_to = match msg.reply.clone() {
            Some(r) => r,
            None => {
                // The original published these answers to a fixed subject.
                pipeline.observer().decide_reply_defaulted();
                default_reply.clone()
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (pipeline, client) = (pipeline.clone(), client.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = handle(&pipeline, &msg.payload).await;
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = client.publish(reply_to, body.into()).await {
                tracing::warn!(error = %e, "decide reply could not be sent");
            }
        });
    }
    let _ = sub.unsubscribe().await;
    // Wait for in-flight requests: all permits back.
    let _ = permits.acquire_many(max_in_flight as u32).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_payloads_stay_objects_and_payload_ref_stands_in() {
        let (r, ctx) = parse_request(
            br#"{"version": "1", "request_id": "r", "tenant_id": "t",
                 "task": {"type": "chat", "payload": {"text": "hi", "n": [1]}}}"#,
        )
        .unwrap();
        assert_eq!(
            r.message.payload,
            Payload::Json(json!({"text": "hi", "n": [1]}))
        );
        assert_eq!(ctx["request_id"], "r");
        assert_eq!(ctx["trace_id"].as_str().unwrap().len(), 32);
        let (r, _) = parse_request(
            br#"{"request_id": "r", "tenant_id": "t", "trace_id": "abc",
                 "task": {"type": "chat", "payload_ref": "s3://bucket/key"}}"#,
        )
        .unwrap();
        assert_eq!(r.message.payload_ref, Some(json!("s3://bucket/key")));
        assert_eq!(r.message.payload, "");
        let (e, ctx) =
            parse_request(br#"{"request_id": "r", "tenant_id": "t", "task": {"type": "chat"}}"#)
                .unwrap_err();
        assert!(e.contains("task.payload (or task.payload_ref)"), "{e}");
        assert_eq!(
            ctx,
            json!({"request_id": "r"}),
            "absent keys are left out, not null"
        );
    }

    #[test]
    fn replies_leave_out_what_has_no_value() {
        let (_, ctx) = parse_request(br#"[1]"#).unwrap_err();
        assert_eq!(ctx, json!({}));
        let r = error_reply(ErrorCode::InvalidRequest, "bad", Map::new(), &ctx);
        assert_eq!(
            r,
            json!({"ok": false, "error": {"code": "invalid_request", "message": "bad"}, "context": {}})
        );
        assert!(!r.to_string().contains("null"));
    }
}
