//! The stop sequence under faults (issue 13's matrix): for NATS killed, NATS paused
//! (SIGSTOP), NATS never reachable, PostgreSQL killed, PostgreSQL paused and an
//! extension paused — each with its own nats-server and/or PostgreSQL to break — the
//! router gets SIGTERM with requests in flight and must exit 0 within its bound
//! (`[server] drain_timeout_ms`, then health at most 5 s, NATS flush at most 1 s, HTTP
//! close at most 1 s, runtime 0.5 s), having answered every request in flight: a
//! decision, or an error with a documented code (`x-beamline-error-code` on gRPC,
//! `error.code` on the NATS intake). Measured stop durations are printed as
//! `MEASURED stop …` lines.
//!
//! Also: a second signal while stopping exits at once, non-zero; readiness turns
//! unready at the first signal while in-flight requests drain.

mod common;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_model::ErrorCode;
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::{NatsServer, PgCluster, TestDatabase, free_port};
use common::*;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

const DRAIN_MS: u64 = 5_000;
/// The stop sequence's own bound (crates/router/src/serve.rs): the drain, health
/// persistence (5 s), the NATS flush (1 s), the span exporter's flush (1 s), the HTTP
/// server's close (1 s), and a little.
const STOP_BOUND: Duration = Duration::from_millis(DRAIN_MS + 5_000 + 1_000 + 1_000 + 1_000 + 500);
/// Allowance on top of the bound for a machine busy with other work: the point is
/// that the process ends, and ends about when the bound says.
const SLACK: Duration = Duration::from_secs(10);
/// gRPC requests in flight at the signal.
const GRPC_IN_FLIGHT: usize = 6;
/// NATS intake requests in flight at the signal (when NATS stays up).
const INTAKE_IN_FLIGHT: usize = 3;
/// The extension the test serves itself answers after this long.
const EXTENSION_DELAY: Duration = Duration::from_millis(1_500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    NatsKilled,
    NatsPaused,
    NatsNeverReachable,
    PostgresKilled,
    PostgresPaused,
    ExtensionPaused,
}

struct Slow;
impl Handler for Slow {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        tokio::time::sleep(EXTENSION_DELAY).await;
        Ok(Response::unchanged())
    }
}

/// A `beamline-router serve --demo` process, used as an extension service in a
/// process of its own (so it can be paused): it serves normalize_text and the
/// other reference extensions on the test's NATS.
struct DemoExtensions(Child);

impl DemoExtensions {
    fn start(nats_url: &str) -> DemoExtensions {
        let mut child = bin()
            .args(["serve", "--demo"])
            .env("BEAMLINE_NATS_URL", nats_url)
            .env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
            .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the demo extensions");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains("demo extensions serving") => break,
                _ => assert!(
                    Instant::now() < deadline,
                    "the demo extensions did not start"
                ),
            }
        }
        std::thread::spawn(move || while rx.recv().is_ok() {});
        DemoExtensions(child)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }
}

impl Drop for DemoExtensions {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Counts every message published on `subject` (a plain subscription sees each
/// request the router sends, whoever answers it); flushed before it returns.
async fn observe(nc: &async_nats::Client, subject: &str) -> Arc<AtomicUsize> {
    let mut sub = nc.subscribe(subject.to_string()).await.unwrap();
    nc.flush().await.unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while sub.next().await.is_some() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    seen
}

fn decide_request(i: usize) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: format!("m{i}"),
            tenant_id: "acme".into(),
            payload: b"Hello World".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A gRPC answer: a decision, or an error the router answered with a documented
/// code. A transport failure (connection dropped, no answer) is neither.
fn grpc_answer(r: &Result<tonic::Response<proto::RouteDecision>, tonic::Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) => {
            let code = s
                .metadata()
                .get("x-beamline-error-code")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            assert!(
                ErrorCode::parse(code).is_some(),
                "an in-flight request got no documented answer: {s:?}"
            );
            code.to_string()
        }
    }
}

fn intake_answer(payload: &[u8]) -> String {
    let v: Value = serde_json::from_slice(payload).expect("intake reply is JSON");
    if v["ok"] == true {
        return "ok".into();
    }
    let code = v["error"]["code"].as_str().unwrap_or("");
    assert!(
        ErrorCode::parse(code).is_some(),
        "an in-flight intake request got no documented answer: {v}"
    );
    code.to_string()
}

fn signal(router: &Router, sig: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(router.child.id() as i32, sig) };
}

/// Waits for the router to exit; its status and how long it took.
fn wait_exit(router: &mut Router, since: Instant) -> (std::process::ExitStatus, Duration) {
    loop {
        if let Some(s) = router.child.try_wait().unwrap() {
            let took = since.elapsed();
            // Its last lines may still be on their way to the test's reader.
            router.wait_log_ended();
            return (s, took);
        }
        assert!(
            since.elapsed() < STOP_BOUND + SLACK,
            "the router did not exit within {:?} of SIGTERM:\n{}",
            STOP_BOUND + SLACK,
            router.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn seed_sql(id: &str, subject: &str, timeout_ms: u32) -> String {
    format!(
        "INSERT INTO extensions (id, type, subject, timeout_ms, retry) VALUES ('{id}', 'pre', '{subject}', {timeout_ms}, 0);
         INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('default', 'default',
           '{{\"providers\": [{{\"name\": \"p\"}}], \"pre\": [{{\"id\": \"{id}\"}}]}}');"
    )
}

async fn fault_matrix(fault: Fault) {
    let mut nats = (fault != Fault::NatsNeverReachable).then(NatsServer::start);
    let mut cluster =
        matches!(fault, Fault::PostgresKilled | Fault::PostgresPaused).then(PgCluster::start);
    let db = match &cluster {
        Some(c) => TestDatabase::create_on(&c.url()).await,
        None => TestDatabase::create().await,
    };
    let out = bin()
        .args(["migrate", "--database-url", db.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (id, subject) = match fault {
        Fault::ExtensionPaused => ("normalize_text", "beamline.ext.pre.normalize_text.v1"),
        _ => ("work", "stop.work"),
    };
    {
        let pool = db.pool().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(seed_sql(id, subject, 3_000)))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let nats_url = match &nats {
        Some(n) => n.url(),
        None => format!("nats://127.0.0.1:{}", free_port()),
    };

    // The extension, and an observer that sees every request the router sends it.
    let (client, observed) = match &nats {
        Some(n) => {
            let nc = async_nats::connect(n.url()).await.unwrap();
            let seen = observe(&nc, subject).await;
            (Some(nc), seen)
        }
        None => (None, Arc::new(AtomicUsize::new(0))),
    };
    let demo = (fault == Fault::ExtensionPaused).then(|| DemoExtensions::start(&nats_url));
    let _extension = match (&client, fault) {
        (Some(nc), f) if f != Fault::ExtensionPaused => Some(
            beamline_sdk::spawn(nc.clone(), subject, Slow, ServeOptions::default())
                .await
                .unwrap(),
        ),
        _ => None,
    };

    // Tracing on, towards a collector that never answers (TCP connects, nothing
    // else): the span exporter's flush must not hold the stop past its bound either.
    let stuck_collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut router = start(&write_config(
        dir.path(),
        db.url(),
        &nats_url,
        &format!(
            "\n[server]\ndrain_timeout_ms = {DRAIN_MS}\n[tracing]\nendpoint = \"http://{}\"\n",
            stuck_collector.local_addr().unwrap()
        ),
    ));
    let grpc = RouterClient::connect(router.addr.clone()).await.unwrap();

    if fault == Fault::NatsNeverReachable {
        // Nothing can wait on NATS here: calls fail fast (extension_unavailable).
        let mut c = grpc.clone();
        let r = c.decide(decide_request(0)).await;
        assert_eq!(grpc_answer(&r), "extension_unavailable");
    } else {
        // The whole path works before the fault.
        let mut c = grpc.clone();
        let r = c.decide(decide_request(0)).await;
        assert_eq!(grpc_answer(&r), "ok", "{r:?}");
    }
    if let Some(d) = &demo {
        d.signal(libc::SIGSTOP);
    }

    // Requests in flight: the observer has seen each reach the extension's subject.
    let before = observed.load(Ordering::SeqCst);
    let mut grpc_calls = Vec::new();
    for i in 0..GRPC_IN_FLIGHT {
        let mut c = grpc.clone();
        grpc_calls.push(tokio::spawn(async move {
            c.decide(decide_request(i + 1)).await
        }));
    }
    let with_intake = matches!(fault, Fault::PostgresKilled | Fault::PostgresPaused);
    let mut intake_calls = Vec::new();
    if with_intake {
        for i in 0..INTAKE_IN_FLIGHT {
            let nc = client.clone().unwrap();
            intake_calls.push(tokio::spawn(async move {
                let body = json!({"version": "1", "request_id": format!("r{i}"), "tenant_id": "acme",
                    "task": {"type": "chat", "payload": "Hello World"}});
                nc.request(
                    "beamline.router.v1.decide",
                    serde_json::to_vec(&body).unwrap().into(),
                )
                .await
            }));
        }
    }
    if fault != Fault::NatsNeverReachable {
        let want = GRPC_IN_FLIGHT + intake_calls.len();
        wait_until(
            20,
            "every request is in flight at the extension",
            async || observed.load(Ordering::SeqCst) >= before + want,
        )
        .await;
    } else {
        for j in grpc_calls.drain(..) {
            assert_eq!(grpc_answer(&j.await.unwrap()), "extension_unavailable");
        }
    }

    match fault {
        Fault::NatsKilled => nats.as_mut().unwrap().stop(),
        Fault::NatsPaused => nats.as_ref().unwrap().pause(),
        Fault::PostgresKilled => cluster.as_mut().unwrap().stop(),
        Fault::PostgresPaused => cluster.as_ref().unwrap().pause(),
        Fault::NatsNeverReachable | Fault::ExtensionPaused => {}
    }
    let stopping = Instant::now();
    signal(&router, libc::SIGTERM);
    let (status, took) = wait_exit(&mut router, stopping);
    let log = router.log.lock().unwrap().clone();
    assert!(
        status.success(),
        "{fault:?}: exit {status:?} after SIGTERM\n{log}"
    );
    assert!(log.contains("beamline-router stopped"), "{log}");

    let mut answers: Vec<String> = Vec::new();
    for j in grpc_calls {
        let r = tokio::time::timeout(Duration::from_secs(30), j)
            .await
            .expect("the caller got an answer")
            .unwrap();
        answers.push(grpc_answer(&r));
    }
    for j in intake_calls {
        let m = tokio::time::timeout(Duration::from_secs(30), j)
            .await
            .expect("the intake caller got an answer")
            .unwrap()
            .expect("an in-flight intake request was answered");
        answers.push(intake_answer(&m.payload));
    }
    eprintln!(
        "MEASURED stop {fault:?}: {:.2} s (bound {:.1} s); in-flight answers: {answers:?}",
        took.as_secs_f64(),
        STOP_BOUND.as_secs_f64()
    );
    drop(demo);
    // Back up, so the test database can be dropped.
    match fault {
        Fault::PostgresKilled => cluster.as_mut().unwrap().restart(),
        Fault::PostgresPaused => cluster.as_ref().unwrap().resume(),
        _ => {}
    }
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_nats_killed() {
    fault_matrix(Fault::NatsKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_nats_paused() {
    fault_matrix(Fault::NatsPaused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_nats_never_reachable() {
    fault_matrix(Fault::NatsNeverReachable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_postgres_killed() {
    fault_matrix(Fault::PostgresKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_postgres_paused() {
    fault_matrix(Fault::PostgresPaused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_an_extension_paused() {
    fault_matrix(Fault::ExtensionPaused).await;
}

/// Readiness turns unready at the first signal while in-flight requests drain; a
/// second signal ends the process at once with 128 + its number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_unready_at_once_and_a_second_signal_exits_now() {
    let nats = NatsServer::start();
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(seed_sql("work", "stop.second", 3_000)))
        .execute(&pool)
        .await
        .unwrap();
    let nc = async_nats::connect(nats.url()).await.unwrap();
    // A subscriber that never answers within the drain: requests stay in flight.
    let seen = observe(&nc, "stop.second").await;
    let dir = tempfile::tempdir().unwrap();
    let mut router = start(&write_config(
        dir.path(),
        db.url(),
        &nats.url(),
        "\n[server]\ndrain_timeout_ms = 60000\n",
    ));
    assert_eq!(http_get(&router.http, "/readyz").0, 200);
    let mut c = RouterClient::connect(router.addr.clone()).await.unwrap();
    let call = tokio::spawn(async move { c.decide(decide_request(1)).await });
    wait_until(20, "the request is in flight", async || {
        seen.load(Ordering::SeqCst) >= 1
    })
    .await;
    signal(&router, libc::SIGTERM);
    wait_until(10, "/readyz answers 503 while draining", async || {
        let (code, body) = http_get(&router.http, "/readyz");
        code == 503 && body.contains("shutting down")
    })
    .await;
    assert!(router.child.try_wait().unwrap().is_none(), "still draining");
    let second = Instant::now();
    signal(&router, libc::SIGTERM);
    let (status, took) = wait_exit(&mut router, second);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    eprintln!(
        "MEASURED second SIGTERM → exit: {:.3} s",
        took.as_secs_f64()
    );
    // The request in flight had to be abandoned: the caller is told (transport error),
    // not left waiting.
    let r = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the caller is not left hanging")
        .unwrap();
    assert!(r.is_err());
}
