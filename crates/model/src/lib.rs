//! The types of beamline-router, and the one validation every source shares.
//!
//! Nothing here does I/O: the registry reads fixtures and PostgreSQL rows into the
//! loose `*Record` shapes, and [`ExtensionRecord::validate`] and friends turn them into
//! the typed values the rest of the router trusts. Keeping a single validation here
//! means a fixture file and a database row can never disagree about what is valid.
//!
//! Layout:
//! - [`extension`]: extensions, versions, instances, their types and validation.
//! - [`routing`]: a version's `routing_rules` and how they match a request context
//!   (including the stable share of tenants, `{"share": 5}`).
//! - [`canary`]: progressive delivery — a rollout's plan, its validation, and the
//!   judgement of a candidate version against its baseline.
//! - [`policy`]: tenant policies, pipeline steps and `when` conditions.
//! - [`limits`]: the size, depth and range limits, with their error names.
//! - [`subject`]: what a valid NATS subject is.
//! - [`secret`]: secrets and URLs that print redacted.
//! - [`wire`]: the extension request and reply protocol over NATS.
//! - [`trace`]: W3C `traceparent` / `tracestate`, and whether spans are made.
//! - [`codes`]: the error codes a request can fail with.
//! - [`error`]: [`ValidationError`], which names the field and the reason.

pub mod canary;
pub mod codes;
pub mod error;
pub mod extension;
pub mod limits;
pub mod policy;
pub mod routing;
pub mod secret;
pub mod subject;
pub mod trace;
pub mod wire;

pub use codes::ErrorCode;
pub use error::ValidationError;
pub use extension::{
    Extension, ExtensionInstance, ExtensionRecord, ExtensionType, ExtensionVersion, InstanceHealth,
    InstanceRecord, VersionRecord,
};
pub use limits::Limits;
pub use policy::{Policy, PolicyDocument};
pub use routing::{RoutingContext, RoutingRules};
pub use secret::{Secret, SecretUrl};
