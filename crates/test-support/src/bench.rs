//! What the benches of several crates share, so that they measure the same thing.

use std::time::Duration;

use sqlx::PgPool;

/// The router binary's allocator tuning (`tune_allocator` in
/// crates/router/src/main.rs): mimalloc returns freed pages at once. For benches with
/// mimalloc as their global allocator; call it first thing in `main`.
pub fn tune_allocator_like_the_binary() {
    // SAFETY: sets a process-wide option. Index 15 is `mi_option_purge_delay`, whose
    // default is 10 ms in mimalloc v2 and 1 s in v3; the router's test
    // `the_purge_delay_option_is_found_and_set` checks the index.
    unsafe {
        if [10, 1000].contains(&libmimalloc_sys::mi_option_get(15)) {
            libmimalloc_sys::mi_option_set(15, 0);
        }
    }
}

/// The value at quantile `p` (0..=1) of `sorted` (nearest rank); zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Inserts the benchmark registry into a migrated database: `n` extensions
/// (`ext_00000`…, the first one named `first_id`) of the four types in turn, each
/// with versions `v2` (routed to two tenants) and `v3` (routed to none) and one
/// healthy instance — the dataset of P3, P4 and P5 (DESIGN.md §8) — then `ANALYZE`s,
/// as autovacuum soon would.
pub async fn seed_bench_registry(
    pool: &PgPool,
    n: usize,
    first_id: &str,
) -> Result<(), sqlx::Error> {
    let last = i32::try_from(n).unwrap_or(i32::MAX) - 1;
    sqlx::query(
        r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry, config, metadata)
SELECT CASE WHEN i = 0 THEN $2 ELSE 'ext_' || lpad(i::text, 5, '0') END,
       (ARRAY['pre','validator','post','provider'])[i % 4 + 1],
       'beamline.ext.pre.ext_' || i || '.v1', 100, 1, '{"max_length": 1000}', '{"description": "bench"}'
FROM generate_series(0, $1) AS i"#,
    )
    .bind(last)
    .bind(first_id)
    .execute(pool)
    .await?;
    sqlx::query(
        r#"
INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules)
SELECT CASE WHEN i = 0 THEN $2 ELSE 'ext_' || lpad(i::text, 5, '0') END, v,
       'beamline.ext.pre.ext_' || i || '.' || v, 150, 1,
       CASE v WHEN 'v2' THEN '{"tenant_id": ["premium_tenant", "standard_tenant"]}'::jsonb ELSE '{"tenant_id": []}'::jsonb END
FROM generate_series(0, $1) AS i, (VALUES ('v2'), ('v3')) AS vs(v)"#,
    )
    .bind(last)
    .bind(first_id)
    .execute(pool)
    .await?;
    sqlx::query(
        r#"
INSERT INTO extension_instances (extension_id, instance_id, subject, weight, health_status)
SELECT CASE WHEN i = 0 THEN $2 ELSE 'ext_' || lpad(i::text, 5, '0') END, 'i1',
       'beamline.ext.pre.ext_' || i || '.v1', 100, 'healthy'
FROM generate_series(0, $1) AS i"#,
    )
    .bind(last)
    .bind(first_id)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}
