//! Side-by-side pipeline benchmarks, in-process (`Pipeline::decide` called directly;
//! the caller's path through the intakes is `crates/router/benches/caller.rs`), each
//! against a baseline measured in the same run on the same NATS and the same echo
//! service:
//!
//! - P1: one extension step through Decide vs a raw async-nats request with the same
//!   body, sequential, p50 and p99.
//! - P2: Decide throughput with 4 extension steps at concurrency 64 vs raw request
//!   throughput ÷ 4, measured in rotating windows together with raw requests that
//!   carry the four `Beamline-*` headers (what NATS charges for those; they are
//!   opt-in, `[pipeline] extension_headers`) and the zero-logic relay.
//!
//! The second baseline of P1 and P2, the zero-logic relay, makes exactly the NATS
//! hops of the pipeline (one request per step, in sequence, with the same body and,
//! like the pipeline by default, no header) and nothing else: the ratio to it is what
//! the pipeline's own logic costs.
//! - P6: a call refused by an open breaker (goal ≤ 1 µs, no NATS message).
//!
//! `cargo bench -p beamline-pipeline --bench pipeline [-- --quick]`. Uses NATS at
//! `NATS_URL` when it answers, otherwise starts a nats-server of its own.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use beamline_model::Limits;
use beamline_model::wire::{ExtensionRequest, Message};
use beamline_pipeline::{BreakerConfig, DecideRequest, InvokerConfig, Pipeline, PipelineConfig};
use beamline_registry::{Registry, RegistryConfig, SourceMode};
use beamline_sdk::{ExtensionError, Handler, Response, ServeOptions};
use beamline_test_support::bench::percentile;
use common::nats;
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

/// The headers every pipeline call carries (values as the bench's Decide sends).
fn protocol_headers(extension_id: &str) -> async_nats::HeaderMap {
    use beamline_model::wire::{
        HEADER_EXTENSION_ID, HEADER_EXTENSION_VERSION, HEADER_TENANT_ID, HEADER_TRACE_ID,
    };
    let mut h = async_nats::HeaderMap::new();
    h.insert(HEADER_TRACE_ID, "t");
    h.insert(HEADER_TENANT_ID, "bench");
    h.insert(HEADER_EXTENSION_ID, extension_id);
    h.insert(HEADER_EXTENSION_VERSION, "v1");
    h
}

/// The zero-logic relay: the NATS hops a Decide of `steps` steps makes — one request
/// per step, in sequence, with the body the pipeline sends (and no header, as the
/// pipeline sends none by default) — and nothing else (no policy, no parsing, no
/// bookkeeping).
async fn relay(
    client: &async_nats::Client,
    prefix: &str,
    steps: usize,
    body: &bytes::Bytes,
) -> bool {
    for step in 1..=steps {
        if client
            .request(format!("{prefix}.e{step}"), body.clone())
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

/// Runs `op` in `conc` concurrent loops for `window` (after a short ramp-up that
/// is not counted) and returns how many calls succeeded in the window.
async fn saturate<F, Fut>(conc: usize, window: Duration, op: F) -> u64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let ramp = Duration::from_millis(100);
    let start = Instant::now() + ramp;
    let stop = start + window;
    let done = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::with_capacity(conc);
    for _ in 0..conc {
        let (op, done) = (op.clone(), done.clone());
        loops.push(tokio::spawn(async move {
            loop {
                let ok = op().await;
                let now = Instant::now();
                if now >= stop {
                    break;
                }
                if ok && now >= start {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for l in loops {
        let _ = l.await;
    }
    done.load(Ordering::Relaxed)
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
            payload_ref: None,
            metadata: Map::new(),
        },
        policy_id: policy.into(),
        context: Map::new(),
    }
}

fn main() {
    beamline_test_support::bench::tune_allocator_like_the_binary();
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
        ..ExtensionRequest::default()
    })
    .unwrap();
    let raw_subject = format!("{prefix}.e1");
    let n = if quick { 2_000 } else { 20_000 };
    let warm = n / 10;

    // P1 — sequential latency.
    let body = bytes::Bytes::from(body);
    let mut raw = Vec::with_capacity(n);
    let mut piped = Vec::with_capacity(n);
    let mut relayed = Vec::with_capacity(n);
    for i in 0..(n + warm) {
        // Interleave so all three see the same machine state.
        let t = Instant::now();
        client
            .request(raw_subject.clone(), body.clone())
            .await
            .expect("raw request");
        let r = t.elapsed();
        let t = Instant::now();
        pipeline
            .decide(request("hello world", "one"))
            .await
            .expect("decide");
        let p = t.elapsed();
        let t = Instant::now();
        assert!(relay(&client, &prefix, 1, &body).await, "relay request");
        let z = t.elapsed();
        if i >= warm {
            raw.push(r);
            piped.push(p);
            relayed.push(z);
        }
    }
    raw.sort();
    piped.sort();
    relayed.sort();
    let (r50, r99, p50, p99) = (
        percentile(&raw, 0.5),
        percentile(&raw, 0.99),
        percentile(&piped, 0.5),
        percentile(&piped, 0.99),
    );

    // P2 — throughput at concurrency 64, raw and pipeline in alternating windows
    // (raw first in even rounds, pipeline first in odd ones), so a disturbance or a
    // drift of the machine lands on both sides instead of on one ratio term.
    let (windows, window) = if quick {
        (6, Duration::from_millis(500))
    } else {
        (10, Duration::from_secs(1))
    };
    let secs = (window * windows).as_secs_f64();
    let conc = 64;
    // Side 0: raw requests; 1: the pipeline; 2: raw requests carrying the protocol's
    // four headers (DESIGN.md §5), which every pipeline call must send: the gap
    // between 0 and 2 is the cost of the headers in NATS itself; 3: the zero-logic
    // relay making the pipeline's four hops per operation.
    const SIDES: usize = 4;
    let mut done = [0u64; SIDES];
    let mut window_ratios = Vec::with_capacity(windows as usize);
    for round in 0..windows {
        let mut pair = [0u64; SIDES];
        for k in 0..SIDES {
            let side = (round as usize + k) % SIDES;
            pair[side] = match side {
                3 => {
                    let (c, prefix, b) = (client.clone(), prefix.clone(), body.clone());
                    saturate(conc, window, move || {
                        let (c, prefix, b) = (c.clone(), prefix.clone(), b.clone());
                        async move { relay(&c, &prefix, 4, &b).await }
                    })
                    .await
                }
                0 | 2 => {
                    let (c, s, b) = (client.clone(), raw_subject.clone(), body.clone());
                    let with_headers = side == 2;
                    saturate(conc, window, move || {
                        let (c, s, b) = (c.clone(), s.clone(), b.clone());
                        async move {
                            if with_headers {
                                c.request_with_headers(s, protocol_headers("e1"), b)
                                    .await
                                    .is_ok()
                            } else {
                                c.request(s, b).await.is_ok()
                            }
                        }
                    })
                    .await
                }
                _ => {
                    let p = pipeline.clone();
                    saturate(conc, window, move || {
                        let p = p.clone();
                        async move { p.decide(request("hello world", "four")).await.is_ok() }
                    })
                    .await
                }
            };
        }
        for side in 0..SIDES {
            done[side] += pair[side];
        }
        window_ratios.push(pair[1] as f64 / (pair[0] as f64 / 4.0));
    }
    window_ratios.sort_by(f64::total_cmp);
    let (raw_done, pipe_done, headed_done, relay_done) = (done[0], done[1], done[2], done[3]);
    let raw_tput = raw_done as f64 / secs;
    let pipe_tput = pipe_done as f64 / secs;
    let headed_tput = headed_done as f64 / secs;
    let relay_tput = relay_done as f64 / secs;

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
        "\nbeamline-router pipeline benchmarks ({} mode, n={n}, {secs:.0} s of throughput on each side)",
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
        "in-process: 1-step Decide vs raw request, p50",
        us(p50),
        us(r50),
        r,
        "≤ 1.10×",
        r <= 1.10,
    );
    let r = p99.as_secs_f64() / r99.as_secs_f64();
    row(
        "P1",
        "in-process: 1-step Decide vs raw request, p99",
        us(p99),
        us(r99),
        r,
        "≤ 1.10×",
        r <= 1.10,
    );
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        let (ours, base) = (percentile(&piped, q), percentile(&relayed, q));
        println!(
            "| P1 | in-process: 1-step Decide vs the zero-logic relay (the same hop and body, no logic), {label} | {} | {} | {:.3}× | (context) | |",
            us(ours),
            us(base),
            ours.as_secs_f64() / base.as_secs_f64()
        );
    }
    let r = pipe_tput / (raw_tput / 4.0);
    row(
        "P2",
        "in-process: 4-step Decide/s at c=64 vs raw req/s ÷ 4",
        format!("{pipe_tput:.0}/s"),
        format!("{:.0}/s", raw_tput / 4.0),
        r,
        "≥ 0.90×",
        r >= 0.90,
    );
    let r = pipe_tput / relay_tput;
    println!(
        "| P2 | in-process: the same vs the zero-logic relay (the pipeline's four hops per operation, same bodies, no logic) | {pipe_tput:.0}/s | {relay_tput:.0}/s | {r:.3}× | (context) | |"
    );
    let r = pipe_tput / (headed_tput / 4.0);
    println!(
        "| P2 | in-process: the same vs raw requests carrying the four Beamline-* headers ÷ 4 (what NATS itself charges for them, now opt-in: raw with headers is {:.3}× raw) | {pipe_tput:.0}/s | {:.0}/s | {r:.3}× | (context) | |",
        headed_tput / raw_tput,
        headed_tput / 4.0,
    );
    println!(
        "| P2 | in-process: ratio to raw per window round ({} rounds of {:.1} s a side), min / median / max | {:.3} / {:.3} / {:.3} | | | (context) | |",
        window_ratios.len(),
        window.as_secs_f64(),
        window_ratios.first().copied().unwrap_or(0.0),
        window_ratios[window_ratios.len() / 2],
        window_ratios.last().copied().unwrap_or(0.0),
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
