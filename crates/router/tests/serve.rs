//! The real binary: `serve` starts on its built-in fixtures and stops cleanly on
//! SIGTERM and SIGINT; bad configuration is refused with file, key and reason;
//! `migrate` creates the schema.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use beamline_test_support::TestDatabase;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_beamline-router"));
    // Keep the test's environment from steering the binary.
    for (k, _) in std::env::vars() {
        if k.starts_with("EXTENSION_REGISTRY_") || k.starts_with("BEAMLINE_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    // No fixed ports in tests; the test NATS.
    c.env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_NATS_URL", beamline_test_support::nats_url());
    c
}

/// Everything the child writes to stderr, read on a thread as it comes.
struct Logs {
    rx: std::sync::mpsc::Receiver<String>,
    text: String,
}

impl Logs {
    fn of(child: &mut Child) -> Logs {
        let mut err = child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx
                            .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        Logs {
            rx,
            text: String::new(),
        }
    }

    /// Reads until `needle` shows up (after what was already read) or time runs out.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> &str {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !self.text.contains(needle) {
            if let Ok(chunk) = self.rx.recv_timeout(Duration::from_millis(50)) {
                self.text.push_str(&chunk);
            }
        }
        &self.text
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we own; no memory is touched.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill failed");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("router did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_runs_on_builtin_fixtures_and_stops_cleanly_on_sigterm_and_sigint() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = bin()
            .args(["serve"])
            .current_dir(std::env::temp_dir())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut logs = Logs::of(&mut child);
        let log = logs
            .wait_for("beamline-router started", Duration::from_secs(20))
            .to_string();
        assert!(log.contains("Extension Registry synced"), "{log}");
        assert!(log.contains("extensions=4"), "{log}");
        signal(&child, sig);
        let status = wait_exit(&mut child, Duration::from_secs(10));
        assert!(
            status.success(),
            "exit status {status:?} after signal {sig}"
        );
    }
}

#[test]
fn client_flags_belong_to_client_commands_only() {
    // Before or after a client command's name.
    for args in [
        vec!["--output", "json", "ext", "get", "--help"],
        vec!["ext", "get", "--help", "--output", "json"],
        vec!["--addr", "http://127.0.0.1:1", "decide", "--help"],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Not on serve and migrate: refused there, and not in their help.
    for command in ["serve", "migrate"] {
        let out = bin()
            .args(["--output", "json", command, "--help"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--output'"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let help = bin().args([command, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in ["--addr", "--api-key", "--output", "--tls-ca"] {
            assert!(
                !help.contains(flag),
                "{command} --help shows {flag}:\n{help}"
            );
        }
    }
}

#[test]
fn bad_configuration_is_refused_with_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    std::fs::write(
        &path,
        "[extension_registry]\nsource = \"database\"\ndatabase_url = \"postgres://u:hunter2@h/db\"\nsync_interval_seconds = 0\n",
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("router.toml"), "{err}");
    assert!(
        err.contains("extension_registry.sync_interval_seconds"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let out = bin()
        .args(["serve"])
        .env("EXTENSION_REGISTRY_SOURCE", "sideways")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EXTENSION_REGISTRY_SOURCE"));
}

/// A broken fixture file does not stop the router: it is quarantined with the file,
/// field and reason named in the log, and the good files serve. A fixtures folder
/// that cannot be read at all stops `serve` with the folder named.
#[test]
fn broken_fixtures_are_quarantined_and_the_rest_serves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.json"),
        "{\"id\": \"x\", \"type\": \"pre\", \"subject\": \"a.*\"}",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("good.json"),
        "{\"id\": \"y\", \"type\": \"pre\", \"subject\": \"a.b\"}",
    )
    .unwrap();
    let mut child = bin()
        .args(["serve"])
        .env("EXTENSION_REGISTRY_FIXTURES_DIR", dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut logs = Logs::of(&mut child);
    let log = logs
        .wait_for("beamline-router started", Duration::from_secs(20))
        .to_string();
    assert!(log.contains("extensions=1"), "{log}");
    let quarantined = log
        .lines()
        .find(|l| l.contains("record quarantined"))
        .unwrap_or_else(|| panic!("no quarantine line: {log}"));
    assert!(
        quarantined.contains("bad.json: subject:") && quarantined.contains("wildcard"),
        "{quarantined}"
    );
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());

    let out = bin()
        .args(["serve"])
        .env(
            "EXTENSION_REGISTRY_FIXTURES_DIR",
            dir.path().join("missing"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing"), "{err}");
}

#[tokio::test]
async fn migrate_creates_the_schema_and_is_idempotent() {
    let db = TestDatabase::create().await;
    for _ in 0..2 {
        let out = bin()
            .args(["migrate", "--database-url", db.url()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pool = db.pool().await;
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let names: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
    for t in [
        "extension_audit_log",
        "extension_health",
        "extension_instances",
        "extension_versions",
        "extensions",
        "policies",
    ] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }
}

#[test]
fn migrate_against_an_unreachable_database_exits_3() {
    let port = beamline_test_support::free_port();
    let out = bin()
        .args([
            "migrate",
            "--database-url",
            &format!("postgres://postgres:pw@127.0.0.1:{port}/x"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(":pw@"));
}

/// The database source end to end through the binary: NOTIFY-driven change shows in
/// the sync log line without any reload call.
#[tokio::test]
async fn serve_against_postgres_picks_up_committed_changes() {
    let db = TestDatabase::create().await;
    let out = bin()
        .args(["migrate", "--database-url", db.url()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let pool = db.pool().await;
    sqlx::query("INSERT INTO extensions (id, type, subject, timeout_ms) VALUES ('normalize_text', 'pre', 'beamline.ext.pre.normalize_text.v1', 100)")
        .execute(&pool)
        .await
        .unwrap();
    let mut child = bin()
        .args(["serve"])
        .env("EXTENSION_REGISTRY_SOURCE", "database")
        .env("EXTENSION_REGISTRY_DATABASE_URL", db.url())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut logs = Logs::of(&mut child);
    let log = logs
        .wait_for("listening for changes", Duration::from_secs(20))
        .to_string();
    assert!(log.contains("source=\"database\""), "{log}");
    // The full reload that follows LISTEN takes the router's position in the change
    // log; a change committed before it would be in that reload, and its NOTIFY
    // would then find nothing new.
    logs.wait_for("trigger=\"reconnect\"", Duration::from_secs(20));
    sqlx::query("UPDATE extensions SET timeout_ms = 200 WHERE id = 'normalize_text'")
        .execute(&pool)
        .await
        .unwrap();
    let child_log = logs
        .wait_for("trigger=\"notify\"", Duration::from_secs(10))
        .to_string();
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(child_log.contains("trigger=\"notify\""), "{child_log}");
    assert!(
        child_log.contains("scope=\"changes\" changed_keys=1"),
        "only the changed extension is read again: {child_log}"
    );
    assert!(status.success());
}
