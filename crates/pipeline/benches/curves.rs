//! Scaling curves for docs/PERFORMANCE.md, as CSV files (rendered to PNG by
//! `scripts/bench --curves`):
//!
//! - `decide.csv`: Decide throughput and latency vs concurrency (1 … 256) for 1 and 4
//!   extension steps, next to the baseline at the same concurrency: the same number
//!   of raw async-nats requests made one after the other to the same echo services.
//!   Needs NATS (`NATS_URL`, else a nats-server of its own).
//! - `reload.csv`: full reload time vs registry size (1 000 … 100 000 extensions, each
//!   with two versions and one instance), split into the one-transaction read and the
//!   validation + build. Needs PostgreSQL (`DATABASE_URL`).
//! - `lookup.csv`: snapshot lookup and version resolve latency vs registry size,
//!   next to a plain `HashMap::get` over the same keys.
//!
//! The memory curve comes from the `memory` bench (`-- --curve`).
//!
//! `cargo bench -p beamline-pipeline --bench curves -- [--quick] [--out DIR]
//! [--only decide,reload,lookup] [--sizes 1000,10000] [--steps 1,4]
//! [--concurrency 1,64]` (default DIR: the workspace's target/bench-curves).
//! `BENCH_RUN_SECONDS=N` changes the length of each Decide point (default 3 s, quick
//! 0.8 s); `BENCH_SERIES=1` prints the completions of every second of each point.

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beamline_model::wire::{ExtensionRequest, Message};
use beamline_model::{Limits, SecretUrl};
use beamline_pipeline::{BreakerConfig, DecideRequest, Pipeline, PipelineConfig};
use beamline_registry::{ActiveSource, Registry, RegistryConfig, Snapshot, SourceMode};
use beamline_sdk::{ExtensionError, Handler, Response, ServeOptions};
use beamline_test_support::bench::percentile;
use common::{dataset, ext_id, nats};
use serde_json::{Map, json};

/// The allocator the router binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONCURRENCY: &[usize] = &[1, 2, 4, 8, 16, 32, 64, 128, 256];
const SIZES: &[usize] = &[1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000];

struct Echo;

impl Handler for Echo {
    async fn handle(&self, _r: ExtensionRequest) -> Result<Response, ExtensionError> {
        Ok(Response::unchanged())
    }
}

fn main() {
    beamline_test_support::bench::tune_allocator_like_the_binary();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || std::env::var("BENCH_QUICK").is_ok();
    let value_of = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // cargo runs benches from the package directory: default to the workspace's target/.
    let out = value_of("--out").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-curves"),
        PathBuf::from,
    );
    let sizes: Option<Vec<usize>> = value_of("--sizes").map(|v| {
        v.split(',')
            .map(|n| n.trim().parse().expect("--sizes N,N,..."))
            .collect()
    });
    let only = value_of("--only").unwrap_or_else(|| "decide,reload,lookup".into());
    std::fs::create_dir_all(&out).expect("output directory");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for part in only.split(',') {
        match part.trim() {
            "decide" => {
                let list = |name: &str, all: &[usize]| {
                    value_of(name).map_or_else(
                        || all.to_vec(),
                        |v| {
                            v.split(',')
                                .map(|n| n.trim().parse().expect(name))
                                .collect()
                        },
                    )
                };
                let steps = list("--steps", &[1, 4]);
                let concurrency = list("--concurrency", CONCURRENCY);
                rt.block_on(decide(quick, &steps, &concurrency, &out))
            }
            "reload" => {
                if let Err(e) = rt.block_on(reload(quick, sizes.clone(), &out)) {
                    eprintln!("reload curve skipped: {e}");
                }
            }
            "lookup" => lookup(quick, sizes.clone(), &out),
            "" => {}
            other => panic!("unknown curve {other:?} (decide, reload, lookup)"),
        }
    }
}

fn create(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Decide vs concurrency.

fn request(policy: &str) -> DecideRequest {
    DecideRequest {
        request_id: "bench".into(),
        message: Message {
            message_id: "m".into(),
            tenant_id: "bench".into(),
            trace_id: "t".into(),
            message_type: "chat".into(),
            payload: "hello world".into(),
            payload_ref: None,
            metadata: Map::new(),
        },
        policy_id: policy.into(),
        context: Map::new(),
    }
}

/// One point: `concurrency` tasks calling `op` in a loop for `run` (after `warm`).
/// Returns (operations per second, sorted latencies, errors).
async fn load<F, Fut>(
    concurrency: usize,
    warm: Duration,
    run: Duration,
    op: F,
) -> (f64, Vec<Duration>, u64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let start = Instant::now() + warm;
    let stop = start + run;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut at = Vec::new();
            let mut errors = 0u64;
            loop {
                let t = Instant::now();
                if t >= stop {
                    break;
                }
                let ok = op().await;
                if t >= start {
                    if ok {
                        lat.push(t.elapsed());
                        at.push(t - start);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, at, errors)
        }));
    }
    let mut all = Vec::new();
    let mut per_second = vec![0u64; run.as_secs().max(1) as usize + 1];
    let mut errors = 0;
    for t in tasks {
        let (lat, at, e) = t.await.expect("load task");
        all.extend(lat);
        for a in at {
            per_second[a.as_secs() as usize] += 1;
        }
        errors += e;
    }
    if std::env::var_os("BENCH_SERIES").is_some() {
        eprintln!("  completions per second: {per_second:?}");
    }
    all.sort();
    (all.len() as f64 / run.as_secs_f64(), all, errors)
}

async fn decide(quick: bool, steps: &[usize], concurrency: &[usize], out: &Path) {
    let (client, _own) = nats().await;
    let prefix = format!("curves{}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let ext_dir = dir.path().join("extensions");
    let pol_dir = dir.path().join("policies/bench");
    std::fs::create_dir_all(&ext_dir).unwrap();
    std::fs::create_dir_all(&pol_dir).unwrap();
    let exts: Vec<_> = (1..=4)
        .map(|i| json!({"id": format!("e{i}"), "type": "pre", "subject": format!("{prefix}.e{i}"), "timeout_ms": 5000}))
        .collect();
    std::fs::write(
        ext_dir.join("all.json"),
        serde_json::to_string(&exts).unwrap(),
    )
    .unwrap();
    let one = json!({"providers": [{"name": "p"}], "pre": [{"id": "e1"}]});
    let four = json!({"providers": [{"name": "p"}], "pre": [{"id": "e1"}, {"id": "e2"}, {"id": "e3"}, {"id": "e4"}]});
    std::fs::write(pol_dir.join("one.json"), one.to_string()).unwrap();
    std::fs::write(pol_dir.join("four.json"), four.to_string()).unwrap();
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
    let mut services = Vec::new();
    for i in 1..=4 {
        services.push(
            beamline_sdk::spawn(
                client.clone(),
                &format!("{prefix}.e{i}"),
                Echo,
                ServeOptions::default(),
            )
            .await
            .expect("echo service"),
        );
    }
    let pipeline = Pipeline::new(
        registry,
        client.clone(),
        PipelineConfig::default(),
        BreakerConfig::default(),
        Limits::default(),
    );
    // The bodies the pipeline sends (same message, same context keys), so the raw
    // baseline moves the same bytes through the same echo services.
    let body = |policy: &str| {
        let context: Map<String, serde_json::Value> = [
            ("tenant_id", "bench"),
            ("policy_id", policy),
            ("request_id", "bench"),
            ("trace_id", "t"),
            ("message_type", "chat"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
        bytes::Bytes::from(
            serde_json::to_vec(&ExtensionRequest {
                trace_id: "t".into(),
                tenant_id: "bench".into(),
                payload: request(policy).message,
                metadata: context,
                config: Map::new(),
                ..ExtensionRequest::default()
            })
            .unwrap(),
        )
    };

    let (warm, mut run) = if quick {
        (Duration::from_millis(200), Duration::from_millis(800))
    } else {
        (Duration::from_millis(500), Duration::from_secs(3))
    };
    if let Ok(secs) = std::env::var("BENCH_RUN_SECONDS") {
        run = Duration::from_secs(secs.parse().expect("BENCH_RUN_SECONDS"));
    }
    let path = out.join("decide.csv");
    let mut f = create(&path);
    writeln!(f, "steps,concurrency,kind,ops_per_s,p50_us,p99_us,errors").unwrap();
    for &steps in steps {
        let policy = match steps {
            1 => "one",
            4 => "four",
            other => panic!("--steps: 1 or 4, not {other}"),
        };
        let subjects: Arc<Vec<String>> =
            Arc::new((1..=steps).map(|i| format!("{prefix}.e{i}")).collect());
        let payload = body(policy);
        for &c in concurrency {
            let (client, subjects, payload) = (client.clone(), subjects.clone(), payload.clone());
            let raw = load(c, warm, run, move || {
                let (client, subjects, payload) =
                    (client.clone(), subjects.clone(), payload.clone());
                async move {
                    for s in subjects.iter() {
                        if client.request(s.clone(), payload.clone()).await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            })
            .await;
            let p = pipeline.clone();
            let piped = load(c, warm, run, move || {
                let p = p.clone();
                async move { p.decide(request(policy)).await.is_ok() }
            })
            .await;
            for (kind, (tput, lat, errors)) in [("raw", raw), ("pipeline", piped)] {
                let line = format!(
                    "{steps},{c},{kind},{tput:.0},{:.1},{:.1},{errors}",
                    percentile(&lat, 0.5).as_secs_f64() * 1e6,
                    percentile(&lat, 0.99).as_secs_f64() * 1e6,
                );
                eprintln!("decide: {line}");
                writeln!(f, "{line}").unwrap();
            }
        }
    }
    for s in services {
        s.abort();
    }
    eprintln!("wrote {}", path.display());
}

// ---------------------------------------------------------------------------
// Reload vs registry size.

fn median_ms(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(percentile(&v, 0.5)),
        ms(v[0]),
        ms(*v.last().expect("samples")),
    )
}

async fn reload(quick: bool, sizes: Option<Vec<usize>>, out: &Path) -> Result<(), String> {
    let path = out.join("reload.csv");
    let mut f = create(&path);
    writeln!(
        f,
        "extensions,reload_ms_median,reload_ms_min,reload_ms_max,read_ms_median,build_ms_median,samples"
    )
    .unwrap();
    let sizes: Vec<usize> = sizes.unwrap_or_else(|| {
        if quick {
            vec![1_000, 10_000, 50_000]
        } else {
            SIZES.to_vec()
        }
    });
    for n in sizes {
        let db = tokio::time::timeout(
            Duration::from_secs(10),
            beamline_test_support::TestDatabase::try_create(),
        )
        .await
        .map_err(|_| "no PostgreSQL at DATABASE_URL (timed out)".to_string())??;
        let pool = sqlx::PgPool::connect(db.url())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        beamline_registry::database::migrate(&pool, "bench")
            .await
            .map_err(|e| format!("migrate: {e}"))?;
        beamline_test_support::bench::seed_bench_registry(&pool, n, "ext_00000")
            .await
            .map_err(|e| format!("seed: {e}"))?;
        let registry = Registry::start(
            RegistryConfig {
                source: SourceMode::Database,
                database_url: Some(SecretUrl::new(db.url())),
                ..RegistryConfig::default()
            },
            Limits::default(),
        )
        .await
        .map_err(|e| format!("registry: {e}"))?;
        assert_eq!(registry.snapshot().counts.extensions, n);
        let samples = match (quick, n) {
            (true, _) => 3,
            (false, n) if n <= 10_000 => 11,
            (false, _) => 5,
        };
        let (mut total, mut read, mut build) = (Vec::new(), Vec::new(), Vec::new());
        // One warm-up reload, then the samples.
        registry.reload().await.map_err(|e| e.to_string())?;
        for _ in 0..samples {
            let t = Instant::now();
            let report = registry.reload().await.map_err(|e| e.to_string())?;
            total.push(t.elapsed());
            black_box(report);
            let t = Instant::now();
            let data = beamline_registry::database::load(&pool, "bench")
                .await
                .map_err(|e| e.to_string())?;
            read.push(t.elapsed());
            let t = Instant::now();
            let s = Snapshot::build(data, &Limits::default(), ActiveSource::Database, 9);
            build.push(t.elapsed());
            drop(s);
        }
        let (med, min, max) = median_ms(total);
        let line = format!(
            "{n},{med:.2},{min:.2},{max:.2},{:.2},{:.2},{samples}",
            median_ms(read).0,
            median_ms(build).0
        );
        eprintln!("reload: {line}");
        writeln!(f, "{line}").unwrap();
        drop(registry);
        pool.close().await;
        drop(db);
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}

// ---------------------------------------------------------------------------
// Lookup vs registry size.

/// Nanoseconds per call: the median and p99 of the means of `batches` batches of
/// `batch` calls (timer overhead amortised), each call on the next key of `keys`.
fn per_call(keys: &[String], batches: usize, batch: usize, f: impl Fn(&str) -> u32) -> (f64, f64) {
    let mut means = Vec::with_capacity(batches);
    let mut k = 0usize;
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..batch {
            k = if k + 1 == keys.len() { 0 } else { k + 1 };
            black_box(f(black_box(keys[k].as_str())));
        }
        means.push(t.elapsed() / batch as u32);
    }
    means.sort();
    (
        percentile(&means, 0.5).as_nanos() as f64,
        percentile(&means, 0.99).as_nanos() as f64,
    )
}

fn lookup(quick: bool, sizes: Option<Vec<usize>>, out: &Path) {
    let path = out.join("lookup.csv");
    let mut f = create(&path);
    writeln!(
        f,
        "extensions,lookup_ns_median,lookup_ns_p99,resolve_ns_median,resolve_ns_p99,hashmap_ns_median,hashmap_ns_p99"
    )
    .unwrap();
    let batches = if quick { 300 } else { 3_000 };
    for n in sizes.unwrap_or_else(|| SIZES.to_vec()) {
        let snapshot = arc_swap::ArcSwap::from_pointee(Snapshot::build(
            dataset(n),
            &Limits::default(),
            ActiveSource::Database,
            1,
        ));
        // A fixed pseudo-random order over all ids, so large registries miss the cache
        // the way real traffic over many extensions would.
        let keys: Vec<String> = (0..n).map(|i| ext_id((i * 7919) % n)).collect();
        let plain: HashMap<String, Arc<beamline_model::Extension>> = snapshot
            .load()
            .list()
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        let l = per_call(&keys, batches, 1_000, |id| {
            snapshot.load().lookup(id).map_or(0, |e| e.timeout_ms)
        });
        let r = per_call(&keys, batches, 1_000, |id| {
            snapshot
                .load()
                .resolve(id, &[("tenant_id", "standard_tenant")])
                .map_or(0, |e| e.timeout_ms)
        });
        let h = per_call(&keys, batches, 1_000, |id| {
            plain.get(id).map_or(0, |e| e.timeout_ms)
        });
        let line = format!(
            "{n},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1}",
            l.0, l.1, r.0, r.1, h.0, h.1
        );
        eprintln!("lookup: {line}");
        writeln!(f, "{line}").unwrap();
    }
    eprintln!("wrote {}", path.display());
}
