//! The extension wire protocol over NATS (REFERENCE.md §3, DESIGN.md §5), shared by
//! the router (which sends requests and reads replies) and the SDK (which does the
//! reverse), so the two can never drift apart.
//!
//! Request body, the same for every extension type:
//! `{"trace_id", "tenant_id", "payload": <Message>, "metadata": <context>, "config": <step config>}`.
//! A reply is a JSON object; its meaning depends on the extension's type
//! ([`Reply::parse`]). Headers carry the trace, tenant, extension and version, and the
//! NATS micro error headers mark an error reply from any NATS micro library.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ExtensionType;
use crate::limits::json_kind;

pub const HEADER_TRACE_ID: &str = "Beamline-Trace-Id";
pub const HEADER_TENANT_ID: &str = "Beamline-Tenant-Id";
pub const HEADER_EXTENSION_ID: &str = "Beamline-Extension-Id";
pub const HEADER_EXTENSION_VERSION: &str = "Beamline-Extension-Version";
/// NATS micro: set on an error reply, with a description.
pub const HEADER_SERVICE_ERROR: &str = "Nats-Service-Error";
/// NATS micro: the error's code.
pub const HEADER_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// The message that travels through the pipeline. `payload` is the request text; pre
/// and post extensions may rewrite it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Message {
    #[serde(default)]
    pub message_id: String,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub trace_id: String,
    #[serde(default)]
    pub message_type: String,
    #[serde(default)]
    pub payload: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// What the router sends to an extension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtensionRequest {
    #[serde(default)]
    pub trace_id: String,
    #[serde(default)]
    pub tenant_id: String,
    /// The current message.
    pub payload: Message,
    /// The pipeline context (tenant, policy, request ids, constraints, metadata).
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// The policy step's `config` (extensions may ignore it).
    #[serde(default)]
    pub config: Map<String, Value>,
}

/// [`ExtensionRequest`] by reference, for the router to serialise without cloning
/// the message and context for every step. Same JSON.
#[derive(Debug, Serialize)]
pub struct ExtensionRequestRef<'a> {
    pub trace_id: &'a str,
    pub tenant_id: &'a str,
    pub payload: &'a Message,
    pub metadata: &'a Map<String, Value>,
    pub config: &'a Map<String, Value>,
}

/// A validator's verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ok,
    Reject { reason: String, details: Value },
}

/// Token usage a provider reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderOutput {
    pub provider_id: String,
    pub output: Value,
    pub usage: Usage,
    pub metadata: Map<String, Value>,
}

/// A parsed, successful reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// pre / post: an optional new message and context keys to merge.
    Transform {
        message: Option<MessageUpdate>,
        metadata: Map<String, Value>,
    },
    Verdict(Verdict),
    Provider(ProviderOutput),
}

/// How a pre/post reply changes the message.
#[derive(Debug, Clone, PartialEq)]
pub enum MessageUpdate {
    /// `"payload": {...}`: message fields to replace (fields not given stay).
    Fields(Map<String, Value>),
    /// `"payload": "text"`: the new request text.
    Text(String),
}

/// Why a reply is not a success.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplyError {
    /// The extension said it failed (`"error": {...}`, a provider's `status: error`,
    /// or the NATS micro error headers).
    #[error("extension error {code}: {message}")]
    Extension { code: String, message: String },
    /// The reply is not what the protocol allows.
    #[error("invalid_response_format: {0}")]
    Invalid(String),
}

fn str_field(map: &Map<String, Value>, key: &str) -> Option<String> {
    map.get(key).and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

impl MessageUpdate {
    /// Applies the update; field types that do not fit are an invalid reply.
    /// Applies the update; field types that do not fit are an invalid reply, and then
    /// the message is left exactly as it was (everything is checked before anything
    /// is changed).
    pub fn apply(self, message: &mut Message) -> Result<(), ReplyError> {
        match self {
            MessageUpdate::Text(t) => message.payload = t,
            MessageUpdate::Fields(map) => {
                for (k, v) in &map {
                    let ok = match k.as_str() {
                        "payload" | "message_type" => v.is_string(),
                        "metadata" => v.is_object(),
                        _ => true,
                    };
                    if !ok {
                        return Err(ReplyError::Invalid(format!(
                            "payload.{k} must be {}, found {}",
                            if k == "metadata" {
                                "an object"
                            } else {
                                "a string"
                            },
                            json_kind(v)
                        )));
                    }
                }
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("payload", Value::String(s)) => message.payload = s,
                        ("message_type", Value::String(s)) => message.message_type = s,
                        ("metadata", Value::Object(m)) => message.metadata = m,
                        // Ids are the router's: an extension cannot re-address a request.
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

impl Reply {
    /// Interprets a reply body for an extension of `ext_type`. `service_error` is the
    /// NATS micro error header pair when present.
    pub fn parse(
        ext_type: ExtensionType,
        body: Value,
        service_error: Option<(String, String)>,
    ) -> Result<Reply, ReplyError> {
        if let Some((code, message)) = service_error {
            return Err(ReplyError::Extension { code, message });
        }
        let Value::Object(mut map) = body else {
            return Err(ReplyError::Invalid(format!(
                "reply must be a JSON object, found {}",
                json_kind(&body)
            )));
        };
        match map.get("error") {
            None | Some(Value::Null) => {}
            Some(Value::Object(e)) => {
                return Err(ReplyError::Extension {
                    code: str_field(e, "code").unwrap_or_else(|| "extension_error".into()),
                    message: str_field(e, "message").unwrap_or_default(),
                });
            }
            Some(Value::String(s)) => {
                return Err(ReplyError::Extension {
                    code: "extension_error".into(),
                    message: s.clone(),
                });
            }
            Some(other) => {
                return Err(ReplyError::Invalid(format!(
                    "`error` must be an object, found {}",
                    json_kind(other)
                )));
            }
        }
        match ext_type {
            ExtensionType::Pre | ExtensionType::Post => {
                let message = match map.remove("payload") {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(m)) => Some(MessageUpdate::Fields(m)),
                    Some(Value::String(s)) => Some(MessageUpdate::Text(s)),
                    Some(other) => {
                        return Err(ReplyError::Invalid(format!(
                            "`payload` must be a message object or a string, found {}",
                            json_kind(&other)
                        )));
                    }
                };
                let metadata = take_object(&mut map, "metadata")?;
                Ok(Reply::Transform { message, metadata })
            }
            ExtensionType::Validator => {
                let status = map.get("status").and_then(Value::as_str);
                let valid = map.get("valid").and_then(Value::as_bool);
                let reject = || Verdict::Reject {
                    reason: str_field(&map, "reason").unwrap_or_else(|| "rejected".into()),
                    details: map.get("details").cloned().unwrap_or(Value::Null),
                };
                match (status, valid) {
                    (Some("ok"), _) => Ok(Reply::Verdict(Verdict::Ok)),
                    (Some("reject"), _) => Ok(Reply::Verdict(reject())),
                    (Some("error"), _) => Err(ReplyError::Extension {
                        code: str_field(&map, "error_code")
                            .unwrap_or_else(|| "extension_error".into()),
                        message: str_field(&map, "error_message").unwrap_or_default(),
                    }),
                    (Some(other), _) => Err(ReplyError::Invalid(format!(
                        "validator status must be \"ok\" or \"reject\", found {other:?}"
                    ))),
                    (None, Some(true)) => Ok(Reply::Verdict(Verdict::Ok)),
                    (None, Some(false)) => Ok(Reply::Verdict(reject())),
                    (None, None) => Err(ReplyError::Invalid(
                        "validator reply needs \"status\": \"ok\" | \"reject\"".into(),
                    )),
                }
            }
            ExtensionType::Provider => {
                if map.get("status").and_then(Value::as_str) == Some("error") {
                    return Err(ReplyError::Extension {
                        code: str_field(&map, "error_code")
                            .unwrap_or_else(|| "provider_error".into()),
                        message: str_field(&map, "error_message").unwrap_or_default(),
                    });
                }
                let provider_id = match map.get("provider_id") {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    _ => {
                        return Err(ReplyError::Invalid(
                            "provider reply needs a non-empty \"provider_id\"".into(),
                        ));
                    }
                };
                let usage = match map.remove("usage") {
                    None | Some(Value::Null) => Usage::default(),
                    Some(v) => serde_json::from_value(v)
                        .map_err(|e| ReplyError::Invalid(format!("`usage`: {e}")))?,
                };
                let metadata = take_object(&mut map, "metadata")?;
                Ok(Reply::Provider(ProviderOutput {
                    provider_id,
                    output: map.remove("output").unwrap_or(Value::Null),
                    usage,
                    metadata,
                }))
            }
        }
    }
}

fn take_object(map: &mut Map<String, Value>, key: &str) -> Result<Map<String, Value>, ReplyError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(ReplyError::Invalid(format!(
            "`{key}` must be an object, found {}",
            json_kind(&other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(t: ExtensionType, v: Value) -> Result<Reply, ReplyError> {
        Reply::parse(t, v, None)
    }

    #[test]
    fn pre_reply_replaces_message_fields_and_merges_metadata() {
        let r = parse(
            ExtensionType::Pre,
            json!({"payload": {"payload": "hi", "tenant_id": "evil"}, "metadata": {"lang": "en"}}),
        )
        .unwrap();
        let Reply::Transform {
            message: Some(update),
            metadata,
        } = r
        else {
            panic!()
        };
        let mut m = Message {
            tenant_id: "t".into(),
            payload: "  hi ".into(),
            ..Default::default()
        };
        update.apply(&mut m).unwrap();
        assert_eq!((m.payload.as_str(), m.tenant_id.as_str()), ("hi", "t"));
        assert_eq!(metadata["lang"], "en");
        assert!(matches!(
            parse(ExtensionType::Post, json!({})).unwrap(),
            Reply::Transform { message: None, .. }
        ));
    }

    #[test]
    fn a_bad_update_changes_nothing() {
        let mut m = Message {
            payload: "keep".into(),
            message_type: "chat".into(),
            ..Default::default()
        };
        let bad: Map<String, Value> = [
            ("message_type".to_string(), json!("x")),
            ("metadata".to_string(), json!(5)),
        ]
        .into_iter()
        .collect();
        assert!(MessageUpdate::Fields(bad).apply(&mut m).is_err());
        assert_eq!(
            (m.payload.as_str(), m.message_type.as_str()),
            ("keep", "chat")
        );
    }

    #[test]
    fn validator_reads_status_and_valid_false() {
        assert_eq!(
            parse(ExtensionType::Validator, json!({"status": "ok"})).unwrap(),
            Reply::Verdict(Verdict::Ok)
        );
        let r = parse(
            ExtensionType::Validator,
            json!({"status": "reject", "reason": "pii_detected", "details": {"n": 1}}),
        )
        .unwrap();
        assert!(
            matches!(r, Reply::Verdict(Verdict::Reject { ref reason, .. }) if reason == "pii_detected")
        );
        assert!(matches!(
            parse(ExtensionType::Validator, json!({"valid": false})).unwrap(),
            Reply::Verdict(Verdict::Reject { .. })
        ));
        assert!(matches!(
            parse(ExtensionType::Validator, json!({"status": "maybe"})),
            Err(ReplyError::Invalid(_))
        ));
        assert!(matches!(
            parse(ExtensionType::Validator, json!({})),
            Err(ReplyError::Invalid(_))
        ));
    }

    #[test]
    fn error_replies_are_errors_not_successes() {
        for t in ExtensionType::ALL {
            let e = parse(t, json!({"error": {"code": "boom", "message": "bad"}})).unwrap_err();
            assert_eq!(
                e,
                ReplyError::Extension {
                    code: "boom".into(),
                    message: "bad".into()
                }
            );
        }
        let e = parse(
            ExtensionType::Provider,
            json!({"status": "error", "error_code": "rate_limited", "error_message": "slow down"}),
        )
        .unwrap_err();
        assert!(matches!(e, ReplyError::Extension { ref code, .. } if code == "rate_limited"));
        let e = Reply::parse(
            ExtensionType::Pre,
            json!({}),
            Some(("500".into(), "crashed".into())),
        )
        .unwrap_err();
        assert!(matches!(e, ReplyError::Extension { .. }));
    }

    #[test]
    fn garbage_is_invalid_response_format() {
        for (t, v) in [
            (ExtensionType::Pre, json!([1, 2])),
            (ExtensionType::Pre, json!({"payload": 5})),
            (ExtensionType::Post, json!({"metadata": "x"})),
            (ExtensionType::Provider, json!({"output": "x"})),
            (
                ExtensionType::Provider,
                json!({"provider_id": "p", "usage": {"prompt_tokens": "many"}}),
            ),
            (ExtensionType::Validator, json!("ok")),
        ] {
            assert!(
                matches!(parse(t, v.clone()), Err(ReplyError::Invalid(_))),
                "{t} {v}"
            );
        }
    }

    #[test]
    fn provider_reply() {
        let r = parse(ExtensionType::Provider, json!({"provider_id": "p", "output": "hello", "usage": {"prompt_tokens": 3, "completion_tokens": 5}})).unwrap();
        let Reply::Provider(p) = r else { panic!() };
        assert_eq!(
            (p.provider_id.as_str(), p.usage.completion_tokens),
            ("p", 5)
        );
    }

    #[test]
    fn borrowed_request_serialises_like_the_owned_one() {
        let r = ExtensionRequest {
            trace_id: "t".into(),
            tenant_id: "acme".into(),
            payload: Message {
                payload: "hello".into(),
                ..Default::default()
            },
            metadata: [("k".to_string(), json!(1))].into_iter().collect(),
            config: Map::new(),
        };
        let by_ref = ExtensionRequestRef {
            trace_id: &r.trace_id,
            tenant_id: &r.tenant_id,
            payload: &r.payload,
            metadata: &r.metadata,
            config: &r.config,
        };
        assert_eq!(
            serde_json::to_value(&by_ref).unwrap(),
            serde_json::to_value(&r).unwrap()
        );
    }

    #[test]
    fn request_round_trips() {
        let r = ExtensionRequest {
            trace_id: "t".into(),
            tenant_id: "acme".into(),
            payload: Message {
                payload: "hello".into(),
                ..Default::default()
            },
            metadata: Map::new(),
            config: Map::new(),
        };
        let back: ExtensionRequest =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
