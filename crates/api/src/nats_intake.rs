//! NATS intake `beamline.router.v1.decide`: the original's JSON request/reply contract
//! (REFERENCE.md §3), served with a queue group so several routers share the load.
//!
//! Request: `{"version": "1", "request_id", "trace_id", "tenant_id", "task": {"type",
//! "payload"}, "policy_id", "constraints": {...}, "metadata": {...}}`. Reply:
//! `{"ok": true, "decision": {...}, "context": {...}}` or
//! `{"ok": false, "error": {"code", "message", "details"}, "context": {...}}`.

use std::sync::Arc;

use beamline_model::ErrorCode;
use beamline_model::wire::Message;
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

fn error_reply(code: ErrorCode, message: &str, details: Value, context: &Value) -> Value {
    json!({"ok": false, "error": {"code": code.as_str(), "message": message, "details": details}, "context": context})
}

/// Parses the JSON contract into a pipeline request; the error names the field.
pub fn parse_request(body: &[u8]) -> Result<(DecideRequest, Value), (String, Value)> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| (format!("request is not JSON: {e}"), Value::Null))?;
    let Value::Object(obj) = v else {
        return Err(("request must be a JSON object".into(), Value::Null));
    };
    let get_str = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let context = json!({"request_id": get_str("request_id"), "trace_id": get_str("trace_id")});
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
    let payload = match task.get("payload") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => return Err(fail("task.payload is required".into())),
        Some(other) => other.to_string(),
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
    let context = json!({"request_id": request_id, "trace_id": trace_id});
    Ok((
        DecideRequest {
            request_id: request_id.clone(),
            message: Message {
                message_id: request_id,
                tenant_id,
                trace_id,
                message_type: task_type.to_string(),
                payload: payload.into(),
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
        Ok(d) => json!({
            "ok": true,
            "decision": {
                "provider_id": d.provider_id,
                "priority": d.priority,
                "expected_latency_ms": d.expected_latency_ms,
                "expected_cost": d.expected_cost,
                "reason": d.reason,
                "metadata": d.metadata,
                "executed_extensions": d.executed_extensions,
                "message": d.message,
                "provider_output": d.provider_output,
            },
            "context": context,
        }),
        Err(e) => {
            let mut details = Value::Object(e.details.clone());
            details["executed_extensions"] =
                serde_json::to_value(&e.executed_extensions).unwrap_or(Value::Null);
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
            Value::Null,
            &Value::Null,
        );
    }
    match parse_request(body) {
        Err((message, context)) => {
            error_reply(ErrorCode::InvalidRequest, &message, Value::Null, &context)
        }
        Ok((request, context)) => reply(pipeline.decide(request).await, &context),
    }
}

/// Serves the intake until `shutdown`; then stops taking requests and lets the ones
/// in flight finish.
pub async fn serve(
    pipeline: Pipeline,
    client: async_nats::Client,
    max_in_flight: usize,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let sub = subscribe(&client).await?;
    serve_subscription(pipeline, client, sub, max_in_flight, shutdown).await
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
    Ok(sub)
}

/// Answers requests arriving on `sub` until `shutdown`, then drains.
pub async fn serve_subscription(
    pipeline: Pipeline,
    client: async_nats::Client,
    mut sub: async_nats::Subscriber,
    max_in_flight: usize,
    shutdown: CancellationToken,
) -> Result<(), async_nats::Error> {
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
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
    let _ = permits.acquire_many(max_in_flight.max(1) as u32).await;
    Ok(())
}
