//! TestDatabase against the PostgreSQL at DATABASE_URL.

use beamline_test_support::{TestDatabase, database_url};
use sqlx::{Connection, PgConnection};

async fn database_exists(name: &str) -> bool {
    let mut conn = PgConnection::connect(&database_url())
        .await
        .expect("connect to DATABASE_URL");
    let count: i64 = sqlx::query_scalar("select count(*) from pg_database where datname = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("query pg_database");
    conn.close().await.expect("close");
    count == 1
}

/// Creates a database, uses it, and drops it while a pool still holds connections.
async fn exercise() {
    let db = TestDatabase::create().await;
    let name = db.name().to_owned();
    assert!(name.starts_with("beamline_test_"), "{name}");
    assert!(db.url().ends_with(&format!("/{name}")), "{}", db.url());
    assert!(database_exists(&name).await, "{name} should exist");

    let pool = db.pool().await;
    let current: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await
        .expect("current_database()");
    assert_eq!(current, name);
    let tables: i64 =
        sqlx::query_scalar("select count(*) from pg_tables where schemaname = 'public'")
            .fetch_one(&pool)
            .await
            .expect("count tables");
    assert_eq!(tables, 0, "a new test database is empty");
    sqlx::query("create table t (id int primary key)")
        .execute(&pool)
        .await
        .expect("create table");
    sqlx::query("insert into t values (1)")
        .execute(&pool)
        .await
        .expect("insert");

    // The pool is still open: DROP DATABASE … WITH (FORCE) must disconnect it.
    drop(db);
    assert!(!database_exists(&name).await, "{name} should be dropped");
    pool.close().await;
}

#[tokio::test]
async fn create_use_and_drop_in_a_current_thread_runtime() {
    exercise().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_use_and_drop_in_a_multi_thread_runtime() {
    exercise().await;
}

#[test]
fn drop_outside_any_runtime() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = runtime.block_on(TestDatabase::create());
    let name = db.name().to_owned();
    assert!(runtime.block_on(database_exists(&name)));
    drop(runtime);

    drop(db);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    assert!(
        !runtime.block_on(database_exists(&name)),
        "{name} should be dropped"
    );
}

#[tokio::test]
async fn databases_are_distinct_and_isolated() {
    let a = TestDatabase::create().await;
    let b = TestDatabase::create().await;
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());

    let pool_a = a.pool().await;
    sqlx::query("create table only_in_a (id int)")
        .execute(&pool_a)
        .await
        .expect("create table");
    let pool_b = b.pool().await;
    let found: i64 =
        sqlx::query_scalar("select count(*) from pg_tables where tablename = 'only_in_a'")
            .fetch_one(&pool_b)
            .await
            .expect("count");
    assert_eq!(found, 0);
    pool_a.close().await;
    pool_b.close().await;
}

#[tokio::test]
#[should_panic(
    expected = "cannot connect to PostgreSQL at postgres://postgres@127.0.0.1:1/postgres"
)]
async fn an_unreachable_server_is_a_clear_panic() {
    TestDatabase::create_on("postgres://postgres@127.0.0.1:1/postgres").await;
}

#[tokio::test]
async fn try_create_reports_an_unreachable_server() {
    let err = TestDatabase::try_create_on("postgres://postgres:secret@127.0.0.1:1/postgres")
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    assert!(
        !err.contains("secret"),
        "the password must not be shown: {err}"
    );
}

#[tokio::test]
async fn try_create_on_a_reachable_server() {
    let db = TestDatabase::try_create()
        .await
        .expect("DATABASE_URL is reachable");
    assert!(db.name().starts_with("beamline_test_"));
}
