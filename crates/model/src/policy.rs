//! Tenant policies (REFERENCE.md §4): providers, the pipeline's steps and their
//! `when` conditions.
//!
//! A policy's JSON document is the same in a fixture file
//! (`policies/<tenant>/<policy>.json`) and in the `policies.policy` column.
//! [`Policy::from_document`] refuses what the original silently misread: unknown
//! `mode` or `on_fail` values, unknown fields, too many steps. Whether the
//! extensions a policy names exist is the registry's concern, since it alone sees
//! every record.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ValidationError;
use crate::extension::check_id;
use crate::limits::{Limits, json_kind};

/// The policy used when a request names none.
pub const DEFAULT_POLICY_ID: &str = "default";

/// A policy document as written in a file or the `policies.policy` column.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a policy object")]
pub struct PolicyDocument {
    /// Must equal the file's (or row's) tenant when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Must equal the file's (or row's) policy id when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
    #[serde(default = "default_policy_version")]
    pub version: String,
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    /// Pick the same provider for a tenant every time (by weight, per tenant).
    #[serde(default)]
    pub sticky: bool,
    #[serde(default)]
    pub pre: Vec<StepSpec>,
    #[serde(default)]
    pub validators: Vec<ValidatorSpec>,
    #[serde(default)]
    pub post: Vec<StepSpec>,
    #[serde(default)]
    pub fallbacks: Vec<FallbackSpec>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// Circuit breaker settings for this policy's calls, overriding `[circuit_breaker]`
    /// key by key. A policy with overrides gets breakers of its own, so a strict
    /// policy never trips (or is tripped by) the breakers other policies share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerOverrides>,
}

/// Per-policy circuit breaker overrides; every field is optional.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an object of circuit breaker settings"
)]
pub struct BreakerOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate_threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_calls: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_max_requests: Option<u32>,
}

impl BreakerOverrides {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let at_least_one = |name: &str, v: Option<u64>| match v {
            Some(0) => Err(ValidationError::new(name, "must be at least 1")),
            _ => Ok(()),
        };
        at_least_one("failure_threshold", self.failure_threshold.map(u64::from))?;
        at_least_one("timeout_seconds", self.timeout_seconds)?;
        at_least_one(
            "half_open_max_requests",
            self.half_open_max_requests.map(u64::from),
        )?;
        at_least_one("window_seconds", self.window_seconds)?;
        if self.window_seconds.is_some_and(|w| w > 3600) {
            return Err(ValidationError::new(
                "window_seconds",
                "must be at most 3600",
            ));
        }
        if let Some(r) = self.error_rate_threshold
            && !(r > 0.0 && r <= 1.0)
        {
            return Err(ValidationError::new(
                "error_rate_threshold",
                format!("{r} is out of range (0, 1]"),
            ));
        }
        Ok(())
    }
}

fn default_policy_version() -> String {
    "1.0".to_string()
}

/// A provider the policy may route to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object with \"name\"")]
pub struct ProviderSpec {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A provider-type extension to invoke when this provider is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    /// Sent to the provider's extension as `parameters` (`max_tokens`, `model`, …);
    /// a request's context `parameters` overrides them key by key.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
}

fn default_weight() -> u32 {
    100
}

/// How a pre or post step's failure affects the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", expecting = "\"required\" or \"optional\"")]
pub enum Mode {
    /// Failure fails the request.
    Required,
    /// Failure is skipped and the message left unchanged.
    Optional,
}

/// What a validator's rejection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    rename_all = "lowercase",
    expecting = "\"block\", \"warn\" or \"ignore\""
)]
pub enum OnFail {
    Block,
    Warn,
    Ignore,
}

/// A pre or post step.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object with \"id\"")]
pub struct StepSpec {
    pub id: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub config: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Value>,
}

fn default_mode() -> Mode {
    Mode::Required
}

/// A validator step.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object with \"id\"")]
pub struct ValidatorSpec {
    pub id: String,
    #[serde(default = "default_on_fail")]
    pub on_fail: OnFail,
    #[serde(default)]
    pub config: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Value>,
}

fn default_on_fail() -> OnFail {
    OnFail::Block
}

/// A provider fallback: when the chosen provider fails with a matching status,
/// retry, then go `to` another provider.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "an object with \"to\"")]
pub struct FallbackSpec {
    #[serde(default)]
    pub when: Option<Value>,
    #[serde(default)]
    pub retry: u32,
    pub to: String,
}

/// A validated policy of one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub tenant_id: String,
    pub policy_id: String,
    pub enabled: bool,
    pub document: PolicyDocument,
    pub pre: Vec<Step>,
    pub validators: Vec<Validator>,
    pub post: Vec<Step>,
    pub fallbacks: Vec<Fallback>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub mode: Mode,
    pub config: Map<String, Value>,
    pub when: When,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Validator {
    pub id: String,
    pub on_fail: OnFail,
    pub config: Map<String, Value>,
    pub when: When,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    pub when: When,
    pub retry: u32,
    pub to: String,
}

impl Policy {
    /// Parses a document from JSON text, naming the offending field on error.
    pub fn parse_document(value: Value) -> Result<PolicyDocument, ValidationError> {
        if !value.is_object() {
            return Err(ValidationError::new(
                "",
                format!(
                    "a policy must be a JSON object, found {}",
                    json_kind(&value)
                ),
            ));
        }
        serde_path_to_error::deserialize(value).map_err(ValidationError::from_serde)
    }

    /// Validates a document for (tenant, policy id).
    pub fn from_document(
        tenant_id: &str,
        policy_id: &str,
        enabled: bool,
        document: PolicyDocument,
        limits: &Limits,
    ) -> Result<Policy, ValidationError> {
        check_id("tenant_id", tenant_id)?;
        check_id("policy_id", policy_id)?;
        if let Some(t) = &document.tenant_id
            && t != tenant_id
        {
            return Err(ValidationError::new(
                "tenant_id",
                format!("'{t}' does not match the policy's tenant '{tenant_id}'"),
            ));
        }
        if let Some(p) = &document.policy_id
            && p != policy_id
        {
            return Err(ValidationError::new(
                "policy_id",
                format!("'{p}' does not match the policy's id '{policy_id}'"),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, p) in document.providers.iter().enumerate() {
            let field = format!("providers[{i}]");
            if p.name.is_empty() {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    "must not be empty",
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    format!("provider '{}' is listed twice", p.name),
                ));
            }
            if p.weight > 10_000 {
                return Err(ValidationError::new(
                    format!("{field}.weight"),
                    format!("{} is out of range 0..=10000", p.weight),
                ));
            }
            if let Some(ext) = &p.extension {
                check_id(&format!("{field}.extension"), ext)?;
            }
            limits
                .check_map_shape(&p.parameters)
                .map_err(|e| e.within(&format!("{field}.parameters")))?;
        }
        let per_type = [
            ("pre", document.pre.len(), "too_many_pre_processors"),
            (
                "validators",
                document.validators.len(),
                "too_many_validators",
            ),
            ("post", document.post.len(), "too_many_post_processors"),
        ];
        for (field, n, code) in per_type {
            if n > limits.max_steps_per_type {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "{n} steps, more than the limit of {}",
                        limits.max_steps_per_type
                    ),
                )
                .with_code(code));
            }
        }
        let depth = document.pre.len() + document.validators.len() + document.post.len();
        if depth > limits.max_pipeline_depth {
            return Err(ValidationError::new(
                "",
                format!(
                    "{depth} pipeline steps, more than the limit of {}",
                    limits.max_pipeline_depth
                ),
            )
            .with_code("pipeline_too_deep"));
        }
        let steps = |list: &[StepSpec], name: &str| -> Result<Vec<Step>, ValidationError> {
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    let field = format!("{name}[{i}]");
                    check_id(&format!("{field}.id"), &s.id)?;
                    check_step_config(&field, &s.config, limits)?;
                    Ok(Step {
                        id: s.id.clone(),
                        mode: s.mode,
                        config: s.config.clone(),
                        when: When::parse_optional(s.when.as_ref(), limits)
                            .map_err(|e| e.within(&format!("{field}.when")))?,
                    })
                })
                .collect()
        };
        let pre = steps(&document.pre, "pre")?;
        let post = steps(&document.post, "post")?;
        let validators = document
            .validators
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let field = format!("validators[{i}]");
                check_id(&format!("{field}.id"), &s.id)?;
                check_step_config(&field, &s.config, limits)?;
                Ok(Validator {
                    id: s.id.clone(),
                    on_fail: s.on_fail,
                    config: s.config.clone(),
                    when: When::parse_optional(s.when.as_ref(), limits)
                        .map_err(|e| e.within(&format!("{field}.when")))?,
                })
            })
            .collect::<Result<Vec<_>, ValidationError>>()?;
        let fallbacks = document
            .fallbacks
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let field = format!("fallbacks[{i}]");
                if f.retry > limits.max_retry {
                    return Err(ValidationError::new(
                        format!("{field}.retry"),
                        format!("{} is out of range 0..={}", f.retry, limits.max_retry),
                    )
                    .with_code("retry_limit_exceeded"));
                }
                if !names.contains(f.to.as_str()) {
                    return Err(ValidationError::new(
                        format!("{field}.to"),
                        format!("'{}' is not one of the policy's providers", f.to),
                    ));
                }
                Ok(Fallback {
                    when: When::parse_optional(f.when.as_ref(), limits)
                        .map_err(|e| e.within(&format!("{field}.when")))?,
                    retry: f.retry,
                    to: f.to.clone(),
                })
            })
            .collect::<Result<Vec<_>, ValidationError>>()?;
        let distinct: BTreeSet<&str> = pre
            .iter()
            .map(|s| s.id.as_str())
            .chain(validators.iter().map(|s| s.id.as_str()))
            .chain(post.iter().map(|s| s.id.as_str()))
            .chain(
                document
                    .providers
                    .iter()
                    .filter_map(|p| p.extension.as_deref()),
            )
            .collect();
        if distinct.len() > limits.max_extensions_per_policy {
            return Err(ValidationError::new(
                "",
                format!(
                    "uses {} extensions, more than the limit of {} per policy",
                    distinct.len(),
                    limits.max_extensions_per_policy
                ),
            ));
        }
        if let Some(b) = &document.circuit_breaker {
            b.validate().map_err(|e| e.within("circuit_breaker"))?;
        }
        let metadata = Value::Object(document.metadata.clone());
        limits.check_record_object("metadata", &metadata)?;
        Ok(Policy {
            tenant_id: tenant_id.to_string(),
            policy_id: policy_id.to_string(),
            enabled,
            pre,
            validators,
            post,
            fallbacks,
            document,
        })
    }

    /// Every extension id the policy uses, with the type it expects it to be.
    pub fn extension_refs(&self) -> Vec<(String, crate::ExtensionType, String)> {
        use crate::ExtensionType as T;
        let mut out = Vec::new();
        for (i, s) in self.pre.iter().enumerate() {
            out.push((format!("pre[{i}].id"), T::Pre, s.id.clone()));
        }
        for (i, s) in self.validators.iter().enumerate() {
            out.push((format!("validators[{i}].id"), T::Validator, s.id.clone()));
        }
        for (i, s) in self.post.iter().enumerate() {
            out.push((format!("post[{i}].id"), T::Post, s.id.clone()));
        }
        for (i, p) in self.document.providers.iter().enumerate() {
            if let Some(e) = &p.extension {
                out.push((format!("providers[{i}].extension"), T::Provider, e.clone()));
            }
        }
        out
    }
}

fn check_step_config(
    field: &str,
    config: &Map<String, Value>,
    limits: &Limits,
) -> Result<(), ValidationError> {
    limits
        .check_record_object("config", &Value::Object(config.clone()))
        .map_err(|e| e.within(field))
}

/// Comparison operators of the operator form of `when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    In,
}

impl CmpOp {
    fn parse(s: &str) -> Option<CmpOp> {
        Some(match s {
            "==" => CmpOp::Eq,
            "!=" => CmpOp::Ne,
            ">" => CmpOp::Gt,
            "<" => CmpOp::Lt,
            ">=" => CmpOp::Ge,
            "<=" => CmpOp::Le,
            "in" => CmpOp::In,
            _ => return None,
        })
    }
}

/// One condition of a `when`.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// `key: value`
    Equals { key: String, value: Value },
    /// `key: [values]`
    OneOf { key: String, values: Vec<Value> },
    /// `{"op": [{"var": "context.key"}, operand]}`
    Compare {
        op: CmpOp,
        var: String,
        operand: Value,
    },
}

/// A step's condition: all entries ANDed; an empty `when` is always true.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct When {
    pub conditions: Vec<Condition>,
}

impl When {
    pub fn parse_optional(value: Option<&Value>, limits: &Limits) -> Result<When, ValidationError> {
        match value {
            None | Some(Value::Null) => Ok(When::default()),
            Some(v) => When::parse(v, limits),
        }
    }

    pub fn parse(value: &Value, limits: &Limits) -> Result<When, ValidationError> {
        limits.check_json_shape(value)?;
        let Value::Object(map) = value else {
            return Err(ValidationError::new(
                "",
                format!("must be a JSON object, found {}", json_kind(value)),
            ));
        };
        let mut conditions = Vec::with_capacity(map.len());
        for (key, v) in map {
            if let Some(op) = CmpOp::parse(key) {
                let args = v.as_array().filter(|a| a.len() == 2).ok_or_else(|| {
                    ValidationError::new(
                        key.clone(),
                        "operator form takes exactly two arguments: [{\"var\": \"context.key\"}, value]",
                    )
                })?;
                let var = args[0]
                    .get("var")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        ValidationError::new(
                            format!("{key}[0]"),
                            "must be {\"var\": \"context.key\"}",
                        )
                    })?;
                if op == CmpOp::In && !args[1].is_array() {
                    return Err(ValidationError::new(
                        format!("{key}[1]"),
                        "the operand of `in` must be a list",
                    ));
                }
                conditions.push(Condition::Compare {
                    op,
                    var: var.strip_prefix("context.").unwrap_or(var).to_string(),
                    operand: args[1].clone(),
                });
            } else if let Value::Array(values) = v {
                conditions.push(Condition::OneOf {
                    key: key.clone(),
                    values: values.clone(),
                });
            } else if v.is_object() {
                return Err(ValidationError::new(
                    key.clone(),
                    format!(
                        "'{key}' is not an operator (==, !=, >, <, >=, <=, in) and an object is not a value to compare with"
                    ),
                ));
            } else {
                conditions.push(Condition::Equals {
                    key: key.clone(),
                    value: v.clone(),
                });
            }
        }
        Ok(When { conditions })
    }

    /// True when every condition holds for `context`. A key the context lacks makes its
    /// condition false (except `!=`, which holds).
    pub fn evaluate(&self, context: &Map<String, Value>) -> bool {
        self.conditions.iter().all(|c| match c {
            Condition::Equals { key, value } => {
                lookup(context, key).is_some_and(|a| json_eq(a, value))
            }
            Condition::OneOf { key, values } => {
                lookup(context, key).is_some_and(|a| values.iter().any(|v| json_eq(a, v)))
            }
            Condition::Compare { op, var, operand } => {
                let actual = lookup(context, var);
                match (op, actual) {
                    (CmpOp::Ne, None) => true,
                    (_, None) => false,
                    (CmpOp::Eq, Some(a)) => json_eq(a, operand),
                    (CmpOp::Ne, Some(a)) => !json_eq(a, operand),
                    (CmpOp::In, Some(a)) => operand
                        .as_array()
                        .is_some_and(|l| l.iter().any(|v| json_eq(a, v))),
                    (op, Some(a)) => match json_cmp(a, operand) {
                        None => false,
                        Some(ord) => match op {
                            CmpOp::Gt => ord.is_gt(),
                            CmpOp::Lt => ord.is_lt(),
                            CmpOp::Ge => ord.is_ge(),
                            CmpOp::Le => ord.is_le(),
                            _ => false,
                        },
                    },
                }
            }
        })
    }
}

/// Looks up `a.b.c` in nested objects; a plain key is tried whole first so keys that
/// contain dots still work.
fn lookup<'a>(context: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = context.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut current = context.get(parts.next()?)?;
    for p in parts {
        current = current.as_object()?.get(p)?;
    }
    Some(current)
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn json_cmp(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every bound of a policy's breaker overrides, inclusive where it says so.
    #[test]
    fn breaker_override_bounds() {
        let check = |v: Value| {
            serde_json::from_value::<BreakerOverrides>(v)
                .unwrap()
                .validate()
                .map_err(|e| e.field)
        };
        for ok in [
            json!({}),
            json!({"failure_threshold": 1, "timeout_seconds": 1, "half_open_max_requests": 1}),
            json!({"window_seconds": 1}),
            json!({"window_seconds": 60}),
            json!({"window_seconds": 3600}),
            json!({"error_rate_threshold": 0.0001}),
            json!({"error_rate_threshold": 0.5}),
            json!({"error_rate_threshold": 1.0}),
        ] {
            assert_eq!(check(ok.clone()), Ok(()), "{ok}");
        }
        for (bad, field) in [
            (json!({"failure_threshold": 0}), "failure_threshold"),
            (json!({"timeout_seconds": 0}), "timeout_seconds"),
            (
                json!({"half_open_max_requests": 0}),
                "half_open_max_requests",
            ),
            (json!({"window_seconds": 0}), "window_seconds"),
            (json!({"window_seconds": 3601}), "window_seconds"),
            (json!({"error_rate_threshold": 0.0}), "error_rate_threshold"),
            (
                json!({"error_rate_threshold": -0.5}),
                "error_rate_threshold",
            ),
            (
                json!({"error_rate_threshold": 1.01}),
                "error_rate_threshold",
            ),
        ] {
            assert_eq!(check(bad.clone()), Err(field.to_string()), "{bad}");
        }
    }

    fn policy(v: Value) -> Result<Policy, ValidationError> {
        let doc = Policy::parse_document(v)?;
        Policy::from_document("acme", "default", true, doc, &Limits::default())
    }

    /// The original's shape (providers as strings) is refused with the field path and
    /// in JSON words, never a Rust type name.
    #[test]
    fn document_errors_name_the_field_path_in_json_words() {
        for (doc, field, needle) in [
            (
                json!({"providers": ["openai"]}),
                "providers[0]",
                "expected an object with \"name\", found the string \"openai\"",
            ),
            (
                json!({"pre": [{"id": "n", "mode": 3}]}),
                "pre[0].mode",
                "expected a string, found the number 3",
            ),
            (
                json!({"providers": [{"name": "a", "weight": -1}]}),
                "providers[0].weight",
                "expected a non-negative whole number, found the number -1",
            ),
            (
                json!({"pre": {"id": "n"}}),
                "pre",
                "expected an array, found an object",
            ),
        ] {
            let e = Policy::parse_document(doc).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(needle), "{e}");
            for rust in ["struct", "Spec", "u32", "sequence", "enum"] {
                assert!(!e.reason.contains(rust), "{e}");
            }
        }
    }

    fn sample() -> Value {
        json!({"version": "1.0",
            "providers": [{"name": "openai", "weight": 70}, {"name": "anthropic", "weight": 30}],
            "pre": [{"id": "normalize_text", "mode": "required"}],
            "validators": [{"id": "pii_guard", "on_fail": "block"}],
            "post": [{"id": "mask_pii", "mode": "optional"}],
            "fallbacks": [{"when": {"status": ["timeout", "5xx"]}, "retry": 2, "to": "anthropic"}],
            "metadata": {"description": "sample"}})
    }

    #[test]
    fn the_reference_policy_is_valid() {
        let p = policy(sample()).unwrap();
        assert_eq!(p.pre[0].mode, Mode::Required);
        assert_eq!(p.validators[0].on_fail, OnFail::Block);
        assert_eq!(p.fallbacks[0].to, "anthropic");
        assert_eq!(p.extension_refs().len(), 3);
    }

    #[test]
    fn unknown_mode_is_refused_not_treated_as_optional() {
        let mut v = sample();
        v["pre"][0]["mode"] = json!("mandatory");
        let err = policy(v).unwrap_err();
        assert!(err.to_string().contains("mandatory"), "{err}");
        let mut v = sample();
        v["validators"][0]["on_fail"] = json!("reject");
        assert!(policy(v).is_err());
    }

    #[test]
    fn step_limits_have_reference_names() {
        let mut v = sample();
        v["pre"] = json!(
            (0..6)
                .map(|i| json!({"id": format!("p{i}")}))
                .collect::<Vec<_>>()
        );
        assert_eq!(policy(v).unwrap_err().code, Some("too_many_pre_processors"));
        let mut v = sample();
        v["pre"] = json!(
            (0..4)
                .map(|i| json!({"id": format!("p{i}")}))
                .collect::<Vec<_>>()
        );
        v["validators"] = json!(
            (0..4)
                .map(|i| json!({"id": format!("v{i}")}))
                .collect::<Vec<_>>()
        );
        v["post"] = json!(
            (0..3)
                .map(|i| json!({"id": format!("o{i}")}))
                .collect::<Vec<_>>()
        );
        assert_eq!(policy(v).unwrap_err().code, Some("pipeline_too_deep"));
    }

    #[test]
    fn breaker_overrides_are_checked() {
        let mut v = sample();
        v["circuit_breaker"] = json!({"failure_threshold": 2, "timeout_seconds": 5});
        let p = policy(v).unwrap();
        assert_eq!(
            p.document.circuit_breaker.unwrap().failure_threshold,
            Some(2)
        );
        let mut v = sample();
        v["circuit_breaker"] = json!({"error_rate_threshold": 1.5});
        assert_eq!(
            policy(v).unwrap_err().field,
            "circuit_breaker.error_rate_threshold"
        );
        let mut v = sample();
        v["circuit_breaker"] = json!({"failure_treshold": 2});
        assert!(policy(v).is_err());
    }

    #[test]
    fn fallback_must_name_a_provider() {
        let mut v = sample();
        v["fallbacks"][0]["to"] = json!("nobody");
        assert_eq!(policy(v).unwrap_err().field, "fallbacks[0].to");
    }

    #[test]
    fn document_ids_must_match_location() {
        let mut v = sample();
        v["tenant_id"] = json!("other");
        assert_eq!(policy(v).unwrap_err().field, "tenant_id");
    }

    #[test]
    fn when_membership_equality_and_operators() {
        let l = Limits::default();
        let ctx = json!({"tenant_id": "t1", "score": 7, "region": {"name": "eu"}});
        let ctx = ctx.as_object().unwrap();
        let t = |v: Value| When::parse(&v, &l).unwrap().evaluate(ctx);
        assert!(t(json!({})));
        assert!(t(json!({"tenant_id": ["t1", "t2"]})));
        assert!(!t(json!({"tenant_id": ["t2"]})));
        assert!(t(json!({"tenant_id": "t1", "score": 7.0})));
        assert!(t(json!({">": [{"var": "context.score"}, 5]})));
        assert!(!t(json!({"<": [{"var": "context.score"}, 5]})));
        assert!(t(json!({"==": [{"var": "context.region.name"}, "eu"]})));
        assert!(t(json!({"in": [{"var": "tenant_id"}, ["t1"]]})));
        assert!(t(json!({"!=": [{"var": "context.missing"}, 1]})));
        assert!(
            !t(json!({">": [{"var": "context.tenant_id"}, 1]})),
            "type mismatch is false"
        );
        assert!(!t(json!({"missing": 1})));
    }

    #[test]
    fn malformed_when_is_refused() {
        let l = Limits::default();
        assert!(When::parse(&json!([1]), &l).is_err());
        assert!(When::parse(&json!({"==": [1]}), &l).is_err());
        assert!(When::parse(&json!({"==": [{"x": 1}, 2]}), &l).is_err());
        assert!(When::parse(&json!({"in": [{"var": "a"}, 2]}), &l).is_err());
        assert!(When::parse(&json!({"key": {"a": 1}}), &l).is_err());
    }
}
