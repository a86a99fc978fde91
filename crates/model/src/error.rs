//! The error every validation returns: which field, and why.

use std::fmt;

/// A value that failed validation. `field` is a path inside the record
/// (`timeout_ms`, `routing_rules.tenant_id`, `pre[2].mode`); the caller adds where the
/// record came from (a file, a table row), so the whole message names what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// Path of the offending field inside the record.
    pub field: String,
    /// What is wrong with it, in words an operator can act on.
    pub reason: String,
    /// The error name of REFERENCE.md §6 when one applies (`timeout_out_of_range`, …).
    pub code: Option<&'static str>,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Prefixes the field path, for errors found inside a nested value.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else if self.field.starts_with('[') {
            format!("{parent}{}", self.field)
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)?;
        } else {
            write!(f, "field `{}`: {}", self.field, self.reason)?;
        }
        if let Some(code) = self.code {
            write!(f, " ({code})")?;
        }
        Ok(())
    }
}

impl ValidationError {
    /// The error of deserializing a JSON document, with the path of the field that
    /// failed and serde's message put in an operator's words (see [`humanize_serde`]).
    pub fn from_serde(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        ValidationError::new(field, humanize_serde(&e.inner().to_string()))
    }
}

/// serde's messages name Rust types (`expected struct ProviderSpec`, `expected u32`);
/// an operator editing JSON wants to read what the document should hold there.
/// Turns `invalid type: X, expected Y` into `expected Y, found X`, and the Rust type
/// names into JSON words. Types that can show up in a message carry a
/// `#[serde(expecting = "…")]` of their own; this is the net behind it.
pub fn humanize_serde(message: &str) -> String {
    // serde_json appends " at line L column C" when parsing text; the caller names
    // the place better (the field path).
    let message = match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => &message[..i],
        _ => message,
    };
    let rewritten = ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|prefix| {
            let rest = message.strip_prefix(prefix)?;
            let (found, expected) = rest.rsplit_once(", expected ")?;
            Some(format!(
                "expected {}, found {}",
                json_words(expected),
                found_words(found)
            ))
        });
    match rewritten {
        Some(r) => r,
        None => match message.split_once(", expected ") {
            // "invalid length 3, expected …", "unknown variant `x`, expected one of …"
            Some((head, expected)) => format!("{head}, expected {}", json_words(expected)),
            None => message.to_string(),
        },
    }
}

fn found_words(found: &str) -> String {
    match found {
        "map" => "an object".into(),
        "sequence" => "an array".into(),
        "null" | "unit value" => "null".into(),
        f if f.starts_with("string ") => format!("the string {}", &f["string ".len()..]),
        f if f.starts_with("integer ") || f.starts_with("floating point ") => {
            format!(
                "the number {}",
                f.split_once(' ')
                    .map(|x| x.1)
                    .unwrap_or(f)
                    .trim_matches('`')
            )
        }
        f if f.starts_with("boolean ") => f["boolean ".len()..].trim_matches('`').to_string(),
        f => f.to_string(),
    }
}

fn json_words(expected: &str) -> String {
    let e = expected.trim();
    if e.starts_with("struct ") || e == "a map" || e.starts_with("struct variant") {
        return "an object".into();
    }
    if e.starts_with("enum ") {
        return "one of the allowed values".into();
    }
    match e {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative whole number".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "an array".into(),
        "a boolean" => "true or false".into(),
        "unit" => "null".into(),
        "a borrowed string" | "string or map" => "a string".into(),
        "a string" | "a character" => "a string".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_speak_json_not_rust() {
        for (raw, want) in [
            (
                "invalid type: string \"openai\", expected struct ProviderSpec",
                "expected an object, found the string \"openai\"",
            ),
            (
                "invalid type: string \"x\", expected an object with \"name\"",
                "expected an object with \"name\", found the string \"x\"",
            ),
            (
                "invalid value: integer `-1`, expected u32",
                "expected a non-negative whole number, found the number -1",
            ),
            (
                "invalid type: map, expected a sequence at line 1 column 9",
                "expected an array, found an object",
            ),
            (
                "invalid type: boolean `true`, expected i64",
                "expected a whole number, found true",
            ),
            (
                "unknown variant `mandatory`, expected `required` or `optional`",
                "unknown variant `mandatory`, expected `required` or `optional`",
            ),
            ("missing field `name`", "missing field `name`"),
        ] {
            let got = humanize_serde(raw);
            assert_eq!(got, want, "from {raw}");
            for rust in ["struct", "u32", "i64", "sequence", "ProviderSpec"] {
                assert!(!got.contains(rust), "{got} still names {rust}");
            }
        }
    }
}
