//! PgCluster: start, stop, restart and clean-up, checked with sqlx.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use beamline_test_support::{PgCluster, TestDatabase};
use sqlx::{Connection, PgConnection};

async fn select_one(url: &str) -> Result<i32, sqlx::Error> {
    let mut conn = PgConnection::connect(url).await?;
    let one: i32 = sqlx::query_scalar("select 1").fetch_one(&mut conn).await?;
    conn.close().await?;
    Ok(one)
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z'),
        Err(_) => false,
    }
}

/// The postmaster and its children (checkpointer, walwriter, …).
fn server_processes(postmaster: u32) -> Vec<u32> {
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

fn wait_until_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| process_alive(p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn start_stop_and_restart_keep_the_port_and_the_data() {
    let mut cluster = PgCluster::start();
    let port = cluster.port();
    let url = cluster.url();
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );
    assert!(cluster.is_running());
    assert_eq!(select_one(&url).await.expect("select 1"), 1);

    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query("create table kept (v text)")
        .execute(&mut conn)
        .await
        .expect("create table");
    sqlx::query("insert into kept values ('before restart')")
        .execute(&mut conn)
        .await
        .expect("insert");
    conn.close().await.expect("close");

    cluster.stop();
    assert!(!cluster.is_running());
    assert_eq!(cluster.pid(), None);
    assert!(select_one(&url).await.is_err(), "the server should be down");
    cluster.stop(); // stopping twice is harmless

    cluster.restart();
    assert!(cluster.is_running());
    assert_eq!(cluster.port(), port);
    assert_eq!(select_one(&url).await.expect("select 1 after restart"), 1);
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    let kept: String = sqlx::query_scalar("select v from kept")
        .fetch_one(&mut conn)
        .await
        .expect("data survives a restart");
    assert_eq!(kept, "before restart");
    conn.close().await.expect("close");
}

#[tokio::test]
async fn test_databases_on_a_cluster() {
    let cluster = PgCluster::start();
    let db = TestDatabase::create_on(&cluster.url()).await;
    let name = db.name().to_owned();
    assert!(db.url().starts_with(&format!(
        "postgres://postgres@127.0.0.1:{}/",
        cluster.port()
    )));
    let pool = db.pool().await;
    let current: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert_eq!(current, name);
    pool.close().await;
    drop(db);

    let mut conn = PgConnection::connect(&cluster.url())
        .await
        .expect("connect");
    let count: i64 = sqlx::query_scalar("select count(*) from pg_database where datname = $1")
        .bind(&name)
        .fetch_one(&mut conn)
        .await
        .expect("query pg_database");
    assert_eq!(count, 0, "{name} should be dropped");
    conn.close().await.expect("close");
}

#[test]
fn drop_stops_every_server_process_and_removes_the_directory() {
    let cluster = PgCluster::start();
    let postmaster = cluster.pid().expect("running");
    let processes = server_processes(postmaster);
    assert!(processes.len() > 1, "postmaster children: {processes:?}");
    let dir: PathBuf = cluster.data_dir().parent().expect("parent").to_path_buf();
    assert!(cluster.data_dir().join("PG_VERSION").is_file());

    drop(cluster);

    let alive = wait_until_gone(&processes, Duration::from_secs(10));
    assert!(alive.is_empty(), "still running: {alive:?}");
    assert!(!dir.exists(), "{} should be removed", dir.display());
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let cluster = PgCluster::start();
        let postmaster = cluster.pid().expect("running");
        let dir = cluster.data_dir().parent().expect("parent").to_path_buf();
        tx.send((server_processes(postmaster), dir)).expect("send");
        panic!("deliberate panic while a PgCluster is alive");
    })
    .join();
    assert!(outcome.is_err(), "the thread should have panicked");
    let (processes, dir) = rx.recv().expect("the thread started a cluster");
    let alive = wait_until_gone(&processes, Duration::from_secs(10));
    assert!(alive.is_empty(), "still running: {alive:?}");
    assert!(!dir.exists(), "{} should be removed", dir.display());
}

/// A paused cluster answers no query on an open connection and accepts no new one;
/// resumed, both work; a paused cluster still shuts down on drop.
#[tokio::test]
async fn pause_freezes_every_server_process_and_resume_thaws_them() {
    let cluster = PgCluster::start();
    let url = cluster.url();
    let mut open = PgConnection::connect(&url).await.unwrap();
    cluster.pause();
    let query = tokio::time::timeout(
        Duration::from_millis(700),
        sqlx::query_scalar::<_, i32>("select 1").fetch_one(&mut open),
    )
    .await;
    assert!(query.is_err(), "a paused cluster answered a query");
    let connect = tokio::time::timeout(Duration::from_millis(700), select_one(&url)).await;
    assert!(connect.is_err(), "a paused cluster accepted a connection");
    cluster.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), select_one(&url)).await {
            Ok(Ok(1)) => break,
            other => assert!(
                Instant::now() < deadline,
                "not back after resume: {other:?}"
            ),
        }
    }
    let pids = server_processes(cluster.pid().unwrap());
    cluster.pause();
    drop(cluster);
    assert_eq!(
        wait_until_gone(&pids, Duration::from_secs(30)),
        Vec::<u32>::new()
    );
}
