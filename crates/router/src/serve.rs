//! `beamline-router serve`: load the configuration, start the registry and its sync
//! task, connect to NATS, build the pipeline, serve gRPC and the NATS intake, run
//! until SIGINT or SIGTERM, then stop within bounds whatever NATS and PostgreSQL do.
//!
//! The stop sequence (docs/RUNBOOK.md, "Stopping a router"): at the first signal
//! readiness turns unready and intake stops (gRPC refuses new connections, the NATS
//! intake unsubscribes, the registry sync ends); requests already accepted get up to
//! `[server] drain_timeout_ms` to finish; health is persisted for at most
//! [`PERSIST_BOUND`]; NATS is flushed for at most [`FLUSH_BOUND`]; queued spans are
//! exported for at most [`TRACING_BOUND`] (tracing on); the process exits 0. Every step that waits on NATS or PostgreSQL is bounded and abandoned when its
//! bound passes, so a dead, paused or never-reached dependency cannot keep the
//! process alive. A second signal exits at once with 128 + the signal's number.

use std::time::{Duration, Instant};

use anyhow::Context;
use beamline_api::router_service::RouterService;
use beamline_pipeline::Pipeline;
use beamline_registry::{Registry, SourceMode};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::ServeArgs;
use crate::config::Config;
use crate::private_nats::{PrivateNats, first_server};

/// Requests the NATS intake handles at once.
const INTAKE_MAX_IN_FLIGHT: usize = 4096;
/// Longest the health write at shutdown may take.
pub const PERSIST_BOUND: Duration = Duration::from_secs(5);
/// Longest the final NATS flush may take.
pub const FLUSH_BOUND: Duration = Duration::from_secs(1);
/// Longest `--demo`'s private nats-server may take to stop.
const PRIVATE_NATS_BOUND: Duration = Duration::from_secs(1);
/// Longest the HTTP server (metrics, probes) may take to close after the drain.
const HTTP_CLOSE_BOUND: Duration = Duration::from_secs(1);
/// Longest the span exporter may take to send what is queued and stop (tracing on).
pub const TRACING_BOUND: Duration = Duration::from_secs(1);

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Signal handlers first: a signal that arrives while we start must stop us
    // cleanly, not kill the process with the default action.
    let mut signals = Signals::install()?;
    let config = Config::load(args.config.as_deref())?;
    let telemetry = crate::telemetry::init(&config.log, &config.tracing)?;
    let started = tokio::select! {
        r = start(args, config) => r,
        signal = signals.next() => {
            // Starting waits on NATS and PostgreSQL for a few seconds at most; a stop
            // asked for meanwhile is honoured at once (what was started is dropped
            // with the runtime).
            tracing::info!(signal, "stop requested while starting; exiting");
            if let Some(t) = telemetry {
                t.shutdown(TRACING_BOUND).await;
            }
            return Ok(());
        }
    };
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            if let Some(t) = telemetry {
                t.shutdown(TRACING_BOUND).await;
            }
            return Err(e);
        }
    };
    started.run_until_stopped(signals, telemetry).await
}

/// Everything `serve` runs, between start and stop.
struct Running {
    config: Config,
    nats: async_nats::Client,
    /// Stops intake: gRPC, the NATS intake, readiness, the registry sync.
    shutdown: CancellationToken,
    /// Readiness unready (set at the first signal, before anything else).
    stopping: CancellationToken,
    /// Stops the HTTP server (metrics, probes), last.
    http_stop: CancellationToken,
    /// Stops the health persister, after the drain.
    persist_stop: CancellationToken,
    intake: JoinHandle<Result<(), async_nats::Error>>,
    /// The original's admin NATS subjects; stops with the intake.
    nats_admin: JoinHandle<Result<(), async_nats::Error>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    readiness: JoinHandle<()>,
    sync: JoinHandle<()>,
    persist: JoinHandle<()>,
    /// The canary judge (`[canary] enabled`); stops with the health persister.
    canary: Option<JoinHandle<()>>,
    demo: Vec<JoinHandle<()>>,
    /// `--demo`'s own nats-server, when it started one.
    private_nats: Option<PrivateNats>,
}

async fn start(args: ServeArgs, config: Config) -> anyhow::Result<Running> {
    let shutdown = CancellationToken::new();
    let stopping = CancellationToken::new();
    let registry = Registry::start(config.extension_registry.clone(), config.limits.clone())
        .await
        .context("cannot start the extension registry")?;
    if !registry.is_loaded() && config.extension_registry.source == SourceMode::Fixtures {
        // The fixtures folder itself cannot be read (a bad file is only quarantined):
        // waiting will not heal that, so say what is wrong and stop.
        let status = registry.status();
        anyhow::bail!(
            "fixtures could not be loaded: {}",
            status.last_error.unwrap_or_else(|| "unknown error".into())
        );
    }
    let sync = registry.spawn_sync(shutdown.clone());

    // `--demo` brings its own NATS when none answers (see private_nats).
    let private_nats = if args.demo {
        start_private_nats(&config.nats.seeds().join(",")).await?
    } else {
        None
    };
    let nats_shown = match &private_nats {
        Some(p) => p.url.clone(),
        None => config.nats.seeds_redacted(),
    };

    // NATS may be down at start: the client keeps connecting in the background (any
    // seed will do) and extension calls fail fast (extension_unavailable) until it is.
    let nats =
        crate::nats::connect(&config.nats, private_nats.as_ref().map(|p| p.url.as_str())).await?;
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

    let mut demo = Vec::new();
    if args.demo {
        demo = beamline_sdk::reference::spawn_all(nats.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the demo extensions: {e}"))?;
        tracing::info!(
            "demo extensions serving: normalize_text, pii_guard, mask_pii, test_provider"
        );
    }

    let listener = tokio::net::TcpListener::bind(config.grpc.listen)
        .await
        .with_context(|| format!("cannot listen on grpc.listen {}", config.grpc.listen))?;
    let grpc_addr = listener.local_addr()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = {
        let (registry, stopping, nats_state) = (registry.clone(), stopping.clone(), nats.clone());
        tokio::spawn(beamline_api::grpc::follow_readiness(
            reporter,
            // Ready to serve: a snapshot, a NATS connection (extensions are reached
            // through it), and not stopping.
            move || {
                registry.is_loaded()
                    && !stopping.is_cancelled()
                    && matches!(
                        nats_state.connection_state(),
                        async_nats::connection::State::Connected
                    )
            },
            shutdown.clone(),
        ))
    };
    let auth = std::sync::Arc::new(beamline_api::auth::Authenticator::new(&config.admin));
    let router_service = if config.admin.decide_requires_key {
        RouterService::new(pipeline.clone()).with_auth(auth.clone())
    } else {
        RouterService::new(pipeline.clone())
    }
    .with_status_codes(config.grpc.status_codes);
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
    // The canary judge: reports per-version health and, holding the lock, judges
    // rollouts; it stops after the drain too, so the last calls are reported.
    let canary = config.canary.enabled.then(|| {
        tokio::spawn(
            beamline_pipeline::canary::Judge::new(pipeline.clone(), config.canary.clone())
                .run(persist_stop.clone()),
        )
    });
    let http_stop = CancellationToken::new();
    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    let http_addr = http_listener.local_addr()?;
    let http = tokio::spawn(beamline_api::http::serve(
        http_listener,
        pipeline.clone(),
        metrics.clone(),
        Some(auth.clone()),
        stopping.clone(),
        http_stop.clone(),
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
        let intake_options = beamline_api::nats_intake::IntakeOptions {
            max_in_flight: INTAKE_MAX_IN_FLIGHT,
            default_reply_subject: config.nats.decide_reply_subject.clone(),
        };
        tokio::spawn(async move {
            let sub = match intake_sub {
                Some(sub) => sub,
                // Made once NATS answers; a stop before that ends the wait.
                None => tokio::select! {
                    r = beamline_api::nats_intake::subscribe(&nats) => r?,
                    () = shutdown.cancelled() => return Ok(()),
                },
            };
            beamline_api::nats_intake::serve_subscription(
                pipeline,
                nats,
                sub,
                intake_options,
                shutdown,
            )
            .await
        })
    };
    // The original's admin subjects, subscribed the same way.
    let admin_subs = match tokio::time::timeout(
        Duration::from_secs(5),
        beamline_api::nats_admin::subscribe(&nats),
    )
    .await
    {
        Ok(Ok(subs)) => Some(subs),
        Ok(Err(e)) => anyhow::bail!("cannot subscribe to the admin NATS subjects: {e}"),
        Err(_) => None,
    };
    let nats_admin = {
        let mut admin = beamline_api::nats_admin::NatsAdmin::new(pipeline.clone());
        if config.admin.nats_requires_key {
            admin = admin.with_auth(auth.clone());
        }
        let (nats, shutdown) = (nats.clone(), shutdown.clone());
        tokio::spawn(async move {
            let subs = match admin_subs {
                Some(subs) => subs,
                None => tokio::select! {
                    r = beamline_api::nats_admin::subscribe(&nats) => r?,
                    () = shutdown.cancelled() => return Ok(()),
                },
            };
            beamline_api::nats_admin::serve(admin, nats, subs, shutdown).await;
            Ok(())
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

    Ok(Running {
        config,
        nats,
        shutdown,
        stopping,
        http_stop,
        persist_stop,
        intake,
        nats_admin,
        grpc,
        http,
        readiness,
        sync,
        persist,
        canary,
        demo,
        private_nats,
    })
}

impl Running {
    /// Serves until the first signal, then runs the bounded stop sequence.
    async fn run_until_stopped(
        mut self,
        mut signals: Signals,
        telemetry: Option<crate::telemetry::Telemetry>,
    ) -> anyhow::Result<()> {
        let signal = tokio::select! {
            s = signals.next() => s,
            r = grpc_failed(&self.grpc) => anyhow::bail!("gRPC server stopped: {r}"),
        };
        let stop_started = Instant::now();
        // Unready first, so a load balancer stops sending before intake closes.
        self.stopping.cancel();
        tokio::spawn(exit_on_second_signal(signals));
        let drain_timeout = self.config.server.drain_timeout();
        tracing::info!(
            signal,
            drain_timeout_ms = self.config.server.drain_timeout_ms,
            "shutdown requested; readiness unready, intake stopped, draining in-flight requests"
        );
        self.shutdown.cancel();
        // The sync is not in-flight work, and a reload can wait on a paused database:
        // it ends now.
        self.sync.abort();
        let drain = async {
            let _ = (&mut self.intake).await;
            let _ = (&mut self.nats_admin).await;
            let _ = (&mut self.grpc).await;
        };
        if tokio::time::timeout(drain_timeout, drain).await.is_err() {
            tracing::warn!(
                drain_timeout_ms = self.config.server.drain_timeout_ms,
                "in-flight requests did not finish within the drain timeout; stopping anyway"
            );
        }
        self.intake.abort();
        self.nats_admin.abort();
        self.grpc.abort();
        self.readiness.abort();

        // Health last, after the final requests were answered: extension_health and
        // the canary judge's last per-version report, together within one bound.
        self.persist_stop.cancel();
        let persist_started = Instant::now();
        if tokio::time::timeout(PERSIST_BOUND, &mut self.persist)
            .await
            .is_err()
        {
            self.persist.abort();
            tracing::warn!(
                bound_ms = PERSIST_BOUND.as_millis() as u64,
                "extension_health was not written at shutdown within its bound (database unreachable?); stopping anyway"
            );
        }
        if let Some(canary) = self.canary.as_mut() {
            let left = PERSIST_BOUND.saturating_sub(persist_started.elapsed());
            if tokio::time::timeout(left, &mut *canary).await.is_err() {
                canary.abort();
                tracing::warn!(
                    bound_ms = PERSIST_BOUND.as_millis() as u64,
                    "the canary judge's last report did not finish within the persistence bound; stopping anyway"
                );
            }
        }
        for task in &self.demo {
            task.abort();
        }
        match tokio::time::timeout(FLUSH_BOUND, self.nats.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "final NATS flush failed"),
            Err(_) => tracing::warn!(
                bound_ms = FLUSH_BOUND.as_millis() as u64,
                "final NATS flush did not finish within its bound (NATS unreachable?); stopping anyway"
            ),
        }
        // The last requests' spans, then the exporter (bounded: a collector that
        // is down or slow does not hold the stop).
        if let Some(t) = telemetry {
            t.shutdown(TRACING_BOUND).await;
        }
        if let Some(p) = self.private_nats.take() {
            // Dropped at the bound, which kills it.
            let _ = tokio::time::timeout(PRIVATE_NATS_BOUND, p.stop()).await;
            tracing::info!("private nats-server stopped");
        }
        self.http_stop.cancel();
        if tokio::time::timeout(HTTP_CLOSE_BOUND, &mut self.http)
            .await
            .is_err()
        {
            self.http.abort();
        }
        tracing::info!(
            stop_ms = stop_started.elapsed().as_millis() as u64,
            "beamline-router stopped"
        );
        Ok(())
    }
}

/// A second SIGTERM/SIGINT while stopping: the operator wants out now.
async fn exit_on_second_signal(mut signals: Signals) {
    let signal = signals.next().await;
    let code = match signal {
        "SIGINT" => 130,
        _ => 143,
    };
    tracing::warn!(
        signal,
        code,
        "second signal while stopping; exiting at once"
    );
    std::process::exit(code);
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

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
