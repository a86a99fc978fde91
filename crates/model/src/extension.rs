//! Extensions, their versions and instances (REFERENCE.md §1, §2).
//!
//! Each comes in two shapes: a loose `*Record` exactly as a source holds it (signed
//! integers, raw JSON), and the typed value that [`ExtensionRecord::validate`] (and
//! friends) produce. Sources never build typed values themselves, so every source
//! gets the same checks.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ValidationError;
use crate::limits::{Limits, json_kind};
use crate::routing::RoutingRules;
use crate::subject::check_subject;

/// Longest extension id (REFERENCE.md §1).
pub const MAX_ID_LEN: usize = 255;
/// Longest version name (REFERENCE.md §1).
pub const MAX_VERSION_LEN: usize = 32;
/// Default per-attempt timeout when a record gives none.
pub const DEFAULT_TIMEOUT_MS: i64 = 5000;
/// Version of a base record that names none.
pub const DEFAULT_VERSION: &str = "v1";

/// Where in the pipeline an extension runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtensionType {
    Pre,
    Validator,
    Post,
    Provider,
}

impl ExtensionType {
    pub const ALL: [ExtensionType; 4] = [
        ExtensionType::Pre,
        ExtensionType::Validator,
        ExtensionType::Post,
        ExtensionType::Provider,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExtensionType::Pre => "pre",
            ExtensionType::Validator => "validator",
            ExtensionType::Post => "post",
            ExtensionType::Provider => "provider",
        }
    }

    /// Position in [`ExtensionType::ALL`], for per-type arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ExtensionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExtensionType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExtensionType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!("unknown type '{s}' (expected one of pre, validator, post, provider)")
            })
    }
}

/// Health of one instance as recorded in `extension_instances.health_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceHealth {
    Healthy,
    Degraded,
    Unhealthy,
    Unknown,
}

impl InstanceHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceHealth::Healthy => "healthy",
            InstanceHealth::Degraded => "degraded",
            InstanceHealth::Unhealthy => "unhealthy",
            InstanceHealth::Unknown => "unknown",
        }
    }
}

impl FromStr for InstanceHealth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "healthy" => Ok(Self::Healthy),
            "degraded" => Ok(Self::Degraded),
            "unhealthy" => Ok(Self::Unhealthy),
            "unknown" => Ok(Self::Unknown),
            _ => Err(format!(
                "unknown health_status '{s}' (expected healthy, degraded, unhealthy or unknown)"
            )),
        }
    }
}

/// A validated extension: the base record of `extensions`, or the effective record
/// after version resolution (then `version` names the chosen version).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Extension {
    pub id: String,
    #[serde(rename = "type")]
    pub ext_type: ExtensionType,
    pub subject: String,
    pub timeout_ms: u32,
    pub retry: u32,
    pub enabled: bool,
    pub version: String,
    pub config: Map<String, Value>,
    pub metadata: Map<String, Value>,
}

/// A validated row of `extension_versions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExtensionVersion {
    pub id: String,
    pub version: String,
    pub subject: String,
    pub timeout_ms: u32,
    pub retry: u32,
    pub config: Map<String, Value>,
    pub metadata: Map<String, Value>,
    pub routing_rules: RoutingRules,
    pub enabled: bool,
    pub created_at: Option<DateTime<Utc>>,
}

impl Serialize for RoutingRules {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// A validated row of `extension_instances`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExtensionInstance {
    pub extension_id: String,
    pub instance_id: String,
    pub subject: String,
    pub weight: u32,
    pub enabled: bool,
    pub health_status: InstanceHealth,
}

/// An `extensions` row or fixture record before validation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionRecord {
    pub id: String,
    #[serde(rename = "type")]
    pub ext_type: String,
    pub subject: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: i64,
    #[serde(default)]
    pub retry: i64,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_version")]
    pub version: String,
    #[serde(default = "empty_object")]
    pub config: Value,
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

/// An `extension_versions` row before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub id: String,
    pub version: String,
    pub subject: String,
    pub timeout_ms: i64,
    pub retry: i64,
    pub config: Value,
    pub metadata: Value,
    pub routing_rules: Value,
    pub enabled: bool,
    pub created_at: Option<DateTime<Utc>>,
}

/// An `extension_instances` row before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    pub extension_id: String,
    pub instance_id: String,
    pub subject: String,
    pub weight: i64,
    pub enabled: bool,
    pub health_status: String,
}

fn default_timeout() -> i64 {
    DEFAULT_TIMEOUT_MS
}
fn default_true() -> bool {
    true
}
fn default_version() -> String {
    DEFAULT_VERSION.to_string()
}
fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// An identifier (extension, instance, tenant, policy): 1–255 characters of
/// `A-Z a-z 0-9 _ . -`. Narrow on purpose: ids end up in NATS headers, file names and
/// metric labels, and none of those should need escaping.
pub fn check_id(field: &str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("is {} characters, longer than {MAX_ID_LEN}", id.len()),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(ValidationError::new(
            field,
            format!(
                "'{}' contains {c:?}; ids may use only letters, digits, '_', '-' and '.'",
                id.escape_debug()
            ),
        ));
    }
    Ok(())
}

fn check_version_name(field: &str, version: &str) -> Result<(), ValidationError> {
    if version.is_empty() || version.len() > MAX_VERSION_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "must be 1 to {MAX_VERSION_LEN} characters, found {}",
                version.len()
            ),
        ));
    }
    if let Some(c) = version
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(ValidationError::new(
            field,
            format!("'{}' contains {c:?}", version.escape_debug()),
        ));
    }
    Ok(())
}

fn check_subject_field(subject: &str) -> Result<(), ValidationError> {
    check_subject(subject).map_err(|reason| ValidationError::new("subject", reason))
}

fn check_timeout(timeout_ms: i64, limits: &Limits) -> Result<u32, ValidationError> {
    if timeout_ms < i64::from(limits.min_timeout_ms)
        || timeout_ms > i64::from(limits.max_timeout_ms)
    {
        return Err(ValidationError::new(
            "timeout_ms",
            format!(
                "{timeout_ms} is out of range {}..={}",
                limits.min_timeout_ms, limits.max_timeout_ms
            ),
        )
        .with_code("timeout_out_of_range"));
    }
    Ok(timeout_ms as u32)
}

fn check_retry(retry: i64, limits: &Limits) -> Result<u32, ValidationError> {
    if retry < 0 || retry > i64::from(limits.max_retry) {
        return Err(ValidationError::new(
            "retry",
            format!("{retry} is out of range 0..={}", limits.max_retry),
        )
        .with_code("retry_limit_exceeded"));
    }
    Ok(retry as u32)
}

/// `config` / `metadata` as a validated object. Metadata keys the pipeline reads
/// (`max_payload_size`, `max_metadata_size`, `allowed_tenants`, `headers`) must have
/// the right type.
fn check_object(
    field: &str,
    value: Value,
    limits: &Limits,
) -> Result<Map<String, Value>, ValidationError> {
    limits.check_record_object(field, &value)?;
    let Value::Object(map) = value else {
        unreachable!("check_record_object accepts only objects")
    };
    if field == "metadata" {
        for key in ["max_payload_size", "max_metadata_size"] {
            if let Some(v) = map.get(key)
                && v.as_u64().is_none_or(|n| n == 0)
            {
                return Err(ValidationError::new(
                    format!("metadata.{key}"),
                    format!("must be a positive integer (bytes), found {v}"),
                ));
            }
        }
        if let Some(v) = map.get("headers")
            && !v.is_boolean()
        {
            return Err(ValidationError::new(
                "metadata.headers",
                format!(
                    "must be true or false (send the Beamline-* headers), found {}",
                    json_kind(v)
                ),
            ));
        }
        if let Some(v) = map.get("allowed_tenants") {
            let ok = v.as_array().is_some_and(|a| a.iter().all(Value::is_string));
            if !ok {
                return Err(ValidationError::new(
                    "metadata.allowed_tenants",
                    format!("must be a list of tenant ids, found {}", json_kind(v)),
                ));
            }
        }
    }
    Ok(map)
}

impl ExtensionRecord {
    pub fn validate(self, limits: &Limits) -> Result<Extension, ValidationError> {
        check_id("id", &self.id)?;
        let ext_type = self
            .ext_type
            .parse::<ExtensionType>()
            .map_err(|reason| ValidationError::new("type", reason))?;
        check_subject_field(&self.subject)?;
        let timeout_ms = check_timeout(self.timeout_ms, limits)?;
        let retry = check_retry(self.retry, limits)?;
        check_version_name("version", &self.version)?;
        let config = check_object("config", self.config, limits)?;
        let metadata = check_object("metadata", self.metadata, limits)?;
        Ok(Extension {
            id: self.id,
            ext_type,
            subject: self.subject,
            timeout_ms,
            retry,
            enabled: self.enabled,
            version: self.version,
            config,
            metadata,
        })
    }
}

impl VersionRecord {
    pub fn validate(self, limits: &Limits) -> Result<ExtensionVersion, ValidationError> {
        check_id("id", &self.id)?;
        check_version_name("version", &self.version)?;
        check_subject_field(&self.subject)?;
        let timeout_ms = check_timeout(self.timeout_ms, limits)?;
        let retry = check_retry(self.retry, limits)?;
        let config = check_object("config", self.config, limits)?;
        let metadata = check_object("metadata", self.metadata, limits)?;
        limits
            .check_json_shape(&self.routing_rules)
            .map_err(|e| e.within("routing_rules"))?;
        let routing_rules =
            RoutingRules::parse(&self.routing_rules).map_err(|e| e.within("routing_rules"))?;
        Ok(ExtensionVersion {
            id: self.id,
            version: self.version,
            subject: self.subject,
            timeout_ms,
            retry,
            config,
            metadata,
            routing_rules,
            enabled: self.enabled,
            created_at: self.created_at,
        })
    }
}

impl InstanceRecord {
    pub fn validate(self) -> Result<ExtensionInstance, ValidationError> {
        check_id("extension_id", &self.extension_id)?;
        check_id("instance_id", &self.instance_id)?;
        check_subject_field(&self.subject)?;
        if !(0..=100).contains(&self.weight) {
            return Err(ValidationError::new(
                "weight",
                format!("{} is out of range 0..=100", self.weight),
            ));
        }
        let health_status = self
            .health_status
            .parse::<InstanceHealth>()
            .map_err(|reason| ValidationError::new("health_status", reason))?;
        Ok(ExtensionInstance {
            extension_id: self.extension_id,
            instance_id: self.instance_id,
            subject: self.subject,
            weight: self.weight as u32,
            enabled: self.enabled,
            health_status,
        })
    }
}

impl Extension {
    /// The effective record when `version` is chosen: the version's subject, timeout,
    /// retry, config and metadata, the base record's id, type and enabled flag.
    pub fn with_version(&self, version: &ExtensionVersion) -> Extension {
        Extension {
            id: self.id.clone(),
            ext_type: self.ext_type,
            subject: version.subject.clone(),
            timeout_ms: version.timeout_ms,
            retry: version.retry,
            enabled: self.enabled,
            version: version.version.clone(),
            config: version.config.clone(),
            metadata: version.metadata.clone(),
        }
    }
}

/// Orders version names the way people read them: `v10` after `v9`, `v2.1` after `v2`.
pub fn compare_version_names(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, &str>> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits > 0 {
                out.push(rest[..digits].parse::<u64>().map_err(|_| &rest[..digits]));
                rest = &rest[digits..];
            } else {
                let text = rest
                    .find(|c: char| c.is_ascii_digit())
                    .unwrap_or(rest.len());
                out.push(Err(&rest[..text]));
                rest = &rest[text..];
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x, y) {
            (Ok(x), Ok(y)) => x.cmp(y),
            (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
            (Err(_), Ok(_)) => std::cmp::Ordering::Less,
            (Err(x), Err(y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    pa.len().cmp(&pb.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(v: Value) -> Result<Extension, ValidationError> {
        serde_json::from_value::<ExtensionRecord>(v)
            .unwrap()
            .validate(&Limits::default())
    }

    #[test]
    fn the_original_fixture_is_valid_with_defaults() {
        let e = record(json!({"id": "normalize_text", "type": "pre",
            "subject": "beamline.ext.pre.normalize_text.v1", "timeout_ms": 100}))
        .unwrap();
        assert_eq!(e.ext_type, ExtensionType::Pre);
        assert_eq!((e.retry, e.enabled, e.version.as_str()), (0, true, "v1"));
        assert!(e.config.is_empty());
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = json!({"id": "x", "type": "pre", "subject": "a.b", "timeout_ms": 100});
        let cases = [
            ("type", json!("preprocessor")),
            ("subject", json!("a.*")),
            ("timeout_ms", json!(5001)),
            ("timeout_ms", json!(9)),
            ("retry", json!(4)),
            ("retry", json!(-1)),
            ("id", json!("has space")),
            ("id", json!("")),
            ("config", json!([])),
            ("metadata", json!("x")),
            ("version", json!("")),
        ];
        for (field, value) in cases {
            let mut v = base.clone();
            v[field] = value.clone();
            let err = record(v).unwrap_err();
            assert_eq!(err.field, field, "{field}={value}: {err}");
        }
        let mut v = base.clone();
        v["metadata"] = json!({"max_payload_size": "big"});
        assert_eq!(record(v).unwrap_err().field, "metadata.max_payload_size");
        let mut v = base.clone();
        v["metadata"] = json!({"headers": "yes"});
        assert_eq!(record(v).unwrap_err().field, "metadata.headers");
        let mut v = base.clone();
        v["metadata"] = json!({"headers": true});
        assert!(record(v).is_ok());
    }

    /// Every bound is inclusive: the limit itself is valid, one past it is not.
    #[test]
    fn bounds_are_inclusive() {
        let base = json!({"id": "x", "type": "pre", "subject": "a.b", "timeout_ms": 100});
        let with = |field: &str, value: Value| {
            let mut v = base.clone();
            v[field] = value;
            record(v)
        };
        let l = Limits::default();
        for (field, ok, bad) in [
            (
                "id",
                json!("i".repeat(MAX_ID_LEN)),
                json!("i".repeat(MAX_ID_LEN + 1)),
            ),
            (
                "version",
                json!("v".repeat(MAX_VERSION_LEN)),
                json!("v".repeat(MAX_VERSION_LEN + 1)),
            ),
            (
                "timeout_ms",
                json!(l.min_timeout_ms),
                json!(l.min_timeout_ms - 1),
            ),
            (
                "timeout_ms",
                json!(l.max_timeout_ms),
                json!(l.max_timeout_ms + 1),
            ),
            ("retry", json!(l.max_retry), json!(l.max_retry + 1)),
            ("retry", json!(0), json!(-1)),
        ] {
            assert!(with(field, ok.clone()).is_ok(), "{field} = {ok} is valid");
            assert_eq!(
                with(field, bad.clone()).unwrap_err().field,
                field,
                "{field} = {bad}"
            );
        }
    }

    /// The metadata keys the pipeline reads are checked for their type.
    #[test]
    fn metadata_keys_the_pipeline_reads_are_typed() {
        let with = |metadata: Value| {
            record(
                json!({"id": "x", "type": "pre", "subject": "a.b", "timeout_ms": 100,
                          "metadata": metadata}),
            )
        };
        for ok in [
            json!({"max_payload_size": 600}),
            json!({"max_metadata_size": 1}),
            json!({"allowed_tenants": ["acme", "beta"]}),
            json!({"allowed_tenants": []}),
        ] {
            assert!(with(ok.clone()).is_ok(), "{ok}");
        }
        for (bad, field) in [
            (json!({"max_payload_size": 0}), "metadata.max_payload_size"),
            (
                json!({"max_metadata_size": -5}),
                "metadata.max_metadata_size",
            ),
            (
                json!({"allowed_tenants": "acme"}),
                "metadata.allowed_tenants",
            ),
            (
                json!({"allowed_tenants": ["acme", 7]}),
                "metadata.allowed_tenants",
            ),
        ] {
            assert_eq!(with(bad.clone()).unwrap_err().field, field, "{bad}");
        }
        // The same keys in `config` are the extension's own business.
        assert!(
            record(
                json!({"id": "x", "type": "pre", "subject": "a.b", "timeout_ms": 100,
                          "config": {"max_payload_size": 0, "allowed_tenants": "any"}})
            )
            .is_ok()
        );
    }

    #[test]
    fn timeout_error_carries_its_reference_name() {
        let err = record(json!({"id": "x", "type": "pre", "subject": "a", "timeout_ms": 20000}))
            .unwrap_err();
        assert_eq!(err.code, Some("timeout_out_of_range"));
        assert!(err.to_string().contains("20000"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r = serde_json::from_value::<ExtensionRecord>(
            json!({"id": "x", "type": "pre", "subject": "a", "timout_ms": 100}),
        );
        assert!(r.unwrap_err().to_string().contains("timout_ms"));
    }

    #[test]
    fn versions_validate_routing_rules() {
        let v = VersionRecord {
            id: "x".into(),
            version: "v2".into(),
            subject: "a.b".into(),
            timeout_ms: 150,
            retry: 1,
            config: json!({}),
            metadata: json!({}),
            routing_rules: json!({"tenant_id": [1]}),
            enabled: true,
            created_at: None,
        };
        let err = v.validate(&Limits::default()).unwrap_err();
        assert_eq!(err.field, "routing_rules.tenant_id[0]");
    }

    #[test]
    fn instances_validate_weight_and_health() {
        let mut i = InstanceRecord {
            extension_id: "x".into(),
            instance_id: "i1".into(),
            subject: "a.b".into(),
            weight: 101,
            enabled: true,
            health_status: "healthy".into(),
        };
        assert_eq!(i.clone().validate().unwrap_err().field, "weight");
        i.weight = 50;
        i.health_status = "sick".into();
        assert_eq!(i.clone().validate().unwrap_err().field, "health_status");
        i.health_status = "degraded".into();
        assert_eq!(
            i.validate().unwrap().health_status,
            InstanceHealth::Degraded
        );
    }

    #[test]
    fn version_names_order_naturally() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_version_names("v10", "v9"), Greater);
        assert_eq!(compare_version_names("v2", "v2.1"), Less);
        assert_eq!(compare_version_names("v1", "v1"), Equal);
        assert_eq!(compare_version_names("v2-beta", "v2"), Greater);
    }
}
