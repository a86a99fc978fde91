//! The extension pipeline of beamline-router.
//!
//! [`Pipeline::decide`] runs a request through its tenant's policy, calling
//! extensions over NATS. Around every call: version resolution (registry), instance
//! choice ([`balancer`]), the circuit breaker ([`breaker`]), the NATS request with
//! timeout and retries ([`invoker`]), and health recording ([`health`]). Live
//! per-extension state lives in [`runtime`], apart from the registry snapshot, so
//! reloads never reset it; [`observer`] is how metrics and logs hear about it all;
//! [`trace`] makes the spans of a request and carries its W3C trace context.
//! [`canary`] is the judge of canary rollouts, which runs in every router and acts in
//! the one holding its PostgreSQL advisory lock.

pub mod balancer;
pub mod breaker;
pub mod canary;
pub mod health;
pub mod invoker;
pub mod observer;
pub mod persist;
pub mod pipeline;
pub mod runtime;
pub mod trace;

pub use breaker::{BreakerConfig, BreakerState};
pub use canary::CanaryConfig;
pub use invoker::{InvokeError, InvokerConfig};
pub use observer::{InvocationEvent, Observer};
pub use pipeline::{
    DecideError, DecideRequest, Decision, ExecutedExtension, Pipeline, PipelineConfig,
    ProviderOutputView, StepStatus, new_trace_id,
};
pub use runtime::{ExtensionHealth, HealthSummary};
