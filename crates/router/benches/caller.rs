//! P1/P2 as a caller sees them (DESIGN.md §8): Decide through the real router binary
//! — over the NATS intake (the original's JSON contract) and over gRPC — against a
//! zero-logic relay process that makes the same hops over the same transport to the
//! same echo service, measured in one run, in interleaved windows.
//!
//! Processes (each its own, as in production): a nats-server of the bench's own, the
//! echo service (`--role echo`: answers every request with its body), the router
//! (`beamline-router serve`, fixtures: `e1`…`e4` are pre steps on the echo subject,
//! policy `one` runs `e1`, policy `four` runs all four), and the relays — `--role
//! relay` forwards the caller's body as is to the echo service (1 or 4 hops in
//! sequence, no headers) and answers with the last reply; `--role grpc-relay` is a
//! minimal tonic `Router/Decide` service making the same NATS hop. The client is
//! this process. Rows:
//!
//! - P1: sequential p50 / p99, 1 step, NATS intake and gRPC (goal ≤ 1.10× / ≤ 1.20×).
//! - P2: throughput at 64 in flight, 1 step over both intakes and 4 steps over the
//!   NATS intake against the 4-hop relay (goal ≥ 0.90×).
//! - Allocations per Decide, counted in-process with a counting allocator around
//!   the intake's own handler (the same code `serve` runs; the echo answers on the
//!   bench's NATS).
//!
//! `cargo bench -p beamline-router --bench caller [-- --quick]`.

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use beamline_api::proto;
use beamline_api::proto::router_client::RouterClient;
use beamline_test_support::NatsServer;
use beamline_test_support::bench::percentile;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};

/// The router's allocator, counting: allocations per Decide are a result of the bench.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// SAFETY: every call is forwarded to mimalloc unchanged; the counter has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { MIMALLOC.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { MIMALLOC.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { MIMALLOC.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const ECHO_SUBJECT: &str = "bench.echo";
const RELAY_SUBJECT: &str = "bench.relay";
const INTAKE_SUBJECT: &str = "beamline.router.v1.decide";
const CONCURRENCY: usize = 64;
const TEXT: &str = "Hello world, please route this request";

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    beamline_test_support::bench::tune_allocator_like_the_binary();
    let role = arg("--role");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match role.as_deref() {
        Some("echo") => rt.block_on(echo(arg("--nats").expect("--nats"))),
        Some("relay") => rt.block_on(relay(arg("--nats").expect("--nats"))),
        Some("grpc-relay") => rt.block_on(grpc_relay(arg("--nats").expect("--nats"))),
        Some(other) => panic!("unknown role {other}"),
        None => {
            let quick =
                std::env::args().any(|a| a == "--quick") || std::env::var("BENCH_QUICK").is_ok();
            rt.block_on(run(quick));
        }
    }
}

// ---------------------------------------------------------------------------
// The other processes.

/// Answers every request with its own body, from the subscriber's loop.
async fn echo(nats: String) {
    let client = async_nats::connect(nats).await.expect("echo: connect");
    let mut sub = client
        .queue_subscribe(ECHO_SUBJECT, "echo".into())
        .await
        .expect("echo: subscribe");
    client.flush().await.expect("echo: flush");
    println!("ready");
    while let Some(msg) = sub.next().await {
        if let Some(reply) = msg.reply {
            let _ = client.publish(reply, msg.payload).await;
        }
    }
}

/// The zero-logic NATS relay: the caller's body, as is, to the echo service `hops`
/// times in sequence (`bench.relay.<hops>`), then the last reply back.
async fn relay(nats: String) {
    let client = async_nats::connect(nats).await.expect("relay: connect");
    let mut sub = client
        .queue_subscribe(format!("{RELAY_SUBJECT}.*"), "relay".into())
        .await
        .expect("relay: subscribe");
    client.flush().await.expect("relay: flush");
    println!("ready");
    while let Some(msg) = sub.next().await {
        let client = client.clone();
        tokio::spawn(async move {
            let hops: usize = msg
                .subject
                .rsplit('.')
                .next()
                .and_then(|h| h.parse().ok())
                .unwrap_or(1);
            let mut answer = msg.payload.clone();
            for _ in 0..hops {
                match client.request(ECHO_SUBJECT, msg.payload.clone()).await {
                    Ok(m) => answer = m.payload,
                    Err(_) => return,
                }
            }
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, answer).await;
            }
        });
    }
}

/// The zero-logic gRPC relay: `Router/Decide` that sends the message's payload to
/// the echo service and answers a fixed decision.
struct GrpcRelay {
    nats: async_nats::Client,
}

#[tonic::async_trait]
impl proto::router_server::Router for GrpcRelay {
    async fn decide(
        &self,
        request: tonic::Request<proto::RouteRequest>,
    ) -> Result<tonic::Response<proto::RouteDecision>, tonic::Status> {
        let payload = request
            .into_inner()
            .message
            .map(|m| m.payload)
            .unwrap_or_default();
        let reply = self
            .nats
            .request(ECHO_SUBJECT, Bytes::from(payload))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(tonic::Response::new(proto::RouteDecision {
            provider_id: "relay".into(),
            reason: String::from_utf8_lossy(&reply.payload[..reply.payload.len().min(8)])
                .into_owned(),
            ..Default::default()
        }))
    }
}

async fn grpc_relay(nats: String) {
    let client = async_nats::connect(nats)
        .await
        .expect("grpc relay: connect");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("grpc relay: bind");
    let addr = listener.local_addr().expect("grpc relay: address");
    println!("ready {addr}");
    tonic::transport::Server::builder()
        .add_service(proto::router_server::RouterServer::new(GrpcRelay {
            nats: client,
        }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("grpc relay: serve");
}

/// A child process of this bench binary in `role`, once it says `ready`; the rest of
/// its first line (an address) is returned too.
fn spawn_role(role: &str, nats: &str) -> (Proc, String) {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .args(["--role", role, "--nats", nats])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a role");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("role's first line");
    assert!(line.starts_with("ready"), "{role} did not start: {line:?}");
    (
        Proc(child),
        line.trim_start_matches("ready").trim().to_string(),
    )
}

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// The caller.

fn intake_body(policy: &str) -> Bytes {
    Bytes::from(
        json!({"version": "1", "request_id": "bench-1", "trace_id": "0af7651916cd43dd8448eb211c80319c",
               "tenant_id": "bench", "policy_id": policy,
               "task": {"type": "chat", "payload": TEXT}})
        .to_string(),
    )
}

fn grpc_request() -> proto::RouteRequest {
    proto::RouteRequest {
        message: Some(proto::Message {
            message_id: "bench-1".into(),
            tenant_id: "bench".into(),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            message_type: "chat".into(),
            payload: TEXT.as_bytes().to_vec(),
            ..Default::default()
        }),
        policy_id: "one".into(),
        ..Default::default()
    }
}

/// One side of a comparison: how to make one call.
#[derive(Clone)]
enum Side {
    Nats {
        client: async_nats::Client,
        subject: String,
        body: Bytes,
    },
    Grpc(RouterClient<tonic::transport::Channel>),
}

impl Side {
    async fn call(&self) -> bool {
        match self {
            Side::Nats {
                client,
                subject,
                body,
            } => match client.request(subject.clone(), body.clone()).await {
                // The router's refusals say `"ok":false`; the relay echoes the body.
                Ok(m) => !m.payload.windows(10).any(|w| w == b"\"ok\":false"),
                Err(_) => false,
            },
            Side::Grpc(c) => c.clone().decide(grpc_request()).await.is_ok(),
        }
    }
}

/// Sequential latencies of `a` and `b`, interleaved call by call.
async fn sequential(a: &Side, b: &Side, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let warm = n / 10;
    let (mut xs, mut ys) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..(n + warm) {
        let t = Instant::now();
        assert!(a.call().await, "a call failed");
        let x = t.elapsed();
        let t = Instant::now();
        assert!(b.call().await, "a call failed");
        let y = t.elapsed();
        if i >= warm {
            xs.push(x);
            ys.push(y);
        }
    }
    xs.sort();
    ys.sort();
    (xs, ys)
}

/// Calls that succeeded in `window` with `conc` loops (after a 100 ms ramp-up).
async fn saturate(side: &Side, conc: usize, window: Duration) -> u64 {
    let start = Instant::now() + Duration::from_millis(100);
    let stop = start + window;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::with_capacity(conc);
    for _ in 0..conc {
        let (side, done, failed) = (side.clone(), done.clone(), failed.clone());
        loops.push(tokio::spawn(async move {
            loop {
                let ok = side.call().await;
                let now = Instant::now();
                if now >= stop {
                    break;
                }
                if now >= start {
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for l in loops {
        let _ = l.await;
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("caller bench: {failed} calls failed in a window");
    }
    done.load(Ordering::Relaxed)
}

/// Throughput of `ours` and `base` per second, in alternating windows.
async fn throughput(ours: &Side, base: &Side, windows: u32, window: Duration) -> (f64, f64) {
    let (mut a, mut b) = (0u64, 0u64);
    for round in 0..windows {
        if round % 2 == 0 {
            a += saturate(ours, CONCURRENCY, window).await;
            b += saturate(base, CONCURRENCY, window).await;
        } else {
            b += saturate(base, CONCURRENCY, window).await;
            a += saturate(ours, CONCURRENCY, window).await;
        }
    }
    let secs = (window * windows).as_secs_f64();
    (a as f64 / secs, b as f64 / secs)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn latency_rows(what: &str, ours: &[Duration], base: &[Duration]) {
    for (q, name, goal) in [(0.5, "p50", 1.10), (0.99, "p99", 1.20)] {
        let (o, b) = (percentile(ours, q), percentile(base, q));
        let ratio = us(o) / us(b);
        println!(
            "| P1 | {what}, sequential, {name} | {:.1} µs | {:.1} µs (zero-logic relay) | {ratio:.3}× | ≤ {goal:.2}× | {} |",
            us(o),
            us(b),
            if ratio <= goal { "met" } else { "short" }
        );
    }
}

fn throughput_row(what: &str, ours: f64, base: f64, relay: &str) {
    let ratio = ours / base;
    println!(
        "| P2 | {what}, {CONCURRENCY} in flight | {ours:.0}/s | {base:.0}/s ({relay}) | {ratio:.3}× | ≥ 0.90× | {} |",
        if ratio >= 0.90 { "met" } else { "short" }
    );
}

/// Allocations per Decide in the intake's own handler, in this process.
async fn allocations_per_decide(nats: &str, n: u64) -> (f64, f64) {
    use beamline_model::Limits;
    use beamline_pipeline::{BreakerConfig, Pipeline, PipelineConfig};
    use beamline_registry::{Registry, RegistryConfig, SourceMode};
    let dir = tempfile::tempdir().expect("tempdir");
    write_fixtures(dir.path());
    let registry = Registry::start(
        RegistryConfig {
            source: SourceMode::Fixtures,
            fixtures_dir: Some(dir.path().join("extensions")),
            policies_dir: Some(dir.path().join("policies")),
            ..RegistryConfig::default()
        },
        Limits::default(),
    )
    .await
    .expect("registry");
    let client = async_nats::connect(nats).await.expect("connect");
    let pipeline = Pipeline::new(
        registry,
        client,
        PipelineConfig::default(),
        BreakerConfig::default(),
        Limits::default(),
    );
    let mut per = [0.0; 2];
    for (k, policy) in ["one", "four"].iter().enumerate() {
        let body = intake_body(policy);
        for _ in 0..100 {
            beamline_api::nats_intake::handle(&pipeline, &body).await;
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..n {
            let answer = beamline_api::nats_intake::handle(&pipeline, &body).await;
            assert!(
                answer.starts_with(b"{\"ok\":true"),
                "{}",
                String::from_utf8_lossy(&answer)
            );
        }
        per[k] = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n as f64;
    }
    (per[0], per[1])
}

/// The bench's extensions (`e1`…`e4`, pre steps on the echo subject) and policies
/// (`one`: e1; `four`: e1…e4) for tenant `bench`, in `dir/extensions` and
/// `dir/policies`.
fn write_fixtures(dir: &Path) {
    let ext_dir = dir.join("extensions");
    let pol_dir = dir.join("policies/bench");
    std::fs::create_dir_all(&ext_dir).expect("fixtures dir");
    std::fs::create_dir_all(&pol_dir).expect("policies dir");
    let exts: Vec<Value> = (1..=4)
        .map(|i| json!({"id": format!("e{i}"), "type": "pre", "subject": ECHO_SUBJECT, "timeout_ms": 5000}))
        .collect();
    std::fs::write(ext_dir.join("all.json"), Value::from(exts).to_string()).expect("write");
    let one = json!({"providers": [{"name": "p"}], "pre": [{"id": "e1"}]});
    let four = json!({"providers": [{"name": "p"}],
        "pre": [{"id": "e1"}, {"id": "e2"}, {"id": "e3"}, {"id": "e4"}]});
    std::fs::write(pol_dir.join("one.json"), one.to_string()).expect("write");
    std::fs::write(pol_dir.join("four.json"), four.to_string()).expect("write");
}

async fn run(quick: bool) {
    let nats = NatsServer::start();
    let url = nats.url();
    let (_echo, _) = spawn_role("echo", &url);
    let (_relay, _) = spawn_role("relay", &url);
    let (_grpc_relay, grpc_relay_addr) = spawn_role("grpc-relay", &url);
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = std::env::var("BENCH_ROUTER_CONFIG").unwrap_or_default();
    write_fixtures(dir.path());
    let router = common::start_router(dir.path(), &url, &extra);
    let router_addr = router.addr.clone();

    let client = async_nats::connect(url.clone()).await.expect("connect");
    let nats_side = |subject: &str, body: Bytes| Side::Nats {
        client: client.clone(),
        subject: subject.to_string(),
        body,
    };
    let intake1 = nats_side(INTAKE_SUBJECT, intake_body("one"));
    let intake4 = nats_side(INTAKE_SUBJECT, intake_body("four"));
    let relay1 = nats_side(&format!("{RELAY_SUBJECT}.1"), intake_body("one"));
    let relay4 = nats_side(&format!("{RELAY_SUBJECT}.4"), intake_body("four"));
    let grpc = Side::Grpc(
        RouterClient::connect(router_addr)
            .await
            .expect("router gRPC"),
    );
    let grpc_relay = Side::Grpc(
        RouterClient::connect(format!("http://{grpc_relay_addr}"))
            .await
            .expect("relay gRPC"),
    );
    for side in [&intake1, &intake4, &relay1, &relay4, &grpc, &grpc_relay] {
        assert!(side.call().await, "a first call failed");
    }

    // `--soak SIDE SECONDS`: only load one side at 64 in flight (for a profiler).
    if let Some(which) = arg("--soak") {
        let secs: u64 = std::env::args()
            .skip_while(|a| a != "--soak")
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let side = match which.as_str() {
            "intake1" => &intake1,
            "intake4" => &intake4,
            "relay1" => &relay1,
            "relay4" => &relay4,
            "grpc" => &grpc,
            "grpc-relay" => &grpc_relay,
            other => panic!("unknown side {other}"),
        };
        eprintln!("soak: router pid {}", router.child.id());
        let done = saturate(side, CONCURRENCY, Duration::from_secs(secs)).await;
        println!("soak {which}: {:.0}/s", done as f64 / secs as f64);
        return;
    }

    let n = if quick { 2_000 } else { 10_000 };
    let (windows, window) = if quick {
        (4, Duration::from_millis(500))
    } else {
        (10, Duration::from_secs(1))
    };

    let (ours, base) = sequential(&intake1, &relay1, n).await;
    latency_rows("1-step Decide over the NATS intake", &ours, &base);
    let (ours, base) = sequential(&grpc, &grpc_relay, n).await;
    latency_rows("1-step Decide over gRPC", &ours, &base);

    let (o, b) = throughput(&intake1, &relay1, windows, window).await;
    throughput_row(
        "1-step Decide/s over the NATS intake",
        o,
        b,
        "zero-logic relay, 1 hop",
    );
    let (o, b) = throughput(&intake4, &relay4, windows, window).await;
    throughput_row(
        "4-step Decide/s over the NATS intake",
        o,
        b,
        "zero-logic relay, 4 hops",
    );
    let (o, b) = throughput(&grpc, &grpc_relay, windows, window).await;
    throughput_row(
        "1-step Decide/s over gRPC",
        o,
        b,
        "zero-logic tonic relay, 1 hop",
    );

    let (one, four) = allocations_per_decide(&url, if quick { 2_000 } else { 10_000 }).await;
    println!(
        "| P2 | allocations per Decide in the router (NATS intake handler: parse, pipeline, reply), 1 step / 4 steps | {one:.0} / {four:.0} | | | (context) | |"
    );
}
