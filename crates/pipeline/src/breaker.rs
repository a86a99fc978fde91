//! Circuit breakers, one per extension (and one per instance for load balancing).
//!
//! Closed → Open after `failure_threshold` consecutive failures, or when the error rate
//! over a sliding window of `window_seconds` (in at most [`MAX_BUCKETS`] ticks) reaches `error_rate_threshold` once the
//! window holds `min_calls` calls. Open refuses every call without touching NATS until
//! `timeout_seconds` pass; then up to `half_open_max_requests` probes go through: the
//! first success closes the breaker (and clears the window), a failure re-opens it.
//!
//! Unlike the original, nothing is counted cumulatively: failures older than the window
//! are forgotten, and a success resets the consecutive count. Time is passed in
//! (`now: Instant`) so tests drive every transition without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Breaker tuning; `[circuit_breaker]` in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Whether breakers are used at all.
    pub enabled: bool,
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// Error rate over the window that opens the breaker (0 < x ≤ 1).
    pub error_rate_threshold: f64,
    /// Calls the window must hold before the error rate counts.
    pub min_calls: u32,
    /// Length of the sliding window, seconds.
    pub window_seconds: u64,
    /// How long the breaker stays open before probing, seconds.
    pub timeout_seconds: u64,
    /// Probes allowed at once while half-open.
    pub half_open_max_requests: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 5,
            error_rate_threshold: 0.5,
            min_calls: 20,
            window_seconds: 60,
            timeout_seconds: 60,
            half_open_max_requests: 3,
        }
    }
}

impl BreakerConfig {
    /// This configuration with a policy's overrides applied.
    pub fn with_overrides(&self, o: &beamline_model::policy::BreakerOverrides) -> BreakerConfig {
        BreakerConfig {
            enabled: o.enabled.unwrap_or(self.enabled),
            failure_threshold: o.failure_threshold.unwrap_or(self.failure_threshold),
            error_rate_threshold: o.error_rate_threshold.unwrap_or(self.error_rate_threshold),
            min_calls: o.min_calls.unwrap_or(self.min_calls),
            window_seconds: o.window_seconds.unwrap_or(self.window_seconds),
            timeout_seconds: o.timeout_seconds.unwrap_or(self.timeout_seconds),
            half_open_max_requests: o
                .half_open_max_requests
                .unwrap_or(self.half_open_max_requests),
        }
    }

    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.failure_threshold == 0 {
            return Err(("failure_threshold".into(), "must be at least 1".into()));
        }
        if !(self.error_rate_threshold > 0.0 && self.error_rate_threshold <= 1.0) {
            return Err((
                "error_rate_threshold".into(),
                format!("{} is out of range (0, 1]", self.error_rate_threshold),
            ));
        }
        for (k, v) in [
            ("window_seconds", self.window_seconds),
            ("timeout_seconds", self.timeout_seconds),
            (
                "half_open_max_requests",
                u64::from(self.half_open_max_requests),
            ),
        ] {
            if v == 0 {
                return Err((k.into(), "must be at least 1".into()));
            }
        }
        if self.window_seconds > 3600 {
            return Err(("window_seconds".into(), "must be at most 3600".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The gauge value of the runbook's dashboard: closed 0, half_open 1, open 2.
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// A state change, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

/// What a breaker shows operators.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub opened_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub window_calls: u64,
    pub window_failures: u64,
    pub opened_total: u64,
}

/// Outcomes of one tick (a slice of the window, see [`MAX_BUCKETS`]). Ticks count
/// from the breaker's creation; a `u32` lasts over a century and keeps a bucket at
/// 12 bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    tick: u32,
    ok: u32,
    fail: u32,
}

/// Most buckets a window is divided into. The default 60 s window slides in 3 s
/// ticks: an outcome leaves the window between 57 and 60 s after it happened. Finer
/// ticks buy little precision for the memory: two breakers per extension with 60
/// one-second buckets were a third of the router's memory at 10 000 extensions.
pub const MAX_BUCKETS: u64 = 20;

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    opened_at: Option<Instant>,
    opened_at_wall: Option<DateTime<Utc>>,
    consecutive_failures: u32,
    half_open_in_flight: u32,
    buckets: Vec<Bucket>,
}

/// One circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    /// Ticks are counted from here, so buckets are plain integers.
    origin: Instant,
    /// Length of one tick (one bucket), seconds.
    tick_seconds: u64,
    inner: Mutex<Inner>,
    opened_total: AtomicU64,
}

/// Whether a call may go ahead, and as what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: a normal call.
    Normal,
    /// Half-open: one of the limited probes.
    Probe,
}

/// Proof that a call was admitted; report its outcome with [`Permit::record`]. A
/// permit dropped without an outcome (a cancelled call) frees its probe slot and
/// counts as neither success nor failure.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    admission: Admission,
    done: bool,
}

impl Permit {
    pub fn admission(&self) -> Admission {
        self.admission
    }

    /// Records the outcome; returns the state change it caused, if any.
    pub fn record(mut self, success: bool, now: Instant) -> Option<Transition> {
        self.done = true;
        self.breaker.record(self.admission, success, now)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done && self.admission == Admission::Probe {
            let mut inner = self.breaker.lock();
            inner.half_open_in_flight = inner.half_open_in_flight.saturating_sub(1);
        }
    }
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Arc<Breaker> {
        Arc::new(Breaker::build(config))
    }

    /// A breaker not yet shared (for maps that hand out `Arc`s themselves).
    pub fn build(config: BreakerConfig) -> Breaker {
        let window = config.window_seconds.max(1);
        let tick_seconds = window.div_ceil(MAX_BUCKETS);
        let slots = window.div_ceil(tick_seconds) as usize;
        Breaker {
            origin: Instant::now(),
            tick_seconds,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                opened_at: None,
                opened_at_wall: None,
                consecutive_failures: 0,
                half_open_in_flight: 0,
                buckets: vec![Bucket::default(); slots],
            }),
            opened_total: AtomicU64::new(0),
            config,
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves Inner consistent before anything that could panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self, now: Instant) -> u32 {
        let seconds = now.saturating_duration_since(self.origin).as_secs();
        u32::try_from(seconds / self.tick_seconds).unwrap_or(u32::MAX)
    }

    /// Asks to make a call. `Err(transition)` means refused; the transition is set when
    /// this call moved the breaker (never, for a refusal; kept for symmetry).
    pub fn try_acquire(
        self: &Arc<Self>,
        now: Instant,
    ) -> Result<(Permit, Option<Transition>), Refused> {
        if !self.config.enabled {
            return Ok((self.permit(Admission::Normal), None));
        }
        let mut inner = self.lock();
        let mut transition = None;
        if inner.state == BreakerState::Open {
            let opened = inner.opened_at.unwrap_or(now);
            if now.saturating_duration_since(opened)
                < Duration::from_secs(self.config.timeout_seconds)
            {
                return Err(Refused);
            }
            inner.state = BreakerState::HalfOpen;
            inner.half_open_in_flight = 0;
            transition = Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen,
            });
        }
        match inner.state {
            BreakerState::Closed => Ok((self.permit(Admission::Normal), transition)),
            BreakerState::HalfOpen => {
                if inner.half_open_in_flight >= self.config.half_open_max_requests {
                    return Err(Refused);
                }
                inner.half_open_in_flight += 1;
                Ok((self.permit(Admission::Probe), transition))
            }
            BreakerState::Open => Err(Refused),
        }
    }

    fn permit(self: &Arc<Self>, admission: Admission) -> Permit {
        Permit {
            breaker: self.clone(),
            admission,
            done: false,
        }
    }

    /// Whether a call would be refused right now, without taking a probe slot.
    pub fn is_refusing(&self, now: Instant) -> bool {
        if !self.config.enabled {
            return false;
        }
        let inner = self.lock();
        match inner.state {
            BreakerState::Closed => false,
            BreakerState::Open => {
                let opened = inner.opened_at.unwrap_or(now);
                now.saturating_duration_since(opened)
                    < Duration::from_secs(self.config.timeout_seconds)
            }
            BreakerState::HalfOpen => {
                inner.half_open_in_flight >= self.config.half_open_max_requests
            }
        }
    }

    fn record(&self, admission: Admission, success: bool, now: Instant) -> Option<Transition> {
        if !self.config.enabled {
            return None;
        }
        let tick = self.tick(now);
        let mut inner = self.lock();
        let slots = inner.buckets.len() as u32;
        let bucket = &mut inner.buckets[(tick % slots) as usize];
        if bucket.tick != tick {
            *bucket = Bucket {
                tick,
                ok: 0,
                fail: 0,
            };
        }
        if success {
            bucket.ok = bucket.ok.saturating_add(1);
        } else {
            bucket.fail = bucket.fail.saturating_add(1);
        }
        match (inner.state, admission) {
            (BreakerState::HalfOpen, Admission::Probe) => {
                inner.half_open_in_flight = inner.half_open_in_flight.saturating_sub(1);
                if success {
                    self.close(&mut inner);
                    Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Closed,
                    })
                } else {
                    self.open(&mut inner, now);
                    Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Open,
                    })
                }
            }
            (BreakerState::Closed, _) => {
                if success {
                    inner.consecutive_failures = 0;
                    return None;
                }
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                let (calls, failures) = window_totals(&inner.buckets, tick, slots);
                let rate_trips = calls >= u64::from(self.config.min_calls)
                    && calls > 0
                    && failures as f64 / calls as f64 >= self.config.error_rate_threshold;
                if inner.consecutive_failures >= self.config.failure_threshold || rate_trips {
                    self.open(&mut inner, now);
                    Some(Transition {
                        from: BreakerState::Closed,
                        to: BreakerState::Open,
                    })
                } else {
                    None
                }
            }
            // A late result of a call admitted before the breaker changed state: it is
            // in the window, but it does not move the breaker.
            _ => None,
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        inner.state = BreakerState::Open;
        inner.opened_at = Some(now);
        inner.opened_at_wall = Some(Utc::now());
        inner.half_open_in_flight = 0;
        self.opened_total.fetch_add(1, Ordering::Relaxed);
    }

    fn close(&self, inner: &mut Inner) {
        inner.state = BreakerState::Closed;
        inner.opened_at = None;
        inner.opened_at_wall = None;
        inner.consecutive_failures = 0;
        inner.half_open_in_flight = 0;
        for b in &mut inner.buckets {
            *b = Bucket::default();
        }
    }

    /// Operator reset (`breaker reset`, or the runbook's SQL): closed, window cleared.
    pub fn reset(&self) -> Option<Transition> {
        let mut inner = self.lock();
        let from = inner.state;
        self.close(&mut inner);
        (from != BreakerState::Closed).then_some(Transition {
            from,
            to: BreakerState::Closed,
        })
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let inner = self.lock();
        let slots = inner.buckets.len() as u32;
        let (calls, failures) = window_totals(&inner.buckets, self.tick(now), slots);
        BreakerSnapshot {
            state: inner.state,
            opened_at: inner.opened_at_wall,
            consecutive_failures: inner.consecutive_failures,
            window_calls: calls,
            window_failures: failures,
            opened_total: self.opened_total.load(Ordering::Relaxed),
        }
    }

    pub fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }
}

/// Calls and failures in the buckets of the last `slots` ticks.
fn window_totals(buckets: &[Bucket], tick: u32, slots: u32) -> (u64, u64) {
    buckets
        .iter()
        .filter(|b| {
            u64::from(b.tick) + u64::from(slots) > u64::from(tick)
                && b.tick <= tick
                && (b.ok > 0 || b.fail > 0)
        })
        .fold((0, 0), |(c, f), b| {
            (
                c + u64::from(b.ok) + u64::from(b.fail),
                f + u64::from(b.fail),
            )
        })
}

/// A call refused by an open breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            min_calls: 10,
            ..BreakerConfig::default()
        }
    }

    fn call(b: &Arc<Breaker>, now: Instant, success: bool) -> Result<Option<Transition>, Refused> {
        let (permit, t1) = b.try_acquire(now)?;
        let t2 = permit.record(success, now);
        Ok(t2.or(t1))
    }

    #[test]
    fn a_window_is_at_most_twenty_buckets_and_still_slides_whole() {
        for (window, buckets) in [(1, 1), (10, 10), (60, 20), (61, 16), (3600, 20)] {
            let b = Breaker::new(BreakerConfig {
                window_seconds: window,
                ..cfg()
            });
            assert_eq!(b.lock().buckets.len(), buckets, "window {window} s");
        }
        let b = Breaker::new(BreakerConfig {
            window_seconds: 3600,
            ..cfg()
        });
        let t0 = Instant::now();
        call(&b, t0, true).unwrap();
        call(&b, t0 + Duration::from_secs(1800), true).unwrap();
        assert_eq!(
            b.snapshot(t0 + Duration::from_secs(3599)).window_calls,
            2,
            "both calls are within the hour"
        );
        assert_eq!(
            b.snapshot(t0 + Duration::from_secs(3600)).window_calls,
            1,
            "the first call left the window after an hour"
        );
        assert_eq!(b.snapshot(t0 + Duration::from_secs(5400)).window_calls, 0);
    }

    #[test]
    fn five_consecutive_failures_open_and_a_success_resets_the_count() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        for _ in 0..4 {
            call(&b, t0, false).unwrap();
        }
        call(&b, t0, true).unwrap();
        for _ in 0..4 {
            assert_eq!(call(&b, t0, false).unwrap(), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        let t = call(&b, t0, false).unwrap();
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            })
        );
        assert_eq!(call(&b, t0, true), Err(Refused));
        assert_eq!(b.opened_total(), 1);
    }

    #[test]
    fn error_rate_opens_once_min_calls_are_in_the_window() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        // Alternate, starting with a failure: never 5 in a row, but 5 of 9 fail.
        for i in 0..9 {
            call(&b, t0, i % 2 == 1).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed, "9 calls < min_calls");
        call(&b, t0, true).unwrap();
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "rate trips only on a failure"
        );
        call(&b, t0, false).unwrap();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn old_failures_leave_the_window() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        for i in 0..20 {
            let _ = call(&b, t0, i % 3 == 0); // ~66 % errors, never 5 in a row
        }
        // A success every third call: never 5 consecutive; the rate would trip…
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "rate ≥ 50 % with ≥ 10 calls trips"
        );
        let b = Breaker::new(cfg());
        for i in 0..9 {
            call(&b, t0, i % 2 == 0).unwrap();
        }
        // …but a minute later those calls are gone: one failure does not trip.
        let later = t0 + Duration::from_secs(61);
        call(&b, later, true).unwrap();
        call(&b, later, false).unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot(later).window_calls, 2);
    }

    #[test]
    fn open_then_half_open_probes_then_closed() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        for _ in 0..5 {
            call(&b, t0, false).unwrap();
        }
        assert_eq!(
            b.try_acquire(t0 + Duration::from_secs(59)).err(),
            Some(Refused)
        );
        let t1 = t0 + Duration::from_secs(60);
        let (p1, tr) = b.try_acquire(t1).unwrap();
        assert_eq!(
            tr,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            })
        );
        assert_eq!(p1.admission(), Admission::Probe);
        let (p2, _) = b.try_acquire(t1).unwrap();
        let (p3, _) = b.try_acquire(t1).unwrap();
        assert_eq!(
            b.try_acquire(t1).err(),
            Some(Refused),
            "only 3 probes at once"
        );
        drop(p3); // cancelled: frees its slot
        let (p4, _) = b.try_acquire(t1).unwrap();
        assert_eq!(
            p1.record(true, t1),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        assert_eq!(b.state(), BreakerState::Closed);
        // Late probe results do not move a closed breaker.
        assert_eq!(p2.record(false, t1), None);
        drop(p4);
        assert_eq!(b.snapshot(t1).consecutive_failures, 1);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_timeout() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        for _ in 0..5 {
            call(&b, t0, false).unwrap();
        }
        let t1 = t0 + Duration::from_secs(60);
        let t = call(&b, t1, false).unwrap();
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Open
            })
        );
        assert_eq!(
            b.try_acquire(t1 + Duration::from_secs(30)).err(),
            Some(Refused)
        );
        assert!(b.try_acquire(t1 + Duration::from_secs(60)).is_ok());
        assert_eq!(b.opened_total(), 2);
    }

    #[test]
    fn reset_closes_and_disabled_never_refuses() {
        let b = Breaker::new(cfg());
        let t0 = Instant::now();
        for _ in 0..5 {
            call(&b, t0, false).unwrap();
        }
        assert!(b.is_refusing(t0));
        assert_eq!(b.reset().map(|t| t.to), Some(BreakerState::Closed));
        assert!(call(&b, t0, true).is_ok());
        let off = Breaker::new(BreakerConfig {
            enabled: false,
            ..cfg()
        });
        for _ in 0..50 {
            call(&off, t0, false).unwrap();
        }
        assert_eq!(off.state(), BreakerState::Closed);
    }
}
