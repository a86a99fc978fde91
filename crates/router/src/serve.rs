//! `beamline-router serve`: load the configuration, start the registry and its sync
//! task, run until SIGINT or SIGTERM, stop cleanly.

use anyhow::Context;
use beamline_registry::{Registry, SourceMode};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::config::Config;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    crate::logging::init(&config.log);
    let shutdown = CancellationToken::new();
    let registry = Registry::start(config.extension_registry.clone(), config.limits.clone())
        .await
        .context("cannot start the extension registry")?;
    if !registry.is_loaded() && config.extension_registry.source == SourceMode::Fixtures {
        // Fixtures cannot heal by waiting: say what is wrong and stop.
        let status = registry.status();
        anyhow::bail!(
            "fixtures could not be loaded: {}",
            status.last_error.unwrap_or_else(|| "unknown error".into())
        );
    }
    let sync = registry.spawn_sync(shutdown.clone());
    let status = registry.status();
    tracing::info!(
        source = %status.source,
        active_source = status.active_source.as_str(),
        extensions = status.size,
        policies = status.counts.policies,
        config = %serde_json::to_string(&status.config).unwrap_or_default(),
        "beamline-router started"
    );
    wait_for_signal().await?;
    tracing::info!("shutdown requested; stopping");
    shutdown.cancel();
    if let Err(e) = sync.await {
        tracing::warn!(error = %e, "registry sync task ended abnormally");
    }
    tracing::info!("beamline-router stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
