//! The Decide request on both intakes, up to the point where the pipeline takes it:
//! the NATS intake's JSON contract (`nats_intake::parse_request`) and the gRPC
//! `RouteRequest` (protobuf-decoded, then `router_service::decide_request`). The
//! request's context and metadata then go through the same size and shape checks the
//! pipeline applies (`Limits::check_map_shape`, `json_len`).
//! Must never panic; errors are fine. Checked: an accepted NATS request has the
//! required ids, and a refused gRPC request is `invalid_request`.
#![no_main]

use beamline_api::proto::RouteRequest;
use beamline_api::{nats_intake, router_service};
use beamline_model::Limits;
use beamline_model::limits::json_len;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// The pipeline's size and shape checks on a request's metadata and context.
fn limits_checks(metadata: &Map<String, Value>, context: &Map<String, Value>) {
    let limits = Limits::default();
    let _ = json_len(metadata).saturating_add(json_len(context));
    let _ = limits.check_map_shape(metadata);
    let _ = limits.check_map_shape(context);
}

fuzz_target!(|data: &[u8]| {
    match nats_intake::parse_request(data) {
        Ok((request, context)) => {
            assert!(
                !request.request_id.is_empty(),
                "accepted without request_id"
            );
            assert!(
                !request.message.tenant_id.is_empty(),
                "accepted without tenant_id"
            );
            assert!(
                !request.message.message_type.is_empty(),
                "accepted without task.type"
            );
            let _ = serde_json::to_vec(&context).expect("the reply context serialises");
            limits_checks(&request.message.metadata, &request.context);
        }
        Err((message, context)) => {
            assert!(!message.is_empty());
            let _ = serde_json::to_vec(&context).expect("the reply context serialises");
        }
    }

    if let Ok(route) = <RouteRequest as prost::Message>::decode(data) {
        match router_service::decide_request(route) {
            Ok(request) => limits_checks(&request.message.metadata, &request.context),
            Err(status) => assert!(
                status.message().starts_with("invalid_request"),
                "unexpected refusal: {status:?}"
            ),
        }
    }
});
