//! A version's `routing_rules`: which request contexts it serves.
//!
//! `{}` matches every context; `{"key": "v"}` needs the context's `key` to equal `v`;
//! `{"key": ["a", "b"]}` needs it to be one of the list (so `[]` matches nothing, which
//! is how the runbook rolls a version back); several keys are ANDed. A key missing from
//! the context never matches.
//!
//! One key is special when its value is a number: `{"share": 5}` is a *stable share*
//! of tenants — it matches the 5 % of `tenant_id`s whose [`share_bucket`] is below
//! 500 (of 10 000). The bucket is SHA-256 of the tenant id, so every router, every
//! build and PostgreSQL itself (docs/REGISTRY.md has the SQL) put a tenant in the same
//! bucket, and a tenant inside 5 % is inside 25 % too: a canary that grows step by
//! step never moves a tenant back and forth. `share` is 0..=100 with at most two
//! decimals; a string or list under `share` is still an ordinary match rule on a
//! context key named `share`, so rules written before the share form keep their meaning.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ValidationError;
use crate::limits::json_kind;

/// The key of the stable-share form (`{"share": 5}`).
pub const SHARE_KEY: &str = "share";
/// Buckets tenants are hashed into: a share is counted in hundredths of a percent.
pub const SHARE_BUCKETS: u32 = 10_000;

/// A tenant's bucket, `0..10_000`: the first four bytes of SHA-256 of the tenant id
/// (UTF-8), read big-endian, modulo 10 000. The same in every router and every build
/// (never a per-process hasher), and computable in SQL:
/// `('x' || left(encode(sha256(convert_to(tenant_id, 'UTF8')), 'hex'), 8))::bit(32)::bigint % 10000`.
pub fn share_bucket(tenant_id: &str) -> u32 {
    let digest = Sha256::digest(tenant_id.as_bytes());
    let first = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    first % SHARE_BUCKETS
}

/// Whether `tenant_id` falls inside a share of `basis_points` (hundredths of a percent).
pub fn in_share(tenant_id: &str, basis_points: u32) -> bool {
    share_bucket(tenant_id) < basis_points
}

/// A share in percent (0..=100, at most two decimals) as basis points, or why not.
pub fn share_basis_points(percent: f64) -> Result<u32, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!(
            "share {percent} is out of range 0..=100 (percent of tenants)"
        ));
    }
    let bp = (percent * 100.0).round();
    if (bp - percent * 100.0).abs() > 1e-6 {
        return Err(format!("share {percent} has more than two decimals"));
    }
    Ok(bp as u32)
}

/// Basis points back as the percent they were written as (`5`, `12.5`).
pub fn share_json(basis_points: u32) -> Value {
    if basis_points.is_multiple_of(100) {
        Value::from(basis_points / 100)
    } else {
        Value::from(f64::from(basis_points) / 100.0)
    }
}

/// What one key of the rules asks of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleValue {
    Equals(String),
    OneOf(Vec<String>),
    /// `{"share": N}`: the context's `tenant_id` falls in the first N % of buckets
    /// (stored in basis points, hundredths of a percent).
    Share(u32),
}

/// Parsed `routing_rules`, keys sorted so matching and display are deterministic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingRules {
    rules: Vec<(String, RuleValue)>,
}

/// Anything a request context can be read from.
pub trait RoutingContext {
    fn get(&self, key: &str) -> Option<&str>;
}

impl RoutingContext for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        HashMap::get(self, key).map(String::as_str)
    }
}

impl RoutingContext for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        BTreeMap::get(self, key).map(String::as_str)
    }
}

impl RoutingContext for [(&str, &str)] {
    fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

impl<const N: usize> RoutingContext for [(&str, &str); N] {
    fn get(&self, key: &str) -> Option<&str> {
        RoutingContext::get(self.as_slice(), key)
    }
}

/// A JSON object context; only string values take part in matching.
impl RoutingContext for serde_json::Map<String, Value> {
    fn get(&self, key: &str) -> Option<&str> {
        serde_json::Map::get(self, key).and_then(Value::as_str)
    }
}

impl RoutingRules {
    /// Parses and validates the JSON form. `field` paths are relative to the rules.
    pub fn parse(value: &Value) -> Result<RoutingRules, ValidationError> {
        let Value::Object(map) = value else {
            return Err(ValidationError::new(
                "",
                format!(
                    "must be a JSON object of key → string or list of strings, found {}",
                    json_kind(value)
                ),
            ));
        };
        let mut rules = Vec::with_capacity(map.len());
        for (key, v) in map {
            if key.is_empty() {
                return Err(ValidationError::new("", "keys must not be empty"));
            }
            let rule = match v {
                Value::Number(n) if key == SHARE_KEY => {
                    let percent = n.as_f64().unwrap_or(f64::NAN);
                    RuleValue::Share(
                        share_basis_points(percent)
                            .map_err(|m| ValidationError::new(key.clone(), m))?,
                    )
                }
                Value::String(s) => RuleValue::Equals(s.clone()),
                Value::Array(items) => {
                    let mut list = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        match item {
                            Value::String(s) => list.push(s.clone()),
                            other => {
                                return Err(ValidationError::new(
                                    format!("{key}[{i}]"),
                                    format!("must be a string, found {}", json_kind(other)),
                                ));
                            }
                        }
                    }
                    RuleValue::OneOf(list)
                }
                other => {
                    return Err(ValidationError::new(
                        key.clone(),
                        format!(
                            "must be a string or a list of strings (or, under `share`, a percent of tenants), found {}",
                            json_kind(other)
                        ),
                    ));
                }
            };
            rules.push((key.clone(), rule));
        }
        rules.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(RoutingRules { rules })
    }

    /// True when every key matches the context (and always for `{}`).
    pub fn matches<C: RoutingContext + ?Sized>(&self, context: &C) -> bool {
        self.rules.iter().all(|(key, rule)| match rule {
            RuleValue::Share(bp) => context
                .get("tenant_id")
                .is_some_and(|tenant| in_share(tenant, *bp)),
            RuleValue::Equals(expected) => context.get(key) == Some(expected.as_str()),
            RuleValue::OneOf(list) => context
                .get(key)
                .is_some_and(|actual| list.iter().any(|v| v == actual)),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when no context can match: some key lists no value, as the runbook's
    /// rollback writes (`{"tenant_id": []}`), or a share is 0. Such a version receives
    /// no traffic.
    pub fn matches_nothing(&self) -> bool {
        self.rules.iter().any(|(_, rule)| match rule {
            RuleValue::OneOf(list) => list.is_empty(),
            RuleValue::Share(bp) => *bp == 0,
            RuleValue::Equals(_) => false,
        })
    }

    /// The share of tenants these rules route by, in basis points, if they have one.
    pub fn share(&self) -> Option<u32> {
        self.rules.iter().find_map(|(_, rule)| match rule {
            RuleValue::Share(bp) => Some(*bp),
            _ => None,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, RuleValue)> {
        self.rules.iter()
    }

    /// The JSON form, as stored.
    pub fn to_json(&self) -> Value {
        let map = self
            .rules
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    RuleValue::Equals(s) => Value::String(s.clone()),
                    RuleValue::OneOf(list) => {
                        Value::Array(list.iter().cloned().map(Value::String).collect())
                    }
                    RuleValue::Share(bp) => share_json(*bp),
                };
                (k.clone(), v)
            })
            .collect();
        Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(v: Value) -> RoutingRules {
        RoutingRules::parse(&v).unwrap()
    }

    /// Only a key listing no value (the runbook's rollback) matches nothing.
    #[test]
    fn matches_nothing_only_for_an_empty_list() {
        assert!(rules(json!({"tenant_id": []})).matches_nothing());
        assert!(rules(json!({"tenant_id": ["a"], "region": []})).matches_nothing());
        assert!(!rules(json!({"tenant_id": ["a"]})).matches_nothing());
        assert!(!rules(json!({"tenant_id": "a"})).matches_nothing());
        assert!(!rules(json!({})).matches_nothing());
    }

    #[test]
    fn empty_rules_match_everything() {
        assert!(rules(json!({})).matches(&[("tenant_id", "x")]));
        assert!(rules(json!({})).matches(&[] as &[(&str, &str)]));
    }

    #[test]
    fn lists_are_membership_and_empty_list_matches_nothing() {
        let r = rules(json!({"tenant_id": ["premium_tenant", "standard_tenant"]}));
        assert!(r.matches(&[("tenant_id", "premium_tenant")]));
        assert!(r.matches(&[("tenant_id", "standard_tenant")]));
        assert!(!r.matches(&[("tenant_id", "free")]));
        assert!(!rules(json!({"tenant_id": []})).matches(&[("tenant_id", "premium_tenant")]));
    }

    #[test]
    fn strings_are_equality_and_keys_are_anded() {
        let r = rules(json!({"tenant_id": "a", "region": ["eu", "us"]}));
        assert!(r.matches(&[("tenant_id", "a"), ("region", "eu")]));
        assert!(!r.matches(&[("tenant_id", "a"), ("region", "ap")]));
        assert!(
            !r.matches(&[("tenant_id", "a")]),
            "missing key never matches"
        );
    }

    #[test]
    fn wrong_shapes_are_refused_with_the_key() {
        let err = RoutingRules::parse(&json!({"tenant_id": 5})).unwrap_err();
        assert_eq!(err.field, "tenant_id");
        let err = RoutingRules::parse(&json!({"tenant_id": ["a", 1]})).unwrap_err();
        assert_eq!(err.field, "tenant_id[1]");
        assert!(RoutingRules::parse(&json!(["tenant_id"])).is_err());
        assert!(RoutingRules::parse(&json!(null)).is_err());
    }

    #[test]
    fn json_round_trip() {
        let v = json!({"b": "x", "a": ["1", "2"]});
        assert_eq!(rules(v.clone()).to_json(), v);
        let v = json!({"share": 12.5, "region": "eu"});
        assert_eq!(rules(v.clone()).to_json(), v);
        assert_eq!(rules(json!({"share": 5})).to_json(), json!({"share": 5}));
        assert_eq!(rules(json!({"share": 5.0})).to_json(), json!({"share": 5}));
    }

    /// Known values, computed outside this code (`printf %s TENANT | sha256sum`, first
    /// 8 hex digits as a number, mod 10000): a change of hash would move tenants
    /// between versions in the middle of every rollout, so it must never happen.
    #[test]
    fn share_buckets_are_stable() {
        for (tenant, bucket) in [
            ("tenant-000", 8854),
            ("tenant-001", 4235),
            ("premium_tenant", 5984),
            ("acme", 9357),
            ("", 2610),
            ("ünï", 1321),
        ] {
            assert_eq!(share_bucket(tenant), bucket, "{tenant:?}");
        }
    }

    #[test]
    fn shares_match_by_bucket_and_grow_monotonically() {
        // acme is in bucket 9357, tenant-001 in 4235.
        let at = |p: f64| rules(json!({ "share": p }));
        assert!(!at(93.57).matches(&[("tenant_id", "acme")]));
        assert!(at(93.58).matches(&[("tenant_id", "acme")]));
        assert!(at(100.0).matches(&[("tenant_id", "acme")]));
        assert!(!at(42.35).matches(&[("tenant_id", "tenant-001")]));
        assert!(at(42.36).matches(&[("tenant_id", "tenant-001")]));
        assert!(
            !at(100.0).matches(&[("region", "eu")]),
            "no tenant_id, no share"
        );
        assert!(at(0.0).matches_nothing() && !at(0.0).matches(&[("tenant_id", "")]));
        assert!(!at(5.0).matches_nothing());
        assert_eq!(at(12.5).share(), Some(1250));
        // A tenant inside a share is inside every larger one.
        let tenants: Vec<String> = (0..2000).map(|i| format!("t{i}")).collect();
        let mut previous = 0;
        for p in [1.0, 5.0, 25.0, 50.0, 100.0] {
            let r = at(p);
            let inside: Vec<&String> = tenants
                .iter()
                .filter(|t| r.matches(&[("tenant_id", t.as_str())]))
                .collect();
            assert!(inside.len() >= previous);
            previous = inside.len();
            // Roughly the share (2000 tenants: a few percent of noise).
            let expected = 2000.0 * p / 100.0;
            assert!(
                (inside.len() as f64 - expected).abs() <= 40.0 + expected * 0.2,
                "{p} %: {} tenants",
                inside.len()
            );
        }
        assert_eq!(previous, 2000);
        // ANDed with ordinary keys.
        let r = rules(json!({"share": 100, "region": "eu"}));
        assert!(r.matches(&[("tenant_id", "a"), ("region", "eu")]));
        assert!(!r.matches(&[("tenant_id", "a"), ("region", "us")]));
    }

    #[test]
    fn shares_out_of_range_are_refused_with_the_field() {
        for bad in [
            json!({"share": 101}),
            json!({"share": -1}),
            json!({"share": 5.125}),
        ] {
            let err = RoutingRules::parse(&bad).unwrap_err();
            assert_eq!(err.field, "share", "{bad}");
        }
        let err = RoutingRules::parse(&json!({"share": 101})).unwrap_err();
        assert!(err.reason.contains("0..=100"), "{err}");
        // A string under `share` is the old meaning: a context key named share.
        let r = rules(json!({"share": "gold"}));
        assert!(r.matches(&[("share", "gold")]) && !r.matches(&[("tenant_id", "gold")]));
        assert_eq!(r.share(), None);
    }
}
