//! The reference extensions, built on the SDK: what `serve --demo` runs and what the
//! integration tests and benchmarks call.
//!
//! | extension | type | subject | does |
//! |---|---|---|---|
//! | [`NormalizeText`] | pre | `beamline.ext.pre.normalize_text.v1` | Unicode NFKC, collapses whitespace, trims; `config.max_length` truncates; JSON passes unchanged |
//! | [`PiiGuard`] | validator | `beamline.ext.validate.pii_guard.v1` | rejects e-mail addresses, card numbers (Luhn-checked) and phone numbers (in JSON too) |
//! | [`MaskPii`] | post | `beamline.ext.post.mask_pii.v1` | masks the same in the message it is given — the provider's answer when there is one (every string of a JSON answer) |
//! | [`TestProvider`] | provider | `beamline.provider.test_provider.v1` | echoes the `prompt` |
//!
//! They are this project's own, written in Rust: not the original's Node samples,
//! whose behaviour differs (see the README).
//! | [`Echo`] | any pre/post | (benchmarks) | answers "unchanged" at once |

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value, json};
use unicode_normalization::UnicodeNormalization;

use crate::{ExtensionError, ExtensionRequest, Handler, Payload, Response, ServeOptions, Usage};

pub const NORMALIZE_TEXT_SUBJECT: &str = "beamline.ext.pre.normalize_text.v1";
pub const PII_GUARD_SUBJECT: &str = "beamline.ext.validate.pii_guard.v1";
pub const MASK_PII_SUBJECT: &str = "beamline.ext.post.mask_pii.v1";
pub const TEST_PROVIDER_SUBJECT: &str = "beamline.provider.test_provider.v1";

/// Whitespace and Unicode normalisation.
pub struct NormalizeText;

impl Handler for NormalizeText {
    async fn handle(&self, request: ExtensionRequest) -> Result<Response, ExtensionError> {
        let mut message = request.payload;
        let Some(text) = message.payload.as_text() else {
            return Ok(Response::unchanged());
        };
        let text: String = text.nfkc().collect();
        let mut normalized = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some(max) = request.config.get("max_length").and_then(Value::as_u64)
            && let Some((cut, _)) = normalized.char_indices().nth(max as usize)
        {
            normalized.truncate(cut);
        }
        message.payload = normalized.into();
        Ok(Response::transform(message))
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b")
        .expect("valid regex")
});
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("valid regex"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\b\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}\b",
    )
    .expect("valid regex")
});

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

fn luhn(d: &[u32]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A piece of PII found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub start: usize,
    pub end: usize,
}

/// Finds e-mail addresses, Luhn-valid card numbers and phone numbers, without overlaps.
pub fn find_pii(text: &str) -> Vec<Finding> {
    let mut found: Vec<Finding> = Vec::new();
    let overlaps =
        |found: &[Finding], s: usize, e: usize| found.iter().any(|f| s < f.end && f.start < e);
    for m in CARD.find_iter(text) {
        let d = digits(m.as_str());
        if (13..=19).contains(&d.len()) && luhn(&d) {
            found.push(Finding {
                kind: "card_number",
                start: m.start(),
                end: m.end(),
            });
        }
    }
    for m in EMAIL.find_iter(text) {
        if !overlaps(&found, m.start(), m.end()) {
            found.push(Finding {
                kind: "email",
                start: m.start(),
                end: m.end(),
            });
        }
    }
    for m in PHONE.find_iter(text) {
        let n = digits(m.as_str()).len();
        if (9..=15).contains(&n) && !overlaps(&found, m.start(), m.end()) {
            found.push(Finding {
                kind: "phone_number",
                start: m.start(),
                end: m.end(),
            });
        }
    }
    found.sort_by_key(|f| f.start);
    found
}

/// Rejects messages carrying PII.
pub struct PiiGuard;

impl Handler for PiiGuard {
    async fn handle(&self, request: ExtensionRequest) -> Result<Response, ExtensionError> {
        let found = find_pii(&request.payload.payload.to_text());
        if found.is_empty() {
            return Ok(Response::Ok);
        }
        let mut kinds: Vec<&str> = found.iter().map(|f| f.kind).collect();
        kinds.dedup();
        Ok(Response::reject(
            "pii_detected",
            json!({"kinds": kinds, "count": found.len()}),
        ))
    }
}

/// Masks PII in the message.
pub struct MaskPii;

/// `text` with every finding replaced by `[EMAIL]`, `[CARD]` or `[PHONE]`.
pub fn mask_pii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in find_pii(text) {
        out.push_str(&text[at..f.start]);
        out.push_str(match f.kind {
            "email" => "[EMAIL]",
            "card_number" => "[CARD]",
            _ => "[PHONE]",
        });
        at = f.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Masks every string in a JSON value, keys left alone.
fn mask_json(value: &mut Value) {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => *s = mask_pii(s),
            Value::Array(items) => stack.extend(items.iter_mut()),
            Value::Object(map) => stack.extend(map.values_mut()),
            _ => {}
        }
    }
}

impl Handler for MaskPii {
    async fn handle(&self, request: ExtensionRequest) -> Result<Response, ExtensionError> {
        let mut message = request.payload;
        match &mut message.payload {
            Payload::Text(text) => *text = mask_pii(text),
            Payload::Json(value) => mask_json(value),
        }
        Ok(Response::transform(message))
    }
}

/// A provider that echoes its prompt.
pub struct TestProvider;

impl Handler for TestProvider {
    async fn handle(&self, request: ExtensionRequest) -> Result<Response, ExtensionError> {
        let prompt = match &request.prompt {
            Some(p) => std::borrow::Cow::Borrowed(p.as_str()),
            None => request.payload.payload.to_text(),
        };
        let words = prompt.split_whitespace().count() as u64;
        let mut metadata = Map::new();
        metadata.insert("model".into(), Value::String("echo-1".into()));
        Ok(Response::Provider {
            provider_id: "test_provider".into(),
            output: Value::String(format!("echo: {prompt}")),
            usage: Usage::new(words, words + 1),
            metadata,
        })
    }
}

/// Answers "unchanged" immediately (benchmarks).
pub struct Echo;

impl Handler for Echo {
    async fn handle(&self, _request: ExtensionRequest) -> Result<Response, ExtensionError> {
        Ok(Response::unchanged())
    }
}

/// Serves the four reference extensions on their fixture subjects (queue group
/// `beamline-demo`, so several demo routers share the work).
pub async fn spawn_all(
    client: async_nats::Client,
) -> Result<Vec<tokio::task::JoinHandle<()>>, async_nats::Error> {
    // Compile the PII patterns now rather than on the first request, whose
    // pii_guard call (200 ms timeout) would otherwise pay for it.
    for pattern in [&EMAIL, &CARD, &PHONE] {
        LazyLock::force(pattern);
    }
    let options = ServeOptions {
        queue_group: Some("beamline-demo".into()),
        ..ServeOptions::default()
    };
    Ok(vec![
        crate::spawn(
            client.clone(),
            NORMALIZE_TEXT_SUBJECT,
            NormalizeText,
            options.clone(),
        )
        .await?,
        crate::spawn(client.clone(), PII_GUARD_SUBJECT, PiiGuard, options.clone()).await?,
        crate::spawn(client.clone(), MASK_PII_SUBJECT, MaskPii, options.clone()).await?,
        crate::spawn(client, TEST_PROVIDER_SUBJECT, TestProvider, options).await?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    fn req(text: &str, config: Value) -> ExtensionRequest {
        ExtensionRequest {
            trace_id: "t".into(),
            tenant_id: "acme".into(),
            payload: Message {
                payload: text.into(),
                ..Default::default()
            },
            config: config.as_object().cloned().unwrap_or_default(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn normalize_collapses_whitespace_and_normalises_unicode() {
        let r = NormalizeText
            .handle(req("  Ｈｅｌｌｏ \t\n  wor\u{0301}ld  ", json!({})))
            .await
            .unwrap();
        let Response::Transform {
            message: Some(m), ..
        } = r
        else {
            panic!()
        };
        assert_eq!(m.payload, "Hello wor\u{0301}ld".nfkc().collect::<String>());
        let r = NormalizeText
            .handle(req("abcdef", json!({"max_length": 3})))
            .await
            .unwrap();
        let Response::Transform {
            message: Some(m), ..
        } = r
        else {
            panic!()
        };
        assert_eq!(m.payload, "abc");
    }

    #[test]
    fn pii_is_found_and_clean_text_passes() {
        let kinds = |t: &str| find_pii(t).into_iter().map(|f| f.kind).collect::<Vec<_>>();
        assert_eq!(kinds("mail me at jane.doe@example.com now"), vec!["email"]);
        assert_eq!(kinds("card 4111 1111 1111 1111 ok"), vec!["card_number"]);
        assert_eq!(kinds("call +1 555 123 4567"), vec!["phone_number"]);
        assert_eq!(kinds("call (555) 123-4567"), vec!["phone_number"]);
        assert!(kinds("order 12345 shipped in 2024, 3 items").is_empty());
        assert!(
            kinds("4111 1111 1111 1112")
                .iter()
                .all(|k| *k != "card_number"),
            "Luhn fails"
        );
    }

    #[test]
    fn masking_replaces_every_finding() {
        assert_eq!(
            mask_pii("jane@example.com / 4111-1111-1111-1111 / +44 20 7946 0958"),
            "[EMAIL] / [CARD] / [PHONE]"
        );
    }

    #[tokio::test]
    async fn json_payloads_are_masked_string_by_string_and_normalize_passes_them() {
        let mut r = req("", json!({}));
        r.payload.payload =
            Payload::Json(json!({"to": "jane@example.com", "n": [1, "call +1 555 123 4567"]}));
        let Response::Transform {
            message: Some(m), ..
        } = MaskPii.handle(r.clone()).await.unwrap()
        else {
            panic!()
        };
        assert_eq!(
            m.payload,
            Payload::Json(json!({"to": "[EMAIL]", "n": [1, "call [PHONE]"]}))
        );
        assert_eq!(
            NormalizeText.handle(r).await.unwrap(),
            Response::unchanged()
        );
    }

    #[tokio::test]
    async fn guard_rejects_with_reason_and_kinds() {
        let r = PiiGuard
            .handle(req("write to a@b.io", json!({})))
            .await
            .unwrap();
        assert_eq!(r.to_json()["reason"], "pii_detected");
        assert_eq!(r.to_json()["details"]["kinds"][0], "email");
        assert_eq!(
            PiiGuard.handle(req("hello", json!({}))).await.unwrap(),
            Response::Ok
        );
    }
}
