//! A version's `routing_rules`: which request contexts it serves.
//!
//! `{}` matches every context; `{"key": "v"}` needs the context's `key` to equal `v`;
//! `{"key": ["a", "b"]}` needs it to be one of the list (so `[]` matches nothing, which
//! is how the runbook rolls a version back); several keys are ANDed. A key missing from
//! the context never matches.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::ValidationError;
use crate::limits::json_kind;

/// What one key of the rules asks of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleValue {
    Equals(String),
    OneOf(Vec<String>),
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
                            "must be a string or a list of strings, found {}",
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
        self.rules.iter().all(|(key, rule)| match context.get(key) {
            None => false,
            Some(actual) => match rule {
                RuleValue::Equals(expected) => actual == expected,
                RuleValue::OneOf(list) => list.iter().any(|v| v == actual),
            },
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when no context can match: some key lists no value, as the runbook's
    /// rollback writes (`{"tenant_id": []}`). Such a version receives no traffic.
    pub fn matches_nothing(&self) -> bool {
        self.rules
            .iter()
            .any(|(_, rule)| matches!(rule, RuleValue::OneOf(list) if list.is_empty()))
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
    }
}
