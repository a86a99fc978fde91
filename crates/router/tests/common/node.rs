//! Node.js extensions of `tests/conformance/` for the tests that run them: where
//! scripts/test installed their npm packages, and a process per extension.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// One extension process; killed when dropped (it also exits when its stdin closes).
pub struct NodeExtension {
    child: Child,
    /// What it printed after its `ready` line, line by line.
    pub lines: Receiver<String>,
}

impl Drop for NodeExtension {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// Where scripts/test installed the npm packages; a clear failure when nowhere.
pub fn node_modules() -> PathBuf {
    let dir = std::env::var_os("BEAMLINE_CONFORMANCE_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("beamline-router/conformance/node_modules")
        });
    assert!(
        dir.join("nats/package.json").is_file(),
        "the conformance test needs the npm package nats (pinned in {}) in {}: run scripts/test, \
         which installs it there (or: cp package.json package-lock.json into a directory, run \
         `npm ci` in it, and set BEAMLINE_CONFORMANCE_NODE_MODULES to its node_modules)",
        sources().join("package-lock.json").display(),
        dir.display()
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the conformance test needs Node.js (`node` on PATH): run scripts/test, which installs \
         the Debian package nodejs ({node:?})"
    );
    dir
}

/// Starts `file` on NATS and waits (bounded) for its `ready` line.
pub fn start_extension(file: &str, nats_url: &str, modules: &Path) -> NodeExtension {
    let mut child = Command::new("node")
        .arg(sources().join(file))
        .env("NODE_PATH", modules)
        .env("NATS_URL", nats_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn node");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) if line.starts_with("ready ") => NodeExtension { child, lines: rx },
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{file} did not get ready within 30 s: {other:?}")
        }
    }
}
