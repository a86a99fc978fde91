//! Incremental reloads: a NOTIFY that names its keys makes the router read only those
//! records and share every other entry with the snapshot it had, and the result is
//! exactly what a full reload of the same database would build. A bad row in a change
//! is quarantined on its own; the rest keeps flowing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use beamline_model::{ExtensionType, Limits};
use beamline_registry::{ActiveSource, Registry, Snapshot, SourceMode, Trigger};
use beamline_test_support::TestDatabase;
use common::*;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// 200 extensions of every type, each with two versions and an instance, and
/// policies for three tenants.
async fn seed(pool: &PgPool) {
    sqlx::raw_sql(
        r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry)
SELECT 'ext-' || g, (ARRAY['pre', 'validator', 'post', 'provider'])[1 + g % 4],
       'beamline.ext.e' || g || '.v1', 100 + g, g % 2
FROM generate_series(1, 200) g;
INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, routing_rules)
SELECT 'ext-' || g, v, 'beamline.ext.e' || g || '.' || v, 200, 0,
       CASE WHEN v = 'v2' THEN '{"tenant_id": ["canary"]}'::jsonb ELSE '{}'::jsonb END
FROM generate_series(1, 200) g, unnest(ARRAY['v1', 'v2']) v;
INSERT INTO extension_instances (extension_id, instance_id, subject, weight)
SELECT 'ext-' || g, 'i1', 'beamline.ext.e' || g || '.i1', 50 FROM generate_series(1, 200) g;
INSERT INTO extensions (id, type, subject) VALUES ('marker', 'pre', 'beamline.ext.marker');
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
 ('default', 'default', '{"providers": [{"name": "ext-3", "weight": 100}], "pre": [{"id": "ext-4"}]}'),
 ('t1', 'p1', '{"providers": [{"name": "ext-7", "weight": 100}], "post": [{"id": "ext-2"}]}'),
 ('t2', 'p1', '{"providers": [{"name": "ext-11", "weight": 100}]}');
"#,
    )
    .execute(pool)
    .await
    .expect("seed");
}

/// Everything a snapshot serves, in a canonical order, for comparing two snapshots.
fn dump(s: &Snapshot) -> String {
    let mut out = format!("{:?}\n", s.counts);
    for ext in s.list() {
        let entry = s.entry(&ext.id).expect("listed extension has an entry");
        out.push_str(&format!("{:?}\n", entry.base));
        for v in &entry.versions {
            out.push_str(&format!("  {:?}\n  -> {:?}\n", v.version, v.resolved));
        }
        for i in entry.instances.iter() {
            out.push_str(&format!("  {i:?}\n"));
        }
    }
    for t in ExtensionType::ALL {
        let ids: Vec<&str> = s.list_by_type(t).iter().map(|e| e.id.as_str()).collect();
        out.push_str(&format!("{t}: {ids:?}\n"));
    }
    for p in s.policies() {
        out.push_str(&format!("{p:?}\n"));
    }
    for w in &s.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

async fn full_build(pool: &PgPool) -> Snapshot {
    let data = beamline_registry::database::load(pool, "test")
        .await
        .expect("full read");
    Snapshot::build(data, &Limits::default(), ActiveSource::Database, 0)
}

/// Commits `sql`, then touches `marker` and waits until the router has seen that:
/// notifications are applied in commit order, so everything before it is applied too.
async fn commit_and_settle(pool: &PgPool, registry: &Registry, sql: &'static str) {
    sqlx::raw_sql(sql).execute(pool).await.expect(sql);
    let stamp: i64 = sqlx::query_scalar(
        "UPDATE extensions SET timeout_ms = 10 + (timeout_ms - 9) % 4000 WHERE id = 'marker' \
         RETURNING timeout_ms::bigint",
    )
    .fetch_one(pool)
    .await
    .expect("touch marker");
    let seen = eventually(Duration::from_secs(10), || {
        registry
            .snapshot()
            .lookup("marker")
            .is_some_and(|m| m.timeout_ms as i64 == stamp)
    })
    .await;
    assert!(seen, "the router did not catch up after: {sql}");
}

async fn running(db: &TestDatabase) -> (PgPool, Registry, CancellationToken) {
    let pool = db.pool().await;
    migrate(&pool).await;
    seed(&pool).await;
    // Periodic sync far away: only NOTIFY brings changes in.
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let stop = CancellationToken::new();
    registry.spawn_sync(stop.clone());
    // Listening, and the full reload that follows LISTEN done: from here on every
    // change arrives through the change log.
    assert!(
        eventually(Duration::from_secs(10), || registry
            .status()
            .last_sync_trigger
            == Some(Trigger::Reconnect))
        .await
    );
    (pool, registry, stop)
}

#[tokio::test]
async fn keyed_changes_share_untouched_entries_and_equal_a_full_reload() {
    let db = TestDatabase::create().await;
    let (pool, registry, stop) = running(&db).await;

    // A statement over 256 keys is logged as "read everything": a full reload.
    commit_and_settle(
        &pool,
        &registry,
        "INSERT INTO extensions (id, type, subject) \
         SELECT 'bulk-' || g, 'pre', 'beamline.ext.bulk' FROM generate_series(1, 300) g",
    )
    .await;
    assert_eq!(registry.snapshot().counts.extensions, 501);
    assert_eq!(dump(&registry.snapshot()), dump(&full_build(&pool).await));
    let before = registry.snapshot();

    let changes = [
        // one field of one extension
        "UPDATE extensions SET timeout_ms = 777 WHERE id = 'ext-1'",
        // a new extension with a version and instances, in one transaction
        "BEGIN;
         INSERT INTO extensions (id, type, subject) VALUES ('new-1', 'provider', 'beamline.provider.new1');
         INSERT INTO extension_versions (id, version, subject, timeout_ms, retry) VALUES ('new-1', 'v9', 'beamline.provider.new1.v9', 300, 1);
         INSERT INTO extension_instances (extension_id, instance_id, subject, weight) VALUES ('new-1', 'a', 'x.a', 30), ('new-1', 'b', 'x.b', 70);
         COMMIT;",
        // a delete that cascades to versions and instances, and leaves t1's policy
        // naming a missing extension (a warning)
        "DELETE FROM extensions WHERE id = 'ext-2'",
        // a version disabled, an instance reweighted
        "UPDATE extension_versions SET enabled = false WHERE id = 'ext-5' AND version = 'v2'",
        "UPDATE extension_instances SET weight = 90 WHERE extension_id = 'ext-6'",
        // a type change moves an extension between the per-type lists; ext-4 is in
        // the default policy's pre list, so this makes a type warning too
        "UPDATE extensions SET type = 'post' WHERE id = 'ext-4'",
        // an id change of an extension without children
        "INSERT INTO extensions (id, type, subject) VALUES ('solo', 'pre', 'beamline.ext.solo');
         UPDATE extensions SET id = 'solo-renamed' WHERE id = 'solo'",
        // policies: an upsert, a delete, a new tenant, one statement over two tenants
        "INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('t1', 'p1', '{\"providers\": [{\"name\": \"new-1\", \"weight\": 100}]}')
         ON CONFLICT (tenant_id, policy_id) DO UPDATE SET policy = EXCLUDED.policy",
        "DELETE FROM policies WHERE tenant_id = 't2'",
        "INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('t3', 'p1', '{\"providers\": [{\"name\": \"ext-3\", \"weight\": 100}], \"pre\": [{\"id\": \"ghost\"}]}')",
        "UPDATE policies SET enabled = false WHERE tenant_id IN ('t1', 't3')",
    ];
    for sql in changes {
        commit_and_settle(&pool, &registry, sql).await;
        assert_eq!(
            dump(&registry.snapshot()),
            dump(&full_build(&pool).await),
            "after: {sql}"
        );
        if sql.contains("ghost") {
            let warnings = registry.snapshot().warnings.clone();
            assert!(
                warnings.iter().any(|w| w.contains("'ghost'")),
                "{warnings:?}"
            );
        }
    }
    let after = registry.snapshot();
    assert_eq!(after.lookup("ext-1").map(|e| e.timeout_ms), Some(777));
    assert!(after.lookup("ext-2").is_none() && after.lookup("solo").is_none());
    assert_eq!(after.instances("new-1").len(), 2);
    assert!(
        after
            .warnings
            .iter()
            .any(|w| w.contains("'ext-4' is of type post")),
        "{:?}",
        after.warnings
    );
    // Untouched entries are the very same allocations: nothing but the changed keys
    // was read or rebuilt.
    for id in ["ext-100", "ext-150", "ext-200"] {
        assert!(
            Arc::ptr_eq(
                before.lookup(id).expect("present"),
                after.lookup(id).expect("present")
            ),
            "{id} was rebuilt"
        );
    }
    assert!(!Arc::ptr_eq(
        before.lookup("ext-6").expect("present"),
        after.lookup("ext-6").expect("present")
    ));
    assert_eq!(registry.status().last_sync_trigger, Some(Trigger::Notify));
    stop.cancel();
}

/// One bad row in each table (extensions, versions, instances, policies), arriving
/// through the change log: each is quarantined on its own — named with its field
/// path, its key held at the last good version or absent — and good changes to
/// other rows, committed after the bad ones, still reach the router. Fixing the rows
/// takes them out of quarantine, and the result equals a full reload.
#[tokio::test]
async fn bad_rows_in_every_table_are_quarantined_and_good_changes_keep_flowing() {
    let db = TestDatabase::create().await;
    let (pool, registry, stop) = running(&db).await;
    let errors_before = registry.sync_counts().1;

    // Each passes the table's CHECKs but not the router's validation.
    commit_and_settle(
        &pool,
        &registry,
        r#"UPDATE extensions SET timeout_ms = 99999 WHERE id = 'ext-1';
           UPDATE extension_versions SET routing_rules = '{"tenant_id": 5}' WHERE id = 'ext-5' AND version = 'v2';
           UPDATE extension_instances SET subject = 'beamline.>' WHERE extension_id = 'ext-6';
           UPDATE policies SET policy = '{"providers": ["ext-7"]}' WHERE tenant_id = 't1';"#,
    )
    .await;
    let status = registry.status();
    let found: Vec<(String, String, String)> = status
        .quarantined
        .iter()
        .map(|q| (q.table.as_str().to_string(), q.key.clone(), q.error.clone()))
        .collect();
    let expect = [
        ("extensions", "ext-1", "extensions[ext-1].timeout_ms: "),
        (
            "extension_versions",
            "ext-5/v2",
            "extension_versions[ext-5/v2].routing_rules.tenant_id: ",
        ),
        (
            "extension_instances",
            "ext-6/i1",
            "extension_instances[ext-6/i1].subject: ",
        ),
        (
            "policies",
            "t1/p1",
            "policies[t1/p1].policy.providers[0]: expected an object with \"name\", found the string \"ext-7\"",
        ),
    ];
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    for ((table, key, error), (t, k, needle)) in found.iter().zip(expect) {
        assert_eq!((table.as_str(), key.as_str()), (t, k));
        assert!(error.contains(needle), "{error}");
    }
    assert!(status.last_error.is_none(), "{:?}", status.last_error);
    assert_eq!(
        registry.sync_counts().1,
        errors_before,
        "quarantine is not a failed sync"
    );
    // Held: the last good versions serve.
    let held = registry.snapshot();
    assert_eq!(held.lookup("ext-1").map(|e| e.timeout_ms), Some(101));
    assert_eq!(
        held.resolve("ext-5", &[("tenant_id", "canary")])
            .unwrap()
            .version,
        "v2"
    );
    assert_eq!(held.instances("ext-6")[0].subject, "beamline.ext.e6.i1");
    assert_eq!(held.policy("t1", "p1").unwrap().post[0].id, "ext-2");

    // Good changes to every table, committed after the bad rows, apply.
    commit_and_settle(
        &pool,
        &registry,
        r#"UPDATE extensions SET timeout_ms = 555 WHERE id = 'ext-9';
           UPDATE extension_versions SET timeout_ms = 444 WHERE id = 'ext-13' AND version = 'v1';
           UPDATE extension_instances SET weight = 7 WHERE extension_id = 'ext-14';
           UPDATE policies SET policy = '{"providers": [{"name": "ext-15", "weight": 100}]}' WHERE tenant_id = 't2';"#,
    )
    .await;
    let s = registry.snapshot();
    assert_eq!(s.lookup("ext-9").map(|e| e.timeout_ms), Some(555));
    let v1 = s
        .entry("ext-13")
        .unwrap()
        .versions
        .iter()
        .find(|v| v.version.version == "v1")
        .unwrap();
    assert_eq!(v1.version.timeout_ms, 444);
    assert_eq!(s.instances("ext-14")[0].weight, 7);
    assert_eq!(
        s.policy("t2", "p1").unwrap().document.providers[0].name,
        "ext-15"
    );
    assert_eq!(s.quarantine.len(), 4, "the bad rows stay quarantined");
    let since = |s: &Snapshot| s.quarantine.iter().map(|q| q.since).collect::<Vec<_>>();
    assert_eq!(since(&s), since(&held), "`since` is when the row went bad");

    // Fixing the rows brings them in and empties the quarantine.
    commit_and_settle(
        &pool,
        &registry,
        r#"UPDATE extensions SET timeout_ms = 250 WHERE id = 'ext-1';
           UPDATE extension_versions SET routing_rules = '{"tenant_id": ["canary"]}' WHERE id = 'ext-5' AND version = 'v2';
           UPDATE extension_instances SET subject = 'beamline.ext.e6.i2' WHERE extension_id = 'ext-6';
           UPDATE policies SET policy = '{"providers": [{"name": "ext-8", "weight": 100}]}' WHERE tenant_id = 't1';"#,
    )
    .await;
    let s = registry.snapshot();
    assert!(s.quarantine.is_empty(), "{:?}", s.quarantine);
    assert_eq!(s.lookup("ext-1").map(|e| e.timeout_ms), Some(250));
    assert_eq!(s.instances("ext-6")[0].subject, "beamline.ext.e6.i2");
    assert_eq!(dump(&s), dump(&full_build(&pool).await));
    assert_eq!(registry.status().last_sync_trigger, Some(Trigger::Notify));
    stop.cancel();
}

/// Two extensions changed in one transaction are seen together or not at all, even
/// while a writer commits transaction after transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_never_seen_half_applied() {
    let db = TestDatabase::create().await;
    let (pool, registry, stop) = running(&db).await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (registry, done) = (registry.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut reads, mut torn) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let s = registry.snapshot();
                let a = s.lookup("ext-10").map(|e| e.timeout_ms);
                let b = s.lookup("ext-20").map(|e| e.timeout_ms);
                let initial = a == Some(110) && b == Some(120);
                if !initial && a.zip(b).is_none_or(|(a, b)| a != b + 1000) {
                    torn += 1;
                }
                reads += 1;
            }
            (reads, torn)
        })
    };
    for i in 0..40u32 {
        let mut tx = pool.begin().await.expect("begin");
        for (id, t) in [("ext-10", 1100 + i), ("ext-20", 100 + i)] {
            sqlx::query("UPDATE extensions SET timeout_ms = $1 WHERE id = $2")
                .bind(t as i32)
                .bind(id)
                .execute(&mut *tx)
                .await
                .expect("update");
        }
        tx.commit().await.expect("commit");
    }
    assert!(
        eventually(Duration::from_secs(10), || registry
            .snapshot()
            .lookup("ext-20")
            .is_some_and(|e| e.timeout_ms == 139))
        .await
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, torn) = reader.join().expect("reader");
    assert!(reads > 1000, "{reads} reads");
    assert_eq!(torn, 0, "a reader saw half a transaction");
    stop.cancel();
}

/// A hand-written `NOTIFY beamline_registry` (or a router older than the keyed
/// triggers) still works: anything that is not a keyed payload is a full reload.
#[tokio::test]
async fn an_unkeyed_notify_is_a_full_reload() {
    let db = TestDatabase::create().await;
    let (pool, registry, stop) = running(&db).await;
    let before = registry.snapshot();
    // Change a row without firing the triggers, as a restore or a replica might.
    sqlx::raw_sql(
        "BEGIN; SET LOCAL session_replication_role = replica;
         UPDATE extensions SET timeout_ms = 4321 WHERE id = 'ext-50'; COMMIT;",
    )
    .execute(&pool)
    .await
    .expect("silent update");
    sqlx::query("NOTIFY beamline_registry, 'please reload'")
        .execute(&pool)
        .await
        .expect("notify");
    assert!(
        eventually(Duration::from_secs(10), || registry
            .snapshot()
            .lookup("ext-50")
            .is_some_and(|e| e.timeout_ms == 4321))
        .await
    );
    // The change bypassed the triggers, so it is not in registry_changes: only a full
    // read can have brought it in. Unchanged entries are still shared with the
    // previous snapshot (a full reload keeps what did not change).
    let after = registry.snapshot();
    assert!(Arc::ptr_eq(
        before.lookup("ext-100").expect("present"),
        after.lookup("ext-100").expect("present")
    ));
    stop.cancel();
}

/// A sync that finds nothing new changes nothing but still counts as a successful
/// sync (the alerts' failure ratio divides by all syncs).
#[tokio::test]
async fn a_sync_with_nothing_new_counts_and_changes_nothing() {
    let db = TestDatabase::create().await;
    let (_pool, registry, stop) = running(&db).await;
    let before = registry.snapshot();
    let (ok_before, errors_before) = registry.sync_counts();
    let report = registry
        .sync_changes(Trigger::Manual)
        .await
        .expect("nothing to read is a success");
    assert_eq!(report.changed_keys, Some(0));
    assert_eq!(report.generation, before.generation);
    assert!(
        Arc::ptr_eq(&before, &registry.snapshot()),
        "no new snapshot"
    );
    assert_eq!(registry.sync_counts(), (ok_before + 1, errors_before));
    assert_eq!(registry.status().last_sync_trigger, Some(Trigger::Manual));
    stop.cancel();
}
