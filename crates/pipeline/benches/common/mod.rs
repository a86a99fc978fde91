//! Shared by the `memory`, `curves` and `pipeline` benches (not a bench target itself).

#![allow(dead_code)]

use std::time::Duration;

use beamline_model::{ExtensionRecord, InstanceRecord, VersionRecord};
use beamline_registry::Origin;
use beamline_registry::dataset::{Dataset, Sourced};
use serde_json::json;

/// The id of extension `i` (`ext_00042`).
pub fn ext_id(i: usize) -> String {
    format!("ext_{i:05}")
}

/// `n` extensions shaped like the P3/P4 dataset of `crates/registry/benches/registry.rs`:
/// two versions each (one routed to a tenant list, one disabled by rules
/// `{"tenant_id": []}`) and one instance each.
pub fn dataset(n: usize) -> Dataset {
    let origin = || Origin::Builtin {
        name: "bench".into(),
        item: None,
    };
    let mut d = Dataset::default();
    for i in 0..n {
        let id = ext_id(i);
        d.extensions.push(Sourced {
            origin: origin(),
            value: ExtensionRecord {
                id: id.clone(),
                ext_type: ["pre", "validator", "post", "provider"][i % 4].into(),
                subject: format!("beamline.ext.pre.{id}.v1"),
                timeout_ms: 100,
                retry: 1,
                enabled: true,
                version: "v1".into(),
                config: json!({"max_length": 1000}),
                metadata: json!({"description": "bench"}),
            },
        });
        for (v, rules) in [
            (
                "v2",
                json!({"tenant_id": ["premium_tenant", "standard_tenant"]}),
            ),
            ("v3", json!({"tenant_id": []})),
        ] {
            d.versions.push(Sourced {
                origin: origin(),
                value: VersionRecord {
                    id: id.clone(),
                    version: v.into(),
                    subject: format!("beamline.ext.pre.{id}.{v}"),
                    timeout_ms: 150,
                    retry: 1,
                    config: json!({}),
                    metadata: json!({}),
                    routing_rules: rules,
                    enabled: true,
                    created_at: None,
                },
            });
        }
        d.instances.push(Sourced {
            origin: origin(),
            value: InstanceRecord {
                extension_id: id.clone(),
                instance_id: "i1".into(),
                subject: format!("beamline.ext.pre.{id}.v1"),
                weight: 100,
                enabled: true,
                health_status: "healthy".into(),
            },
        });
    }
    d
}

/// Resident set size of this process in bytes (`/proc/self/statm`, second field,
/// times the page size).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(1) as u64
}

/// Megabytes (10^6 bytes, the unit of DESIGN.md's P7 goal).
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// A client of the NATS at `NATS_URL`, or of a nats-server of the bench's own when
/// none answers there (kept alive by the returned handle).
pub async fn nats() -> (
    async_nats::Client,
    Option<beamline_test_support::NatsServer>,
) {
    let url = beamline_test_support::nats_url();
    if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(&url)).await
    {
        return (c, None);
    }
    let server = beamline_test_support::NatsServer::start();
    let c = async_nats::connect(server.url())
        .await
        .expect("own nats-server");
    (c, Some(server))
}
