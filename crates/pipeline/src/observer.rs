//! Hooks through which the pipeline reports what it does (metrics, logs), so this
//! crate does not depend on any metrics library. Every method has a no-op default.

use std::time::Duration;

use beamline_model::ExtensionType;

use crate::breaker::Transition;

/// One finished extension call.
#[derive(Debug, Clone)]
pub struct InvocationEvent<'a> {
    pub extension_id: &'a str,
    pub ext_type: ExtensionType,
    pub version: &'a str,
    pub instance_id: Option<&'a str>,
    pub tenant_id: &'a str,
    pub trace_id: &'a str,
    /// `success`, `error` or `timeout` (the metric's `status` label).
    pub status: &'static str,
    pub latency: Duration,
    /// Attempts made (1 + retries).
    pub attempts: u32,
    pub error: Option<String>,
}

pub trait Observer: Send + Sync {
    fn invocation(&self, _event: &InvocationEvent<'_>) {}
    /// A breaker changed state; `instance_id` is set for per-instance breakers.
    fn breaker_transition(&self, _extension_id: &str, _instance_id: Option<&str>, _t: Transition) {}
    fn instance_selected(&self, _extension_id: &str, _instance_id: &str) {}
    fn payload_too_large(&self, _extension_id: &str) {}
    fn retry_limit_exceeded(&self, _extension_id: &str) {}
    /// A Decide came on the NATS intake without a reply subject and is answered on
    /// the default reply subject.
    fn decide_reply_defaulted(&self) {}
}

/// Reports nothing.
pub struct NoopObserver;

impl Observer for NoopObserver {}
