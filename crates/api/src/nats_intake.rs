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
//! where the original published it, and counted. A W3C `traceparent` header (and
//! `tracestate`) continues the caller's trace: its trace id becomes the request's.

use std::borrow::Cow;
use std::sync::Arc;

use beamline_model::ErrorCode;
use beamline_model::wire::{Message, Payload};
use beamline_pipeline::trace::Incoming;
use beamline_pipeline::{DecideError, DecideRequest, Decision, Pipeline};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
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
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplyContext {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl ReplyContext {
    fn new(request_id: Option<&str>, trace_id: Option<&str>) -> ReplyContext {
        let own = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_string);
        ReplyContext {
            request_id: own(request_id),
            trace_id: own(trace_id),
        }
    }
}

/// `{"ok": false, "error": {…}, "context": {…}}`.
#[derive(Serialize)]
struct ErrorReply<'a> {
    ok: bool,
    error: ErrorBody<'a>,
    context: &'a ReplyContext,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Map::is_empty")]
    details: &'a Map<String, Value>,
}

/// `{"ok": true, "decision": {…}, "context": {…}}`, written straight from the
/// decision (no JSON tree is built on the way).
#[derive(Serialize)]
struct OkReply<'a> {
    ok: bool,
    decision: DecisionView<'a>,
    context: &'a ReplyContext,
}

#[derive(Serialize)]
struct DecisionView<'a> {
    provider_id: &'a str,
    priority: i32,
    expected_latency_ms: i64,
    expected_cost: f64,
    reason: &'a str,
    metadata: &'a std::collections::BTreeMap<String, String>,
    executed_extensions: &'a [beamline_pipeline::ExecutedExtension],
    message: &'a Message,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_output: Option<&'a beamline_pipeline::ProviderOutputView>,
}

fn error_reply(
    code: ErrorCode,
    message: &str,
    details: &Map<String, Value>,
    context: &ReplyContext,
) -> Vec<u8> {
    encode(&ErrorReply {
        ok: false,
        error: ErrorBody {
            code: code.as_str(),
            message,
            details,
        },
        context,
    })
}

fn encode(reply: &impl Serialize) -> Vec<u8> {
    // Serialising these types cannot fail (string keys, no non-finite floats that
    // serde_json refuses: it writes them as null).
    let mut buf = Vec::with_capacity(1024);
    match serde_json::to_writer(&mut buf, reply) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

/// The request as it arrives: every field kept as raw JSON text borrowed from the
/// body, so unknown fields cost a skip and known ones are read once, each into the
/// type it must have (with the intake's own error when it has another).
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    version: Option<&'a RawValue>,
    #[serde(borrow)]
    request_id: Option<&'a RawValue>,
    #[serde(borrow)]
    trace_id: Option<&'a RawValue>,
    #[serde(borrow)]
    tenant_id: Option<&'a RawValue>,
    #[serde(borrow)]
    task: Option<&'a RawValue>,
    #[serde(borrow)]
    policy_id: Option<&'a RawValue>,
    #[serde(borrow)]
    constraints: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawTask<'a> {
    #[serde(borrow, rename = "type")]
    task_type: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    payload_ref: Option<&'a RawValue>,
}

/// A field's string, when it is one (escapes decoded; borrowed when there are none).
fn raw_str(v: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let v = v?;
    let text = v.get();
    if !text.starts_with('"') {
        return None;
    }
    serde_json::from_str::<Cow<'_, str>>(text).ok()
}

/// A field as a JSON value; `None` for absent or null.
fn raw_value(v: Option<&RawValue>) -> Option<Value> {
    let v = v?;
    match serde_json::from_str::<Value>(v.get()) {
        Ok(Value::Null) | Err(_) => None,
        Ok(v) => Some(v),
    }
}

/// Parses the JSON contract into a pipeline request; the error names the field.
pub fn parse_request(body: &[u8]) -> Result<(DecideRequest, ReplyContext), (String, ReplyContext)> {
    // Even a request that cannot be read gets a trace id, for the logs and the caller.
    let empty = || ReplyContext::new(None, Some(&beamline_pipeline::new_trace_id()));
    let not_json = |e: serde_json::Error| (format!("request is not JSON: {e}"), empty());
    // A struct would also take an array (field by position): only an object is one.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(("request must be a JSON object".into(), empty())),
            Err(e) => Err(not_json(e)),
        };
    }
    let raw: RawRequest<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) if e.is_data() => return Err((format!("request cannot be read: {e}"), empty())),
        Err(e) => return Err(not_json(e)),
    };
    let request_id = raw_str(raw.request_id).filter(|s| !s.is_empty());
    // One trace id per request, refused ones included: the caller's, or a new one,
    // in the reply's context as everywhere else.
    let trace_id = match raw_str(raw.trace_id).filter(|s| !s.is_empty()) {
        Some(t) => t.into_owned(),
        None => beamline_pipeline::new_trace_id(),
    };
    let context = ReplyContext::new(request_id.as_deref(), Some(&trace_id));
    let fail = |m: String| (m, context.clone());
    if let Some(version) = raw.version {
        let v = version.get();
        if v != "\"1\"" && v != "1" {
            return Err(fail(format!("unsupported version {v}; expected \"1\"")));
        }
    }
    let request_id = request_id.ok_or_else(|| fail("request_id is required".into()))?;
    let tenant_id = raw_str(raw.tenant_id)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail("tenant_id is required".into()))?;
    let task: RawTask<'_> = raw
        .task
        .filter(|t| t.get().starts_with('{'))
        .and_then(|t| serde_json::from_str(t.get()).ok())
        .ok_or_else(|| fail("task is required (an object with type and payload)".into()))?;
    let task_type = raw_str(task.task_type)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail("task.type is required".into()))?;
    let payload_ref = raw_value(task.payload_ref);
    let payload = match task.payload.and_then(|p| {
        // Text, the common case, without a JSON tree.
        match raw_str(Some(p)) {
            Some(text) => Some(Payload::Text(text.into_owned())),
            None => raw_value(Some(p)).and_then(Payload::from_value),
        }
    }) {
        Some(p) => p,
        None if payload_ref.is_some() => Payload::default(),
        None => {
            return Err(fail(
                "task.payload (or task.payload_ref) is required".into(),
            ));
        }
    };
    let mut ctx = Map::new();
    let mut metadata = Map::new();
    for (key, field) in [("constraints", raw.constraints), ("metadata", raw.metadata)] {
        match raw_value(field) {
            None => {}
            Some(Value::Object(m)) => {
                if key == "metadata" {
                    ctx.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
                    metadata = m;
                } else {
                    ctx.extend(m);
                }
            }
            Some(_) => return Err(fail(format!("{key} must be an object"))),
        }
    }
    let context = ReplyContext::new(Some(&request_id), Some(&trace_id));
    let request_id = request_id.into_owned();
    Ok((
        DecideRequest {
            request_id: request_id.clone(),
            message: Message {
                message_id: request_id,
                tenant_id: tenant_id.into_owned(),
                trace_id,
                message_type: task_type.into_owned(),
                payload,
                payload_ref,
                metadata,
            },
            policy_id: raw_str(raw.policy_id)
                .map(Cow::into_owned)
                .unwrap_or_default(),
            context: ctx,
        },
        context,
    ))
}

/// The reply for a pipeline outcome, as the bytes sent back.
pub fn reply(result: Result<Decision, DecideError>, context: &ReplyContext) -> Vec<u8> {
    match result {
        Ok(d) => encode(&OkReply {
            ok: true,
            decision: DecisionView {
                provider_id: &d.provider_id,
                priority: d.priority,
                expected_latency_ms: d.expected_latency_ms,
                expected_cost: d.expected_cost,
                reason: &d.reason,
                metadata: &d.metadata,
                executed_extensions: &d.executed_extensions,
                message: &d.message,
                provider_output: d.provider_output.as_ref(),
            },
            context,
        }),
        Err(e) => {
            let mut details = e.details;
            if let Ok(steps) = serde_json::to_value(&e.executed_extensions) {
                details.insert("executed_extensions".into(), steps);
            }
            error_reply(e.code, &e.message, &details, context)
        }
    }
}

/// Answers one intake message body, as the bytes of the reply.
pub async fn handle(pipeline: &Pipeline, body: &[u8]) -> Vec<u8> {
    handle_traced(pipeline, body, Incoming::default()).await
}

/// [`handle`] for a message that came with the caller's trace context (its
/// `traceparent` header): the caller's trace id becomes the request's, in the reply's
/// `context` too.
pub async fn handle_traced(pipeline: &Pipeline, body: &[u8], incoming: Incoming) -> Vec<u8> {
    if body.len() > MAX_REQUEST_BYTES {
        return error_reply(
            ErrorCode::InvalidRequest,
            &format!(
                "request is {} bytes, the intake accepts {MAX_REQUEST_BYTES}",
                body.len()
            ),
            &Map::new(),
            &ReplyContext::default(),
        );
    }
    match parse_request(body) {
        Err((message, mut context)) => {
            adopt_trace_id(&incoming, &mut context);
            error_reply(ErrorCode::InvalidRequest, &message, &Map::new(), &context)
        }
        Ok((mut request, mut context)) => {
            if incoming.adopt(&mut request.message.trace_id) {
                adopt_trace_id(&incoming, &mut context);
            }
            reply(pipeline.decide_with(request, incoming).await, &context)
        }
    }
}

/// The reply context's `trace_id` from the caller's `traceparent`, when it sent one.
fn adopt_trace_id(incoming: &Incoming, context: &mut ReplyContext) {
    if let Some(p) = &incoming.parent {
        context.trace_id = Some(p.trace_id_hex());
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
            let incoming = Incoming::from_nats("nats", msg.headers.as_ref());
            let body = handle_traced(&pipeline, &msg.payload, incoming).await;
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
    use serde_json::json;

    fn ids(c: &ReplyContext) -> (Option<&str>, Option<&str>) {
        (c.request_id.as_deref(), c.trace_id.as_deref())
    }

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
        assert_eq!(ctx.request_id.as_deref(), Some("r"));
        assert_eq!(ctx.trace_id.as_deref().map(str::len), Some(32));
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
        assert_eq!(ctx.request_id.as_deref(), Some("r"));
        assert_eq!(
            ctx.trace_id.as_deref().map(str::len),
            Some(32),
            "a refused request gets its trace id too: {ctx:?}"
        );
        let (_, ctx) = parse_request(
            br#"{"request_id": "r", "trace_id": "mine", "tenant_id": "t", "task": {}}"#,
        )
        .unwrap_err();
        assert_eq!(ids(&ctx), (Some("r"), Some("mine")));
        let (_, ctx) = parse_request(br#"{"tenant_id": "t"}"#).unwrap_err();
        assert_eq!(ctx.request_id, None, "absent keys are left out, not null");
        assert_eq!(
            serde_json::to_value(&ctx)
                .unwrap()
                .as_object()
                .map(|c| c.len()),
            Some(1)
        );
    }

    #[test]
    fn every_field_is_read_as_before() {
        let (r, ctx) = parse_request(
            br#"{"version": 1, "request_id": "r\u0031", "trace_id": "t1", "tenant_id": "acme",
                 "policy_id": "strict", "unknown": [1, {"deep": true}],
                 "task": {"type": "chat", "payload": "caf\u00e9 \"quoted\""},
                 "constraints": {"deadline": 5, "dry_run": true},
                 "metadata": {"dry_run": false, "k": "v"}}"#,
        )
        .unwrap();
        assert_eq!(ids(&ctx), (Some("r1"), Some("t1")));
        assert_eq!(r.request_id, "r1");
        assert_eq!(r.message.message_id, "r1");
        assert_eq!(r.message.tenant_id, "acme");
        assert_eq!(r.message.message_type, "chat");
        assert_eq!(r.message.payload, "café \"quoted\"");
        assert_eq!(r.policy_id, "strict");
        // Constraints and metadata join the context, metadata last.
        assert_eq!(
            Value::Object(r.context),
            json!({"deadline": 5, "dry_run": false, "k": "v"})
        );
        assert_eq!(
            Value::Object(r.message.metadata),
            json!({"dry_run": false, "k": "v"})
        );
    }

    #[test]
    fn what_cannot_be_read_is_named() {
        let refused = |body: &[u8]| parse_request(body).unwrap_err().0;
        assert_eq!(refused(b"[1]"), "request must be a JSON object");
        assert_eq!(refused(b"  \"x\""), "request must be a JSON object");
        assert!(refused(b"{nope").starts_with("request is not JSON"));
        assert!(refused(b"").starts_with("request is not JSON"));
        let base = r#""request_id": "r", "tenant_id": "t", "task": {"type": "c", "payload": "x"}"#;
        let with = |extra: &str| format!("{{{base}, {extra}}}");
        assert_eq!(
            refused(with(r#""version": "2""#).as_bytes()),
            "unsupported version \"2\"; expected \"1\""
        );
        // null is as absent, as for every other optional field.
        parse_request(with(r#""version": null"#).as_bytes()).unwrap();
        assert_eq!(
            refused(with(r#""metadata": [1]"#).as_bytes()),
            "metadata must be an object"
        );
        assert_eq!(
            refused(with(r#""constraints": "x""#).as_bytes()),
            "constraints must be an object"
        );
        assert_eq!(
            refused(br#"{"request_id": 5, "tenant_id": "t"}"#),
            "request_id is required"
        );
        assert_eq!(
            refused(br#"{"request_id": "r", "tenant_id": ""}"#),
            "tenant_id is required"
        );
        assert_eq!(
            refused(br#"{"request_id": "r", "tenant_id": "t", "task": [1]}"#),
            "task is required (an object with type and payload)"
        );
        assert_eq!(
            refused(br#"{"request_id": "r", "tenant_id": "t", "task": {"payload": "x"}}"#),
            "task.type is required"
        );
        // Null metadata and constraints are as absent.
        parse_request(with(r#""metadata": null, "constraints": null"#).as_bytes()).unwrap();
    }

    #[test]
    fn a_provider_answer_without_output_has_no_null() {
        use beamline_pipeline::ProviderOutputView;
        let view = ProviderOutputView {
            provider_id: "p".into(),
            output: Value::Null,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
        };
        let v = serde_json::to_value(&view).unwrap();
        assert_eq!(v.get("output"), None, "{v}");
        assert_eq!(v["provider_id"], "p");
    }

    #[test]
    fn replies_leave_out_what_has_no_value() {
        let (_, ctx) = parse_request(br#"[1]"#).unwrap_err();
        assert_eq!(ctx.request_id, None);
        assert_eq!(ctx.trace_id.as_deref().map(str::len), Some(32), "{ctx:?}");
        let r = error_reply(
            ErrorCode::InvalidRequest,
            "bad",
            &Map::new(),
            &ReplyContext::default(),
        );
        let r: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(
            r,
            json!({"ok": false, "error": {"code": "invalid_request", "message": "bad"}, "context": {}})
        );
    }
}
