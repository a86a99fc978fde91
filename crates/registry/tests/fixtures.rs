//! The fixtures source: the shipped files, every kind of bad file, and refused reloads
//! that keep the previous snapshot.

mod common;

use std::fs;

use beamline_model::{ExtensionType, Limits};
use beamline_registry::{ActiveSource, ErrorKind, Registry, RegistryConfig, fixtures};
use common::*;
use serde_json::json;

#[tokio::test]
async fn shipped_fixtures_load_the_original_four_and_a_default_policy() {
    let root = repo_fixtures();
    let registry = start(fixtures_config(
        &root.join("extensions"),
        Some(&root.join("policies")),
    ))
    .await;
    let snap = registry.snapshot();
    assert_eq!(snap.source, ActiveSource::Fixtures);
    assert_eq!(snap.size(), 4);
    let n = snap.lookup("normalize_text").expect("normalize_text");
    assert_eq!(
        (
            n.ext_type,
            n.subject.as_str(),
            n.timeout_ms,
            n.retry,
            n.enabled
        ),
        (
            ExtensionType::Pre,
            "beamline.ext.pre.normalize_text.v1",
            100,
            0,
            true
        )
    );
    let p = snap.lookup("test_provider").unwrap();
    assert_eq!((p.timeout_ms, p.retry), (5000, 1));
    assert_eq!(
        snap.lookup("pii_guard").unwrap().subject,
        "beamline.ext.validate.pii_guard.v1"
    );
    assert_eq!(snap.list_by_type(ExtensionType::Post)[0].id, "mask_pii");
    let policy = snap.policy("default", "default").expect("default policy");
    assert_eq!(policy.pre[0].id, "normalize_text");
    assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    // Any tenant without a policy of its own uses the default tenant's.
    assert!(snap.policy("acme", "default").is_some());
    assert!(snap.policy("acme", "nope").is_none());
}

#[tokio::test]
async fn builtin_fixtures_match_the_repository_files() {
    let builtin = start(RegistryConfig::default()).await.snapshot();
    let root = repo_fixtures();
    let files = start(fixtures_config(
        &root.join("extensions"),
        Some(&root.join("policies")),
    ))
    .await
    .snapshot();
    assert_eq!(builtin.size(), files.size());
    for ext in files.list() {
        assert_eq!(
            builtin.lookup(&ext.id).map(|e| e.as_ref()),
            Some(ext.as_ref())
        );
    }
    assert_eq!(builtin.counts.policies, files.counts.policies);
}

#[tokio::test]
async fn arrays_versions_and_instances_in_one_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("many.json"),
        json!([
            {"id": "a", "type": "pre", "subject": "s.a.v1",
             "versions": [
                {"version": "v2", "subject": "s.a.v2", "routing_rules": {"tenant_id": ["t1"]}},
                {"version": "v3", "enabled": false}
             ],
             "instances": [
                {"instance_id": "i1", "weight": 75, "health_status": "healthy"},
                {"instance_id": "i2", "subject": "s.a.v1.i2", "weight": 25}
             ]},
            {"id": "b", "type": "post", "subject": "s.b.v1"}
        ])
        .to_string(),
    )
    .unwrap();
    let snap = start(fixtures_config(dir.path(), None)).await.snapshot();
    assert_eq!(snap.size(), 2);
    assert_eq!(snap.counts.versions, 2);
    assert_eq!(
        snap.resolve("a", &[("tenant_id", "t1")]).unwrap().version,
        "v2"
    );
    assert_eq!(
        snap.resolve("a", &[("tenant_id", "t2")]).unwrap().version,
        "v1"
    );
    let inst = snap.instances("a");
    assert_eq!(inst.len(), 2);
    assert_eq!(
        inst[0].subject, "s.a.v1",
        "instance subject defaults to the base subject"
    );
    assert_eq!(inst[1].weight, 25);
}

/// Each bad input is quarantined with a message naming the file, the place in it and
/// the field, in JSON words (never a Rust type name).
#[test]
fn bad_fixture_files_are_named_precisely() {
    let good = json!({"id": "x", "type": "pre", "subject": "a.b", "timeout_ms": 100});
    let with = |k: &str, v: serde_json::Value| {
        let mut g = good.clone();
        g[k] = v;
        g.to_string()
    };
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("subject");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "malformed JSON",
            "{\"id\": \"x\",\n \"type\": }".into(),
            vec!["invalid JSON", "line 2"],
        ),
        (
            "unknown type",
            with("type", json!("preprocessor")),
            vec!["type", "preprocessor"],
        ),
        ("missing field", missing.to_string(), vec!["subject"]),
        (
            "wildcard subject",
            with("subject", json!("beamline.ext.>")),
            vec!["subject", "wildcard"],
        ),
        (
            "timeout out of range",
            with("timeout_ms", json!(60000)),
            vec!["timeout_ms", "60000", "10..=5000"],
        ),
        (
            "retry too high",
            with("retry", json!(9)),
            vec!["retry", "retry_limit_exceeded"],
        ),
        (
            "misspelt field",
            with("timout_ms", json!(1)),
            vec!["timout_ms"],
        ),
        (
            "wrong field type",
            with("timeout_ms", json!("fast")),
            vec![
                "timeout_ms",
                "expected a whole number, found the string \"fast\"",
            ],
        ),
        (
            "a version that is not an object",
            with("versions", json!(["v2"])),
            vec!["versions[0]", "expected a version object"],
        ),
        (
            "routing_rules shape",
            with(
                "versions",
                json!([{"version": "v2", "routing_rules": {"tenant_id": {"a": 1}}}]),
            ),
            vec!["versions[0]", "routing_rules.tenant_id"],
        ),
        (
            "routing_rules not an object",
            with(
                "versions",
                json!([{"version": "v2", "routing_rules": ["t1"]}]),
            ),
            vec!["routing_rules"],
        ),
        (
            "not an object",
            "42".into(),
            vec!["expected an extension object"],
        ),
        (
            "too deep config",
            with(
                "config",
                json!({"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":1}}}}}}}}}}}),
            ),
            vec!["config", "deeper"],
        ),
    ];
    let good_file = json!({"id": "fine", "type": "post", "subject": "c.d"}).to_string();
    for (what, text, needles) in cases {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ext.json"), &text).unwrap();
        fs::write(dir.path().join("fine.json"), &good_file).unwrap();
        let data = fixtures::load_dir(dir.path(), None).expect(what);
        let snap =
            beamline_registry::Snapshot::build(data, &Limits::default(), ActiveSource::Fixtures, 1);
        assert!(
            snap.lookup("fine").is_some(),
            "{what}: the good file applies"
        );
        assert_eq!(snap.quarantine.len(), 1, "{what}: {:?}", snap.quarantine);
        let msg = &snap.quarantine[0].error;
        assert!(msg.contains("ext.json"), "{what}: no file in {msg}");
        for n in needles {
            assert!(msg.contains(n), "{what}: '{n}' missing from: {msg}");
        }
        for rust in ["struct ", "Fixture", "i64", "u32", "sequence"] {
            assert!(!msg.contains(rust), "{what}: a Rust type name in {msg}");
        }
    }
}

#[test]
fn the_same_id_in_two_files_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let rec = json!({"id": "dup", "type": "pre", "subject": "a.b"}).to_string();
    fs::write(dir.path().join("a.json"), &rec).unwrap();
    fs::write(dir.path().join("b.json"), &rec).unwrap();
    let data = fixtures::load_dir(dir.path(), None).unwrap();
    let snap =
        beamline_registry::Snapshot::build(data, &Limits::default(), ActiveSource::Fixtures, 1);
    assert!(
        snap.lookup("dup").is_some(),
        "the first file's record serves"
    );
    let err = &snap.quarantine[0].error;
    assert!(
        err.contains("a.json") && err.contains("b.json") && err.contains("dup"),
        "{err}"
    );
}

#[test]
fn unreadable_folders_are_io_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = fixtures::load_dir(&missing, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("nope"), "{err}");
    let file = dir.path().join("file");
    fs::write(&file, "x").unwrap();
    let err = fixtures::load_dir(&file, None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    // A policies folder that does not exist is named too.
    fs::create_dir(dir.path().join("ext")).unwrap();
    let err = fixtures::load_dir(&dir.path().join("ext"), Some(&missing)).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn bad_policies_are_named() {
    let root = tempfile::tempdir().unwrap();
    let ext = root.path().join("ext");
    let pol = root.path().join("pol");
    fs::create_dir_all(pol.join("acme")).unwrap();
    fs::create_dir_all(&ext).unwrap();
    fs::write(
        ext.join("n.json"),
        json!({"id": "n", "type": "pre", "subject": "a"}).to_string(),
    )
    .unwrap();
    fs::write(
        pol.join("acme/default.json"),
        json!({"pre": [{"id": "n", "mode": "mandatory"}]}).to_string(),
    )
    .unwrap();
    let data = fixtures::load_dir(&ext, Some(&pol)).unwrap();
    let snap =
        beamline_registry::Snapshot::build(data, &Limits::default(), ActiveSource::Fixtures, 1);
    let err = &snap.quarantine[0].error;
    assert!(
        err.contains("acme/default.json: pre[0].mode") && err.contains("mandatory"),
        "{err}"
    );
    assert!(snap.policy("acme", "default").is_none());
    // A stray file outside a tenant folder is quarantined, not ignored.
    fs::write(pol.join("default.json"), "{}").unwrap();
    let data = fixtures::load_dir(&ext, Some(&pol)).unwrap();
    let snap =
        beamline_registry::Snapshot::build(data, &Limits::default(), ActiveSource::Fixtures, 1);
    assert!(
        snap.quarantine
            .iter()
            .any(|q| q.error.contains("tenant folder")),
        "{:?}",
        snap.quarantine
    );
}

#[tokio::test]
async fn policy_references_to_missing_or_mistyped_extensions_are_warnings() {
    let root = tempfile::tempdir().unwrap();
    let ext = root.path().join("ext");
    let pol = root.path().join("pol");
    fs::create_dir_all(pol.join("acme")).unwrap();
    fs::create_dir_all(&ext).unwrap();
    fs::write(
        ext.join("n.json"),
        json!({"id": "n", "type": "post", "subject": "a"}).to_string(),
    )
    .unwrap();
    fs::write(
        pol.join("acme/default.json"),
        json!({"pre": [{"id": "n"}, {"id": "ghost"}]}).to_string(),
    )
    .unwrap();
    let registry = start(fixtures_config(&ext, Some(&pol))).await;
    let snap = registry.snapshot();
    assert!(registry.is_loaded());
    assert_eq!(snap.warnings.len(), 2, "{:?}", snap.warnings);
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.contains("ghost") && w.contains("extension_not_found"))
    );
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.contains("type post, not pre"))
    );
}

/// A broken file is quarantined at its last good version while the other files
/// apply; fixing it takes it out of quarantine; a folder that cannot be read fails
/// the reload, keeps the snapshot, and a later success resolves the error.
#[tokio::test]
async fn a_broken_file_is_held_at_its_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("n.json");
    fs::write(
        &file,
        json!({"id": "n", "type": "pre", "subject": "a", "timeout_ms": 100}).to_string(),
    )
    .unwrap();
    let other = dir.path().join("o.json");
    let other_rec = |t: i64| json!({"id": "o", "type": "post", "subject": "b", "timeout_ms": t});
    fs::write(&other, other_rec(100).to_string()).unwrap();
    let registry: Registry = start(fixtures_config(dir.path(), None)).await;
    let before = registry.snapshot();
    assert_eq!(before.lookup("n").unwrap().timeout_ms, 100);

    for (i, (bad, field)) in [
        (
            json!({"id": "n", "type": "pre", "subject": "a", "timeout_ms": 100000}).to_string(),
            "timeout_ms",
        ),
        ("{ not json".to_string(), ""),
        (
            json!({"id": "n", "type": "nope", "subject": "a"}).to_string(),
            "type",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        fs::write(&file, &bad).unwrap();
        // Another file changes at the same time: its change applies.
        fs::write(&other, other_rec(200 + i as i64).to_string()).unwrap();
        registry
            .reload()
            .await
            .expect("a bad file does not fail the reload");
        let now = registry.snapshot();
        assert_eq!(now.lookup("n").unwrap().timeout_ms, 100, "{bad}: held");
        assert_eq!(now.lookup("o").unwrap().timeout_ms, 200 + i as u32);
        let status = registry.status();
        assert_eq!(status.quarantined.len(), 1, "{:?}", status.quarantined);
        let q = &status.quarantined[0];
        assert!(q.error.contains("n.json"), "{}", q.error);
        assert_eq!(q.field, field, "{}", q.error);
        assert_eq!(q.serving, beamline_registry::quarantine::Serving::LastGood);
        assert!(status.last_error.is_none());
    }
    let status = registry.status();
    assert_eq!(status.sync_error_total, 0);

    fs::write(
        &file,
        json!({"id": "n", "type": "pre", "subject": "a", "timeout_ms": 200}).to_string(),
    )
    .unwrap();
    registry.reload().await.unwrap();
    assert_eq!(registry.snapshot().lookup("n").unwrap().timeout_ms, 200);
    assert!(
        registry.status().quarantined.is_empty(),
        "fixed: out of quarantine"
    );

    // The folder itself gone: the reload fails and changes nothing ...
    let moved = dir.path().with_extension("moved");
    fs::rename(dir.path(), &moved).unwrap();
    let kept = registry.snapshot();
    let err = registry.reload().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(std::sync::Arc::ptr_eq(&kept, &registry.snapshot()));
    assert!(registry.status().last_error.is_some());
    // ... and once it is back, the error is resolved, not left standing.
    fs::rename(&moved, dir.path()).unwrap();
    registry.reload().await.unwrap();
    let status = registry.status();
    assert!(status.last_error.is_none(), "{:?}", status.last_error);
    assert!(status.resolved_error.unwrap().error.contains("cannot read"));
}

/// The runbook's fixtures procedure: edit the file, reload, verify `enabled`.
#[tokio::test]
async fn runbook_disable_via_fixtures_then_reload() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo_fixtures().join("extensions");
    for f in fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let registry = start(fixtures_config(dir.path(), None)).await;
    assert!(
        registry
            .snapshot()
            .lookup("normalize_text")
            .unwrap()
            .enabled
    );
    let path = dir.path().join("normalize_text.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    v["enabled"] = json!(false);
    fs::write(&path, v.to_string()).unwrap();
    registry.reload().await.unwrap();
    let snap = registry.snapshot();
    let ext = snap.lookup("normalize_text").unwrap();
    assert!(
        !ext.enabled,
        "disabled extensions stay in the snapshot with enabled = false"
    );
}
