//! What tracing costs a Decide (docs/PERFORMANCE.md, "Tracing"): three real routers
//! side by side on one NATS and one echo service — tracing off (no endpoint), on
//! with `sample_ratio` 0, on with `sample_ratio` 1 exporting every span to a local
//! OTLP/gRPC receiver (`beamline_test_support::OtlpReceiver`) — asked in turn,
//! round after round (the order rotating), so the three share the machine's state.
//! Reported as ratios to tracing off: sequential gRPC Decide p50 / p99 for a policy
//! of 1 and of 4 extension steps, and throughput at concurrency 16 (4 steps).
//!
//! `cargo bench -p beamline-router --bench tracing [-- --quick]`. Starts its own
//! nats-server (it must be installed) and needs no PostgreSQL (fixtures).

mod common;

use std::path::Path;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_sdk::{ExtensionError, ExtensionRequest, Handler, Response, ServeOptions};
use beamline_test_support::bench::percentile;
use beamline_test_support::{NatsServer, OtlpReceiver};
use serde_json::json;

struct Echo;

impl Handler for Echo {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Ok(Response::unchanged())
    }
}

fn write_fixtures(dir: &Path) {
    let ext = dir.join("extensions");
    std::fs::create_dir_all(&ext).unwrap();
    for (i, t) in [(1, "pre"), (2, "pre"), (3, "post"), (4, "post")] {
        let record = json!({"id": format!("e{i}"), "type": t, "subject": format!("bench.trace.e{i}"),
            "timeout_ms": 5000, "retry": 0, "enabled": true, "config": {}, "metadata": {}});
        std::fs::write(ext.join(format!("e{i}.json")), record.to_string()).unwrap();
    }
    for (tenant, pre, post) in [
        ("one", json!([{"id": "e1"}]), json!([])),
        (
            "four",
            json!([{"id": "e1"}, {"id": "e2"}]),
            json!([{"id": "e3"}, {"id": "e4"}]),
        ),
    ] {
        let p = dir.join("policies").join(tenant);
        std::fs::create_dir_all(&p).unwrap();
        let policy = json!({"providers": [{"name": "upstream", "weight": 100}],
            "pre": pre, "validators": [], "post": post});
        std::fs::write(p.join("default.json"), policy.to_string()).unwrap();
    }
}

fn request(tenant: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: "m".into(),
            tenant_id: tenant.into(),
            trace_id: String::new(),
            message_type: "chat".into(),
            payload: b"hello bench".to_vec(),
            metadata: Default::default(),
            timestamp_ms: 0,
        }),
        policy_id: String::new(),
        context: Default::default(),
    }
}

async fn decide(client: &mut RouterClient<tonic::transport::Channel>, tenant: &str) -> bool {
    client.decide(request(tenant)).await.is_ok()
}

const NAMES: [&str; 3] = [
    "tracing off",
    "tracing on, sampling 0",
    "tracing on, sampling 1",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, per_round, windows) = if quick { (10, 100, 6) } else { (30, 200, 15) };
    let window = Duration::from_millis(if quick { 300 } else { 500 });

    let nats = NatsServer::start();
    let receiver = OtlpReceiver::start().await;
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let mut echoes = Vec::new();
    for i in 1..=4 {
        echoes.push(
            beamline_sdk::spawn(
                client.clone(),
                &format!("bench.trace.e{i}"),
                Echo,
                ServeOptions::default(),
            )
            .await
            .expect("echo extension"),
        );
    }
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for d in &dirs {
        write_fixtures(d.path());
    }
    let exported = |ratio: &str| {
        format!(
            "[tracing]\nendpoint = \"{}\"\nsample_ratio = {ratio}\nexport_interval_ms = 200\n",
            receiver.endpoint()
        )
    };
    let routers = [
        common::start_router(dirs[0].path(), &nats.url(), ""),
        common::start_router(dirs[1].path(), &nats.url(), &exported("0.0")),
        common::start_router(dirs[2].path(), &nats.url(), &exported("1.0")),
    ];
    let mut clients = Vec::new();
    for r in &routers {
        let mut c = RouterClient::connect(r.addr.clone()).await.expect("gRPC");
        // Warm up: connections, first-call paths, the echo services.
        for _ in 0..200 {
            assert!(decide(&mut c, "one").await, "warm-up Decide failed");
            assert!(decide(&mut c, "four").await, "warm-up Decide failed");
        }
        clients.push(c);
    }

    // Sequential latency, interleaved: each round asks every router in turn.
    let mut rows = Vec::new();
    for tenant in ["one", "four"] {
        let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); 3];
        for round in 0..rounds {
            for k in 0..3 {
                let i = (round + k) % 3;
                for _ in 0..per_round {
                    let t = Instant::now();
                    assert!(decide(&mut clients[i], tenant).await, "Decide failed");
                    lat[i].push(t.elapsed());
                }
            }
        }
        for l in &mut lat {
            l.sort();
        }
        let steps = if tenant == "one" { 1 } else { 4 };
        for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
            let off = percentile(&lat[0], q);
            for i in 1..3 {
                let on = percentile(&lat[i], q);
                rows.push(format!(
                    "| T1 | Decide over gRPC, {steps} step(s), sequential {label}: {} | {:.1} µs | {:.1} µs (tracing off) | {:.2}× | (context) | |",
                    NAMES[i],
                    on.as_secs_f64() * 1e6,
                    off.as_secs_f64() * 1e6,
                    on.as_secs_f64() / off.as_secs_f64()
                ));
            }
        }
    }

    // Throughput at concurrency 16, 4 steps, in rotating windows.
    let mut done = [0u64; 3];
    for w in 0..windows {
        for k in 0..3 {
            let i = (w + k) % 3;
            let count = Arc::new(AtomicU64::new(0));
            let stop = Instant::now() + window;
            let mut loops = Vec::new();
            for _ in 0..16 {
                let (mut c, count) = (clients[i].clone(), count.clone());
                loops.push(tokio::spawn(async move {
                    while Instant::now() < stop {
                        if decide(&mut c, "four").await {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for l in loops {
                let _ = l.await;
            }
            done[i] += count.load(Ordering::Relaxed);
        }
    }
    let secs = window.as_secs_f64() * windows as f64;
    for i in 1..3 {
        rows.push(format!(
            "| T2 | Decide over gRPC, 4 steps, concurrency 16, throughput: {} | {:.0}/s | {:.0}/s (tracing off) | {:.2}× | (context) | |",
            NAMES[i],
            done[i] as f64 / secs,
            done[0] as f64 / secs,
            done[i] as f64 / done[0] as f64
        ));
    }

    // What the receiver got: nothing from sampling 0, every span from sampling 1.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    let by = |name: &str| {
        spans
            .iter()
            .filter(|s| s.resource.contains_key("service.name") && s.name == name)
            .count()
    };
    println!(
        "exported to the receiver: {} spans, {} Decide, {} extension calls (sampling 1 exports every span; sampling 0 none)",
        spans.len(),
        by("Decide"),
        spans
            .iter()
            .filter(|s| s.attr("beamline.extension.id").is_some())
            .count()
    );
    for r in rows {
        println!("{r}");
    }
    drop(routers);
    drop(echoes);
}
