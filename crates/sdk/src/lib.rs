//! Write beamline-router extensions in Rust.
//!
//! An extension is a NATS service: it receives an [`ExtensionRequest`] on its subject
//! and answers with a [`Response`]. Implement [`Handler`], then [`serve`] it:
//!
//! ```no_run
//! use beamline_sdk::{Handler, Response, ExtensionError, ExtensionRequest, ServeOptions};
//!
//! struct Shout;
//!
//! impl Handler for Shout {
//!     async fn handle(&self, request: ExtensionRequest) -> Result<Response, ExtensionError> {
//!         let mut message = request.payload;
//!         // Text is shouted; a JSON payload passes through unchanged.
//!         if let Some(text) = message.payload.as_text() {
//!             message.payload = text.to_uppercase().into();
//!         }
//!         Ok(Response::transform(message))
//!     }
//! }
//!
//! # async fn run() -> Result<(), async_nats::Error> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! beamline_sdk::serve(client, "beamline.ext.pre.shout.v1", Shout, ServeOptions::default()).await?;
//! # Ok(()) }
//! ```
//!
//! Tracing: when a request carries a W3C `traceparent` header (the router sends one
//! with every request while it traces, and passes a caller's on otherwise), the
//! handler runs in a span `handle <subject>` (target `beamline_sdk`) whose
//! OpenTelemetry parent is the router's call: install a `tracing-opentelemetry` layer
//! in the extension's subscriber and its spans join the request's trace. Requests
//! without the header make no span.
//!
//! Layout: this file (handler, responses, serving); [`reference`] holds the reference
//! extensions (normalize_text, pii_guard, mask_pii, test_provider, echo). The wire
//! format itself is `beamline_model::wire`, shared with the router, and documented for
//! other languages in `docs/EXTENSIONS.md`.

pub mod reference;
mod trace;

use std::future::Future;
use std::sync::Arc;

use async_nats::HeaderMap;
pub use beamline_model::wire::{ExtensionRequest, Message, Payload, Usage};
use beamline_model::wire::{HEADER_SERVICE_ERROR, HEADER_SERVICE_ERROR_CODE};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

/// What an extension answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// pre / post: the (possibly rewritten) message and context keys to merge.
    Transform {
        message: Option<Message>,
        metadata: Map<String, Value>,
    },
    /// validator: let the request through.
    Ok,
    /// validator: block (or warn, per the policy's `on_fail`).
    Reject { reason: String, details: Value },
    /// provider: the answer.
    Provider {
        provider_id: String,
        output: Value,
        usage: Usage,
        metadata: Map<String, Value>,
    },
}

impl Response {
    /// A pre/post reply replacing the message.
    pub fn transform(message: Message) -> Response {
        Response::Transform {
            message: Some(message),
            metadata: Map::new(),
        }
    }

    /// A pre/post reply that changes nothing.
    pub fn unchanged() -> Response {
        Response::Transform {
            message: None,
            metadata: Map::new(),
        }
    }

    pub fn reject(reason: impl Into<String>, details: Value) -> Response {
        Response::Reject {
            reason: reason.into(),
            details,
        }
    }

    /// The JSON body of the reply.
    pub fn to_json(&self) -> Value {
        match self {
            Response::Transform { message, metadata } => {
                let mut m = Map::new();
                if let Some(msg) = message {
                    m.insert(
                        "payload".into(),
                        serde_json::to_value(msg).unwrap_or(Value::Null),
                    );
                }
                if !metadata.is_empty() {
                    m.insert("metadata".into(), Value::Object(metadata.clone()));
                }
                Value::Object(m)
            }
            Response::Ok => json!({"status": "ok"}),
            Response::Reject { reason, details } => {
                json!({"status": "reject", "reason": reason, "details": details})
            }
            Response::Provider {
                provider_id,
                output,
                usage,
                metadata,
            } => json!({
                "provider_id": provider_id,
                "output": output,
                "usage": usage,
                "metadata": metadata,
            }),
        }
    }
}

/// An extension's failure; sent as `{"error": {"code", "message"}}` plus the NATS
/// micro error headers, so the router counts it as a failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ExtensionError {
    pub code: String,
    pub message: String,
}

impl ExtensionError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ExtensionError {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// An extension's logic.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: ExtensionRequest,
    ) -> impl Future<Output = Result<Response, ExtensionError>> + Send;
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// NATS queue group: instances in the same group share the requests.
    pub queue_group: Option<String>,
    /// Requests handled at once; more wait (backpressure instead of unbounded tasks).
    pub max_in_flight: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            queue_group: None,
            max_in_flight: 1024,
        }
    }
}

/// Serves `handler` on `subject` until the subscription ends (the client closes).
pub async fn serve<H: Handler>(
    client: async_nats::Client,
    subject: &str,
    handler: H,
    options: ServeOptions,
) -> Result<(), async_nats::Error> {
    let sub = subscribe(&client, subject, &options).await?;
    answer(client, sub, Arc::new(handler), options.max_in_flight).await;
    Ok(())
}

/// Subscribes now (so requests sent after this returns are heard) and serves in the
/// background.
pub async fn spawn<H: Handler>(
    client: async_nats::Client,
    subject: &str,
    handler: H,
    options: ServeOptions,
) -> Result<tokio::task::JoinHandle<()>, async_nats::Error> {
    let sub = subscribe(&client, subject, &options).await?;
    Ok(tokio::spawn(answer(
        client,
        sub,
        Arc::new(handler),
        options.max_in_flight,
    )))
}

async fn subscribe(
    client: &async_nats::Client,
    subject: &str,
    options: &ServeOptions,
) -> Result<async_nats::Subscriber, async_nats::Error> {
    let sub = match &options.queue_group {
        Some(q) => {
            client
                .queue_subscribe(subject.to_string(), q.clone())
                .await?
        }
        None => client.subscribe(subject.to_string()).await?,
    };
    client.flush().await?;
    Ok(sub)
}

async fn answer<H: Handler>(
    client: async_nats::Client,
    mut sub: async_nats::Subscriber,
    handler: Arc<H>,
    max_in_flight: usize,
) {
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    while let Some(msg) = sub.next().await {
        // Like the original's samples: a message without a reply subject gets no answer.
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (client, handler) = (client.clone(), handler.clone());
        let span = trace::handler_span(&msg);
        tokio::spawn(async move {
            let _permit = permit;
            let (body, headers) = trace::within(&span, respond(&*handler, &msg.payload)).await;
            trace::ended(&span, headers.as_ref());
            let result = match headers {
                Some(h) => client.publish_with_headers(reply_to, h, body.into()).await,
                None => client.publish(reply_to, body.into()).await,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "extension reply could not be sent");
            }
        });
    }
}

/// Turns a request body into a reply body (and error headers).
pub async fn respond<H: Handler>(handler: &H, body: &[u8]) -> (Vec<u8>, Option<HeaderMap>) {
    let outcome = match serde_json::from_slice::<ExtensionRequest>(body) {
        Ok(request) => handler.handle(request).await,
        Err(e) => Err(ExtensionError::new(
            "bad_request",
            format!("request is not an extension request: {e}"),
        )),
    };
    match outcome {
        Ok(response) => (
            serde_json::to_vec(&response.to_json()).unwrap_or_default(),
            None,
        ),
        Err(e) => {
            let mut h = HeaderMap::new();
            h.insert(HEADER_SERVICE_ERROR, e.message.as_str());
            h.insert(HEADER_SERVICE_ERROR_CODE, e.code.as_str());
            let body = json!({"error": {"code": e.code, "message": e.message}});
            (serde_json::to_vec(&body).unwrap_or_default(), Some(h))
        }
    }
}
