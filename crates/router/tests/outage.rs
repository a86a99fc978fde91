//! PostgreSQL cut off under the real binary: the last good snapshot keeps serving,
//! sync errors are counted, `registry reload` reports the failure, and once the
//! database is back the router resyncs, catching changes it could not hear.

mod common;

use beamline_test_support::{NatsServer, PgCluster};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_in_database_mode() {
    let mut pg = PgCluster::start();
    let url = pg.url();
    assert!(
        bin()
            .args(["migrate", "--database-url", &url])
            .output()
            .unwrap()
            .status
            .success()
    );
    {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(SEED).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = start(&write_config(dir.path(), &url, &nats.url(), ""));
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["registry", "status"])["size"],
        4
    );

    pg.stop();
    wait_until(15, "sync errors counted", async || {
        router.json(Some(VIEWER_KEY), &["registry", "status"])["sync_error_total"]
            .as_u64()
            .unwrap_or(0)
            > 0
    })
    .await;
    let status = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    assert_eq!(status["db_state"], "unreachable", "{status}");
    assert_eq!(status["size"], 4, "the last good snapshot keeps serving");
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["ext", "get", "normalize_text"])["timeout_ms"],
        100
    );
    let reload = router.cli(Some(OPERATOR_KEY), &["registry", "reload"]);
    assert_eq!(
        reload.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    assert!(
        String::from_utf8_lossy(&reload.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    assert_eq!(
        router
            .cli(Some(VIEWER_KEY), &["registry", "test-connection"])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(
        http_get(&router.http, "/readyz").0,
        200,
        "still ready: it serves its snapshot"
    );

    pg.restart();
    // Changed while no router could hear it.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE extensions SET timeout_ms = 444 WHERE id = 'normalize_text'")
        .execute(&pool)
        .await
        .unwrap();
    wait_until(20, "resynced after the outage", async || {
        router.json(Some(VIEWER_KEY), &["ext", "get", "normalize_text"])["timeout_ms"] == 444
    })
    .await;
    assert_eq!(
        router.json(Some(VIEWER_KEY), &["registry", "status"])["db_state"],
        "connected"
    );
}
