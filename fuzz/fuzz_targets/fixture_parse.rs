//! Fixture extension files → `Dataset` → validated `Snapshot`, as the fixtures source
//! loads them (`beamline_registry::fixtures::parse_str`, `Snapshot::build`).
//!
//! Input: the text of one extension fixture file (invalid UTF-8 is replaced, as a
//! lossy reader would). Optionally a 0xff byte and then a policy document: it is
//! added to the dataset as tenant `fuzz`, policy `p`, so policy validation against
//! the fuzzed extensions (references, types, per-tenant limits) runs too.
//! Must never panic; errors are fine (a bad record is quarantined, the rest loads).
#![no_main]

use beamline_model::{ExtensionType, Limits};
use beamline_registry::dataset::{PolicyRecord, Sourced};
use beamline_registry::quarantine::Table;
use beamline_registry::{ActiveSource, Origin, Snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (fixture, policy) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let text = String::from_utf8_lossy(fixture);
    let Ok(mut dataset) = beamline_registry::fixtures::parse_str("fuzz.json", &text) else {
        return;
    };
    if let Some(document) = policy.and_then(|p| serde_json::from_slice(p).ok()) {
        dataset.policies.push(Sourced {
            origin: Origin::Builtin {
                name: "policies/fuzz/p.json".into(),
                item: None,
            },
            value: PolicyRecord {
                tenant_id: "fuzz".into(),
                policy_id: "p".into(),
                document,
                enabled: true,
            },
        });
    }
    let extensions = dataset.extensions.len() + dataset.rejected.len();
    let limits = Limits::default();
    let snapshot = Snapshot::build(dataset, &limits, ActiveSource::Fixtures, 1);
    // Every extension record read is either served or quarantined, never both.
    let quarantined = snapshot
        .quarantine
        .iter()
        .filter(|q| q.table == Table::Extensions)
        .count();
    assert_eq!(
        snapshot.size() + quarantined,
        extensions,
        "a built snapshot lost or invented an extension"
    );
    // The read API the pipeline uses on every request.
    let contexts: [&[(&str, &str)]; 3] = [
        &[],
        &[("tenant_id", "fuzz"), ("region", "eu")],
        &[
            ("tenant_id", "premium_tenant"),
            ("channel", "web"),
            ("tier", "1"),
        ],
    ];
    for ext in snapshot.list() {
        for context in contexts {
            let resolved = snapshot
                .resolve(&ext.id, context)
                .expect("a listed extension resolves");
            assert_eq!(resolved.id, ext.id, "resolve returned another extension");
        }
        let _ = snapshot.instances(&ext.id);
        assert!(snapshot.lookup(&ext.id).is_some());
    }
    for t in ExtensionType::ALL {
        assert!(snapshot.list_by_type(t).iter().all(|e| e.ext_type == t));
    }
    let _ = snapshot.count_by_type();
    if let Some(p) = snapshot.policy("fuzz", "p") {
        let _ = p.extension_refs();
    }
});
