//! Side-by-side pipeline benchmarks of DESIGN.md §8, each against a baseline measured
//! in the same run on the same NATS and the same echo service:
//!
//! - P1: one extension step through Decide vs a raw async-nats request with the same
//!   body, sequential, p50 and p99 (goal ≤ 1.10×).
//! - P2: Decide throughput with 4 extension steps at concurrency 64 vs raw request
//!   throughput ÷ 4 (goal ≥ 0.90×).
//! - P6: a call refused by an open breaker (goal ≤ 1 µs, no NATS message).
//!
//! `cargo bench -p beamline-pipeline --bench pipeline [-- --quick]`. Uses NATS at
//! `NATS_URL` when it answers, otherwise starts a nats-server of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use beamline_model::Limits;
use beamline_model::wire::{ExtensionRequest, Message};
use beamline_pipeline::{BreakerConfig, DecideRequest, InvokerConfig, Pipeline, PipelineConfig};
use beamline_registry::{Registry, RegistryConfig, SourceMode};
use beamline_sdk::{ExtensionError, Handler, Response, ServeOptions};
use serde_json::{Map, json};

/// The allocator the router binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Counting(Arc<AtomicU64>);

impl Handler for Counting {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Response::unchanged())
    }
}

struct Failing;

impl Handler for Failing {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Err(ExtensionError::new("down", "always"))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn request(text: &str, policy: &str) -> DecideRequest {
    DecideRequest {
        request_id: "bench".into(),
        message: Message {
            message_id: "m".into(),
            tenant_id: "bench".into(),
            trace_id: "t".into(),
            message_type: "chat".into(),
            payload: text.into(),
            metadata: Map::new(),
        },
        policy_id: policy.into(),
        context: Map::new(),
    }
}

async fn nats() -> (
    async_nats::Client,
    Option<beamline_test_support::NatsServer>,
) {
    let url = beamline_test_support::nats_url();
    if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), async_nats::connect(&url)).await
    {
        return (c, None);
    }
    let server = beamline_test_support::NatsServer::start();
    let c = async_nats::connect(server.url())
        .await
        .expect("own nats-server");
    (c, Some(server))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var("BENCH_QUICK").is_ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(quick));
}

async fn run(quick: bool) {
    let (client, _own) = nats().await;
    let prefix = format!("bench{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let ext_dir = dir.path().join("extensions");
    let pol_dir = dir.path().join("policies/bench");
    std::fs::create_dir_all(&ext_dir).unwrap();
    std::fs::create_dir_all(&pol_dir).unwrap();
    let exts: Vec<_> = (1..=4)
        .map(|i| json!({"id": format!("e{i}"), "type": "pre", "subject": format!("{prefix}.e{i}"), "timeout_ms": 5000}))
        .chain([json!({"id": "broken", "type": "pre", "subject": format!("{prefix}.broken"), "timeout_ms": 5000})])
        .collect();
    std::fs::write(
        ext_dir.join("all.json"),
        serde_json::to_string(&exts).unwrap(),
    )
    .unwrap();
    let one = json!({"providers": [{"name": "p"}], "pre": [{"id": "e1"}]});
    let four = json!({"providers": [{"name": "p"}], "pre": [{"id": "e1"}, {"id": "e2"}, {"id": "e3"}, {"id": "e4"}]});
    let broken = json!({"providers": [{"name": "p"}], "pre": [{"id": "broken"}]});
    std::fs::write(pol_dir.join("one.json"), one.to_string()).unwrap();
    std::fs::write(pol_dir.join("four.json"), four.to_string()).unwrap();
    std::fs::write(pol_dir.join("broken.json"), broken.to_string()).unwrap();
    let registry = Registry::start(
        RegistryConfig {
            source: SourceMode::Fixtures,
            fixtures_dir: Some(ext_dir),
            policies_dir: Some(dir.path().join("policies")),
            ..RegistryConfig::default()
        },
        Limits::default(),
    )
    .await
    .expect("registry");
    let hits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 1..=4 {
        tasks.push(
            beamline_sdk::spawn(
                client.clone(),
                &format!("{prefix}.e{i}"),
                Counting(hits.clone()),
                ServeOptions::default(),
            )
            .await
            .unwrap(),
        );
    }
    tasks.push(
        beamline_sdk::spawn(
            client.clone(),
            &format!("{prefix}.broken"),
            Failing,
            ServeOptions::default(),
        )
        .await
        .unwrap(),
    );
    let pipeline = Pipeline::new(
        registry,
        client.clone(),
        PipelineConfig {
            invoker: InvokerConfig::default(),
            ..PipelineConfig::default()
        },
        BreakerConfig::default(),
        Limits::default(),
    );

    // The body the pipeline sends for step e1 (same message, same context keys), so
    // the raw baseline moves the same bytes and the echo service parses the same JSON.
    let context: Map<String, serde_json::Value> = [
        ("tenant_id", "bench"),
        ("policy_id", "one"),
        ("request_id", "bench"),
        ("trace_id", "t"),
        ("message_type", "chat"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), json!(v)))
    .collect();
    let body = serde_json::to_vec(&ExtensionRequest {
        trace_id: "t".into(),
        tenant_id: "bench".into(),
        payload: request("hello world", "one").message,
        metadata: context,
        config: Map::new(),
    })
    .unwrap();
    let raw_subject = format!("{prefix}.e1");
    let n = if quick { 2_000 } else { 20_000 };
    let warm = n / 10;

    // P1 — sequential latency.
    let mut raw = Vec::with_capacity(n);
    let mut piped = Vec::with_capacity(n);
    for i in 0..(n + warm) {
        // Interleave so both see the same machine state.
        let t = Instant::now();
        client
            .request(raw_subject.clone(), body.clone().into())
            .await
            .expect("raw request");
        let r = t.elapsed();
        let t = Instant::now();
        pipeline
            .decide(request("hello world", "one"))
            .await
            .expect("decide");
        let p = t.elapsed();
        if i >= warm {
            raw.push(r);
            piped.push(p);
        }
    }
    raw.sort();
    piped.sort();
    let (r50, r99, p50, p99) = (
        percentile(&raw, 0.5),
        percentile(&raw, 0.99),
        percentile(&piped, 0.5),
        percentile(&piped, 0.99),
    );

    // P2 — throughput at concurrency 64.
    let secs = if quick { 3 } else { 10 };
    let conc = 64;
    let raw_tput = {
        let stop = Instant::now() + Duration::from_secs(secs);
        let done = Arc::new(AtomicU64::new(0));
        let mut js = Vec::new();
        for _ in 0..conc {
            let (c, s, b, d) = (
                client.clone(),
                raw_subject.clone(),
                body.clone(),
                done.clone(),
            );
            js.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    if c.request(s.clone(), b.clone().into()).await.is_ok() {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for j in js {
            let _ = j.await;
        }
        done.load(Ordering::Relaxed) as f64 / secs as f64
    };
    let pipe_tput = {
        let stop = Instant::now() + Duration::from_secs(secs);
        let done = Arc::new(AtomicU64::new(0));
        let mut js = Vec::new();
        for _ in 0..conc {
            let (p, d) = (pipeline.clone(), done.clone());
            js.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    if p.decide(request("hello world", "four")).await.is_ok() {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for j in js {
            let _ = j.await;
        }
        done.load(Ordering::Relaxed) as f64 / secs as f64
    };

    // P6 — open the breaker, then time refusals.
    for _ in 0..5 {
        let _ = pipeline.decide(request("x", "broken")).await;
    }
    let rt = pipeline.runtime();
    let breaker = rt.extension("broken").breaker.clone();
    assert!(breaker.is_refusing(rt.now()), "breaker did not open");
    let iters = if quick { 200_000 } else { 2_000_000 };
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(
            breaker
                .try_acquire(std::hint::black_box(Instant::now()))
                .is_err(),
        );
    }
    let refuse_ns = t.elapsed().as_nanos() as f64 / iters as f64;
    let baseline_lock = std::sync::Mutex::new(0u64);
    let t = Instant::now();
    for _ in 0..iters {
        *std::hint::black_box(&baseline_lock).lock().unwrap() += 1;
        std::hint::black_box(Instant::now());
    }
    let lock_ns = t.elapsed().as_nanos() as f64 / iters as f64;
    let sent_before = hits.load(Ordering::Relaxed);
    let decides = if quick { 20_000 } else { 200_000 };
    let t = Instant::now();
    for _ in 0..decides {
        let _ = pipeline.decide(request("x", "broken")).await;
    }
    let decide_refused_us = t.elapsed().as_secs_f64() * 1e6 / decides as f64;
    let sent_after = hits.load(Ordering::Relaxed);

    println!(
        "\nbeamline-router pipeline benchmarks ({} mode, n={n}, {secs}s throughput runs)",
        if quick { "quick" } else { "full" }
    );
    println!("| id | what | ours | baseline | ratio | goal | met |");
    println!("|---|---|---|---|---|---|---|");
    let row =
        |id: &str, what: &str, ours: String, base: String, ratio: f64, goal: &str, met: bool| {
            println!(
                "| {id} | {what} | {ours} | {base} | {ratio:.3}× | {goal} | {} |",
                if met { "met" } else { "short" }
            );
        };
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    let r = p50.as_secs_f64() / r50.as_secs_f64();
    row(
        "P1",
        "1-step Decide vs raw request, p50",
        us(p50),
        us(r50),
        r,
        "≤ 1.10×",
        r <= 1.10,
    );
    let r = p99.as_secs_f64() / r99.as_secs_f64();
    row(
        "P1",
        "1-step Decide vs raw request, p99",
        us(p99),
        us(r99),
        r,
        "≤ 1.10×",
        r <= 1.10,
    );
    let r = pipe_tput / (raw_tput / 4.0);
    row(
        "P2",
        "4-step Decide/s at c=64 vs raw req/s ÷ 4",
        format!("{pipe_tput:.0}/s"),
        format!("{:.0}/s", raw_tput / 4.0),
        r,
        "≥ 0.90×",
        r >= 0.90,
    );
    row(
        "P6",
        "open-breaker refusal (try_acquire)",
        format!("{refuse_ns:.0} ns"),
        format!("{lock_ns:.0} ns (mutex + clock)"),
        refuse_ns / lock_ns,
        "≤ 1 µs",
        refuse_ns <= 1000.0,
    );
    println!(
        "| P6 | whole Decide refused by the open breaker | {decide_refused_us:.2} µs | — | — | (context) | NATS messages sent while open: {} |",
        sent_after - sent_before
    );
    for t in tasks {
        t.abort();
    }
}
