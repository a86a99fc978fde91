//! The router's network surfaces.
//!
//! - [`proto`]: the generated `beamline.flow.v1` types and services.
//! - [`router_service`]: gRPC `Router/Decide`.
//! - [`nats_intake`]: NATS `beamline.router.v1.decide` (the original's JSON contract).
//! - [`nats_admin`]: the original's admin NATS subjects `beamline.router.v1.admin.*`.
//! - [`grpc`]: the gRPC server: services, `grpc.health.v1`, reflection, graceful stop.
//!
//! Both intakes turn their request into one [`beamline_pipeline::DecideRequest`] and
//! share the same pipeline; errors become the same codes on both.

pub mod admin_service;
pub mod auth;
pub mod grpc;
pub mod http;
pub mod json;
pub mod metrics;
pub mod nats_admin;
pub mod nats_intake;
pub mod router_service;

/// Generated from `proto/beamline/flow/v1/flow.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("beamline.flow.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/beamline_descriptor.bin"));
}
