//! Limits of REFERENCE.md §6. One struct, so the registry (at load) and the pipeline
//! (per request) enforce the same numbers, and operators tune them in `[limits]`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ValidationError;

/// Every limit the router enforces on records, policies and messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest payload sent to one extension, in bytes (per extension override:
    /// `metadata.max_payload_size`).
    pub max_payload_bytes: usize,
    /// Largest metadata/context sent to one extension, in bytes (override:
    /// `metadata.max_metadata_size`). Also the largest `config` or `metadata` a record
    /// may carry.
    pub max_metadata_bytes: usize,
    /// Smallest per-attempt timeout a record may ask for.
    pub min_timeout_ms: u32,
    /// Largest per-attempt timeout a record may ask for.
    pub max_timeout_ms: u32,
    /// Most extra attempts a record may ask for.
    pub max_retry: u32,
    /// Most steps (pre + validators + post) in one policy.
    pub max_pipeline_depth: usize,
    /// Most steps of one kind (pre, validators or post) in one policy.
    pub max_steps_per_type: usize,
    /// Most distinct extensions one policy may use.
    pub max_extensions_per_policy: usize,
    /// Most distinct extensions all policies of one tenant may use together.
    pub max_extensions_per_tenant: usize,
    /// Deepest nesting of any JSON value (objects and arrays).
    pub max_json_depth: usize,
    /// Longest JSON array.
    pub max_json_array_len: usize,
    /// Most keys in one JSON object.
    pub max_json_object_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_metadata_bytes: 64 * 1024,
            min_timeout_ms: 10,
            max_timeout_ms: 5000,
            max_retry: 3,
            max_pipeline_depth: 10,
            max_steps_per_type: 5,
            max_extensions_per_policy: 10,
            max_extensions_per_tenant: 20,
            max_json_depth: 10,
            max_json_array_len: 1000,
            max_json_object_keys: 50,
        }
    }
}

impl Limits {
    /// Checks that the limits themselves make sense; `field` names are the config keys.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.min_timeout_ms == 0 {
            return Err(ValidationError::new("min_timeout_ms", "must be at least 1"));
        }
        if self.min_timeout_ms > self.max_timeout_ms {
            return Err(ValidationError::new(
                "min_timeout_ms",
                format!(
                    "{} is greater than max_timeout_ms {}",
                    self.min_timeout_ms, self.max_timeout_ms
                ),
            ));
        }
        for (name, value) in [
            ("max_payload_bytes", self.max_payload_bytes),
            ("max_metadata_bytes", self.max_metadata_bytes),
            ("max_pipeline_depth", self.max_pipeline_depth),
            ("max_steps_per_type", self.max_steps_per_type),
            ("max_extensions_per_policy", self.max_extensions_per_policy),
            ("max_extensions_per_tenant", self.max_extensions_per_tenant),
            ("max_json_depth", self.max_json_depth),
            ("max_json_array_len", self.max_json_array_len),
            ("max_json_object_keys", self.max_json_object_keys),
        ] {
            if value == 0 {
                return Err(ValidationError::new(name, "must be greater than 0"));
            }
        }
        Ok(())
    }

    /// Checks nesting depth, array lengths and object sizes of `value` without
    /// recursion, so a hostile document cannot overflow the stack.
    pub fn check_json_shape(&self, value: &Value) -> Result<(), ValidationError> {
        let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
        while let Some((v, depth)) = stack.pop() {
            match v {
                Value::Array(items) => {
                    if depth > self.max_json_depth {
                        return Err(too_deep(self.max_json_depth));
                    }
                    if items.len() > self.max_json_array_len {
                        return Err(ValidationError::new(
                            "",
                            format!(
                                "an array has {} items, more than the limit of {}",
                                items.len(),
                                self.max_json_array_len
                            ),
                        )
                        .with_code("payload_too_large"));
                    }
                    stack.extend(items.iter().map(|i| (i, depth + 1)));
                }
                Value::Object(map) => {
                    if depth > self.max_json_depth {
                        return Err(too_deep(self.max_json_depth));
                    }
                    if map.len() > self.max_json_object_keys {
                        return Err(ValidationError::new(
                            "",
                            format!(
                                "an object has {} keys, more than the limit of {}",
                                map.len(),
                                self.max_json_object_keys
                            ),
                        )
                        .with_code("payload_too_large"));
                    }
                    stack.extend(map.values().map(|i| (i, depth + 1)));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// [`Limits::check_json_shape`] for an object held as a map (no copy needed).
    pub fn check_map_shape(
        &self,
        map: &serde_json::Map<String, Value>,
    ) -> Result<(), ValidationError> {
        if map.len() > self.max_json_object_keys {
            return Err(ValidationError::new(
                "",
                format!(
                    "an object has {} keys, more than the limit of {}",
                    map.len(),
                    self.max_json_object_keys
                ),
            )
            .with_code("payload_too_large"));
        }
        if self.max_json_depth < 2 && map.values().any(|v| v.is_object() || v.is_array()) {
            return Err(too_deep(self.max_json_depth));
        }
        let nested = Limits {
            max_json_depth: self.max_json_depth.saturating_sub(1),
            ..self.clone()
        };
        for v in map.values() {
            if v.is_object() || v.is_array() {
                nested.check_json_shape(v)?;
            }
        }
        Ok(())
    }

    /// A record's `config` or `metadata`: a JSON object within the shape limits and
    /// at most `max_metadata_bytes` when serialised.
    pub fn check_record_object(&self, field: &str, value: &Value) -> Result<(), ValidationError> {
        if !value.is_object() {
            return Err(ValidationError::new(
                field,
                format!("must be a JSON object, found {}", json_kind(value)),
            ));
        }
        self.check_json_shape(value).map_err(|e| e.within(field))?;
        let size = json_len(value);
        if size > self.max_metadata_bytes {
            return Err(ValidationError::new(
                field,
                format!(
                    "is {size} bytes, more than the limit of {} bytes",
                    self.max_metadata_bytes
                ),
            )
            .with_code("metadata_too_large"));
        }
        Ok(())
    }
}

fn too_deep(limit: usize) -> ValidationError {
    ValidationError::new("", format!("nesting is deeper than the limit of {limit}"))
        .with_code("payload_too_large")
}

/// Bytes `value` takes when serialised as JSON, counted without building the text.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, value) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// The JSON kind of a value, for error messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_at_the_limit_passes_and_one_more_fails() {
        let limits = Limits::default();
        let mut v = json!(1);
        for _ in 0..limits.max_json_depth {
            v = json!([v]);
        }
        assert!(limits.check_json_shape(&v).is_ok());
        let deeper = json!({ "a": v });
        let err = limits.check_json_shape(&deeper).unwrap_err();
        assert!(err.reason.contains("deeper"), "{err}");
    }

    #[test]
    fn very_deep_documents_do_not_overflow_the_stack() {
        let limits = Limits::default();
        let mut v = json!(0);
        for _ in 0..100_000 {
            v = Value::Array(vec![v]);
        }
        assert!(limits.check_json_shape(&v).is_err());
        // serde_json's Value drop is recursive; leak the value to keep the test about us.
        std::mem::forget(v);
    }

    #[test]
    fn object_key_and_array_limits() {
        let limits = Limits::default();
        let many: serde_json::Map<String, Value> =
            (0..51).map(|i| (format!("k{i}"), json!(i))).collect();
        assert!(limits.check_json_shape(&Value::Object(many)).is_err());
        let long = Value::Array(vec![json!(0); 1001]);
        assert!(limits.check_json_shape(&long).is_err());
        let ok = Value::Array(vec![json!(0); 1000]);
        assert!(limits.check_json_shape(&ok).is_ok());
    }

    #[test]
    fn map_shape_matches_value_shape() {
        let limits = Limits::default();
        let mut v = json!(1);
        for _ in 0..limits.max_json_depth - 1 {
            v = json!([v]);
        }
        let ok = json!({ "a": v.clone() });
        assert!(limits.check_map_shape(ok.as_object().unwrap()).is_ok());
        assert!(limits.check_json_shape(&ok).is_ok());
        let deep = json!({ "a": [v] });
        assert!(limits.check_map_shape(deep.as_object().unwrap()).is_err());
        assert!(limits.check_json_shape(&deep).is_err());
    }

    /// Bytes `value` takes as JSON, without building the text.
    #[test]
    fn json_len_counts_bytes() {
        let v = json!({"a": [1, 2, "x"]});
        assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len());
    }

    #[test]
    fn record_objects_must_be_objects_and_small() {
        let limits = Limits::default();
        let err = limits
            .check_record_object("config", &json!([1]))
            .unwrap_err();
        assert_eq!(err.field, "config");
        let big = json!({ "x": "a".repeat(70_000) });
        let err = limits.check_record_object("metadata", &big).unwrap_err();
        assert_eq!(err.code, Some("metadata_too_large"));
    }

    /// Objects count for depth like arrays: nested objects exactly at the limit pass,
    /// one level more fails; an object with exactly the key limit passes.
    #[test]
    fn object_depth_and_key_count_at_the_limit() {
        let limits = Limits::default();
        let mut v = json!({});
        for _ in 0..limits.max_json_depth - 1 {
            v = json!({ "k": v });
        }
        assert!(
            limits.check_json_shape(&v).is_ok(),
            "depth {}",
            limits.max_json_depth
        );
        let deeper = json!({ "k": v });
        assert!(limits.check_json_shape(&deeper).is_err());
        let exactly: serde_json::Map<String, Value> = (0..limits.max_json_object_keys)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        assert!(limits.check_json_shape(&Value::Object(exactly)).is_ok());
    }

    /// `check_map_shape` keeps the same bounds as `check_json_shape`, and names the
    /// configured depth limit when it is 1.
    #[test]
    fn map_shape_at_the_limits() {
        let limits = Limits::default();
        let keys = |n: usize| -> serde_json::Map<String, Value> {
            (0..n).map(|i| (format!("k{i}"), json!(i))).collect()
        };
        assert!(
            limits
                .check_map_shape(&keys(limits.max_json_object_keys))
                .is_ok()
        );
        assert!(
            limits
                .check_map_shape(&keys(limits.max_json_object_keys + 1))
                .is_err()
        );
        let two = Limits {
            max_json_depth: 2,
            ..Limits::default()
        };
        let nested = json!({"a": {"b": 1}, "c": [1]});
        assert!(two.check_map_shape(nested.as_object().unwrap()).is_ok());
        let one = Limits {
            max_json_depth: 1,
            ..Limits::default()
        };
        for v in [json!({"a": {"b": 1}}), json!({"a": [1]})] {
            let err = one.check_map_shape(v.as_object().unwrap()).unwrap_err();
            assert!(err.reason.contains("limit of 1"), "{v}: {err}");
        }
        assert!(
            one.check_map_shape(json!({"a": 1}).as_object().unwrap())
                .is_ok()
        );
    }

    #[test]
    fn limits_validate_catches_nonsense() {
        let l = Limits {
            min_timeout_ms: 6000,
            ..Limits::default()
        };
        assert_eq!(l.validate().unwrap_err().field, "min_timeout_ms");
        assert!(Limits::default().validate().is_ok());
        // One allowed timeout (min = max) is a valid range.
        let one = Limits {
            min_timeout_ms: 100,
            max_timeout_ms: 100,
            ..Limits::default()
        };
        assert!(one.validate().is_ok());
    }
}
