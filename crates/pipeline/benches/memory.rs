//! DESIGN.md §8 P7: resident memory at 10 000 extensions with full health windows,
//! goal ≤ 100 MB. An absolute figure on the machine it runs on, printed next to the
//! resident memory of the same process before anything was loaded.
//!
//! The process (same allocator as the router binary, mimalloc, and a multi-threaded
//! tokio runtime like the router's) builds a registry snapshot of 10 000 extensions,
//! 20 000 versions and 10 000 instances (the P4 dataset) and holds it in an
//! `ArcSwap`, then creates the runtime state of every extension
//! (`RuntimeTable::extension`, `RuntimeTable::instance_breaker`) and fills it the
//! way traffic would: every slot of every health window (`health::SLOTS` slots of
//! the 60 s breaker window) gets calls with many distinct latencies, and every
//! one-second bucket of every breaker gets outcomes. Then it rebuilds the snapshot
//! once and swaps it in, as a reload does, because a running router's steady state
//! includes what the allocator keeps after reloads. RSS is `/proc/self/statm`.
//!
//! `cargo bench -p beamline-pipeline --bench memory` prints the P7 rows;
//! `-- --curve` prints CSV (`extensions,…`) for 1 000 to 100 000 extensions, each size
//! measured in a fresh child process (`-- --extensions N` measures one size).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use beamline_model::Limits;
use beamline_pipeline::BreakerConfig;
use beamline_pipeline::health::SLOTS;
use beamline_pipeline::runtime::RuntimeTable;
use beamline_registry::{ActiveSource, Snapshot};
use common::{dataset, ext_id, mib, rss_bytes};

/// The allocator the router binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Calls recorded into each slot of each health window.
const CALLS_PER_SLOT: usize = 64;

/// Sizes of the memory curve.
const CURVE_SIZES: &[usize] = &[1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000];

struct Measurement {
    extensions: usize,
    baseline: u64,
    snapshot: u64,
    full_windows: u64,
    after_reload: u64,
    fill_seconds: f64,
}

impl Measurement {
    fn csv_header() -> &'static str {
        "extensions,baseline_mib,after_snapshot_mib,after_full_windows_mib,after_reload_mib,runtime_fill_seconds"
    }

    fn csv(&self) -> String {
        format!(
            "{},{:.2},{:.2},{:.2},{:.2},{:.2}",
            self.extensions,
            mib(self.baseline),
            mib(self.snapshot),
            mib(self.full_windows),
            mib(self.after_reload),
            self.fill_seconds
        )
    }

    fn peak(&self) -> u64 {
        self.full_windows.max(self.after_reload)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value_of = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(n) = value_of("--extensions") {
        let n: usize = n.parse().expect("--extensions N");
        println!("{}", Measurement::csv_header());
        println!("{}", measure(n).csv());
        return;
    }
    if args.iter().any(|a| a == "--curve") {
        let max: usize = value_of("--max")
            .map(|m| m.parse().expect("--max N"))
            .unwrap_or(usize::MAX);
        println!("{}", Measurement::csv_header());
        for &n in CURVE_SIZES.iter().filter(|&&n| n <= max) {
            let out = std::process::Command::new(std::env::current_exe().expect("current_exe"))
                .args(["--extensions", &n.to_string()])
                .output()
                .expect("child process");
            assert!(
                out.status.success(),
                "child for {n} extensions failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().nth(1).expect("a CSV line from the child");
            println!("{line}");
            eprintln!("memory curve: {line}");
        }
        return;
    }

    let m = measure(10_000);
    println!(
        "\nP7 memory benchmark: resident memory (RSS, /proc/self/statm) on this machine, absolute"
    );
    println!("| id | what | ours | baseline | ratio | goal | met |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| P7 | RSS with 10 000 extensions (20 000 versions, 10 000 instances) and full health windows and breakers, after one reload (absolute, this machine) | {:.1} MB | {:.1} MB (same process before loading) | — | ≤ 100 MB (absolute) | {} |",
        mib(m.peak()),
        mib(m.baseline),
        if mib(m.peak()) <= 100.0 {
            "met"
        } else {
            "short"
        }
    );
    println!(
        "| P7 | of which: the snapshot (RSS after loading − before) | {:.1} MB | | | (context) | |",
        mib(m.snapshot.saturating_sub(m.baseline))
    );
    println!(
        "| P7 | of which: runtime state with full windows (RSS after filling − after loading) | {:.1} MB | | | (context) | |",
        mib(m.full_windows.saturating_sub(m.snapshot))
    );
    println!(
        "| P7 | RSS before / after the reload | {:.1} / {:.1} MB | | | (context) | |",
        mib(m.full_windows),
        mib(m.after_reload)
    );
}

fn measure(n: usize) -> Measurement {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Let the workers start before taking the baseline.
        tokio::task::yield_now().await;
    });
    let baseline = rss_bytes();

    let limits = Limits::default();
    let snapshot = ArcSwap::from_pointee(
        Snapshot::build(dataset(n), &limits, ActiveSource::Database, 1).expect("snapshot"),
    );
    assert_eq!(snapshot.load().counts.extensions, n);
    let after_snapshot = rss_bytes();

    let started = Instant::now();
    let rt = RuntimeTable::new(BreakerConfig::default());
    let window = Duration::from_secs(rt.breaker_config().window_seconds);
    let slot_width = window / SLOTS as u32;
    let base = rt.now();
    let ids: Vec<String> = (0..n).map(ext_id).collect();
    for (k, id) in ids.iter().enumerate() {
        let ext = rt.extension(id);
        let instance = rt.instance_breaker(id, "i1");
        for slot in 0..SLOTS {
            let at = base + slot_width * slot as u32 + Duration::from_millis(10);
            for c in 0..CALLS_PER_SLOT {
                // Latencies from ~100 µs to ~6 s, log-spaced, shifted per extension
                // and slot so every histogram holds many distinct values.
                let exp = (c + slot * 7 + k % 13) as f64 / CALLS_PER_SLOT as f64 * 4.8;
                let latency = Duration::from_micros((100.0 * 10f64.powf(exp)) as u64);
                ext.health.record(at, latency, c % 10 != 0);
            }
        }
        // Outcomes in every one-second bucket of the breaker windows.
        for second in 0..window.as_secs() {
            let now = base + Duration::from_secs(second) + Duration::from_millis(500);
            let success = second % 10 != 9;
            for breaker in [&ext.breaker, &instance] {
                if let Ok((permit, _)) = breaker.try_acquire(now) {
                    permit.record(success, now);
                }
            }
        }
    }
    let fill_seconds = started.elapsed().as_secs_f64();
    // Every slot of the window is live at the end of it.
    let end = base + slot_width * (SLOTS as u32 - 1) + Duration::from_millis(20);
    let sample = rt.extension(&ids[n / 2]).health.snapshot(end);
    assert_eq!(
        sample.window_calls,
        (SLOTS * CALLS_PER_SLOT) as u64,
        "health window not full"
    );
    let full_windows = rss_bytes();

    // A reload: the next snapshot is built while the current one serves, then swapped.
    snapshot.store(Arc::new(
        Snapshot::build(dataset(n), &limits, ActiveSource::Database, 2).expect("snapshot"),
    ));
    let after_reload = rss_bytes();
    std::hint::black_box((&snapshot, &rt));

    Measurement {
        extensions: n,
        baseline,
        snapshot: after_snapshot,
        full_windows,
        after_reload,
        fill_seconds,
    }
}
