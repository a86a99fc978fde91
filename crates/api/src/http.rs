//! HTTP on `[http] listen`: `/metrics` (Prometheus text format 0.0.4), `/healthz`
//! (the process is alive), `/readyz` (the registry has loaded a snapshot, NATS is
//! connected, and the router is not stopping).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use beamline_pipeline::Pipeline;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    auth: Option<Arc<Authenticator>>,
    stopping: CancellationToken,
}

async fn metrics_page(State(s): State<AppState>) -> impl IntoResponse {
    let body =
        tokio::task::spawn_blocking(move || s.metrics.render(&s.pipeline, s.auth.as_deref()))
            .await
            .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.stopping.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_string(),
        );
    }
    if !matches!(
        s.pipeline.nats().connection_state(),
        async_nats::connection::State::Connected
    ) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: NATS not connected (extension calls fail until it is; the log says why)\n"
                .to_string(),
        );
    }
    let status = s.pipeline.registry().status();
    if status.loaded {
        (
            StatusCode::OK,
            format!(
                "ready: {} extensions from {}\n",
                status.size,
                status.active_source.as_str()
            ),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: registry not loaded ({})\n",
                status.last_error.unwrap_or_else(|| "no sync yet".into())
            ),
        )
    }
}

/// Serves until `shutdown`. Once `stopping` is cancelled `/readyz` answers 503 while
/// `/metrics` and `/healthz` keep answering, so a load balancer takes the router out
/// at the first signal and the drain stays observable.
pub async fn serve(
    listener: TcpListener,
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    auth: Option<Arc<Authenticator>>,
    stopping: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            pipeline,
            metrics,
            auth,
            stopping,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
