//! Trying the router as a newcomer does: the README's run command (`scripts/run`) on
//! a machine where no NATS server answers, `decide` against it (every output and
//! exit code), and what `serve` says at start about what will not work yet.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use beamline_test_support::{NatsServer, free_port};
use common::*;
use serde_json::{Value, json};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether a NATS server answers on 127.0.0.1:`port`.
fn nats_answers(port: u16) -> bool {
    use std::io::{BufRead, BufReader};
    let Ok(s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    ) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("INFO")
}

/// `scripts/run` with the test's binary (no build), on a machine where nothing
/// answers at the NATS URL: it brings its own nats-server, Decide runs the four
/// reference extensions, and the nats-server ends with the router.
#[test]
fn the_run_command_gives_a_working_decide_where_no_nats_runs() {
    let port = free_port();
    assert!(!nats_answers(port));
    let mut command = clean(repo("scripts/run"));
    command
        .env("BEAMLINE_RUN_BINARY", env!("CARGO_BIN_EXE_beamline-router"))
        .env("BEAMLINE_NATS_URL", format!("nats://127.0.0.1:{port}"))
        .env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_LOG_FORMAT", "json");
    let mut router = start_command(command);
    assert!(
        nats_answers(port),
        "no private nats-server on the configured port"
    );

    let out = router.cli(
        None,
        &[
            "decide",
            "--tenant",
            "acme",
            "--payload",
            "  Hello   world  ",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["final_message"]["payload"], "Hello world");
    assert_eq!(d["provider_output"]["output"], "echo: Hello world");
    let steps: Vec<(&str, &str, &str)> = d["executed_extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["type"].as_str().unwrap(),
                s["id"].as_str().unwrap(),
                s["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("pre", "normalize_text", "ok"),
            ("validator", "pii_guard", "ok"),
            ("provider", "test_provider", "ok"),
            ("post", "mask_pii", "ok")
        ]
    );

    let status = router.terminate();
    assert!(status.success(), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while nats_answers(port) {
        assert!(
            Instant::now() < deadline,
            "the private nats-server outlived the router"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where nats-server cannot be found, `serve --demo` says so in one line, with the
/// command that installs it, and exits 3; it never serves a pipeline that fails.
#[test]
fn without_nats_server_the_demo_says_what_to_install() {
    let port = free_port();
    let out = bin()
        .args(["serve", "--demo"])
        .env("BEAMLINE_NATS_SERVER", "/nonexistent/nats-server")
        .env("BEAMLINE_NATS_URL", format!("nats://127.0.0.1:{port}"))
        .env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains("nats-server is not installed")
            && line.contains("sudo apt-get install -y nats-server")
            && line.contains(&format!("nats://127.0.0.1:{port}")),
        "{line}"
    );
}

/// `serve --demo` on `nats`, with the reference extensions' records given 5 s
/// timeouts: these tests are about the CLI, and a machine busy compiling beside them
/// must not turn a 100 ms pre-processor call into a timeout.
fn demo(nats: &NatsServer, dir: &std::path::Path) -> Router {
    let extensions = dir.join("extensions");
    std::fs::create_dir_all(&extensions).unwrap();
    for entry in std::fs::read_dir(repo("fixtures/extensions")).unwrap() {
        let path = entry.unwrap().path();
        let mut record: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        record["timeout_ms"] = json!(5000);
        std::fs::write(
            extensions.join(path.file_name().unwrap()),
            record.to_string(),
        )
        .unwrap();
    }
    let mut command = bin();
    command
        .args(["serve", "--demo"])
        .env("EXTENSION_REGISTRY_FIXTURES_DIR", &extensions)
        .env("EXTENSION_REGISTRY_POLICIES_DIR", repo("fixtures/policies"))
        .env("BEAMLINE_NATS_URL", nats.url())
        .env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_LOG_FORMAT", "json");
    start_command(command)
}

fn decide(router: &Router, output: &str, args: &[&str]) -> Output {
    bin()
        .args([
            "decide",
            "--addr",
            &router.addr,
            "--output",
            output,
            "--tenant",
            "acme",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn decide_prints_the_decision_explains_each_step_and_exits_by_error_class() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let router = demo(&nats, dir.path());

    // --explain: the steps, in order, then the decision.
    let out = decide(
        &router,
        "table",
        &["--payload", "  Hello   world  ", "--explain"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("TYPE") && lines[0].contains("LATENCY_MS"),
        "{table}"
    );
    for (line, (ty, id)) in lines[1..5].iter().zip([
        ("pre", "normalize_text"),
        ("validator", "pii_guard"),
        ("provider", "test_provider"),
        ("post", "mask_pii"),
    ]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            (cells[0], cells[1], cells[2], cells[4]),
            (ty, id, "v1", "ok"),
            "{table}"
        );
    }
    assert!(
        table.contains("provider_id  test_provider") && table.contains("message      Hello world"),
        "{table}"
    );
    // Without --explain, only the decision.
    let plain = text(&decide(&router, "table", &["--payload", "hi"]).stdout);
    assert!(
        !plain.contains("normalize_text") && plain.contains("test_provider"),
        "{plain}"
    );

    // The text from a file (with a context entry) and from standard input.
    let file = dir.path().join("in.txt");
    std::fs::write(&file, "  from   a file ").unwrap();
    let d: Value = serde_json::from_slice(
        &decide(
            &router,
            "json",
            &["--file", file.to_str().unwrap(), "--context", "region=eu"],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(d["final_message"]["payload"], "from a file");
    let mut child = bin()
        .args([
            "decide",
            "--addr",
            &router.addr,
            "--output",
            "json",
            "--tenant",
            "acme",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b" piped  in ")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["final_message"]["payload"], "piped in");

    // --dry-run: every call skipped, the provider still chosen.
    let d: Value =
        serde_json::from_slice(&decide(&router, "json", &["--payload", "x", "--dry-run"]).stdout)
            .unwrap();
    assert_eq!(d["provider_id"], "test_provider");
    assert!(d["provider_output"].is_null(), "{d}");

    // A validator's refusal: exit 7, the steps up to it explained, JSON for scripts.
    let out = decide(
        &router,
        "table",
        &["--payload", "mail me: jane@example.com", "--explain"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("error: validator_blocked: "),
        "{}",
        text(&out.stderr)
    );
    let table = text(&out.stdout);
    assert!(
        table.contains("normalize_text") && table.contains("pii_detected"),
        "{table}"
    );
    let out = decide(&router, "json", &["--payload", "mail me: jane@example.com"]);
    assert_eq!(out.status.code(), Some(7));
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["error"]["code"], "validator_blocked");
    assert_eq!(e["executed_extensions"][1]["status"], "reject");

    // Not found: exit 4. Bad input: exit 2 (not UTF-8 from a file).
    let out = decide(&router, "json", &["--payload", "x", "--policy", "nope"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["error"],
        json!({"code": "policy_not_found", "message": "policy 'nope' not found for tenant 'acme'"})
    );
    let bin_file = dir.path().join("bin");
    std::fs::write(&bin_file, [0xff, 0xfe]).unwrap();
    let out = decide(&router, "json", &["--file", bin_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // Nothing serves the extensions (another router on a NATS with no extensions):
    // exit 8, extension_unavailable.
    let bare_nats = NatsServer::start();
    let mut command = bin();
    command
        .arg("serve")
        .env("BEAMLINE_NATS_URL", bare_nats.url())
        .env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_LOG_FORMAT", "json");
    let bare = start_command(command);
    let out = decide(&bare, "table", &["--payload", "x"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("extension_unavailable"),
        "{}",
        text(&out.stderr)
    );

    // No router: exit 3, and the message says where it looked.
    let out = bin()
        .args([
            "decide",
            "--addr",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .args(["--tenant", "acme", "--payload", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("router unreachable"),
        "{}",
        text(&out.stderr)
    );
}

/// `serve` without --demo and without a NATS server says at start, in one line,
/// what will not work yet and why.
#[test]
fn serve_says_at_start_what_will_not_work_yet() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(policies.join("acme")).unwrap();
    std::fs::write(
        policies.join("acme/default.json"),
        json!({"providers": [{"name": "test_provider", "weight": 100}]}).to_string(),
    )
    .unwrap();
    let mut command = bin();
    command
        .arg("serve")
        .env("EXTENSION_REGISTRY_SOURCE", "fixtures")
        .env(
            "EXTENSION_REGISTRY_FIXTURES_DIR",
            repo("fixtures/extensions"),
        )
        .env("EXTENSION_REGISTRY_POLICIES_DIR", &policies)
        .env(
            "BEAMLINE_NATS_URL",
            format!("nats://127.0.0.1:{}", free_port()),
        )
        .env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_LOG_FORMAT", "json");
    let router = start_command(command);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = router.log.lock().unwrap().clone();
        if let Some(l) = log.lines().find(|l| l.contains("what will not work yet")) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no such line: {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "WARN", "{line}");
    let message = v["message"].as_str().unwrap();
    for says in [
        "no NATS answers at nats://127.0.0.1:",
        "extension_unavailable",
        "no enabled policy 'default' of tenant 'default'",
        "policy_not_found",
        "provider 'test_provider' has the name of a provider extension but no \"extension\"",
    ] {
        assert!(message.contains(says), "{says:?} missing from: {message}");
    }
}
