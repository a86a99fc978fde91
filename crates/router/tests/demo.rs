//! `serve --demo` end to end: the real binary with the reference extensions, called
//! through gRPC `Router/Decide` and the NATS intake, on a nats-server of its own.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_test_support::NatsServer;
use serde_json::{Value, json};

struct Router {
    child: Child,
    grpc: String,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(nats: &NatsServer) -> Router {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_beamline-router"));
    for (k, _) in std::env::vars() {
        if k.starts_with("EXTENSION_REGISTRY_") || k.starts_with("BEAMLINE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .args(["serve", "--demo"])
        .env("BEAMLINE_GRPC_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_HTTP_LISTEN", "127.0.0.1:0")
        .env("BEAMLINE_NATS_URL", nats.url())
        .env("BEAMLINE_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Owned by the guard from here on, so a failed start still kills the child.
    let mut router = Router {
        child,
        grpc: String::new(),
    };
    let stderr = router.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100))
            && let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["message"] == "beamline-router started"
        {
            let grpc = v["grpc"]
                .as_str()
                .expect("grpc address in the start line")
                .to_string();
            // Keep draining the log so the child never blocks on a full pipe.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            router.grpc = format!("http://{grpc}");
            return router;
        }
    }
    panic!("router did not start");
}

fn route_request(tenant: &str, text: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: "m-1".into(),
            tenant_id: tenant.into(),
            trace_id: "trace-1".into(),
            message_type: "chat".into(),
            payload: text.as_bytes().to_vec(),
            metadata: Default::default(),
            timestamp_ms: 0,
        }),
        policy_id: String::new(),
        context: Default::default(),
    }
}

#[tokio::test]
async fn demo_pipeline_over_grpc_and_nats() {
    let nats = NatsServer::start();
    let router = start(&nats);
    let mut client = RouterClient::connect(router.grpc.clone())
        .await
        .expect("gRPC connect");

    // normalize_text → pii_guard → test_provider → mask_pii
    let d = client
        .decide(route_request("acme", "  Hello    world  "))
        .await
        .expect("decide")
        .into_inner();
    assert_eq!(d.provider_id, "test_provider");
    let final_message = d.final_message.unwrap();
    assert_eq!(
        String::from_utf8(final_message.payload).unwrap(),
        "Hello world"
    );
    let steps: Vec<(String, String, String)> = d
        .executed_extensions
        .iter()
        .map(|e| (e.r#type.clone(), e.id.clone(), e.status.clone()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("pre".into(), "normalize_text".into(), "ok".into()),
            ("validator".into(), "pii_guard".into(), "ok".into()),
            ("provider".into(), "test_provider".into(), "ok".into()),
            ("post".into(), "mask_pii".into(), "ok".into()),
        ]
    );
    assert_eq!(
        d.provider_output.unwrap().output_json,
        "\"echo: Hello world\""
    );

    // PII is blocked by the validator: the status message starts with the code.
    let err = client
        .decide(route_request("acme", "mail jane@example.com"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().starts_with("validator_blocked: "),
        "{}",
        err.message()
    );

    // Missing message → invalid_request
    let err = client
        .decide(proto::RouteRequest {
            message: None,
            policy_id: String::new(),
            context: Default::default(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("invalid_request: "),
        "{}",
        err.message()
    );

    // Unknown policy → policy_not_found
    let mut r = route_request("acme", "hi");
    r.policy_id = "nope".into();
    let err = client.decide(r).await.unwrap_err();
    assert!(
        err.message().starts_with("policy_not_found: "),
        "{}",
        err.message()
    );

    // The NATS intake speaks the original's JSON contract.
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let ask = |body: Value| {
        let nc = nc.clone();
        async move {
            let msg = nc
                .request(
                    "beamline.router.v1.decide",
                    serde_json::to_vec(&body).unwrap().into(),
                )
                .await
                .expect("intake reply");
            serde_json::from_slice::<Value>(&msg.payload).unwrap()
        }
    };
    let ok = ask(
        json!({"version": "1", "request_id": "r-1", "trace_id": "t-1", "tenant_id": "acme",
        "task": {"type": "chat", "payload": "call me at +1 555 123 4567"}}),
    )
    .await;
    assert_eq!(ok["ok"], false, "{ok}");
    assert_eq!(ok["error"]["code"], "validator_blocked");
    assert_eq!(ok["context"]["request_id"], "r-1");
    let ok = ask(
        json!({"version": "1", "request_id": "r-2", "tenant_id": "acme",
        "task": {"type": "chat", "payload": "  hi  there "}, "constraints": {"dry_run": true}}),
    )
    .await;
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["decision"]["provider_id"], "test_provider");
    assert!(
        ok["decision"]["executed_extensions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["status"] == "skipped")
    );
    let bad =
        ask(json!({"version": "1", "tenant_id": "acme", "task": {"type": "chat", "payload": "x"}}))
            .await;
    assert_eq!(bad["error"]["code"], "invalid_request");
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request_id")
    );
    let bad = ask(json!("not an object")).await;
    assert_eq!(bad["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn grpc_health_follows_readiness() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let mut nats = NatsServer::start();
    let router = start(&nats);
    let channel = tonic::transport::Channel::from_shared(router.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    // Waits until the overall status is `want`; the statuses seen on the way.
    async fn wait_for(
        health: &mut HealthClient<tonic::transport::Channel>,
        want: ServingStatus,
    ) -> Vec<i32> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if let Ok(r) = r {
                let status = r.into_inner().status;
                seen.push(status);
                if status == want as i32 {
                    return seen;
                }
            }
            assert!(Instant::now() < deadline, "never {want:?}; saw {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    wait_for(&mut health, ServingStatus::Serving).await;
    // Readiness needs NATS: without it the router is NOT_SERVING…
    nats.stop();
    wait_for(&mut health, ServingStatus::NotServing).await;
    // …and SERVING again once NATS is back.
    nats.restart();
    wait_for(&mut health, ServingStatus::Serving).await;
}
