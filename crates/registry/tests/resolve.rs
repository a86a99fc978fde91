//! Version resolution (`lookup_with_version`, REFERENCE.md §5) on in-memory data.

use beamline_model::{ExtensionRecord, Limits, VersionRecord};
use beamline_registry::dataset::{Dataset, Sourced};
use beamline_registry::{ActiveSource, Origin, Snapshot};
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};

fn origin() -> Origin {
    Origin::Builtin {
        name: "test".into(),
        item: None,
    }
}

fn base(id: &str) -> Sourced<ExtensionRecord> {
    Sourced {
        origin: origin(),
        value: serde_json::from_value(
            json!({"id": id, "type": "pre", "subject": format!("s.{id}.v1"), "timeout_ms": 100}),
        )
        .unwrap(),
    }
}

fn version(
    id: &str,
    v: &str,
    rules: Value,
    enabled: bool,
    created_secs: Option<i64>,
) -> Sourced<VersionRecord> {
    Sourced {
        origin: origin(),
        value: VersionRecord {
            id: id.into(),
            version: v.into(),
            subject: format!("s.{id}.{v}"),
            timeout_ms: 150,
            retry: 1,
            config: json!({"v": v}),
            metadata: json!({}),
            routing_rules: rules,
            enabled,
            created_at: created_secs.map(|s| Utc.timestamp_opt(s, 0).unwrap()),
        },
    }
}

fn snapshot(versions: Vec<Sourced<VersionRecord>>) -> Snapshot {
    let data = Dataset {
        extensions: vec![base("n")],
        versions,
        ..Dataset::default()
    };
    Snapshot::build(data, &Limits::default(), ActiveSource::Fixtures, 1)
}

fn resolved(s: &Snapshot, tenant: &str) -> String {
    s.resolve("n", &[("tenant_id", tenant)])
        .unwrap()
        .version
        .clone()
}

#[test]
fn no_versions_resolves_to_the_base_record() {
    let s = snapshot(vec![]);
    let r = s.resolve("n", &[("tenant_id", "x")]).unwrap();
    assert_eq!(
        (r.version.as_str(), r.subject.as_str(), r.timeout_ms),
        ("v1", "s.n.v1", 100)
    );
    assert!(s.resolve("missing", &[("tenant_id", "x")]).is_none());
}

#[test]
fn tenant_list_routes_only_listed_tenants_and_carries_the_versions_fields() {
    let s = snapshot(vec![version(
        "n",
        "v2",
        json!({"tenant_id": ["premium_tenant"]}),
        true,
        Some(2),
    )]);
    let r = s.resolve("n", &[("tenant_id", "premium_tenant")]).unwrap();
    assert_eq!(
        (
            r.version.as_str(),
            r.subject.as_str(),
            r.timeout_ms,
            r.retry
        ),
        ("v2", "s.n.v2", 150, 1)
    );
    assert_eq!(r.config["v"], "v2");
    assert_eq!(r.id, "n");
    assert_eq!(resolved(&s, "standard_tenant"), "v1");
    assert_eq!(
        s.resolve("n", &[] as &[(&str, &str)]).unwrap().version,
        "v1",
        "no tenant in context"
    );
}

#[test]
fn empty_rules_match_everyone() {
    let s = snapshot(vec![version("n", "v2", json!({}), true, Some(2))]);
    assert_eq!(resolved(&s, "anyone"), "v2");
}

/// The runbook's rollback: `{"tenant_id": []}` matches nothing, so the base record
/// (v1) serves — not the newest enabled version, as the original did.
#[test]
fn empty_tenant_list_rolls_back_to_the_base_record() {
    let s = snapshot(vec![version(
        "n",
        "v2",
        json!({"tenant_id": []}),
        true,
        Some(2),
    )]);
    assert_eq!(resolved(&s, "premium_tenant"), "v1");
}

#[test]
fn disabled_versions_are_never_chosen() {
    let s = snapshot(vec![version("n", "v2", json!({}), false, Some(2))]);
    assert_eq!(resolved(&s, "premium_tenant"), "v1");
    assert_eq!(
        s.entry("n").unwrap().versions.len(),
        1,
        "still listed for operators"
    );
}

#[test]
fn newest_matching_version_wins() {
    // v3 is newest by creation time even though inserted first.
    let s = snapshot(vec![
        version("n", "v3", json!({"tenant_id": ["a"]}), true, Some(30)),
        version("n", "v2", json!({}), true, Some(20)),
        version("n", "v4", json!({"tenant_id": ["a"]}), false, Some(40)),
    ]);
    assert_eq!(resolved(&s, "a"), "v3");
    assert_eq!(resolved(&s, "b"), "v2");
    // Without timestamps, names order naturally: v10 is newer than v9.
    let s = snapshot(vec![
        version("n", "v9", json!({}), true, None),
        version("n", "v10", json!({}), true, None),
    ]);
    assert_eq!(resolved(&s, "a"), "v10");
}

#[test]
fn keys_are_anded() {
    let s = snapshot(vec![version(
        "n",
        "v2",
        json!({"tenant_id": "a", "region": ["eu"]}),
        true,
        Some(2),
    )]);
    assert_eq!(
        s.resolve("n", &[("tenant_id", "a"), ("region", "eu")])
            .unwrap()
            .version,
        "v2"
    );
    assert_eq!(
        s.resolve("n", &[("tenant_id", "a"), ("region", "us")])
            .unwrap()
            .version,
        "v1"
    );
}

#[test]
fn a_version_of_an_unknown_extension_is_quarantined() {
    let data = Dataset {
        extensions: vec![base("n")],
        versions: vec![version("ghost", "v2", json!({}), true, None)],
        ..Dataset::default()
    };
    let s = Snapshot::build(data, &Limits::default(), ActiveSource::Fixtures, 1);
    assert!(s.lookup("n").is_some(), "the good record still applies");
    assert_eq!(s.quarantine.len(), 1, "{:?}", s.quarantine);
    let q = &s.quarantine[0];
    assert_eq!(
        (q.table.as_str(), q.key.as_str()),
        ("extension_versions", "ghost/v2")
    );
    assert!(q.error.contains("unknown extension 'ghost'"), "{}", q.error);
}

/// A full rebuild keeps the previous snapshot's entry (the same allocation) for every
/// extension whose records did not change, and builds the rest anew.
#[test]
fn a_rebuild_shares_unchanged_entries() {
    let data = |timeout_of_b: i64, v2_enabled: bool| Dataset {
        extensions: vec![base("a"), base("b"), base("c")]
            .into_iter()
            .map(|mut e| {
                if e.value.id == "b" {
                    e.value.timeout_ms = timeout_of_b;
                }
                e
            })
            .collect(),
        versions: vec![version("c", "v2", json!({}), v2_enabled, Some(10))],
        ..Dataset::default()
    };
    let limits = Limits::default();
    let first = Snapshot::build(data(100, true), &limits, ActiveSource::Database, 1);
    let same = Snapshot::rebuild(data(100, true), &limits, ActiveSource::Database, 2, &first);
    for id in ["a", "b", "c"] {
        assert!(
            std::sync::Arc::ptr_eq(first.lookup(id).unwrap(), same.lookup(id).unwrap()),
            "{id} was rebuilt although nothing changed"
        );
    }
    let changed = Snapshot::rebuild(data(250, false), &limits, ActiveSource::Database, 3, &same);
    assert!(std::sync::Arc::ptr_eq(
        same.lookup("a").unwrap(),
        changed.lookup("a").unwrap()
    ));
    assert_eq!(changed.lookup("b").unwrap().timeout_ms, 250);
    assert!(!changed.entry("c").unwrap().versions[0].version.enabled);
    let version_of_c = |s: &Snapshot| {
        s.resolve("c", &[("tenant_id", "x")])
            .unwrap()
            .version
            .clone()
    };
    assert_eq!(version_of_c(&same), "v2");
    assert_eq!(
        version_of_c(&changed),
        "v1",
        "the disabled v2 no longer serves"
    );
}
