//! The gRPC server: Router, RouterAdmin, `grpc.health.v1` and server reflection (v1 and v1alpha),
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
    admin: crate::admin_service::AdminService,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
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
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(proto::router_server::RouterServer::new(router))
        .add_service(proto::router_admin_server::RouterAdminServer::new(admin))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Keeps `grpc.health.v1` in step with readiness (the registry has loaded): the
/// overall status ("") and `beamline.flow.v1.Router` are SERVING only while ready.
pub async fn follow_readiness(
    reporter: tonic_health::server::HealthReporter,
    ready: impl Fn() -> bool,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let now = ready();
        if last != Some(now) {
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status("beamline.flow.v1.Router", status)
                .await;
            last = Some(now);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status("beamline.flow.v1.Router", ServingStatus::NotServing)
        .await;
}
