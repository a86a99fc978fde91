//! Per-extension health: lifetime success/failure counts and last times, and over a
//! sliding window the success rate and true latency quantiles.
//!
//! The window is a ring of [`SLOTS`] HDR histograms, each covering
//! `window / SLOTS`; a quantile merges the live slots. Histograms count in units of
//! 10 µs with one significant digit (≤ 6.25 % relative error), a compromise that keeps
//! a full window near 5 KiB per extension, so 10 000 extensions fit DESIGN.md's P7
//! memory goal. Recording takes only the extension's own lock (never a global one),
//! and the lifetime counters are plain atomics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Slots in the sliding window.
pub const SLOTS: usize = 4;
/// Histogram unit: 10 µs.
const UNIT_US: u64 = 10;
/// Largest latency recorded exactly: 60 s (longer ones are clamped).
const MAX_UNITS: u64 = 6_000_000;

struct Slot {
    epoch: u64,
    ok: u64,
    fail: u64,
    hist: Histogram<u32>,
}

/// Health of one extension.
pub struct Health {
    origin: Instant,
    slot_width: Duration,
    slots: Mutex<Vec<Slot>>,
    success_total: AtomicU64,
    failure_total: AtomicU64,
    last_success_ms: AtomicI64,
    last_failure_ms: AtomicI64,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("success_total", &self.success_total)
            .field("failure_total", &self.failure_total)
            .finish()
    }
}

/// Health as reported (`health get`), field names as the runbook prints them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthSnapshot {
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    pub success_count: u64,
    pub failure_count: u64,
    /// Over the window; 1.0 when the window is empty (no news is not bad news).
    pub success_rate: f64,
    pub window_calls: u64,
    pub avg_latency_ms: f64,
    pub p50_latency_ms: f64,
    pub p95_latency_ms: f64,
    pub p99_latency_ms: f64,
}

fn new_hist() -> Histogram<u32> {
    // Bounds are constants within the crate's accepted range.
    Histogram::new_with_bounds(1, MAX_UNITS, 1).expect("valid histogram bounds")
}

impl Health {
    pub fn new(window: Duration) -> Health {
        let slot_width = (window / SLOTS as u32).max(Duration::from_millis(1));
        Health {
            origin: Instant::now(),
            slot_width,
            slots: Mutex::new(Vec::new()),
            success_total: AtomicU64::new(0),
            failure_total: AtomicU64::new(0),
            last_success_ms: AtomicI64::new(i64::MIN),
            last_failure_ms: AtomicI64::new(i64::MIN),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.slot_width.as_nanos().max(1))
            as u64
    }

    /// Records one call's outcome and latency.
    pub fn record(&self, now: Instant, latency: Duration, success: bool) {
        let wall = Utc::now().timestamp_millis();
        if success {
            self.success_total.fetch_add(1, Ordering::Relaxed);
            self.last_success_ms.store(wall, Ordering::Relaxed);
        } else {
            self.failure_total.fetch_add(1, Ordering::Relaxed);
            self.last_failure_ms.store(wall, Ordering::Relaxed);
        }
        let units = (latency.as_micros() as u64 / UNIT_US).clamp(1, MAX_UNITS);
        let epoch = self.epoch(now);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.is_empty() {
            slots.extend((0..SLOTS).map(|_| Slot {
                epoch: u64::MAX,
                ok: 0,
                fail: 0,
                hist: new_hist(),
            }));
        }
        let slot = &mut slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.ok = 0;
            slot.fail = 0;
            slot.hist.reset();
        }
        if success {
            slot.ok += 1;
        } else {
            slot.fail += 1;
        }
        slot.hist.saturating_record(units);
    }

    /// Lifetime counters restored from `extension_health` at start.
    pub fn restore_counts(&self, success: u64, failure: u64) {
        self.success_total.fetch_max(success, Ordering::Relaxed);
        self.failure_total.fetch_max(failure, Ordering::Relaxed);
    }

    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let epoch = self.epoch(now);
        let mut merged = new_hist();
        let (mut ok, mut fail) = (0u64, 0u64);
        {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            for s in slots.iter() {
                if s.epoch != u64::MAX && s.epoch + (SLOTS as u64) > epoch && s.epoch <= epoch {
                    ok += s.ok;
                    fail += s.fail;
                    // Same bounds on both sides: add cannot fail.
                    let _ = merged.add(&s.hist);
                }
            }
        }
        let calls = ok + fail;
        let ms = |units: u64| units as f64 * UNIT_US as f64 / 1000.0;
        let q = |p: f64| {
            if calls == 0 {
                0.0
            } else {
                ms(merged.value_at_quantile(p))
            }
        };
        let to_time = |v: i64| {
            (v != i64::MIN)
                .then(|| Utc.timestamp_millis_opt(v).single())
                .flatten()
        };
        HealthSnapshot {
            last_success: to_time(self.last_success_ms.load(Ordering::Relaxed)),
            last_failure: to_time(self.last_failure_ms.load(Ordering::Relaxed)),
            success_count: self.success_total.load(Ordering::Relaxed),
            failure_count: self.failure_total.load(Ordering::Relaxed),
            success_rate: if calls == 0 {
                1.0
            } else {
                ok as f64 / calls as f64
            },
            window_calls: calls,
            avg_latency_ms: if calls == 0 {
                0.0
            } else {
                merged.mean() * UNIT_US as f64 / 1000.0
            },
            p50_latency_ms: q(0.50),
            p95_latency_ms: q(0.95),
            p99_latency_ms: q(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_real_quantiles() {
        let h = Health::new(Duration::from_secs(60));
        let t = Instant::now();
        for ms in 1..=100u64 {
            h.record(t, Duration::from_millis(ms), true);
        }
        let s = h.snapshot(t);
        let close = |a: f64, b: f64| (a - b).abs() / b <= 0.07;
        assert!(close(s.p50_latency_ms, 50.0), "{s:?}");
        assert!(close(s.p95_latency_ms, 95.0), "{s:?}");
        assert!(close(s.p99_latency_ms, 99.0), "{s:?}");
        assert!(close(s.avg_latency_ms, 50.5), "{s:?}");
        assert_eq!((s.success_count, s.success_rate), (100, 1.0));
    }

    #[test]
    fn the_window_slides_but_lifetime_counts_stay() {
        let h = Health::new(Duration::from_secs(60));
        let t = Instant::now();
        for _ in 0..10 {
            h.record(t, Duration::from_millis(500), false);
        }
        let later = t + Duration::from_secs(61);
        h.record(later, Duration::from_millis(5), true);
        let s = h.snapshot(later);
        assert_eq!((s.success_count, s.failure_count), (1, 10));
        assert_eq!(s.window_calls, 1);
        assert_eq!(s.success_rate, 1.0);
        assert!(s.p99_latency_ms < 6.0, "{s:?}");
        assert!(s.last_failure.is_some() && s.last_success.is_some());
    }

    #[test]
    fn an_empty_window_reports_no_latency_and_full_success() {
        let h = Health::new(Duration::from_secs(60));
        let s = h.snapshot(Instant::now());
        assert_eq!(
            (s.window_calls, s.success_rate, s.p95_latency_ms),
            (0, 1.0, 0.0)
        );
        assert!(s.last_success.is_none());
    }
}
