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
//! bucket of every breaker gets outcomes. Then it reloads [`RELOADS`] times the way
//! the registry does (`Snapshot::rebuild` from a fresh read, swapped in), every
//! other reload with one extension changed, because a running router's steady state
//! includes what the allocator keeps after reloads. RSS is `/proc/self/statm`.
//!
//! `cargo bench -p beamline-pipeline --bench memory` prints the P7 rows;
//! `-- --curve` prints CSV (`extensions,…`) for 1 000 to 100 000 extensions, each size
//! measured in a fresh child process (`-- --extensions N` measures one size).

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use beamline_model::Limits;
use beamline_pipeline::BreakerConfig;
use beamline_pipeline::health::SLOTS;
use beamline_pipeline::runtime::RuntimeTable;
use beamline_registry::{ActiveSource, Snapshot};
use common::{dataset, ext_id, mb, rss_bytes};

/// The allocator the router binary uses (mimalloc), so the bench measures what ships,
/// wrapped to count the bytes the program holds: RSS minus that is what the
/// allocator keeps (freed pages not yet returned, fragmentation).
#[global_allocator]
static ALLOC: Counting = Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded to mimalloc unchanged; the counter is a side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

/// Bytes currently allocated by the program.
fn live() -> u64 {
    LIVE.load(Ordering::Relaxed) as u64
}

/// Full reloads done before the steady state is measured.
const RELOADS: u64 = 10;

/// Calls recorded into each slot of each health window.
const CALLS_PER_SLOT: usize = 64;

/// Sizes of the memory curve.
const CURVE_SIZES: &[usize] = &[1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000];

/// Resident and live (allocated) bytes at one point.
#[derive(Clone, Copy, Default)]
struct Point {
    rss: u64,
    live: u64,
}

fn point() -> Point {
    Point {
        rss: rss_bytes(),
        live: live(),
    }
}

struct Measurement {
    extensions: usize,
    /// After the runtime started, before anything was loaded.
    baseline: Point,
    /// The dataset read (what the database read returns), before validation.
    dataset: Point,
    /// The snapshot built and held, the dataset dropped.
    snapshot: Point,
    /// Runtime entries (extension state, instance breakers) created, nothing recorded.
    entries: Point,
    /// Every health window and breaker window full.
    full: Point,
    /// After the reloads (each snapshot built, swapped in, the previous dropped).
    reload: Point,
    /// Half a second and some allocator traffic after the reload.
    settled: Point,
    /// Peak RSS of the process (VmHWM).
    peak_rss: u64,
    /// Creating the runtime entries (sharded map inserts).
    entries_seconds: f64,
    /// Creating and filling them.
    fill_seconds: f64,
}

impl Measurement {
    fn csv_header() -> &'static str {
        "extensions,baseline_rss_mb,snapshot_rss_mb,entries_rss_mb,full_rss_mb,reload_rss_mb,settled_rss_mb,peak_rss_mb,\
baseline_live_mb,dataset_live_mb,snapshot_live_mb,entries_live_mb,full_live_mb,settled_live_mb,\
entries_seconds,fill_seconds"
    }

    fn csv(&self) -> String {
        format!(
            "{},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2}",
            self.extensions,
            mb(self.baseline.rss),
            mb(self.snapshot.rss),
            mb(self.entries.rss),
            mb(self.full.rss),
            mb(self.reload.rss),
            mb(self.settled.rss),
            mb(self.peak_rss),
            mb(self.baseline.live),
            mb(self.dataset.live),
            mb(self.snapshot.live),
            mb(self.entries.live),
            mb(self.full.live),
            mb(self.settled.live),
            self.entries_seconds,
            self.fill_seconds
        )
    }

    /// The headline: a running router's steady state (full windows, reloads done,
    /// the allocator given time to return freed pages).
    fn steady(&self) -> u64 {
        self.settled.rss
    }
}

/// VmHWM (peak resident set) of this process, bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    beamline_test_support::bench::tune_allocator_like_the_binary();
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
    let d = |a: u64, b: u64| mb(a.saturating_sub(b));
    println!(
        "\nP7 memory benchmark: resident memory (RSS, /proc/self/statm) on this machine, absolute; \
         live = bytes allocated and not freed (counted in the global allocator)"
    );
    println!("| id | what | ours | baseline | ratio | goal | met |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| P7 | RSS with 10 000 extensions (20 000 versions, 10 000 instances), full health windows and breakers, {} full reloads done, settled (absolute, this machine) | {:.1} MB | {:.1} MB (same process before loading) | — | ≤ 100 MB (absolute) | {} |",
        RELOADS,
        mb(m.steady()),
        mb(m.baseline.rss),
        if mb(m.steady()) <= 100.0 {
            "met"
        } else {
            "short"
        }
    );
    println!(
        "| P7 | of which live: snapshot / runtime entries and breakers / health windows | {:.1} / {:.1} / {:.1} MB | | | (context) | |",
        d(m.snapshot.live, m.baseline.live),
        d(m.entries.live, m.snapshot.live),
        d(m.full.live, m.entries.live),
    );
    println!(
        "| P7 | RSS after loading / after filling the windows / right after the reloads / peak | {:.1} / {:.1} / {:.1} / {:.1} MB | | | (context) | |",
        mb(m.snapshot.rss),
        mb(m.full.rss),
        mb(m.reload.rss),
        mb(m.peak_rss)
    );
    println!(
        "| P7 | live bytes at the end (RSS − live = pages the allocator keeps) | {:.1} MB | | | (context) | |",
        mb(m.settled.live)
    );
    println!(
        "| P7 | creating the 20 000 runtime entries (sharded map) | {:.3} s | | | (context) | |",
        m.entries_seconds
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
    let baseline = point();

    let limits = Limits::default();
    let data = dataset(n);
    let dataset_point = point();
    let snapshot = ArcSwap::from_pointee(Snapshot::build(data, &limits, ActiveSource::Database, 1));
    assert_eq!(snapshot.load().counts.extensions, n);
    let after_snapshot = point();

    let started = Instant::now();
    let rt = RuntimeTable::new(BreakerConfig::default());
    let window = Duration::from_secs(rt.breaker_config().window_seconds);
    let slot_width = window / SLOTS as u32;
    let base = rt.now();
    let ids: Vec<String> = (0..n).map(ext_id).collect();
    let entries: Vec<_> = ids
        .iter()
        .map(|id| (rt.extension(id), rt.instance_breaker(id, "i1")))
        .collect();
    let after_entries = point();
    let entries_seconds = started.elapsed().as_secs_f64();
    for (k, (ext, instance)) in entries.iter().enumerate() {
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
        // Outcomes in every second (so every bucket) of both breakers' windows.
        for second in 0..window.as_secs() {
            let now = base + Duration::from_secs(second) + Duration::from_millis(500);
            let success = second % 10 != 9;
            for breaker in [&ext.breaker, instance] {
                if let Ok((permit, _)) = breaker.try_acquire(now) {
                    permit.record(success, now);
                }
            }
        }
    }
    drop(entries);
    let fill_seconds = started.elapsed().as_secs_f64();
    // Every slot of the window is live at the end of it.
    let end = base + slot_width * (SLOTS as u32 - 1) + Duration::from_millis(20);
    let sample = rt.extension(&ids[n / 2]).health.snapshot(end);
    assert_eq!(
        sample.window_calls,
        (SLOTS * CALLS_PER_SLOT) as u64,
        "health window not full"
    );
    drop(ids);
    let full = point();

    // Reloads: each next snapshot is built while the current one serves, then
    // swapped, as `Registry::reload` does; every other one changes one extension.
    for r in 0..RELOADS {
        let mut data = dataset(n);
        if r % 2 == 1 {
            data.extensions[n / 3].value.timeout_ms = 100 + r as i64;
        }
        let next = Snapshot::rebuild(
            data,
            &limits,
            ActiveSource::Database,
            2 + r,
            &snapshot.load(),
        );
        snapshot.store(Arc::new(next));
    }
    let reload = point();
    // mimalloc returns freed pages to the OS after a delay, from later allocator
    // calls: give it both, as the next requests would in a running router.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..100 {
        let v: Vec<Vec<u8>> = (0..1000).map(|i| vec![0u8; 16 + i % 512]).collect();
        std::hint::black_box(v);
    }
    let settled = point();
    std::hint::black_box((&snapshot, &rt));

    Measurement {
        extensions: n,
        baseline,
        dataset: dataset_point,
        snapshot: after_snapshot,
        entries: after_entries,
        full,
        reload,
        settled,
        peak_rss: peak_rss(),
        entries_seconds,
        fill_seconds,
    }
}
