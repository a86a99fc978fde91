//! Per-extension health: lifetime success/failure counts and last times, and over a
//! sliding window the success rate and true latency quantiles.
//!
//! The window is a ring of [`SLOTS`] latency histograms, each covering
//! `window / SLOTS`; a quantile merges the live slots. A histogram counts in units of
//! 10 µs in log-linear buckets, 16 per power of two (≤ 6.25 % relative error, the
//! precision of an HDR histogram with one significant digit), up to 60 s. Its counts
//! are stored sparsely (4 bytes per bucket in use) until that would cost more than a
//! dense array: an extension's latencies usually span a few powers of two, so a full
//! window costs about 1 KiB rather than the 5 KiB a dense histogram needs — what lets
//! 10 000 extensions fit DESIGN.md's P7 memory goal. Recording takes only the
//! extension's own lock (never a global one), and the lifetime counters are plain
//! atomics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

/// Slots in the sliding window.
pub const SLOTS: usize = 4;
/// Histogram unit: 10 µs.
const UNIT_US: u64 = 10;
/// Largest latency recorded exactly: 60 s (longer ones are clamped).
const MAX_UNITS: u64 = 6_000_000;
/// Buckets: 32 exact ones below 32 units, then 16 per power of two up to MAX_UNITS.
const BUCKETS: usize = bucket_of(MAX_UNITS) + 1;

/// The bucket of a value in units (1..=MAX_UNITS).
#[inline]
const fn bucket_of(units: u64) -> usize {
    if units < 32 {
        return units as usize;
    }
    let msb = 63 - units.leading_zeros() as usize; // ≥ 5
    let shift = msb - 4;
    32 + (msb - 5) * 16 + ((units >> shift) as usize - 16)
}

/// The largest value (units) that falls in `bucket`.
#[inline]
fn bucket_top(bucket: usize) -> u64 {
    if bucket < 32 {
        return bucket as u64;
    }
    let octave = (bucket - 32) / 16;
    let sub = ((bucket - 32) % 16) as u64;
    ((16 + sub + 1) << (octave + 1)) - 1
}

/// Sparse entries pack the bucket (9 bits) above the count (23 bits).
const COUNT_BITS: u32 = 23;
const COUNT_MAX: u32 = (1 << COUNT_BITS) - 1;
/// Past this many buckets in use, a dense array is smaller (and faster to record).
const SPARSE_MAX: usize = BUCKETS / 4;

/// Counts per bucket: sparse (sorted packed entries) while few buckets are in use,
/// dense afterwards.
#[derive(Debug)]
enum Counts {
    Sparse(Vec<u32>),
    Dense(Box<[u32; BUCKETS]>),
}

impl Counts {
    fn record(&mut self, bucket: usize) {
        match self {
            Counts::Dense(d) => d[bucket] = d[bucket].saturating_add(1),
            Counts::Sparse(v) => {
                let key = (bucket as u32) << COUNT_BITS;
                match v.binary_search_by(|e| (e & !COUNT_MAX).cmp(&key)) {
                    Ok(i) if v[i] & COUNT_MAX < COUNT_MAX => v[i] += 1,
                    Ok(_) => {
                        self.densify();
                        self.record(bucket);
                    }
                    Err(_) if v.len() >= SPARSE_MAX => {
                        self.densify();
                        self.record(bucket);
                    }
                    Err(i) => {
                        if v.len() == v.capacity() {
                            v.reserve_exact(8);
                        }
                        v.insert(i, key | 1);
                    }
                }
            }
        }
    }

    fn densify(&mut self) {
        if let Counts::Sparse(v) = self {
            let mut d = Box::new([0u32; BUCKETS]);
            for e in v.iter() {
                d[(e >> COUNT_BITS) as usize] = e & COUNT_MAX;
            }
            *self = Counts::Dense(d);
        }
    }

    fn clear(&mut self) {
        // Back to sparse: a burst of odd latencies should not cost a dense array for
        // the rest of the extension's life.
        *self = Counts::Sparse(Vec::new());
    }

    /// Every bucket in use with its count, in bucket order.
    fn each(&self, mut f: impl FnMut(usize, u64)) {
        match self {
            Counts::Dense(d) => {
                for (b, c) in d.iter().enumerate() {
                    if *c > 0 {
                        f(b, u64::from(*c));
                    }
                }
            }
            Counts::Sparse(v) => {
                for e in v {
                    f((e >> COUNT_BITS) as usize, u64::from(e & COUNT_MAX));
                }
            }
        }
    }

    fn add_to(&self, merged: &mut [u64; BUCKETS]) {
        match self {
            Counts::Dense(d) => {
                for (m, c) in merged.iter_mut().zip(d.iter()) {
                    *m += u64::from(*c);
                }
            }
            Counts::Sparse(v) => {
                for e in v {
                    merged[(e >> COUNT_BITS) as usize] += u64::from(e & COUNT_MAX);
                }
            }
        }
    }
}

struct Slot {
    epoch: u64,
    ok: u64,
    fail: u64,
    /// Sum of the recorded latencies, µs: the mean is exact, not a bucket estimate.
    sum_us: u64,
    counts: Counts,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            epoch: u64::MAX,
            ok: 0,
            fail: 0,
            sum_us: 0,
            counts: Counts::Sparse(Vec::new()),
        }
    }
}

/// Health of one extension.
pub struct Health {
    origin: Instant,
    slot_width: Duration,
    /// Allocated on the first call: an extension never called costs no window.
    slots: Mutex<Option<Box<[Slot; SLOTS]>>>,
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

impl Health {
    pub fn new(window: Duration) -> Health {
        let slot_width = (window / SLOTS as u32).max(Duration::from_millis(1));
        Health {
            origin: Instant::now(),
            slot_width,
            slots: Mutex::new(None),
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
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let units = (micros / UNIT_US).clamp(1, MAX_UNITS);
        let epoch = self.epoch(now);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slots = slots.get_or_insert_with(|| Box::new(std::array::from_fn(|_| Slot::empty())));
        let slot = &mut slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.ok = 0;
            slot.fail = 0;
            slot.sum_us = 0;
            slot.counts.clear();
        }
        if success {
            slot.ok += 1;
        } else {
            slot.fail += 1;
        }
        slot.sum_us = slot.sum_us.saturating_add(micros.min(MAX_UNITS * UNIT_US));
        slot.counts.record(bucket_of(units));
    }

    /// Lifetime counters restored from `extension_health` at start.
    pub fn restore_counts(&self, success: u64, failure: u64) {
        self.success_total.fetch_max(success, Ordering::Relaxed);
        self.failure_total.fetch_max(failure, Ordering::Relaxed);
    }

    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let epoch = self.epoch(now);
        let mut merged = [0u64; BUCKETS];
        let (mut ok, mut fail, mut sum_us) = (0u64, 0u64, 0u64);
        {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            for s in slots.iter().flat_map(|s| s.iter()) {
                if s.epoch != u64::MAX && s.epoch + (SLOTS as u64) > epoch && s.epoch <= epoch {
                    ok += s.ok;
                    fail += s.fail;
                    sum_us = sum_us.saturating_add(s.sum_us);
                    s.counts.add_to(&mut merged);
                }
            }
        }
        let calls = ok + fail;
        let ms = |units: u64| units as f64 * UNIT_US as f64 / 1000.0;
        // The value at quantile p: the top of the bucket holding the ceil(p·n)-th call.
        let q = |p: f64| {
            if calls == 0 {
                return 0.0;
            }
            let rank = ((p * calls as f64).ceil() as u64).clamp(1, calls);
            let mut seen = 0u64;
            for (bucket, count) in merged.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return ms(bucket_top(bucket));
                }
            }
            ms(MAX_UNITS)
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
                sum_us as f64 / calls as f64 / 1000.0
            },
            p50_latency_ms: q(0.50),
            p95_latency_ms: q(0.95),
            p99_latency_ms: q(0.99),
        }
    }
}

/// Calls to one version of an extension since the last [`VersionDeltas::take`]:
/// what a router reports to `extension_version_health` for the canary judge, which
/// sums every router's reports. The latency histogram is the health window's (same
/// buckets, ≤ 6.25 % error), reported as bucket upper bounds in microseconds so
/// reports merge exactly.
#[derive(Debug)]
pub struct VersionDeltas {
    calls: u64,
    errors: u64,
    counts: Counts,
    breaker_opened: u64,
}

/// What [`VersionDeltas::take`] hands over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionDelta {
    pub calls: u64,
    pub errors: u64,
    /// (bucket upper bound in µs, calls), in increasing order.
    pub latency_us: Vec<(u64, u64)>,
    pub breaker_opened: u64,
}

impl Default for VersionDeltas {
    fn default() -> Self {
        VersionDeltas {
            calls: 0,
            errors: 0,
            counts: Counts::Sparse(Vec::new()),
            breaker_opened: 0,
        }
    }
}

impl VersionDeltas {
    pub fn record(&mut self, latency: Duration, success: bool) {
        self.calls += 1;
        if !success {
            self.errors += 1;
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.counts
            .record(bucket_of((micros / UNIT_US).clamp(1, MAX_UNITS)));
    }

    /// The version's breaker opened.
    pub fn breaker_opened(&mut self) {
        self.breaker_opened += 1;
    }

    /// What happened since the last take (`None` if nothing), and a fresh start.
    pub fn take(&mut self) -> Option<VersionDelta> {
        if self.calls == 0 && self.breaker_opened == 0 {
            return None;
        }
        let mut latency_us = Vec::new();
        self.counts
            .each(|b, c| latency_us.push((bucket_top(b) * UNIT_US, c)));
        let out = VersionDelta {
            calls: self.calls,
            errors: self.errors,
            latency_us,
            breaker_opened: self.breaker_opened,
        };
        *self = VersionDeltas::default();
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_deltas_hand_over_what_happened_since_the_last_take() {
        let mut d = VersionDeltas::default();
        assert_eq!(d.take(), None);
        for i in 0..10u64 {
            d.record(Duration::from_millis(2), i % 5 != 0);
        }
        d.record(Duration::from_millis(40), true);
        d.breaker_opened();
        let t = d.take().unwrap();
        assert_eq!((t.calls, t.errors, t.breaker_opened), (11, 2, 1));
        assert_eq!(t.latency_us.iter().map(|(_, c)| c).sum::<u64>(), 11);
        // Upper bounds within the bucket error of what was recorded.
        let (first, n) = t.latency_us[0];
        assert_eq!(n, 10);
        assert!((2000..=2125).contains(&first), "{first}");
        let (last, _) = t.latency_us[1];
        assert!((40_000..=42_500).contains(&last), "{last}");
        assert_eq!(d.take(), None, "taken means gone");
    }

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
    fn buckets_cover_the_range_in_order_within_the_error_bound() {
        let mut last = 0;
        for units in 1..=MAX_UNITS {
            let b = bucket_of(units);
            assert!(b < BUCKETS, "{units} → {b}");
            assert!(b == last || b == last + 1, "{units}: {last} → {b}");
            let top = bucket_top(b);
            assert!(top >= units, "{units} above its bucket's top {top}");
            assert!(
                (top - units) as f64 <= units as f64 / 16.0,
                "{units}: top {top} more than 6.25 % above"
            );
            last = b;
        }
        assert_eq!(bucket_of(MAX_UNITS), BUCKETS - 1);
    }

    #[test]
    fn sparse_and_dense_counts_agree() {
        // Same calls, one histogram staying sparse, one forced dense at once.
        let mut sparse = Counts::Sparse(Vec::new());
        let mut dense = Counts::Sparse(Vec::new());
        dense.densify();
        let values: Vec<u64> = (0..2000u64).map(|i| 1 + (i * 7919) % 5000).collect();
        for &v in &values {
            sparse.record(bucket_of(v));
            dense.record(bucket_of(v));
        }
        assert!(
            matches!(sparse, Counts::Dense(_)),
            "many buckets make it dense"
        );
        let (mut a, mut b) = ([0u64; BUCKETS], [0u64; BUCKETS]);
        sparse.add_to(&mut a);
        dense.add_to(&mut b);
        assert_eq!(a, b);
        assert_eq!(a.iter().sum::<u64>(), values.len() as u64);

        let mut few = Counts::Sparse(Vec::new());
        for v in [5u64, 900, 5, 40_000, 900, 5] {
            few.record(bucket_of(v));
        }
        match &few {
            Counts::Sparse(v) => assert_eq!(v.len(), 3),
            Counts::Dense(_) => panic!("three buckets should stay sparse"),
        }
        let mut m = [0u64; BUCKETS];
        few.add_to(&mut m);
        assert_eq!(
            (m[bucket_of(5)], m[bucket_of(900)], m[bucket_of(40_000)]),
            (3, 2, 1)
        );
    }

    #[test]
    fn a_slow_tail_shows_in_p99_but_not_p50() {
        let h = Health::new(Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..1000u64 {
            let latency = if i % 100 == 0 {
                Duration::from_secs(2)
            } else {
                Duration::from_micros(800 + i % 50)
            };
            h.record(t, latency, true);
        }
        let s = h.snapshot(t);
        assert!(s.p50_latency_ms < 0.9, "{s:?}");
        assert!(s.p95_latency_ms < 0.9, "{s:?}");
        assert!(s.p99_latency_ms < 0.9, "exactly 1 % is slow: {s:?}");
        // Exact mean: 10 × 2 s and 990 calls near 0.8 ms.
        assert!((s.avg_latency_ms - 20.8).abs() < 0.1, "{s:?}");
        h.record(t, Duration::from_secs(2), true);
        assert!(h.snapshot(t).p99_latency_ms > 1900.0);
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
