//! `beamline-router serve`: load the configuration, start the registry and its sync
//! task, connect to NATS, build the pipeline, serve gRPC and the NATS intake, run
//! until SIGINT or SIGTERM, stop cleanly (intake first, then in-flight work).

use std::time::{Duration, Instant};

use anyhow::Context;
use beamline_api::router_service::RouterService;
use beamline_pipeline::Pipeline;
use beamline_registry::{Registry, SourceMode};
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::private_nats::{PrivateNats, first_server};

/// Requests the NATS intake handles at once.
const INTAKE_MAX_IN_FLIGHT: usize = 4096;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Signal handlers first: a signal that arrives while we start must stop us
    // cleanly, not kill the process with the default action.
    let signals = Signals::install()?;
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

    // `--demo` brings its own NATS when none answers (see private_nats).
    let private_nats = if args.demo {
        start_private_nats(config.nats.url.expose()).await?
    } else {
        None
    };
    let nats_url = private_nats
        .as_ref()
        .map(|p| p.url.clone())
        .unwrap_or_else(|| config.nats.url.expose().to_string());
    let nats_shown = match &private_nats {
        Some(p) => p.url.clone(),
        None => config.nats.url.redacted(),
    };

    // NATS may be down at start: the client keeps connecting in the background and
    // extension calls fail fast (extension_unavailable) until it is up.
    let nats = async_nats::ConnectOptions::new()
        .name("beamline-router")
        .retry_on_initial_connect()
        .connect(nats_url.as_str())
        .await
        .with_context(|| format!("cannot use NATS at {nats_shown}"))?;
    // Give the first connection a moment, so requests right after start do not fail
    // for a connection that is about to exist; past that, start anyway (calls fail
    // fast with extension_unavailable until NATS is there).
    let connecting = Instant::now();
    while !matches!(
        nats.connection_state(),
        async_nats::connection::State::Connected
    ) && connecting.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let metrics = beamline_api::metrics::Metrics::new(&config.metrics);
    let pipeline = Pipeline::new(
        registry.clone(),
        nats.clone(),
        config.pipeline.clone(),
        config.circuit_breaker.clone(),
        config.limits.clone(),
    )
    .with_observer(std::sync::Arc::new(beamline_api::metrics::MetricsObserver(
        metrics.clone(),
    )));

    let mut tasks = Vec::new();
    if args.demo {
        let demo = beamline_sdk::reference::spawn_all(nats.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the demo extensions: {e}"))?;
        tracing::info!(
            "demo extensions serving: normalize_text, pii_guard, mask_pii, test_provider"
        );
        tasks.extend(demo);
    }

    let listener = tokio::net::TcpListener::bind(config.grpc.listen)
        .await
        .with_context(|| format!("cannot listen on grpc.listen {}", config.grpc.listen))?;
    let grpc_addr = listener.local_addr()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = {
        let registry = registry.clone();
        tokio::spawn(beamline_api::grpc::follow_readiness(
            reporter,
            move || registry.is_loaded(),
            shutdown.clone(),
        ))
    };
    let auth = std::sync::Arc::new(beamline_api::auth::Authenticator::new(&config.admin));
    let router_service = if config.admin.decide_requires_key {
        RouterService::new(pipeline.clone()).with_auth(auth.clone())
    } else {
        RouterService::new(pipeline.clone())
    };
    let grpc = tokio::spawn(beamline_api::grpc::serve(
        listener,
        router_service,
        beamline_api::admin_service::AdminService::new(pipeline.clone(), auth.clone()),
        health_service,
        config
            .grpc
            .tls()
            .map_err(|(key, message)| crate::config::ConfigError::Invalid { key, message })?,
        shutdown.clone(),
    ));
    // extension_health: written every sync interval and at shutdown, manual resets
    // applied; a separate token so it runs after intake has drained.
    let persist_stop = CancellationToken::new();
    let persist = tokio::spawn(
        beamline_pipeline::persist::HealthPersister::new(pipeline.clone()).run(
            config.extension_registry.sync_interval(),
            persist_stop.clone(),
        ),
    );
    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    let http_addr = http_listener.local_addr()?;
    let http = tokio::spawn(beamline_api::http::serve(
        http_listener,
        pipeline.clone(),
        metrics.clone(),
        Some(auth.clone()),
        shutdown.clone(),
    ));
    // Subscribed before the start line, so the intake answers from then on (if NATS
    // is not up yet, the subscription is made when it connects).
    let intake_sub = match tokio::time::timeout(
        Duration::from_secs(5),
        beamline_api::nats_intake::subscribe(&nats),
    )
    .await
    {
        Ok(Ok(sub)) => Some(sub),
        Ok(Err(e)) => anyhow::bail!("cannot subscribe to the NATS intake: {e}"),
        Err(_) => None,
    };
    let intake = {
        let (pipeline, nats, shutdown) = (pipeline.clone(), nats.clone(), shutdown.clone());
        tokio::spawn(async move {
            let sub = match intake_sub {
                Some(sub) => sub,
                None => beamline_api::nats_intake::subscribe(&nats).await?,
            };
            beamline_api::nats_intake::serve_subscription(
                pipeline,
                nats,
                sub,
                INTAKE_MAX_IN_FLIGHT,
                shutdown,
            )
            .await
        })
    };

    // Said just before the start line, so whoever waits for that line has it.
    let problems = not_working_yet(&registry, &nats, &nats_shown);
    if !problems.is_empty() {
        tracing::warn!(
            problems = problems.len(),
            "what will not work yet: {}",
            problems.join("; ")
        );
    }
    let status = registry.status();
    tracing::info!(
        source = %status.source,
        active_source = status.active_source.as_str(),
        extensions = status.size,
        policies = status.counts.policies,
        grpc = %grpc_addr,
        http = %http_addr,
        nats = %nats_shown,
        demo = args.demo,
        config = %serde_json::to_string(&status.config).unwrap_or_default(),
        "beamline-router started"
    );

    tokio::select! {
        () = signals.wait() => {}
        r = grpc_failed(&grpc) => anyhow::bail!("gRPC server stopped: {r}"),
    }
    tracing::info!("shutdown requested; stopping intake and draining in-flight requests");
    shutdown.cancel();
    let drain = async {
        let _ = intake.await;
        let _ = grpc.await;
        let _ = http.await;
        let _ = readiness.await;
        let _ = sync.await;
    };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!("in-flight work did not finish within 30 s; stopping anyway");
    }
    // Last: persist health after the final requests were answered.
    persist_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(10), persist)
        .await
        .is_err()
    {
        tracing::warn!("extension_health was not written at shutdown within 10 s");
    }
    for t in tasks {
        t.abort();
    }
    if let Err(e) = nats.flush().await {
        tracing::debug!(error = %e, "final NATS flush failed");
    }
    if let Some(p) = private_nats {
        p.stop().await;
        tracing::info!("private nats-server stopped");
    }
    tracing::info!("beamline-router stopped");
    Ok(())
}

/// For `--demo`: a private nats-server when nothing answers at the configured URL.
async fn start_private_nats(url: &str) -> anyhow::Result<Option<PrivateNats>> {
    let Some((host, port)) = first_server(url) else {
        return Ok(None);
    };
    if crate::private_nats::answers(&host, port).await {
        return Ok(None);
    }
    let private = PrivateNats::start(&host, port).await.map_err(|e| {
        anyhow::Error::new(Unmet(format!(
            "--demo needs NATS and nothing answers at {}: {e}",
            beamline_model::secret::redact_url(url)
        )))
    })?;
    tracing::info!(
        nats = %private.url,
        "no NATS answered at {}; started a private nats-server at {} for this router's lifetime",
        beamline_model::secret::redact_url(url),
        private.url
    );
    Ok(Some(private))
}

/// A dependency `serve` needs is missing (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unmet(pub String);

/// What will fail until someone acts, each in a few words with why, for the one
/// line `serve` logs at start: no NATS, no registry, no fallback policy, policies
/// that will not work as written.
fn not_working_yet(registry: &Registry, nats: &async_nats::Client, nats_url: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !matches!(
        nats.connection_state(),
        async_nats::connection::State::Connected
    ) {
        let hint = if crate::private_nats::find_binary().is_none() {
            format!(
                " (nats-server is not installed: `{}`; `serve --demo` starts one of its own)",
                crate::private_nats::INSTALL_HINT
            )
        } else {
            String::new()
        };
        problems.push(format!(
            "no NATS answers at {nats_url}: every extension call fails with extension_unavailable until one does{hint}"
        ));
    }
    if !registry.is_loaded() {
        let status = registry.status();
        problems.push(format!(
            "the registry is not loaded ({}): requests fail until it is",
            status
                .last_error
                .unwrap_or_else(|| "no source answered yet".into())
        ));
        return problems;
    }
    let snapshot = registry.snapshot();
    if let Some(w) = snapshot.fallback_policy_warning() {
        problems.push(w);
    }
    let policy_warnings = &snapshot.warnings;
    const SHOWN: usize = 3;
    problems.extend(policy_warnings.iter().take(SHOWN).cloned());
    if policy_warnings.len() > SHOWN {
        problems.push(format!(
            "{} more policy warnings (`beamline-router registry status` lists them)",
            policy_warnings.len() - SHOWN
        ));
    }
    problems
}

/// Resolves only if the gRPC task ends on its own (bind lost, fatal error).
async fn grpc_failed(
    task: &tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> String {
    loop {
        if task.is_finished() {
            return "the server task ended".to_string();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGTERM and SIGINT, listened for from the start.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
