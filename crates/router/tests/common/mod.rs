//! Starting the real binary for tests: a config file, ports chosen by the OS, the
//! start line parsed for the gRPC address, the process killed on drop.
#![allow(dead_code)]

pub mod node;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ADMIN_KEY: &str = "admin-key-0123456789";
pub const OPERATOR_KEY: &str = "operator-key-0123456789";
pub const VIEWER_KEY: &str = "viewer-key-0123456789";

/// The binary with a clean environment (nothing of the test's own leaks in).
pub fn bin() -> Command {
    clean(env!("CARGO_BIN_EXE_beamline-router"))
}

/// `program` without the router's environment variables of the test's own.
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars() {
        if k.starts_with("EXTENSION_REGISTRY_") || k.starts_with("BEAMLINE_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

pub struct Router {
    pub child: Child,
    pub addr: String,
    /// Base URL of /metrics, /healthz, /readyz.
    pub http: String,
    pub log: Arc<Mutex<String>>,
    /// Set when the process's stderr has ended (every line is in `log`).
    pub log_ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with the three test keys; `extra` is appended (TOML).
pub fn write_config(
    dir: &Path,
    database_url: &str,
    nats_url: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("router.toml");
    let text = format!(
        r#"
[extension_registry]
source = "database"
database_url = "{database_url}"
sync_interval_seconds = 1
db_connect_timeout_ms = 1000

[nats]
url = "{nats_url}"

[grpc]
listen = "127.0.0.1:0"

[http]
listen = "127.0.0.1:0"

[log]
format = "json"
level = "info"

[[admin.api_keys]]
name = "alice-admin"
role = "admin"
key = "{ADMIN_KEY}"

[[admin.api_keys]]
name = "oscar-operator"
role = "operator"
key_sha256 = "{op}"

[[admin.api_keys]]
name = "vera-viewer"
role = "viewer"
key = "{VIEWER_KEY}"
{extra}
"#,
        op = sha256_hex(OPERATOR_KEY)
    );
    std::fs::write(&path, text).unwrap();
    path
}

pub fn sha256_hex(s: &str) -> String {
    // Computed by the system's sha256sum so the test does not trust our own code.
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

pub fn start(config: &Path) -> Router {
    let mut command = bin();
    command.args(["serve", "--config"]).arg(config);
    start_command(command)
}

/// Starts `command` (a `serve` whose log is JSON) and waits for its start line.
pub fn start_command(mut command: Command) -> Router {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let log_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (log, ended) = (log.clone(), log_ended.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&line);
                log.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let mut router = Router {
        child,
        addr: String::new(),
        http: String::new(),
        log,
        log_ended,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100))
            && let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["message"] == "beamline-router started"
        {
            router.addr = format!("http://{}", v["grpc"].as_str().unwrap());
            router.http = format!("http://{}", v["http"].as_str().unwrap());
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return router;
        }
    }
    panic!("router did not start: {}", router.log.lock().unwrap());
}

impl Router {
    /// Runs a CLI command against this router.
    pub fn cli(&self, key: Option<&str>, args: &[&str]) -> Output {
        let mut c = bin();
        c.args(["--addr", &self.addr, "--output", "json"]);
        if let Some(k) = key {
            c.args(["--api-key", k]);
        }
        c.args(args).output().expect("cli")
    }

    /// Runs a CLI command that must succeed; returns its JSON.
    pub fn json(&self, key: Option<&str>, args: &[&str]) -> Value {
        let out = self.cli(key, args);
        assert!(
            out.status.success(),
            "{args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit()
    }

    /// Waits for a router that was already signalled to exit (a second SIGTERM would
    /// make it exit at once, non-zero).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        // The router drains for up to 30 s, then persists health.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.wait_log_ended();
                return s;
            }
            assert!(Instant::now() < deadline, "router did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// After the process exited: waits (up to 10 s) until the reader has taken every
    /// line of its stderr, so `log` holds the whole log.
    pub fn wait_log_ended(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log_ended.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the router's stderr did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A fresh database migrated by the real binary (`beamline-router migrate`).
pub async fn migrated_database() -> beamline_test_support::TestDatabase {
    let db = beamline_test_support::TestDatabase::create().await;
    let out = bin()
        .args(["migrate", "--database-url", db.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    db
}

/// Polls until `f` is true (or panics with `what` after `secs`).
pub async fn wait_until(secs: u64, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub const SEED: &str = r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry, enabled, config, metadata) VALUES
 ('normalize_text', 'pre', 'beamline.ext.pre.normalize_text.v1', 100, 0, true, '{}', '{"description": "Text normalization pre-processor", "version": "v1"}'),
 ('pii_guard', 'validator', 'beamline.ext.validate.pii_guard.v1', 200, 0, true, '{}', '{}'),
 ('mask_pii', 'post', 'beamline.ext.post.mask_pii.v1', 150, 0, true, '{}', '{}'),
 ('test_provider', 'provider', 'beamline.provider.test_provider.v1', 5000, 1, true, '{}', '{}');
INSERT INTO extension_instances (extension_id, instance_id, subject, weight, health_status) VALUES
 ('pii_guard', 'pii-a', 'beamline.ext.validate.pii_guard.v1', 100, 'healthy');
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
 ('default', 'default', '{"providers": [{"name": "test_provider", "weight": 100}], "pre": [{"id": "normalize_text", "mode": "required"}], "validators": [{"id": "pii_guard", "on_fail": "block"}], "post": [{"id": "mask_pii", "mode": "optional"}]}');
"#;

/// GET over plain HTTP/1.0; returns (status code, body).
pub fn http_get(base: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let host = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// Every metric of DESIGN.md §7 with its type.
pub const CONTRACT_METRICS: &[(&str, &str)] = &[
    ("router_extension_invocation_total", "counter"),
    ("router_extension_invocation_latency_ms", "histogram"),
    ("router_extension_retries_total", "counter"),
    ("router_extension_circuit_breaker_state", "gauge"),
    ("router_extension_circuit_breaker_opened_total", "counter"),
    ("router_extension_health_success_rate", "gauge"),
    ("router_extension_health_latency_p95_ms", "gauge"),
    ("router_extension_registry_extensions_total", "gauge"),
    ("router_extension_registry_sync_total", "counter"),
    ("router_extension_instance_health", "gauge"),
    ("router_extension_version_invocation_total", "counter"),
    ("router_extension_load_balancer_selection_total", "counter"),
    ("router_rbac_denied_total", "counter"),
    ("router_extension_payload_too_large_total", "counter"),
    ("router_extension_retry_limit_exceeded_total", "counter"),
    ("router_extension_registry_quarantined", "gauge"),
];
