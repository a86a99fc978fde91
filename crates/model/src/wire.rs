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

/// The message that travels through the pipeline. `payload` is the request's content
/// (text, or JSON passed as is); pre and post extensions may rewrite it.
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
    pub payload: Payload,
    /// Where the content is kept instead (the original's `task.payload_ref`), when
    /// the caller sent a reference rather than the content: passed to extensions as
    /// it came, and not theirs to change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_ref: Option<Value>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// A message's content: text, as the original always sent, or any other JSON value
/// (an object payload, a provider's structured answer), which travels as is — an
/// extension receives it as JSON and may answer JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Text(String),
    /// Never a JSON string (that is [`Payload::Text`]) and never null.
    Json(Value),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Text(String::new())
    }
}

impl Payload {
    /// The text, when the payload is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Payload::Text(s) => Some(s),
            Payload::Json(_) => None,
        }
    }

    /// The JSON, when the payload is not text.
    pub fn as_json(&self) -> Option<&Value> {
        match self {
            Payload::Text(_) => None,
            Payload::Json(v) => Some(v),
        }
    }

    /// The text, or the JSON written as text: what a text-only reader (a prompt,
    /// a gRPC `bytes` field, a PII scan) gets.
    pub fn to_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Payload::Text(s) => std::borrow::Cow::Borrowed(s),
            Payload::Json(v) => std::borrow::Cow::Owned(v.to_string()),
        }
    }

    /// Bytes the payload takes on the wire (the text's length, or the JSON's).
    pub fn byte_len(&self) -> usize {
        match self {
            Payload::Text(s) => s.len(),
            Payload::Json(v) => crate::limits::json_len(v),
        }
    }

    /// The payload as a JSON value (text becomes a JSON string).
    pub fn into_value(self) -> Value {
        match self {
            Payload::Text(s) => Value::String(s),
            Payload::Json(v) => v,
        }
    }

    /// `Some` for what a payload may hold: a string (text) or any other JSON value
    /// but null.
    pub fn from_value(v: Value) -> Option<Payload> {
        match v {
            Value::Null => None,
            Value::String(s) => Some(Payload::Text(s)),
            other => Some(Payload::Json(other)),
        }
    }
}

impl From<String> for Payload {
    fn from(s: String) -> Payload {
        Payload::Text(s)
    }
}

impl From<&str> for Payload {
    fn from(s: &str) -> Payload {
        Payload::Text(s.to_string())
    }
}

impl PartialEq<str> for Payload {
    fn eq(&self, other: &str) -> bool {
        self.as_text() == Some(other)
    }
}

impl PartialEq<String> for Payload {
    fn eq(&self, other: &String) -> bool {
        self.as_text() == Some(other.as_str())
    }
}

impl PartialEq<&str> for Payload {
    fn eq(&self, other: &&str) -> bool {
        self.as_text() == Some(*other)
    }
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Text(s) => serializer.serialize_str(s),
            Payload::Json(v) => v.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Payload, D::Error> {
        // null reads as empty text, so a sender that writes `"payload": null` is
        // still understood.
        Ok(Payload::from_value(Value::deserialize(deserializer)?).unwrap_or_default())
    }
}

/// What the router sends to an extension. Every type gets the first five fields;
/// a provider also gets the original's provider fields, a post-processor the
/// original document's `message` / `context` names for `payload` / `metadata`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
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
    /// provider: the policy's provider this call is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// provider: the message's content after the pre steps (`payload.payload`), as
    /// text (an object payload written as JSON text; `payload` keeps the object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// provider: the policy provider's `parameters`, overridden by the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    /// post: the same message as `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    /// provider, post: the same context as `metadata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Map<String, Value>>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<&'a Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<&'a Map<String, Value>>,
}

/// A validator's verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ok,
    Reject { reason: String, details: Value },
}

/// Token usage a provider reports. Read leniently, as the original's providers write
/// it: any non-negative number (rounded), `total_tokens` optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The provider's own total, or prompt + completion when it gave none.
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }

    /// Reads a reply's `usage` object; the error names the field.
    pub fn parse(value: &Value) -> Result<Usage, ReplyError> {
        let Value::Object(map) = value else {
            return Err(ReplyError::Invalid(format!(
                "usage must be an object, found {}",
                json_kind(value)
            )));
        };
        let count = |key: &str| -> Result<Option<u64>, ReplyError> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(u) => Ok(Some(u)),
                    None => match n.as_f64() {
                        Some(f) if f >= 0.0 && f.is_finite() => Ok(Some(f.round() as u64)),
                        _ => Err(ReplyError::Invalid(format!(
                            "usage.{key} must be a non-negative number, found {n}"
                        ))),
                    },
                },
                Some(other) => Err(ReplyError::Invalid(format!(
                    "usage.{key} must be a non-negative number, found {}",
                    json_kind(other)
                ))),
            }
        };
        let prompt = count("prompt_tokens")?.unwrap_or(0);
        let completion = count("completion_tokens")?.unwrap_or(0);
        let total = count("total_tokens")?.unwrap_or(prompt.saturating_add(completion));
        Ok(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
        })
    }
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
    /// `"payload": {...}` (or the original document's `"message": {...}`): message
    /// fields to replace (fields not given stay).
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
    /// Checks the fields an update would set; `key` is where the reply put them
    /// (`payload` or `message`), for the error's field path.
    fn check(fields: &Map<String, Value>, key: &str) -> Result<(), ReplyError> {
        for (k, v) in fields {
            let expected = match (k.as_str(), v) {
                ("payload", Value::Null) => "text or JSON (not null)",
                ("message_type", v) if !v.is_string() => "a string",
                ("metadata", v) if !v.is_object() => "an object",
                _ => continue,
            };
            return Err(ReplyError::Invalid(format!(
                "{key}.{k} must be {expected}, found {}",
                json_kind(v)
            )));
        }
        Ok(())
    }

    /// Applies the update; field types that do not fit are an invalid reply, and then
    /// the message is left exactly as it was (everything is checked before anything
    /// is changed).
    pub fn apply(self, message: &mut Message) -> Result<(), ReplyError> {
        match self {
            MessageUpdate::Text(t) => message.payload = Payload::Text(t),
            MessageUpdate::Fields(map) => {
                Self::check(&map, "payload")?;
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("payload", v) => {
                            if let Some(p) = Payload::from_value(v) {
                                message.payload = p;
                            }
                        }
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
                    "error must be an object, found {}",
                    json_kind(other)
                )));
            }
        }
        match ext_type {
            ExtensionType::Pre | ExtensionType::Post => {
                // The original's document writes `message` / `context` where the
                // common contract says `payload` / `metadata`: both are read.
                let key = if matches!(map.get("payload"), None | Some(Value::Null)) {
                    "message"
                } else {
                    "payload"
                };
                let message = match map.remove(key) {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(m)) => {
                        MessageUpdate::check(&m, key)?;
                        Some(MessageUpdate::Fields(m))
                    }
                    Some(Value::String(s)) => Some(MessageUpdate::Text(s)),
                    Some(other) => {
                        return Err(ReplyError::Invalid(format!(
                            "{key} must be a message object or a string, found {}",
                            json_kind(&other)
                        )));
                    }
                };
                let key = if matches!(map.get("metadata"), None | Some(Value::Null)) {
                    "context"
                } else {
                    "metadata"
                };
                let metadata = take_object(&mut map, key)?;
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
                let usage = match map.get("usage") {
                    None | Some(Value::Null) => Usage::default(),
                    Some(v) => Usage::parse(v)?,
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

/// The keys a reply may use, read in one pass over the body: the rest of a reply (an
/// echo of the request, say) is skipped without being built.
#[derive(Deserialize)]
struct ReplyFields {
    error: Option<Value>,
    payload: Option<UpdateField>,
    message: Option<UpdateField>,
    metadata: Option<Value>,
    context: Option<Value>,
    status: Option<Value>,
    valid: Option<Value>,
    reason: Option<Value>,
    details: Option<Value>,
    error_code: Option<Value>,
    error_message: Option<Value>,
    provider_id: Option<Value>,
    usage: Option<Value>,
    output: Option<Value>,
}

/// A reply's `payload` / `message`: for an object, only the message fields a pre or
/// post reply may change ([`MessageUpdate::apply`]; the ids are the router's and are
/// skipped); anything else as it is, for [`Reply::parse`] to judge.
struct UpdateField(Value);

impl<'de> Deserialize<'de> for UpdateField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = UpdateField;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a message object or text")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<UpdateField, A::Error> {
                let mut m = Map::new();
                while let Some(key) = a.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "payload" | "message_type" | "metadata" => {
                            let v = a.next_value::<Value>()?;
                            m.insert(key.into_owned(), v);
                        }
                        _ => {
                            a.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(UpdateField(Value::Object(m)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<UpdateField, A::Error> {
                Value::deserialize(serde::de::value::SeqAccessDeserializer::new(a)).map(UpdateField)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UpdateField, E> {
                Ok(UpdateField(Value::String(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<UpdateField, E> {
                Ok(UpdateField(Value::String(v)))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<UpdateField, E> {
                Ok(UpdateField(Value::Bool(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<UpdateField, E> {
                Ok(UpdateField(Value::from(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<UpdateField, E> {
                Ok(UpdateField(Value::from(v)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<UpdateField, E> {
                Ok(UpdateField(Value::from(v)))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<UpdateField, E> {
                Ok(UpdateField(Value::Null))
            }
        }
        d.deserialize_any(Fields)
    }
}

impl Reply {
    /// [`Reply::parse`] from the reply's bytes, in one pass, building only what a
    /// reply of any type can say (the keys of [`Reply::parse`]); the JSON shape
    /// limits are checked on that. Unknown keys are skipped, not built.
    pub fn parse_slice(
        ext_type: ExtensionType,
        body: &[u8],
        limits: &crate::Limits,
    ) -> Result<Reply, ReplyError> {
        if body.trim_ascii_start().first() != Some(&b'{') {
            // Not an object: the whole reply, for the error that says what it is.
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| ReplyError::Invalid(format!("reply is not JSON: {e}")))?;
            return Reply::parse(ext_type, v, None);
        }
        let f: ReplyFields = serde_json::from_slice(body).map_err(|e| {
            ReplyError::Invalid(if e.is_data() {
                format!("reply cannot be read: {e}")
            } else {
                format!("reply is not JSON: {e}")
            })
        })?;
        let transform = matches!(ext_type, ExtensionType::Pre | ExtensionType::Post);
        // A validator's or provider's `payload`/`message` is not read: not kept.
        let update = |u: Option<UpdateField>| u.filter(|_| transform).map(|u| u.0);
        let mut map = Map::new();
        let fields = [
            ("error", f.error),
            ("payload", update(f.payload)),
            ("message", update(f.message)),
            ("metadata", f.metadata),
            ("context", f.context),
            ("status", f.status),
            ("valid", f.valid),
            ("reason", f.reason),
            ("details", f.details),
            ("error_code", f.error_code),
            ("error_message", f.error_message),
            ("provider_id", f.provider_id),
            ("usage", f.usage),
            ("output", f.output),
        ];
        for (key, field) in fields {
            if let Some(v) = field {
                map.insert(key.to_string(), v);
            }
        }
        limits
            .check_map_shape(&map)
            .map_err(|e| ReplyError::Invalid(format!("reply {}", e.reason)))?;
        Reply::parse(ext_type, Value::Object(map), None)
    }
}

fn take_object(map: &mut Map<String, Value>, key: &str) -> Result<Map<String, Value>, ReplyError> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(ReplyError::Invalid(format!(
            "{key} must be an object, found {}",
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
        assert_eq!(
            (m.payload.as_text().unwrap(), m.tenant_id.as_str()),
            ("hi", "t")
        );
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
            (m.payload.as_text().unwrap(), m.message_type.as_str()),
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
        assert_eq!(
            p.usage.total_tokens, 8,
            "prompt + completion when not given"
        );
    }

    #[test]
    fn provider_usage_is_read_as_the_original_writes_it() {
        let r = parse(
            ExtensionType::Provider,
            json!({"provider_id": "p", "output": "x",
                   "usage": {"prompt_tokens": 4.5, "completion_tokens": 2.25, "total_tokens": 6.75}}),
        )
        .unwrap();
        let Reply::Provider(p) = r else { panic!() };
        assert_eq!(
            p.usage,
            Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                total_tokens: 7
            }
        );
        for (usage, path) in [
            (json!({"prompt_tokens": -1}), "usage.prompt_tokens"),
            (json!({"completion_tokens": "3"}), "usage.completion_tokens"),
            (json!({"total_tokens": true}), "usage.total_tokens"),
            (json!([1]), "usage must be an object"),
        ] {
            let e = parse(
                ExtensionType::Provider,
                json!({"provider_id": "p", "usage": usage}),
            )
            .unwrap_err();
            let ReplyError::Invalid(m) = e else { panic!() };
            assert!(m.contains(path), "{m}");
            assert!(
                !m.contains("u64") && !m.contains("expected"),
                "no Rust type: {m}"
            );
        }
    }

    #[test]
    fn the_documents_message_and_context_shape_is_read() {
        let r = parse(
            ExtensionType::Post,
            json!({"message": {"payload": "masked"}, "context": {"masked": true}}),
        )
        .unwrap();
        let Reply::Transform {
            message: Some(update),
            metadata,
        } = r
        else {
            panic!()
        };
        let mut m = Message::default();
        update.apply(&mut m).unwrap();
        assert_eq!(m.payload, "masked");
        assert_eq!(metadata["masked"], true);
        let e = parse(ExtensionType::Post, json!({"message": {"metadata": 1}})).unwrap_err();
        assert_eq!(
            e,
            ReplyError::Invalid("message.metadata must be an object, found a number".into())
        );
    }

    #[test]
    fn json_payloads_travel_as_json() {
        let r = parse(
            ExtensionType::Post,
            json!({"payload": {"payload": {"answer": [1, 2]}}}),
        )
        .unwrap();
        let Reply::Transform {
            message: Some(update),
            ..
        } = r
        else {
            panic!()
        };
        let mut m = Message::default();
        update.apply(&mut m).unwrap();
        assert_eq!(m.payload, Payload::Json(json!({"answer": [1, 2]})));
        assert_eq!(
            serde_json::to_value(&m).unwrap()["payload"],
            json!({"answer": [1, 2]})
        );
        let back: Message = serde_json::from_value(json!({"payload": null})).unwrap();
        assert_eq!(back.payload, "");
        assert!(matches!(
            parse(ExtensionType::Pre, json!({"payload": {"payload": null}})),
            Err(ReplyError::Invalid(_))
        ));
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
            provider_id: Some("p".into()),
            prompt: Some("hello".into()),
            parameters: Some(Map::new()),
            message: None,
            context: Some(Map::new()),
        };
        let by_ref = ExtensionRequestRef {
            trace_id: &r.trace_id,
            tenant_id: &r.tenant_id,
            payload: &r.payload,
            metadata: &r.metadata,
            config: &r.config,
            provider_id: r.provider_id.as_deref(),
            prompt: r.prompt.as_deref(),
            parameters: r.parameters.as_ref(),
            message: r.message.as_ref(),
            context: r.context.as_ref(),
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
            provider_id: None,
            prompt: None,
            parameters: None,
            message: Some(Message {
                payload: Payload::Json(json!({"k": [1, 2]})),
                ..Default::default()
            }),
            context: None,
        };
        let back: ExtensionRequest =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn parse_slice_reads_what_parse_reads() {
        let limits = crate::Limits::default();
        let cases = [
            (
                ExtensionType::Pre,
                json!({"payload": {"payload": "x", "metadata": {"a": 1}, "message_id": "ignored"}, "metadata": {"k": "v"}}),
            ),
            (ExtensionType::Pre, json!({"payload": "just text"})),
            (
                ExtensionType::Post,
                json!({"message": {"payload": {"json": [1, 2]}}, "context": {"c": true}}),
            ),
            (
                ExtensionType::Pre,
                json!({"trace_id": "t", "tenant_id": "acme", "config": {}, "payload": {"payload": "echo"}}),
            ),
            (ExtensionType::Pre, json!({})),
            (
                ExtensionType::Validator,
                json!({"status": "reject", "reason": "pii", "details": {"m": "x"}}),
            ),
            (ExtensionType::Validator, json!({"valid": true})),
            (
                ExtensionType::Validator,
                json!({"status": "error", "error_code": 5, "error_message": "m"}),
            ),
            (
                ExtensionType::Provider,
                json!({"provider_id": "p", "output": {"o": 1}, "usage": {"prompt_tokens": 2.5}, "metadata": {"model": "m"}}),
            ),
            (
                ExtensionType::Provider,
                json!({"status": "error", "error_code": "e", "error_message": "m"}),
            ),
            (
                ExtensionType::Pre,
                json!({"error": {"code": "c", "message": "m"}}),
            ),
            (ExtensionType::Pre, json!({"error": "plain"})),
            (ExtensionType::Pre, json!({"payload": {"metadata": 5}})),
            (ExtensionType::Pre, json!({"payload": 5})),
            (ExtensionType::Provider, json!({"output": "no id"})),
            (ExtensionType::Pre, json!([1])),
            (ExtensionType::Pre, json!("text")),
        ];
        for (t, body) in cases {
            let bytes = serde_json::to_vec(&body).unwrap();
            let mut expected = Reply::parse(t, body.clone(), None);
            // What parse keeps of a message update is only the fields it applies.
            if let Ok(Reply::Transform {
                message: Some(MessageUpdate::Fields(m)),
                ..
            }) = &mut expected
            {
                m.retain(|k, _| ["payload", "message_type", "metadata"].contains(&k.as_str()));
            }
            assert_eq!(
                Reply::parse_slice(t, &bytes, &limits),
                expected,
                "{t:?} {body}"
            );
        }
    }

    #[test]
    fn parse_slice_skips_what_no_reply_uses_and_limits_what_it_keeps() {
        let limits = crate::Limits::default();
        // Unknown keys may be anything, as long as the JSON is well formed.
        let body = br#"{"echo": {"deep": [[[[[[[[[[[[1]]]]]]]]]]]]}, "payload": "x"}"#;
        assert_eq!(
            Reply::parse_slice(ExtensionType::Pre, body, &limits),
            Ok(Reply::Transform {
                message: Some(MessageUpdate::Text("x".into())),
                metadata: Map::new()
            })
        );
        let mut deep = json!(1);
        for _ in 0..20 {
            deep = json!([deep]);
        }
        let body = serde_json::to_vec(&json!({"metadata": {"k": deep}})).unwrap();
        let e = Reply::parse_slice(ExtensionType::Pre, &body, &limits).unwrap_err();
        assert!(
            matches!(&e, ReplyError::Invalid(m) if m.starts_with("reply ")),
            "{e}"
        );
        for bad in [&b"{"[..], b"{\"payload\": }", b"nope", b""] {
            let e = Reply::parse_slice(ExtensionType::Pre, bad, &limits).unwrap_err();
            assert!(
                matches!(&e, ReplyError::Invalid(m) if m.contains("not JSON")),
                "{}: {e}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
