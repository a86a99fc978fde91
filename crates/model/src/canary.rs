//! Progressive delivery (DESIGN.md §12): a rollout's plan — steps, minimum calls per
//! step, step duration, criteria — its validation, and the judgement of a candidate
//! version against its baseline over one window of calls.
//!
//! No I/O: the registry stores rollouts and sums the per-version health every router
//! reports; the pipeline's judge measures and acts; `ext canary status` shows the same
//! [`evaluate`] the judge acts on, so what an operator reads is what the judge decides.
//!
//! A step is a stable share of tenants (`25`: the 25 % of tenant ids whose
//! [`crate::routing::share_bucket`] is below 2 500, written as routing rules
//! `{"share": 25}`) or an explicit list of tenants (`{"tenants": ["a", "b"]}`, written
//! as `{"tenant_id": ["a", "b"]}`). The last step must be 100 %: passing it promotes
//! the candidate to be the extension's base record.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ValidationError;
use crate::limits::json_kind;
use crate::routing::{SHARE_BUCKETS, share_basis_points, share_json};

/// Most steps a rollout may have.
pub const MAX_STEPS: usize = 20;
/// Longest step duration (a step that waits longer is a manual rollout).
pub const MAX_STEP_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most calls a step may ask for.
pub const MAX_MIN_CALLS: u64 = 1_000_000_000;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Created; the judge has not written its first step yet.
    Pending,
    /// The judge is evaluating the current step.
    Running,
    /// Held by an operator (`ext canary pause`) or by a manual change of the
    /// candidate's routing rules; the judge leaves it alone until `resume`.
    Paused,
    /// Every step passed: the candidate is the base record.
    Promoted,
    /// A criterion failed: the candidate receives no traffic.
    RolledBack,
    /// Stopped by an operator (`ext canary abort`): the candidate receives no traffic.
    Aborted,
}

impl RolloutState {
    pub const ALL: [RolloutState; 6] = [
        RolloutState::Pending,
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Promoted,
        RolloutState::RolledBack,
        RolloutState::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Pending => "pending",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Whether the rollout is over (nothing will move it again).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutState::Promoted | RolloutState::RolledBack | RolloutState::Aborted
        )
    }

    /// The value of `router_extension_rollout_state`'s one-hot series is 1 for the
    /// current state; this code orders states for displays (0 pending … 5 aborted).
    pub fn code(self) -> i64 {
        RolloutState::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or(0) as i64
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RolloutState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RolloutState::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown rollout state '{s}'"))
    }
}

/// One step of a rollout: who the candidate serves while the step lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A stable share of tenants, in basis points (hundredths of a percent).
    Share(u32),
    /// Exactly these tenants.
    Tenants(Vec<String>),
}

impl Step {
    /// Reads `25`, `{"share": 25}` or `{"tenants": ["a", "b"]}`.
    pub fn parse(value: &Value) -> Result<Step, ValidationError> {
        match value {
            Value::Number(n) => Self::share(n.as_f64().unwrap_or(f64::NAN), ""),
            Value::Object(m) if m.len() == 1 && m.contains_key("share") => match &m["share"] {
                Value::Number(n) => Self::share(n.as_f64().unwrap_or(f64::NAN), "share"),
                other => Err(ValidationError::new(
                    "share",
                    format!("must be a percent of tenants, found {}", json_kind(other)),
                )),
            },
            Value::Object(m) if m.len() == 1 && m.contains_key("tenants") => {
                let Value::Array(items) = &m["tenants"] else {
                    return Err(ValidationError::new(
                        "tenants",
                        format!(
                            "must be a list of tenant ids, found {}",
                            json_kind(&m["tenants"])
                        ),
                    ));
                };
                if items.is_empty() {
                    return Err(ValidationError::new(
                        "tenants",
                        "must name at least one tenant",
                    ));
                }
                let mut tenants = Vec::with_capacity(items.len());
                for (i, t) in items.iter().enumerate() {
                    match t.as_str() {
                        Some(s) if !s.is_empty() && s.len() <= 255 => {
                            if !tenants.iter().any(|x: &String| x == s) {
                                tenants.push(s.to_string());
                            }
                        }
                        _ => {
                            return Err(ValidationError::new(
                                format!("tenants[{i}]"),
                                "must be a tenant id (1..=255 characters)",
                            ));
                        }
                    }
                }
                Ok(Step::Tenants(tenants))
            }
            other => Err(ValidationError::new(
                "",
                format!(
                    "a step is a percent of tenants (25), {{\"share\": 25}} or {{\"tenants\": [\"a\", \"b\"]}}, found {}",
                    json_kind(other)
                ),
            )),
        }
    }

    fn share(percent: f64, field: &str) -> Result<Step, ValidationError> {
        let bp = share_basis_points(percent).map_err(|m| ValidationError::new(field, m))?;
        if bp == 0 {
            return Err(ValidationError::new(
                field,
                "a step of 0 % routes nothing to the candidate",
            ));
        }
        Ok(Step::Share(bp))
    }

    /// The stored form: the percent, or `{"tenants": [...]}`.
    pub fn to_json(&self) -> Value {
        match self {
            Step::Share(bp) => share_json(*bp),
            Step::Tenants(t) => json!({ "tenants": t }),
        }
    }

    /// The candidate's `routing_rules` for this step.
    pub fn routing_rules(&self) -> Value {
        match self {
            Step::Share(bp) => json!({ "share": share_json(*bp) }),
            Step::Tenants(t) => json!({ "tenant_id": t }),
        }
    }

    /// The share in percent (`None` for a tenant list).
    pub fn percent(&self) -> Option<f64> {
        match self {
            Step::Share(bp) => Some(f64::from(*bp) / 100.0),
            Step::Tenants(_) => None,
        }
    }

    /// Whether this step routes every tenant.
    pub fn is_everyone(&self) -> bool {
        *self == Step::Share(SHARE_BUCKETS)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Share(bp) => write!(f, "{} % of tenants", share_json(*bp)),
            Step::Tenants(t) => write!(f, "tenants {}", t.join(", ")),
        }
    }
}

/// Reads a JSON array of steps.
pub fn parse_steps(value: &Value) -> Result<Vec<Step>, ValidationError> {
    let Value::Array(items) = value else {
        return Err(ValidationError::new(
            "steps",
            format!("must be a list of steps, found {}", json_kind(value)),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| Step::parse(v).map_err(|e| e.within(&format!("steps[{i}]"))))
        .collect()
}

/// Reads the CLI's `--steps`: `5,25,100`, or a JSON array for tenant lists
/// (`[{"tenants": ["a"]}, 25, 100]`).
pub fn parse_steps_arg(text: &str) -> Result<Vec<Step>, ValidationError> {
    let text = text.trim();
    if text.starts_with('[') {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ValidationError::new("steps", format!("is not JSON: {e}")))?;
        return parse_steps(&v);
    }
    text.split(',')
        .enumerate()
        .map(|(i, part)| {
            let part = part.trim().trim_end_matches('%').trim();
            let n: f64 = part.parse().map_err(|_| {
                ValidationError::new(
                    format!("steps[{i}]"),
                    format!("'{part}' is not a percent of tenants"),
                )
            })?;
            Step::share(n, "").map_err(|e| e.within(&format!("steps[{i}]")))
        })
        .collect()
}

/// Reads `90s`, `2m`, `1h`, `500ms` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 60s, 5m, 1h or 500ms"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("'{text}': unknown unit '{other}' (ms, s, m, h)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("'{text}' is not a duration"));
    }
    Ok(Duration::from_millis((seconds * 1000.0).round() as u64))
}

/// What the candidate must hold against the baseline, over the same window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Criteria {
    /// The candidate's error rate may exceed the baseline's by at most this (0..=1).
    pub max_error_rate_delta: f64,
    /// The candidate's p95 latency may be at most the baseline's times this (≥ 1).
    pub max_p95_ratio: f64,
    /// Roll back as soon as the candidate's breaker opens on any router.
    pub breaker_never_opened: bool,
}

impl Default for Criteria {
    fn default() -> Self {
        Criteria {
            max_error_rate_delta: 0.05,
            max_p95_ratio: 1.5,
            breaker_never_opened: true,
        }
    }
}

impl Criteria {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !(0.0..=1.0).contains(&self.max_error_rate_delta) {
            return Err(ValidationError::new(
                "max_error_rate_delta",
                format!(
                    "{} is out of range 0..=1 (a difference of error rates)",
                    self.max_error_rate_delta
                ),
            ));
        }
        if !(1.0..=100.0).contains(&self.max_p95_ratio) {
            return Err(ValidationError::new(
                "max_p95_ratio",
                format!(
                    "{} is out of range 1..=100 (candidate p95 / baseline p95)",
                    self.max_p95_ratio
                ),
            ));
        }
        Ok(())
    }
}

/// A rollout's plan, as `ext canary start` gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPlan {
    pub steps: Vec<Step>,
    /// Calls the candidate must have served in a step before it is judged.
    pub min_calls_per_step: u64,
    /// How long a step lasts at least (once its calls are in).
    pub step_duration: Duration,
    pub criteria: Criteria,
}

impl RolloutPlan {
    /// Defaults: 100 calls and 60 s per step, [`Criteria::default`].
    pub fn new(steps: Vec<Step>) -> RolloutPlan {
        RolloutPlan {
            steps,
            min_calls_per_step: 100,
            step_duration: Duration::from_secs(60),
            criteria: Criteria::default(),
        }
    }

    /// Checks the plan; the error names the field (`steps[1]`, `criteria.max_p95_ratio`).
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.steps.is_empty() {
            return Err(ValidationError::new("steps", "must have at least one step"));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(ValidationError::new(
                "steps",
                format!("{} steps: at most {MAX_STEPS}", self.steps.len()),
            ));
        }
        let mut last_share = 0;
        for (i, s) in self.steps.iter().enumerate() {
            if let Step::Share(bp) = s {
                if *bp <= last_share {
                    return Err(ValidationError::new(
                        format!("steps[{i}]"),
                        format!(
                            "shares must grow step by step: {} % after {} %",
                            share_json(*bp),
                            share_json(last_share)
                        ),
                    ));
                }
                last_share = *bp;
            }
        }
        let last = self.steps.len() - 1;
        if !self.steps[last].is_everyone() {
            return Err(ValidationError::new(
                format!("steps[{last}]"),
                "the last step must be 100 (every tenant): passing it promotes the candidate",
            ));
        }
        if !(1..=MAX_MIN_CALLS).contains(&self.min_calls_per_step) {
            return Err(ValidationError::new(
                "min_calls_per_step",
                format!(
                    "{} is out of range 1..={MAX_MIN_CALLS}",
                    self.min_calls_per_step
                ),
            ));
        }
        if self.step_duration > MAX_STEP_DURATION {
            return Err(ValidationError::new(
                "step_duration",
                format!(
                    "{} s is longer than {} s (7 days)",
                    self.step_duration.as_secs(),
                    MAX_STEP_DURATION.as_secs()
                ),
            ));
        }
        self.criteria.validate().map_err(|e| e.within("criteria"))
    }

    pub fn steps_json(&self) -> Value {
        Value::Array(self.steps.iter().map(Step::to_json).collect())
    }
}

/// Latency counts by bucket: upper bound in microseconds → calls. Routers report
/// the buckets of their own health histograms; any two reports merge by key, so the
/// sum over routers is exact whatever bucket layout each used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LatencyHistogram {
    buckets: BTreeMap<u64, u64>,
}

impl LatencyHistogram {
    pub fn add(&mut self, upper_us: u64, count: u64) {
        if count > 0 {
            *self.buckets.entry(upper_us).or_insert(0) += count;
        }
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (k, v) in &other.buckets {
            self.add(*k, *v);
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets.iter().map(|(k, v)| (*k, *v))
    }

    /// The latency at quantile `p` (0..=1) in milliseconds: the upper bound of the
    /// bucket holding the ⌈p·n⌉-th call. `None` without calls.
    pub fn quantile_ms(&self, p: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((p * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (upper, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return Some(*upper as f64 / 1000.0);
            }
        }
        self.buckets.keys().last().map(|u| *u as f64 / 1000.0)
    }

    /// From the stored JSON object (`{"1250": 3, …}`); keys that are not numbers
    /// and counts that are not whole numbers are skipped.
    pub fn from_json(value: &Value) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        if let Value::Object(m) = value {
            for (k, v) in m {
                if let (Ok(upper), Some(count)) = (k.parse::<u64>(), v.as_u64()) {
                    h.add(upper, count);
                }
            }
        }
        h
    }

    pub fn to_json(&self) -> Value {
        Value::Object(
            self.buckets
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(*v)))
                .collect(),
        )
    }
}

/// One version's calls over a window, summed over every router.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WindowStats {
    pub calls: u64,
    pub errors: u64,
    pub latency: LatencyHistogram,
    /// Times this version's breaker opened (any router).
    pub breaker_opened: u64,
}

impl WindowStats {
    pub fn error_rate(&self) -> Option<f64> {
        (self.calls > 0).then(|| self.errors as f64 / self.calls as f64)
    }

    pub fn p95_ms(&self) -> Option<f64> {
        self.latency.quantile_ms(0.95)
    }

    pub fn merge(&mut self, other: &WindowStats) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
        self.breaker_opened += other.breaker_opened;
    }
}

/// Which baseline figures a judgement compared against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineSource {
    /// The baseline's calls in the same window (it had at least the minimum calls).
    Window,
    /// Too few baseline calls now (a 100 % step leaves it none): the figures it had
    /// at the end of the last step where it had enough.
    Reference,
    /// Fewer baseline calls than the minimum and no earlier figures: compared as they are.
    Sparse,
}

/// Picks the baseline to compare with: the window if it holds `min_calls`, else the
/// reference from an earlier step, else the window as it is.
pub fn choose_baseline(
    window: WindowStats,
    reference: Option<WindowStats>,
    min_calls: u64,
) -> (WindowStats, BaselineSource) {
    if window.calls >= min_calls {
        return (window, BaselineSource::Window);
    }
    match reference {
        Some(r) if r.calls > 0 => (r, BaselineSource::Reference),
        _ => (window, BaselineSource::Sparse),
    }
}

/// What the judge measured for the current step.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The candidate since the step started.
    pub candidate: WindowStats,
    /// The baseline to compare with ([`choose_baseline`]).
    pub baseline: WindowStats,
    pub baseline_source: BaselineSource,
    /// The candidate's breaker openings since the rollout started (not only this step).
    pub candidate_breaker_opened: u64,
    /// How long the step has run.
    pub step_elapsed: Duration,
}

/// One line of `ext canary status`: a gate or criterion, measured against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CriterionResult {
    /// `min_calls`, `step_duration`, `error_rate`, `p95_latency_ms`, `breaker_never_opened`.
    pub name: &'static str,
    pub measured: Option<f64>,
    pub threshold: Option<f64>,
    /// `None` while it cannot be measured (no calls yet, no baseline latency).
    pub ok: Option<bool>,
    /// The comparison in words.
    pub detail: String,
}

/// What the judge does with a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "reason", rename_all = "snake_case")]
pub enum Decision {
    /// Keep the step: calls or duration not reached yet.
    Wait(String),
    /// Every criterion holds: on to the next step.
    Advance,
    /// The last (100 %) step passed: the candidate becomes the base record.
    Promote,
    /// A criterion failed: take the candidate out of routing now.
    RollBack(String),
}

/// The gates and criteria of one step, and the decision they lead to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    pub criteria: Vec<CriterionResult>,
    pub decision: Decision,
}

/// Slack for float comparisons of rates and ratios.
const EPSILON: f64 = 1e-9;

/// Judges step `step` of `plan` on `m`. The breaker criterion fails at once; the
/// error and latency criteria once the step holds `min_calls_per_step` candidate
/// calls; a step that holds its calls, its duration and every criterion advances (or
/// promotes, when it is the last).
pub fn evaluate(plan: &RolloutPlan, step: usize, m: &Measurement) -> Judgement {
    let c = &plan.criteria;
    let cand = &m.candidate;
    let mut criteria = Vec::with_capacity(5);
    let mut failures: Vec<String> = Vec::new();

    let enough_calls = cand.calls >= plan.min_calls_per_step;
    criteria.push(CriterionResult {
        name: "min_calls",
        measured: Some(cand.calls as f64),
        threshold: Some(plan.min_calls_per_step as f64),
        ok: Some(enough_calls),
        detail: format!(
            "{} candidate calls this step, {} needed",
            cand.calls, plan.min_calls_per_step
        ),
    });
    let elapsed = m.step_elapsed.as_secs_f64();
    let long_enough = m.step_elapsed >= plan.step_duration;
    criteria.push(CriterionResult {
        name: "step_duration",
        measured: Some(elapsed),
        threshold: Some(plan.step_duration.as_secs_f64()),
        ok: Some(long_enough),
        detail: format!(
            "step running {elapsed:.1} s of {} s",
            plan.step_duration.as_secs_f64()
        ),
    });

    let base_rate = m.baseline.error_rate().unwrap_or(0.0);
    let rate_limit = base_rate + c.max_error_rate_delta;
    let cand_rate = cand.error_rate();
    let rate_ok = cand_rate.map(|r| r <= rate_limit + EPSILON);
    criteria.push(CriterionResult {
        name: "error_rate",
        measured: cand_rate,
        threshold: Some(rate_limit),
        ok: if enough_calls { rate_ok } else { None },
        detail: match cand_rate {
            Some(r) => format!(
                "candidate {r:.4} vs baseline {base_rate:.4} + {:.4} = {rate_limit:.4}",
                c.max_error_rate_delta
            ),
            None => "no candidate calls yet".into(),
        },
    });
    if enough_calls && rate_ok == Some(false) {
        failures.push(format!(
            "error rate {:.4} > baseline {base_rate:.4} + {:.4} ({} of {} calls failed)",
            cand_rate.unwrap_or(0.0),
            c.max_error_rate_delta,
            cand.errors,
            cand.calls
        ));
    }

    let base_p95 = m.baseline.p95_ms();
    let cand_p95 = cand.p95_ms();
    let p95_limit = base_p95.map(|b| b * c.max_p95_ratio);
    let p95_ok = match (cand_p95, p95_limit) {
        (Some(x), Some(limit)) => Some(x <= limit + EPSILON),
        _ => None,
    };
    criteria.push(CriterionResult {
        name: "p95_latency_ms",
        measured: cand_p95,
        threshold: p95_limit,
        ok: if enough_calls { p95_ok } else { None },
        detail: match (cand_p95, base_p95) {
            (Some(x), Some(b)) => format!(
                "candidate {x:.3} ms vs baseline {b:.3} ms × {} = {:.3} ms",
                c.max_p95_ratio,
                b * c.max_p95_ratio
            ),
            (_, None) => "no baseline latency to compare with (not judged)".into(),
            (None, _) => "no candidate calls yet".into(),
        },
    });
    if enough_calls && p95_ok == Some(false) {
        failures.push(format!(
            "p95 latency {:.3} ms > baseline {:.3} ms × {}",
            cand_p95.unwrap_or(0.0),
            base_p95.unwrap_or(0.0),
            c.max_p95_ratio
        ));
    }

    let opened = m.candidate_breaker_opened;
    criteria.push(CriterionResult {
        name: "breaker_never_opened",
        measured: Some(opened as f64),
        threshold: Some(0.0),
        ok: c.breaker_never_opened.then_some(opened == 0),
        detail: if c.breaker_never_opened {
            format!("candidate breaker opened {opened} time(s) since the rollout started")
        } else {
            format!("not judged (criteria.breaker_never_opened = false); opened {opened} time(s)")
        },
    });
    if c.breaker_never_opened && opened > 0 {
        failures.insert(
            0,
            format!("the candidate's circuit breaker opened {opened} time(s)"),
        );
    }

    let decision = if !failures.is_empty() {
        Decision::RollBack(failures.join("; "))
    } else if !enough_calls {
        Decision::Wait(format!(
            "waiting for calls: {} of {}",
            cand.calls, plan.min_calls_per_step
        ))
    } else if !long_enough {
        Decision::Wait(format!(
            "waiting for the step duration: {elapsed:.1} s of {} s",
            plan.step_duration.as_secs_f64()
        ))
    } else if step + 1 >= plan.steps.len() {
        Decision::Promote
    } else {
        Decision::Advance
    };
    Judgement { criteria, decision }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(calls: u64, errors: u64, latency_us: u64) -> WindowStats {
        let mut latency = LatencyHistogram::default();
        latency.add(latency_us, calls);
        WindowStats {
            calls,
            errors,
            latency,
            breaker_opened: 0,
        }
    }

    fn plan() -> RolloutPlan {
        RolloutPlan {
            steps: parse_steps_arg("5,25,100").unwrap(),
            min_calls_per_step: 100,
            step_duration: Duration::from_secs(60),
            criteria: Criteria::default(),
        }
    }

    fn measure(candidate: WindowStats, baseline: WindowStats, secs: u64) -> Measurement {
        Measurement {
            candidate,
            baseline,
            baseline_source: BaselineSource::Window,
            candidate_breaker_opened: 0,
            step_elapsed: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_healthy_candidate_waits_for_calls_and_duration_then_advances_and_promotes() {
        let p = plan();
        let base = stats(1000, 10, 2000);
        let j = evaluate(&p, 0, &measure(stats(50, 0, 2000), base.clone(), 120));
        assert_eq!(
            j.decision,
            Decision::Wait("waiting for calls: 50 of 100".into())
        );
        let j = evaluate(&p, 0, &measure(stats(150, 1, 2000), base.clone(), 10));
        assert!(
            matches!(j.decision, Decision::Wait(ref r) if r.contains("step duration")),
            "{j:?}"
        );
        let j = evaluate(&p, 0, &measure(stats(150, 1, 2000), base.clone(), 60));
        assert_eq!(j.decision, Decision::Advance);
        assert!(j.criteria.iter().all(|c| c.ok != Some(false)), "{j:?}");
        let j = evaluate(&p, 2, &measure(stats(150, 1, 2000), base, 60));
        assert_eq!(j.decision, Decision::Promote);
    }

    #[test]
    fn errors_above_baseline_plus_delta_roll_back_at_once() {
        let p = plan();
        // 30 % errors against 1 %: rolled back as soon as the calls are in, long
        // before the step duration.
        let j = evaluate(
            &p,
            0,
            &measure(stats(100, 30, 2000), stats(1000, 10, 2000), 1),
        );
        let Decision::RollBack(reason) = &j.decision else {
            panic!("{j:?}")
        };
        assert!(reason.contains("error rate 0.3000"), "{reason}");
        let rate = j.criteria.iter().find(|c| c.name == "error_rate").unwrap();
        assert_eq!(rate.ok, Some(false));
        assert!((rate.threshold.unwrap() - 0.06).abs() < 1e-9);
        // Just within: 6 % against 1 % + 5 %.
        let j = evaluate(
            &p,
            0,
            &measure(stats(100, 6, 2000), stats(1000, 10, 2000), 60),
        );
        assert_eq!(j.decision, Decision::Advance);
        // Before the minimum calls the error rate is shown but not judged.
        let j = evaluate(
            &p,
            0,
            &measure(stats(99, 99, 2000), stats(1000, 10, 2000), 60),
        );
        assert!(matches!(j.decision, Decision::Wait(_)), "{j:?}");
        let rate = j.criteria.iter().find(|c| c.name == "error_rate").unwrap();
        assert_eq!((rate.ok, rate.measured), (None, Some(1.0)));
    }

    #[test]
    fn a_slow_candidate_rolls_back_and_a_missing_baseline_latency_is_not_judged() {
        let p = plan();
        let j = evaluate(
            &p,
            0,
            &measure(stats(100, 0, 10_000), stats(1000, 0, 2000), 1),
        );
        assert!(
            matches!(&j.decision, Decision::RollBack(r) if r.contains("p95 latency 10.000 ms > baseline 2.000 ms × 1.5")),
            "{j:?}"
        );
        // Exactly at the ratio passes.
        let j = evaluate(
            &p,
            0,
            &measure(stats(100, 0, 3000), stats(1000, 0, 2000), 60),
        );
        assert_eq!(j.decision, Decision::Advance);
        // No baseline latency at all: p95 not judged, the rest decides.
        let j = evaluate(
            &p,
            0,
            &measure(stats(100, 0, 10_000), WindowStats::default(), 60),
        );
        assert_eq!(j.decision, Decision::Advance);
        let p95 = j
            .criteria
            .iter()
            .find(|c| c.name == "p95_latency_ms")
            .unwrap();
        assert_eq!(p95.ok, None);
    }

    #[test]
    fn an_opened_breaker_rolls_back_even_before_the_minimum_calls() {
        let p = plan();
        let mut m = measure(stats(3, 3, 2000), stats(1000, 0, 2000), 1);
        m.candidate_breaker_opened = 1;
        let j = evaluate(&p, 0, &m);
        assert!(
            matches!(&j.decision, Decision::RollBack(r) if r.contains("breaker opened 1")),
            "{j:?}"
        );
        let mut lenient = p.clone();
        lenient.criteria.breaker_never_opened = false;
        let j = evaluate(&lenient, 0, &m);
        assert!(matches!(j.decision, Decision::Wait(_)), "{j:?}");
    }

    #[test]
    fn the_baseline_falls_back_to_its_reference_when_it_has_too_few_calls() {
        let (b, s) = choose_baseline(stats(5, 0, 1000), Some(stats(500, 5, 2000)), 100);
        assert_eq!((b.calls, s), (500, BaselineSource::Reference));
        let (b, s) = choose_baseline(stats(150, 0, 1000), Some(stats(500, 5, 2000)), 100);
        assert_eq!((b.calls, s), (150, BaselineSource::Window));
        let (b, s) = choose_baseline(stats(5, 0, 1000), None, 100);
        assert_eq!((b.calls, s), (5, BaselineSource::Sparse));
    }

    #[test]
    fn plans_are_validated_with_field_paths() {
        let field = |p: RolloutPlan| p.validate().unwrap_err().field;
        assert!(plan().validate().is_ok());
        assert_eq!(
            field(RolloutPlan::new(parse_steps_arg("5,25").unwrap())),
            "steps[1]"
        );
        assert_eq!(
            field(RolloutPlan::new(parse_steps_arg("25,5,100").unwrap())),
            "steps[1]"
        );
        assert_eq!(field(RolloutPlan::new(vec![])), "steps");
        assert_eq!(parse_steps_arg("5,250,100").unwrap_err().field, "steps[1]");
        assert_eq!(parse_steps_arg("5,x,100").unwrap_err().field, "steps[1]");
        assert_eq!(parse_steps_arg("0,100").unwrap_err().field, "steps[0]");
        let mut p = plan();
        p.min_calls_per_step = 0;
        assert_eq!(field(p), "min_calls_per_step");
        let mut p = plan();
        p.criteria.max_p95_ratio = 0.5;
        assert_eq!(field(p), "criteria.max_p95_ratio");
        let mut p = plan();
        p.criteria.max_error_rate_delta = 2.0;
        assert_eq!(field(p), "criteria.max_error_rate_delta");
        let mut p = plan();
        p.step_duration = Duration::from_secs(8 * 24 * 3600);
        assert_eq!(field(p), "step_duration");
        // Tenant lists, in the JSON form.
        let steps = parse_steps_arg(r#"[{"tenants": ["a", "b"]}, {"share": 25}, 100]"#).unwrap();
        assert_eq!(steps[0], Step::Tenants(vec!["a".into(), "b".into()]));
        assert_eq!(steps[0].routing_rules(), json!({"tenant_id": ["a", "b"]}));
        assert_eq!(steps[1].routing_rules(), json!({"share": 25}));
        assert!(RolloutPlan::new(steps).validate().is_ok());
        let err = parse_steps(&json!([{"tenants": []}, 100])).unwrap_err();
        assert_eq!(err.field, "steps[0].tenants");
        let err = parse_steps(&json!([{"tenants": ["a", 1]}, 100])).unwrap_err();
        assert_eq!(err.field, "steps[0].tenants[1]");
    }

    #[test]
    fn histograms_merge_and_give_quantiles() {
        let mut a = LatencyHistogram::default();
        for (u, n) in [(1000, 90), (2000, 5), (50_000, 5)] {
            a.add(u, n);
        }
        assert_eq!(a.quantile_ms(0.95), Some(2.0));
        assert_eq!(a.quantile_ms(0.96), Some(50.0));
        let b = LatencyHistogram::from_json(&a.to_json());
        assert_eq!(a, b);
        a.merge(&b);
        assert_eq!(a.count(), 200);
        assert_eq!(LatencyHistogram::default().quantile_ms(0.95), None);
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err() && parse_duration("5d").is_err());
    }
}
