//! The sync task: NOTIFY makes committed changes live without a reload call; auto mode
//! falls back to fixtures and returns to the database; a lost database keeps the last
//! good snapshot and resyncs (catching missed notifications) once it is back; readers
//! always see one consistent snapshot.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use beamline_registry::{ActiveSource, RegistryConfig, SourceMode};
use beamline_test_support::{PgCluster, TestDatabase};
use common::*;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_committed_update_is_live_through_notify_without_a_reload() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    seed_original(&pool).await;
    // Periodic sync far away: only NOTIFY can bring the change in.
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let stop = CancellationToken::new();
    let task = registry.spawn_sync(stop.clone());
    // Listening, and the full reload that follows LISTEN done (a change committed
    // before that reload would arrive with it, not by NOTIFY).
    assert!(
        eventually(Duration::from_secs(10), || registry
            .status()
            .last_sync_trigger
            == Some(beamline_registry::Trigger::Reconnect))
        .await
    );
    let before = registry.sync_counts().0;

    sqlx::query("UPDATE extensions SET timeout_ms = 321 WHERE id = 'normalize_text'")
        .execute(&pool)
        .await
        .unwrap();
    let seen = eventually(Duration::from_secs(5), || {
        registry
            .snapshot()
            .lookup("normalize_text")
            .unwrap()
            .timeout_ms
            == 321
    })
    .await;
    assert!(seen, "NOTIFY did not bring the change in");
    assert!(registry.sync_counts().0 > before);
    assert_eq!(
        registry.status().last_sync_trigger,
        Some(beamline_registry::Trigger::Notify)
    );

    // Versions, instances and policies notify too.
    sqlx::query("INSERT INTO extension_instances (extension_id, instance_id, subject) VALUES ('pii_guard', 'i1', 'x.y')")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || registry
            .snapshot()
            .instances("pii_guard")
            .len()
            == 1)
        .await
    );
    sqlx::query("DELETE FROM policies")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || registry
            .snapshot()
            .counts
            .policies
            == 0)
        .await
    );

    // A burst of commits folds into few reloads and ends on the last value.
    for t in 400..450 {
        sqlx::query("UPDATE extensions SET timeout_ms = $1 WHERE id = 'normalize_text'")
            .bind(t)
            .execute(&pool)
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || registry
            .snapshot()
            .lookup("normalize_text")
            .unwrap()
            .timeout_ms
            == 449)
        .await
    );
    stop.cancel();
    task.await.unwrap();
}

/// Auto mode: the database is down at start → fixtures (with a warning); once the
/// database answers, the registry returns to it without anyone calling reload.
#[tokio::test]
async fn auto_mode_falls_back_to_fixtures_and_returns_to_the_database() {
    let mut pg = PgCluster::start();
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    migrate(&pool).await;
    seed_original(&pool).await;
    sqlx::query("INSERT INTO extensions (id, type, subject, timeout_ms) VALUES ('db_only', 'pre', 'a.b', 50)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    pg.stop();

    let root = repo_fixtures();
    let config = RegistryConfig {
        fixtures_dir: Some(root.join("extensions")),
        policies_dir: Some(root.join("policies")),
        sync_interval_seconds: 1,
        ..db_config(&pg.url(), SourceMode::Auto)
    };
    let registry = start(config).await;
    let snap = registry.snapshot();
    assert_eq!(snap.source, ActiveSource::Fixtures);
    assert_eq!(snap.size(), 4);
    assert!(snap.lookup("db_only").is_none());
    assert_eq!(
        registry.status().db_state,
        beamline_registry::DbState::Unreachable
    );

    let stop = CancellationToken::new();
    let task = registry.spawn_sync(stop.clone());
    pg.restart();
    let back = eventually(Duration::from_secs(20), || {
        let s = registry.snapshot();
        s.source == ActiveSource::Database && s.lookup("db_only").is_some()
    })
    .await;
    assert!(
        back,
        "auto mode did not return to the database: {:?}",
        registry.status()
    );

    // Losing the database again keeps the database's snapshot (not the fixtures),
    // and sync errors are counted.
    let errors = registry.sync_counts().1;
    pg.stop();
    assert!(
        eventually(Duration::from_secs(10), || registry.sync_counts().1
            > errors)
        .await
    );
    let s = registry.snapshot();
    assert_eq!(s.source, ActiveSource::Database);
    assert!(s.lookup("db_only").is_some());
    stop.cancel();
    task.await.unwrap();
}

/// Database mode: while PostgreSQL is down the last snapshot serves; changes made
/// while the router could not hear NOTIFY arrive by the full reload after reconnect.
#[tokio::test]
async fn database_outage_keeps_the_snapshot_and_resyncs_missed_changes() {
    let mut pg = PgCluster::start();
    {
        let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
        migrate(&pool).await;
        seed_original(&pool).await;
        pool.close().await;
    }
    let config = RegistryConfig {
        sync_interval_seconds: 3600,
        ..db_config(&pg.url(), SourceMode::Database)
    };
    let registry = start(config).await;
    let stop = CancellationToken::new();
    let task = registry.spawn_sync(stop.clone());
    assert!(eventually(Duration::from_secs(10), || registry.status().listening).await);

    pg.stop();
    assert!(eventually(Duration::from_secs(10), || !registry.status().listening).await);
    assert_eq!(
        registry.snapshot().size(),
        4,
        "last good snapshot keeps serving"
    );
    assert!(registry.reload().await.is_err());
    // The change-log read (what a NOTIFY or an admin write triggers) fails the same
    // way: counted, the reason kept, the snapshot untouched.
    let generation = registry.snapshot().generation;
    let errors = registry.sync_counts().1;
    let err = registry
        .sync_changes(beamline_registry::Trigger::Manual)
        .await
        .expect_err("no database to read the changes from");
    assert_eq!(
        err.kind(),
        beamline_registry::ErrorKind::Unreachable,
        "{err}"
    );
    assert_eq!(registry.sync_counts().1, errors + 1);
    assert_eq!(registry.snapshot().generation, generation);
    assert!(registry.status().last_error.is_some());

    pg.restart();
    // A change committed before the router reconnects: its NOTIFY is lost to us.
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query("UPDATE extensions SET timeout_ms = 777 WHERE id = 'pii_guard'")
        .execute(&pool)
        .await
        .unwrap();
    let caught_up = eventually(Duration::from_secs(20), || {
        registry.snapshot().lookup("pii_guard").unwrap().timeout_ms == 777
    })
    .await;
    assert!(
        caught_up,
        "missed change not resynced: {:?}",
        registry.status()
    );
    stop.cancel();
    task.await.unwrap();
}

/// Readers hammer the registry while a writer flips two extensions in one transaction
/// and NOTIFY reloads: no reader ever sees one flipped and the other not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_always_see_one_consistent_snapshot() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    seed_original(&pool).await;
    let registry = start(db_config(db.url(), SourceMode::Database)).await;
    let stop = CancellationToken::new();
    let task = registry.spawn_sync(stop.clone());
    assert!(eventually(Duration::from_secs(10), || registry.status().listening).await);

    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (r, done, reads) = (registry.clone(), done.clone(), reads.clone());
        readers.push(std::thread::spawn(move || {
            let mut torn = 0u64;
            while !done.load(Ordering::Relaxed) {
                let s = r.snapshot();
                let a = s.lookup("normalize_text").map(|e| e.timeout_ms);
                let b = s.lookup("mask_pii").map(|e| e.timeout_ms);
                if a.is_none() || a != b.map(|x| x + 1000) && !(a == Some(100) && b == Some(150)) {
                    torn += 1;
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            torn
        }));
    }
    for i in 0..30 {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE extensions SET timeout_ms = $1 WHERE id = 'normalize_text'")
            .bind(1100 + i)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("UPDATE extensions SET timeout_ms = $1 WHERE id = 'mask_pii'")
            .bind(100 + i)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        if i % 3 == 0 {
            registry.reload().await.unwrap();
        }
    }
    assert!(
        eventually(Duration::from_secs(5), || registry
            .snapshot()
            .lookup("mask_pii")
            .unwrap()
            .timeout_ms
            == 129)
        .await
    );
    done.store(true, Ordering::Relaxed);
    let torn: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(reads.load(Ordering::Relaxed) > 1000);
    assert_eq!(torn, 0, "readers saw a half-applied change");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn live_source_switch_between_fixtures_and_database() {
    let db = TestDatabase::create().await;
    let pool = db.pool().await;
    migrate(&pool).await;
    sqlx::query("INSERT INTO extensions (id, type, subject, timeout_ms) VALUES ('db_only', 'pre', 'a.b', 50)")
        .execute(&pool)
        .await
        .unwrap();
    let config = RegistryConfig {
        source: SourceMode::Fixtures,
        ..db_config(db.url(), SourceMode::Fixtures)
    };
    let registry = start(config).await;
    assert_eq!(registry.snapshot().source, ActiveSource::Fixtures);
    registry.set_source(SourceMode::Database).await.unwrap();
    let s = registry.snapshot();
    assert_eq!((s.source, s.size()), (ActiveSource::Database, 1));
    registry.set_source(SourceMode::Fixtures).await.unwrap();
    assert_eq!(registry.snapshot().size(), 4);
    assert_eq!(registry.status().source, SourceMode::Fixtures);
}
