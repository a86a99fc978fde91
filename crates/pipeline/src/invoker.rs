//! One extension call over NATS request/reply: headers, per-attempt timeout, bounded
//! retries with exponential backoff and full jitter, reply limits, and reply parsing.
//!
//! Retries happen only on a timeout or "no responders", never past the request's
//! deadline; "no responders" fails at once when no retry is left (it is not a
//! timeout). Everything else — an error reply, garbage, an oversized reply — fails
//! the call immediately: retrying a deterministic failure only adds load.

use std::time::{Duration, Instant};

use async_nats::{HeaderMap, HeaderName, RequestErrorKind};
use beamline_model::wire::{
    HEADER_EXTENSION_ID, HEADER_EXTENSION_VERSION, HEADER_SERVICE_ERROR, HEADER_SERVICE_ERROR_CODE,
    HEADER_TENANT_ID, HEADER_TRACE_ID, Reply, ReplyError,
};
use beamline_model::{ErrorCode, Extension, Limits};
use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// `[pipeline]` tuning of retries and replies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InvokerConfig {
    /// First retry waits up to this long (full jitter), doubling each retry.
    pub retry_backoff_base_ms: u64,
    /// Longest wait between two attempts.
    pub retry_backoff_max_ms: u64,
    /// Largest reply accepted from an extension, bytes.
    pub max_reply_bytes: usize,
    /// Send the `Beamline-Trace-Id`, `Beamline-Tenant-Id`, `Beamline-Extension-Id`
    /// and `Beamline-Extension-Version` headers with every extension request. Off by
    /// default: the body carries the trace and tenant ids, and the headers cost NATS
    /// throughput by themselves (docs/PERFORMANCE.md); an extension's
    /// `metadata.headers` (true/false) overrides this for that extension.
    pub extension_headers: bool,
}

impl Default for InvokerConfig {
    fn default() -> Self {
        Self {
            retry_backoff_base_ms: 100,
            retry_backoff_max_ms: 1000,
            max_reply_bytes: 1024 * 1024,
            extension_headers: false,
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvokeError {
    #[error("extension timed out after {attempts} attempt(s)")]
    Timeout { attempts: u32 },
    #[error("no extension instance is listening on its subject ({attempts} attempt(s))")]
    NoResponders { attempts: u32 },
    #[error("circuit breaker is open")]
    CircuitOpen,
    #[error("extension is disabled")]
    Disabled,
    #[error("extension does not exist")]
    NotFound,
    #[error("extension is of type {actual}, the step needs {expected}")]
    WrongType { expected: String, actual: String },
    #[error("extension replied with error {code}: {message}")]
    Extension { code: String, message: String },
    #[error("invalid_response_format: {0}")]
    InvalidReply(String),
    #[error("request to the extension is too large: {0}")]
    RequestTooLarge(String),
    #[error("the request's deadline passed")]
    Deadline,
    #[error("NATS error: {0}")]
    Transport(String),
    /// The router's NATS connection is down: nothing is sent, the call fails at once.
    #[error("the router is not connected to NATS")]
    NatsDown,
    /// The extension already has `max_in_flight_per_extension` calls in flight.
    #[error("too many calls in flight to this extension ({0}); refused without sending")]
    Overloaded(usize),
}

impl InvokeError {
    /// The request-level code when this failure ends the request.
    pub fn code(&self) -> ErrorCode {
        match self {
            InvokeError::Timeout { .. } => ErrorCode::ExtensionTimeout,
            InvokeError::NoResponders { .. }
            | InvokeError::CircuitOpen
            | InvokeError::NatsDown
            | InvokeError::Overloaded(_) => ErrorCode::ExtensionUnavailable,
            InvokeError::NotFound => ErrorCode::ExtensionNotFound,
            InvokeError::WrongType { .. } | InvokeError::RequestTooLarge(_) => {
                ErrorCode::InvalidRequest
            }
            InvokeError::Deadline => ErrorCode::DeadlineExceeded,
            InvokeError::Disabled
            | InvokeError::Extension { .. }
            | InvokeError::InvalidReply(_)
            | InvokeError::Transport(_) => ErrorCode::ExtensionError,
        }
    }

    /// The `status` label of `router_extension_invocation_total`.
    pub fn status_label(&self) -> &'static str {
        match self {
            InvokeError::Timeout { .. } | InvokeError::Deadline => "timeout",
            _ => "error",
        }
    }

    /// The status a policy fallback's `when` matches on.
    pub fn fallback_status(&self) -> &'static str {
        match self {
            InvokeError::Timeout { .. } | InvokeError::Deadline => "timeout",
            InvokeError::NoResponders { .. }
            | InvokeError::CircuitOpen
            | InvokeError::NatsDown
            | InvokeError::Overloaded(_) => "unavailable",
            _ => "5xx",
        }
    }

    /// Whether the failure says something about the extension's health (and so
    /// counts for its breaker). Refusals before sending do not.
    pub fn counts_against_extension(&self) -> bool {
        !matches!(
            self,
            InvokeError::CircuitOpen
                | InvokeError::NatsDown
                | InvokeError::Overloaded(_)
                | InvokeError::Disabled
                | InvokeError::NotFound
                | InvokeError::WrongType { .. }
                | InvokeError::RequestTooLarge(_)
        )
    }
}

/// Facts about a finished call, success or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallStats {
    pub attempts: u32,
    pub latency: Duration,
}

/// Sends extension requests.
#[derive(Clone)]
pub struct Invoker {
    client: async_nats::Client,
    config: InvokerConfig,
    limits: Limits,
}

/// What to send, and where.
pub struct Call<'a> {
    pub extension: &'a Extension,
    /// The chosen instance's subject, or the extension's own.
    pub subject: &'a str,
    pub body: Bytes,
    pub trace_id: &'a str,
    pub tenant_id: &'a str,
    pub deadline: Instant,
    /// Whether the protocol's `Beamline-*` headers go with the request.
    pub headers: bool,
    /// The request's trace context and what the call's span records.
    pub trace: crate::trace::CallTrace<'a>,
}

impl Invoker {
    pub fn new(client: async_nats::Client, config: InvokerConfig, limits: Limits) -> Invoker {
        Invoker {
            client,
            config,
            limits,
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn config(&self) -> &InvokerConfig {
        &self.config
    }

    /// Whether calls to `extension` carry the `Beamline-*` headers: its
    /// `metadata.headers` when it says, else `[pipeline] extension_headers`.
    pub fn sends_headers(&self, extension: &Extension) -> bool {
        match extension.metadata.get("headers") {
            Some(serde_json::Value::Bool(b)) => *b,
            _ => self.config.extension_headers,
        }
    }

    /// The request's headers, built afresh for each attempt (cheaper than cloning a
    /// map; names are constants, so nothing is validated or allocated for them): the
    /// `Beamline-*` ones when the extension takes them, and the W3C trace context
    /// when there is one. `None` when there is nothing to send: a request without
    /// headers is a plain PUB, which NATS handles faster.
    fn headers(call: &Call<'_>, span: &tracing::Span) -> Option<HeaderMap> {
        const TRACE_ID: HeaderName = HeaderName::from_static(HEADER_TRACE_ID);
        const TENANT_ID: HeaderName = HeaderName::from_static(HEADER_TENANT_ID);
        const EXTENSION_ID: HeaderName = HeaderName::from_static(HEADER_EXTENSION_ID);
        const EXTENSION_VERSION: HeaderName = HeaderName::from_static(HEADER_EXTENSION_VERSION);
        let mut h = HeaderMap::new();
        if call.headers {
            h.insert(TRACE_ID, call.trace_id);
            h.insert(TENANT_ID, call.tenant_id);
            h.insert(EXTENSION_ID, call.extension.id.as_str());
            h.insert(EXTENSION_VERSION, call.extension.version.as_str());
        }
        crate::trace::inject(&mut h, &call.trace, span, call.trace_id);
        (!h.is_empty()).then_some(h)
    }

    /// Backoff before retry `n` (1-based): uniform in [0, min(max, base·2^(n−1))].
    fn backoff(&self, n: u32) -> Duration {
        let cap = self
            .config
            .retry_backoff_base_ms
            .saturating_mul(1u64 << (n.saturating_sub(1)).min(20))
            .min(self.config.retry_backoff_max_ms);
        if cap == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(rand::rng().random_range(0..=cap))
    }

    /// Makes the call: `retry + 1` attempts at most, each bounded by the extension's
    /// `timeout_ms` and by the deadline.
    pub async fn call(&self, call: Call<'_>) -> (Result<Reply, InvokeError>, CallStats) {
        let started = Instant::now();
        let max_attempts = call.extension.retry + 1;
        let per_attempt = Duration::from_millis(u64::from(call.extension.timeout_ms));
        let mut attempts = 0;
        let mut span = tracing::Span::none();
        let result = loop {
            let now = Instant::now();
            let Some(remaining) = call
                .deadline
                .checked_duration_since(now)
                .filter(|d| !d.is_zero())
            else {
                break Err(if attempts == 0 {
                    InvokeError::Deadline
                } else {
                    InvokeError::Timeout { attempts }
                });
            };
            if !matches!(
                self.client.connection_state(),
                async_nats::connection::State::Connected
            ) {
                // Queuing into a dead connection would only wait out the timeout.
                break Err(if attempts == 0 {
                    InvokeError::NatsDown
                } else {
                    InvokeError::Timeout { attempts }
                });
            }
            attempts += 1;
            span = crate::trace::attempt(&call, attempts);
            let mut request = async_nats::Request::new()
                .payload(call.body.clone())
                .timeout(Some(per_attempt.min(remaining)));
            if let Some(headers) = Self::headers(&call, &span) {
                request = request.headers(headers);
            }
            let failure = match self
                .client
                .send_request(async_nats::Subject::from(call.subject), request)
                .await
            {
                Ok(msg) => break self.parse(call.extension, msg),
                Err(e) => match e.kind() {
                    RequestErrorKind::TimedOut => InvokeError::Timeout { attempts },
                    RequestErrorKind::NoResponders => InvokeError::NoResponders { attempts },
                    RequestErrorKind::MaxPayloadExceeded => {
                        break Err(InvokeError::RequestTooLarge(e.to_string()));
                    }
                    RequestErrorKind::InvalidSubject | RequestErrorKind::Other => {
                        break Err(InvokeError::Transport(e.to_string()));
                    }
                },
            };
            if attempts >= max_attempts {
                break Err(failure);
            }
            let wait = self.backoff(attempts);
            if Instant::now() + wait >= call.deadline {
                break Err(failure);
            }
            crate::trace::retried(&mut span, &failure);
            tokio::time::sleep(wait).await;
        };
        crate::trace::ended(&span, &result, &call, attempts);
        (
            result,
            CallStats {
                attempts,
                latency: started.elapsed(),
            },
        )
    }

    fn parse(&self, ext: &Extension, msg: async_nats::Message) -> Result<Reply, InvokeError> {
        if msg.payload.len() > self.config.max_reply_bytes {
            return Err(InvokeError::InvalidReply(format!(
                "reply is {} bytes, more than the limit of {}",
                msg.payload.len(),
                self.config.max_reply_bytes
            )));
        }
        let service_error = msg.headers.as_ref().and_then(|h| {
            let description = h.get(HEADER_SERVICE_ERROR).map(|v| v.as_str().to_string());
            let code = h
                .get(HEADER_SERVICE_ERROR_CODE)
                .map(|v| v.as_str().to_string());
            match (code, description) {
                (None, None) => None,
                (code, description) => Some((
                    code.unwrap_or_else(|| "extension_error".into()),
                    description.unwrap_or_default(),
                )),
            }
        });
        if let Some((code, message)) = service_error {
            return Err(InvokeError::Extension { code, message });
        }
        Reply::parse_slice(ext.ext_type, &msg.payload, &self.limits).map_err(|e| match e {
            ReplyError::Extension { code, message } => InvokeError::Extension { code, message },
            ReplyError::Invalid(m) => InvokeError::InvalidReply(m),
        })
    }
}
