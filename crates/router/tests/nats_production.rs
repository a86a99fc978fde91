//! Production NATS with the real binary (issue 14), each test with nats-servers of its
//! own configured for it: a three-node cluster (first seed down at start, failover of
//! the router's node under traffic, SIGTERM still ends the process); a credentials
//! file against an operator-mode server (JWTs made by the test), token,
//! user/password, NKey (keys made here with the `nkeys` crate) and TLS with a client
//! certificate (a throwaway CA); wrong credentials (one log line, retries, not ready);
//! and the least-privilege permission blocks of docs/DEPLOYMENT.md, run verbatim.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::{NatsCluster, NatsServer, TestCa};
use common::*;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

/// The extension's subject: the reference normalize_text's, as in docs/DEPLOYMENT.md.
const SUBJECT: &str = "beamline.ext.pre.normalize_text.v1";
const OTHER_SUBJECT: &str = "beamline.ext.validate.pii_guard.v1";

const SEED_SQL: &str = r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry) VALUES
  ('normalize_text', 'pre', 'beamline.ext.pre.normalize_text.v1', 1000, 0);
INSERT INTO policies (tenant_id, policy_id, policy) VALUES ('default', 'default',
  '{"providers": [{"name": "p"}], "pre": [{"id": "normalize_text"}]}');
"#;

struct Upper;
impl Handler for Upper {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Ok(Response::unchanged())
    }
}

/// A migrated, seeded database.
async fn database() -> beamline_test_support::TestDatabase {
    let db = migrated_database().await;
    let pool = db.pool().await;
    sqlx::raw_sql(SEED_SQL).execute(&pool).await.unwrap();
    pool.close().await;
    db
}

/// The test config with `nats` as its whole `[nats]` section.
fn config(dir: &Path, db_url: &str, nats: &str) -> std::path::PathBuf {
    let path = write_config(dir, db_url, "nats://placeholder:1", "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[nats]\nurl = \"nats://placeholder:1\"",
        &format!("[nats]\n{nats}"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn request(i: u64) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: format!("m{i}"),
            tenant_id: "acme".into(),
            payload: b"hello".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Decide through the router answers, with the extension step `ok`.
async fn decide_ok(router: &Router) -> Result<(), String> {
    let mut c = RouterClient::connect(router.addr.clone())
        .await
        .map_err(|e| e.to_string())?;
    let d = c
        .decide(request(0))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    match d.executed_extensions.first() {
        Some(step) if step.status == "ok" => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

async fn wait_ready(router: &Router) {
    wait_until(30, "the router is ready (NATS connected)", async || {
        http_get(&router.http, "/readyz").0 == 200
    })
    .await;
}

/// Serves the extension on `SUBJECT` with `options`' credentials, on `url`.
async fn extension(
    options: async_nats::ConnectOptions,
    url: &str,
) -> (async_nats::Client, tokio::task::JoinHandle<()>) {
    let nc = options.connect(url).await.expect("extension connects");
    let task = beamline_sdk::spawn(
        nc.clone(),
        SUBJECT,
        Upper,
        ServeOptions {
            queue_group: Some("normalize_text".into()),
            ..ServeOptions::default()
        },
    )
    .await
    .unwrap();
    nc.flush().await.unwrap();
    (nc, task)
}

fn sigterm_exits_zero(router: &mut Router) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(router.child.id() as i32, libc::SIGTERM) };
    let status = router.wait_exit();
    assert!(status.success(), "exit {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_the_first_seed_down_and_a_failover_under_traffic() {
    let db = database().await;
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    // Two extension instances in one queue group, on two different nodes, so one of
    // them survives whichever node goes.
    let (_e1, _t1) = extension(async_nats::ConnectOptions::new(), &urls[1]).await;
    let (_e2, _t2) = extension(async_nats::ConnectOptions::new(), &urls[2]).await;
    cluster.node_mut(0).stop();
    let dir = tempfile::tempdir().unwrap();
    let mut router = start(&config(
        dir.path(),
        db.url(),
        &format!("url = \"{}\"", urls.join(",")),
    ));
    wait_ready(&router).await;
    wait_until(30, "Decide works with the first seed down", async || {
        decide_ok(&router).await.is_ok()
    })
    .await;

    // Traffic: one Decide after another, each success time-stamped.
    let successes = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop_traffic = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (successes, stop, addr) =
            (successes.clone(), stop_traffic.clone(), router.addr.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                if let Ok(mut c) = RouterClient::connect(addr.clone()).await {
                    let call = c.decide(request(i));
                    if let Ok(Ok(d)) = tokio::time::timeout(Duration::from_secs(5), call).await
                        && d.get_ref()
                            .executed_extensions
                            .first()
                            .map(|s| s.status.as_str())
                            == Some("ok")
                    {
                        successes.lock().unwrap().push(Instant::now());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_until(10, "traffic flows", async || {
        !successes.lock().unwrap().is_empty()
    })
    .await;

    let mut connected_to = None;
    wait_until(10, "the router's node is known", async || {
        connected_to = cluster.node_with_connection("beamline-router");
        connected_to.is_some()
    })
    .await;
    let node = connected_to.unwrap();
    assert_ne!(node, 0, "the first seed is down");
    let killed = Instant::now();
    cluster.node_mut(node).stop();
    wait_until(
        30,
        "Decide answers again after the router's node died",
        async || successes.lock().unwrap().iter().any(|t| *t > killed),
    )
    .await;
    let back = *successes
        .lock()
        .unwrap()
        .iter()
        .find(|t| **t > killed)
        .unwrap();
    eprintln!(
        "MEASURED NATS failover: Decide answered again {:.2} s after the router's node (node{node}) was killed",
        back.duration_since(killed).as_secs_f64()
    );
    let now_on = cluster.node_with_connection("beamline-router");
    assert!(now_on.is_some() && now_on != Some(node), "{now_on:?}");
    stop_traffic.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.unwrap();
    sigterm_exits_zero(&mut router);
}

/// A credentials file (operator mode: JWT + NKey), token, user/password and NKey:
/// each against a server that requires it, with the
/// router's side from `[nats]` (a list in `urls`, or environment overrides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_token_user_password_and_nkey() {
    let db = database().await;
    let keys = nkeys::KeyPair::new_user();
    let seed = keys.seed().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("router.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    // Decentralised auth: an operator-mode server, a `.creds` file (JWT + NKey seed).
    let operator = beamline_test_support::NatsOperator::new();
    let router_creds = dir.path().join("router.creds");
    std::fs::write(&router_creds, operator.user_creds("beamline-router")).unwrap();
    let ext_creds = operator.user_creds("ext");
    let cases: Vec<(&str, String, String, async_nats::ConnectOptions)> = vec![
        (
            "credentials file",
            operator.server_config(),
            format!("credentials_file = \"{}\"", router_creds.display()),
            async_nats::ConnectOptions::with_credentials(&ext_creds).unwrap(),
        ),
        (
            "token",
            "authorization { token: \"t0k3n-for-beamline\" }".into(),
            "token = \"t0k3n-for-beamline\"".into(),
            async_nats::ConnectOptions::with_token("t0k3n-for-beamline".into()),
        ),
        (
            "user/password",
            "authorization { users = [ { user: \"router\", password: \"pw-for-beamline\" } ] }"
                .into(),
            "user = \"router\"\npassword = \"pw-for-beamline\"".into(),
            async_nats::ConnectOptions::with_user_and_password(
                "router".into(),
                "pw-for-beamline".into(),
            ),
        ),
        (
            "nkey",
            format!(
                "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
                keys.public_key()
            ),
            format!("nkey_seed_file = \"{}\"", seed_file.display()),
            async_nats::ConnectOptions::with_nkey(seed.clone()),
        ),
    ];
    for (what, server_conf, router_conf, ext_options) in cases {
        let server = NatsServer::start_with_config(&server_conf);
        let (_ext, _task) = extension(ext_options, &server.url()).await;
        let case_dir = tempfile::tempdir().unwrap();
        let mut router = start(&config(
            case_dir.path(),
            db.url(),
            &format!("urls = [\"{}\"]\n{router_conf}", server.url()),
        ));
        wait_ready(&router).await;
        decide_ok(&router)
            .await
            .unwrap_or_else(|e| panic!("{what}: Decide failed: {e}"));
        let log = router.log.lock().unwrap().clone();
        let router_seed = std::fs::read_to_string(&router_creds).unwrap();
        let router_seed = router_seed
            .lines()
            .find(|l| l.starts_with("SU"))
            .unwrap()
            .to_string();
        for secret in [
            "t0k3n-for-beamline",
            "pw-for-beamline",
            seed.as_str(),
            router_seed.as_str(),
        ] {
            assert!(!log.contains(secret), "{what}: a secret reached the log");
        }
        assert!(log.contains("NATS connected"), "{what}: {log}");
        sigterm_exits_zero(&mut router);
    }
    // The same through the environment.
    let server = NatsServer::start_with_config("authorization { token: \"env-t0k3n\" }");
    let (_ext, _task) = extension(
        async_nats::ConnectOptions::with_token("env-t0k3n".into()),
        &server.url(),
    )
    .await;
    let mut command = bin();
    command
        .args(["serve", "--config"])
        .arg(config(
            dir.path(),
            db.url(),
            "url = \"nats://placeholder:2\"",
        ))
        .env("BEAMLINE_NATS_URL", server.url())
        .env("BEAMLINE_NATS_TOKEN", "env-t0k3n");
    let mut router = start_command(command);
    wait_ready(&router).await;
    decide_ok(&router).await.unwrap();
    sigterm_exits_zero(&mut router);
}

/// TLS with a client certificate (`verify: true` on the server): Decide works; a
/// router without a client certificate is refused, says why once, and is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let db = database().await;
    let ca = TestCa::new();
    let server_cert = ca.issue("nats-server", true);
    let router_cert = ca.issue("beamline-router", false);
    let ext_cert = ca.issue("extension", false);
    let server = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
        server_cert.cert.display(),
        server_cert.key.display(),
        ca.ca_pem().display()
    ));
    let url = server.url().replace("nats://127.0.0.1", "tls://localhost");
    let (_ext, _task) = extension(
        async_nats::ConnectOptions::new()
            .add_root_certificates(ca.ca_pem())
            .add_client_certificate(ext_cert.cert.clone(), ext_cert.key.clone())
            .require_tls(true),
        &url,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let tls = format!(
        "url = \"{url}\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_required = true",
        ca.ca_pem().display(),
        router_cert.cert.display(),
        router_cert.key.display()
    );
    let mut router = start(&config(dir.path(), db.url(), &tls));
    wait_ready(&router).await;
    decide_ok(&router).await.unwrap();
    sigterm_exits_zero(&mut router);

    // No client certificate: the server refuses the handshake.
    let no_cert_dir = tempfile::tempdir().unwrap();
    let mut refused = start(&config(
        no_cert_dir.path(),
        db.url(),
        &format!(
            "url = \"{url}\"\ntls_ca_file = \"{}\"\ntls_required = true",
            ca.ca_pem().display()
        ),
    ));
    // The client library reports the refused handshake as a bare IO error; the
    // router says what it most likely is, once.
    wait_until(30, "the refused handshake is reported", async || {
        let log = refused.log.lock().unwrap();
        log.contains("TLS with NATS failed") || log.contains("cut during its TLS set-up")
    })
    .await;
    let log = refused.log.lock().unwrap().clone();
    assert!(
        !log.contains("no NATS seed answers"),
        "a refused handshake is not an absent server: {log}"
    );
    let (code, body) = http_get(&refused.http, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("NATS not connected"), "{body}");
    sigterm_exits_zero(&mut refused);
}

/// Wrong credentials: one clear line however many attempts fail, the router keeps
/// retrying, and it is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_said_once_retried_and_not_ready() {
    let db = database().await;
    let server = NatsServer::start_with_config("authorization { token: \"right-t0k3n\" }");
    let dir = tempfile::tempdir().unwrap();
    let mut router = start(&config(
        dir.path(),
        db.url(),
        &format!("url = \"{}\"\ntoken = \"wrong-t0k3n\"", server.url()),
    ));
    // The server sees the attempts: at least three refused ones.
    let refusals = || {
        std::fs::read_to_string(server.log_file())
            .unwrap_or_default()
            .matches("authentication error")
            .count()
    };
    wait_until(60, "three refused attempts", async || refusals() >= 3).await;
    let log = router.log.lock().unwrap().clone();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("NATS refused the router's credentials"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("token"), "{}", lines[0]);
    assert!(!log.contains("wrong-t0k3n") && !log.contains("right-t0k3n"));
    let (code, body) = http_get(&router.http, "/readyz");
    assert_eq!(code, 503, "{body}");
    let health = router.json(Some(VIEWER_KEY), &["registry", "status"]);
    assert_eq!(
        health["loaded"], true,
        "the registry itself is fine: {health}"
    );
    eprintln!(
        "MEASURED wrong credentials: {} refused attempts seen by the server, {} log line",
        refusals(),
        lines.len()
    );
    sigterm_exits_zero(&mut router);
}

/// The permission blocks of docs/DEPLOYMENT.md, verbatim.
fn deployment_permissions() -> String {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/DEPLOYMENT.md"
    ))
    .unwrap();
    let start = doc
        .find("<!-- nats-permissions: begin -->")
        .expect("docs/DEPLOYMENT.md has the permission block");
    let block = &doc[start..];
    let body = &block[block.find("```conf\n").unwrap() + "```conf\n".len()..];
    body[..body.find("```").unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_permissions_from_the_deployment_guide() {
    let db = database().await;
    let server = NatsServer::start_with_config(&deployment_permissions());
    // The extension under its own user.
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = events.clone();
    let (ext, _task) = extension(
        async_nats::ConnectOptions::with_user_and_password(
            "ext-normalize-text".into(),
            "normalize-secret".into(),
        )
        .event_callback(move |e| {
            let recorded = recorded.clone();
            async move { recorded.lock().unwrap().push(e.to_string()) }
        }),
        &server.url(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut router = start(&config(
        dir.path(),
        db.url(),
        &format!(
            "url = \"{}\"\nuser = \"beamline-router\"\npassword = \"router-secret\"",
            server.url()
        ),
    ));
    wait_ready(&router).await;
    // Decide over gRPC, and over the NATS intake from a caller's user.
    decide_ok(&router).await.unwrap();
    let caller =
        async_nats::ConnectOptions::with_user_and_password("caller".into(), "caller-secret".into())
            .connect(server.url())
            .await
            .unwrap();
    let body = json!({"version": "1", "request_id": "r1", "tenant_id": "acme",
        "task": {"type": "chat", "payload": "hello"}});
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        caller.request(
            "beamline.router.v1.decide",
            serde_json::to_vec(&body).unwrap().into(),
        ),
    )
    .await
    .expect("the intake answers")
    .expect("the intake answers");
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["ok"], true, "{v}");

    // The router's own user may take the intake only in the routers' queue group:
    // a plain subscription (which would see every caller's request) is refused.
    let router_events: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = router_events.clone();
    let router_user = async_nats::ConnectOptions::with_user_and_password(
        "beamline-router".into(),
        "router-secret".into(),
    )
    .event_callback(move |e| {
        let recorded = recorded.clone();
        async move { recorded.lock().unwrap().push(e.to_string()) }
    })
    .connect(server.url())
    .await
    .unwrap();
    let _spy = router_user
        .subscribe("beamline.router.v1.decide")
        .await
        .unwrap();
    router_user.flush().await.unwrap();
    wait_until(
        10,
        "the server refuses a subscription outside the group",
        async || {
            router_events.lock().unwrap().iter().any(|e| {
                e.to_lowercase().contains("permissions violation")
                    && e.contains("beamline.router.v1.decide")
            })
        },
    )
    .await;

    // The extension's user may not listen on another extension's subject ...
    let mut foreign = ext.subscribe(OTHER_SUBJECT).await.unwrap();
    ext.flush().await.unwrap();
    wait_until(10, "the server refuses the subscription", async || {
        events.lock().unwrap().iter().any(|e| {
            e.to_lowercase().contains("permissions violation") && e.contains(OTHER_SUBJECT)
        })
    })
    .await;
    // ... so a request for that extension never reaches it (the router's user may
    // publish there; nobody answers).
    router_user
        .publish(OTHER_SUBJECT, "for pii_guard only".into())
        .await
        .unwrap();
    router_user.flush().await.unwrap();
    let leaked = tokio::time::timeout(Duration::from_millis(500), foreign.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "the extension's user received another extension's request"
    );
    // ... nor publish to it (no calling other extensions, no impersonating callers).
    ext.publish(OTHER_SUBJECT, "forged".into()).await.unwrap();
    ext.flush().await.unwrap();
    wait_until(10, "the server refuses the publish", async || {
        events.lock().unwrap().iter().any(|e| {
            e.to_lowercase()
                .contains("permissions violation for publish")
                && e.contains(OTHER_SUBJECT)
        })
    })
    .await;
    let log = router.log.lock().unwrap().clone();
    assert!(
        !log.to_lowercase().contains("permissions violation"),
        "the router needed a permission the guide does not give: {log}"
    );
    sigterm_exits_zero(&mut router);
}
