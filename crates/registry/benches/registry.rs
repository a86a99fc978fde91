//! Registry benchmarks for DESIGN.md §8 P3 (lookup / version resolve at 10 000
//! extensions) and P4 (full reload of 10 000 extensions, 20 000 versions and 10 000
//! instances from PostgreSQL), each next to a baseline measured in the same run:
//! a plain `HashMap` probe for lookups, an empty snapshot swap for reloads.
//!
//! `cargo bench -p beamline-registry --bench registry`; the reload group needs
//! PostgreSQL at `DATABASE_URL` (scripts/test's defaults) and is skipped without it.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use beamline_model::{ExtensionRecord, InstanceRecord, Limits, SecretUrl, VersionRecord};
use beamline_registry::dataset::{Dataset, Sourced};
use beamline_registry::{ActiveSource, Origin, Registry, RegistryConfig, Snapshot, SourceMode};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

/// The allocator the router binary ships with, so P4 measures what runs in production.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const N: usize = 10_000;

fn origin() -> Origin {
    Origin::Builtin {
        name: "bench".into(),
        item: None,
    }
}

/// 10 000 extensions, two versions each (one routed to a tenant list, one disabled
/// by rules `{"tenant_id": []}`), one instance each.
fn dataset() -> Dataset {
    let mut d = Dataset::default();
    for i in 0..N {
        let id = format!("ext_{i:05}");
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

fn lookups(c: &mut Criterion) {
    beamline_test_support::bench::tune_allocator_like_the_binary();
    let snapshot = Snapshot::build(dataset(), &Limits::default(), ActiveSource::Fixtures, 1);
    let ids: Vec<String> = (0..N)
        .map(|i| format!("ext_{:05}", (i * 7919) % N))
        .collect();
    let shared = ArcSwap::from_pointee(snapshot);
    let plain: HashMap<String, Arc<beamline_model::Extension>> = shared
        .load()
        .list()
        .into_iter()
        .map(|e| (e.id.clone(), e))
        .collect();

    let mut g = c.benchmark_group("P3_lookup_10k");
    let mut i = 0usize;
    g.bench_function("baseline_plain_hashmap_get", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(plain.get(ids[i].as_str()).map(|e| e.timeout_ms))
        })
    });
    g.bench_function("registry_lookup", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let snap = shared.load();
            black_box(snap.lookup(ids[i].as_str()).map(|e| e.timeout_ms))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("P3_resolve_10k");
    g.bench_function("resolve_matching_version", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let snap = shared.load();
            black_box(
                snap.resolve(ids[i].as_str(), &[("tenant_id", "standard_tenant")])
                    .map(|e| e.timeout_ms),
            )
        })
    });
    g.bench_function("resolve_no_match_base_record", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let snap = shared.load();
            black_box(
                snap.resolve(ids[i].as_str(), &[("tenant_id", "free_tenant")])
                    .map(|e| e.timeout_ms),
            )
        })
    });
    g.finish();
}

async fn seed(url: &str) -> Result<(), sqlx::Error> {
    let pool = sqlx::PgPool::connect(url).await?;
    beamline_registry::database::migrate(&pool, "bench")
        .await
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    beamline_test_support::bench::seed_bench_registry(&pool, 10_000, "ext_00000").await?;
    pool.close().await;
    Ok(())
}

fn reloads(c: &mut Criterion) {
    beamline_test_support::bench::tune_allocator_like_the_binary();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            beamline_test_support::TestDatabase::try_create(),
        )
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r)
    });
    let Ok(db) = db else {
        eprintln!("P4 skipped: no PostgreSQL at DATABASE_URL");
        return;
    };
    if let Err(e) = rt.block_on(seed(db.url())) {
        eprintln!("P4 skipped: seeding failed: {e}");
        return;
    }
    let config = RegistryConfig {
        source: SourceMode::Database,
        database_url: Some(SecretUrl::new(db.url())),
        ..RegistryConfig::default()
    };
    let registry = rt
        .block_on(Registry::start(config, Limits::default()))
        .unwrap();
    let counts = registry.snapshot().counts;
    assert_eq!(
        (counts.extensions, counts.versions, counts.instances),
        (10_000, 20_000, 10_000)
    );

    let mut g = c.benchmark_group("P4_reload_10k_20k_10k");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    let swap = ArcSwap::from_pointee(Snapshot::empty());
    g.bench_function("baseline_empty_snapshot_swap", |b| {
        b.iter(|| swap.store(Arc::new(Snapshot::empty())))
    });
    g.bench_function("full_reload_from_postgres", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(registry.reload().await.unwrap().counts) })
    });
    let pool = registry.pool().unwrap();
    g.bench_function("read_only_one_transaction", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                beamline_registry::database::load(&pool, "bench")
                    .await
                    .unwrap()
                    .extensions
                    .len(),
            )
        })
    });
    g.bench_function("validate_and_build_only", |b| {
        b.iter_batched(
            dataset,
            |d| Snapshot::build(d, &Limits::default(), ActiveSource::Database, 2),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
    drop(registry);
    rt.block_on(async { drop(db) });
}

criterion_group!(benches, lookups, reloads);
criterion_main!(benches);
