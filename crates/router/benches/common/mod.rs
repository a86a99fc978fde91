//! What the router's benches share (not a bench target itself): the real binary,
//! started on a fixtures config, killed and waited for on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running `beamline-router serve`; killed and waited for on drop, also when it
/// never started.
pub struct BenchRouter {
    pub child: Child,
    /// Its gRPC address, `http://…`.
    pub addr: String,
}

impl Drop for BenchRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the router on `dir/extensions` and `dir/policies` (fixtures), NATS at
/// `nats`, `extra` appended to its config (TOML), and waits (up to 60 s) for its
/// start line. Its error lines are passed on to the bench's stderr.
pub fn start_router(dir: &Path, nats: &str, extra: &str) -> BenchRouter {
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[extension_registry]
source = "fixtures"
fixtures_dir = "{d}/extensions"
policies_dir = "{d}/policies"

[nats]
url = "{nats}"

[grpc]
listen = "127.0.0.1:0"

[http]
listen = "127.0.0.1:0"

[log]
format = "json"
level = "info"
{extra}
"#,
            d = dir.display()
        ),
    )
    .expect("write the router's config");
    let child = Command::new(env!("CARGO_BIN_EXE_beamline-router"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn beamline-router");
    let mut router = BenchRouter {
        child,
        addr: String::new(),
    };
    let stderr = router.child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("beamline-router started") {
                let _ = tx.send(line);
            } else if line.contains("\"ERROR\"") {
                eprintln!("router: {line}");
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a router did not start within 60 s");
    let v: Value = serde_json::from_str(&line).expect("the start line is JSON");
    router.addr = format!("http://{}", v["grpc"].as_str().unwrap_or_default());
    router
}
