//! The gRPC server: Router, `grpc.health.v1` and server reflection (v1 and v1alpha),
//! on a listener the caller binds (tests bind port 0), until `shutdown`.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::proto;
use crate::router_service::RouterService;

/// Builds and runs the gRPC server.
pub async fn serve(
    listener: TcpListener,
    router: RouterService,
    health: tonic_health::server::HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let _ = &health;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| {
            tracing::error!(error = %e, "reflection descriptor set is invalid");
            e
        })
        .ok();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .ok();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Server::builder()
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(proto::router_server::RouterServer::new(router))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
