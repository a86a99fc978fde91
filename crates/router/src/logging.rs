//! Log setup: text or JSON lines on stderr, filtered by `RUST_LOG` or `[log] level`;
//! with tracing on (crate::telemetry), the OpenTelemetry layer beside it, and a
//! request's log lines carry its `trace_id` and `span_id` (the fields of its
//! `decide` span).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

/// A layer added beside the log output (the OpenTelemetry layer).
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

pub fn init(config: &LogConfig) {
    init_with(config, None);
}

/// The log filter: `RUST_LOG`, else `[log] level`; the NATS client's own lines off
/// unless named.
fn filter(config: &LogConfig) -> EnvFilter {
    let wanted = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| config.level.clone());
    // The NATS client logs every failed attempt; the router reports the connection
    // itself, one line per distinct problem (crate::nats). A filter that names
    // async_nats gets it back.
    let wanted = if wanted.contains("async_nats") {
        wanted
    } else {
        format!("{wanted},async_nats=off")
    };
    EnvFilter::try_new(&wanted)
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the subscriber; `extra` (with its own filter) sees what it selects,
/// whatever the log level. Returns whether this call installed it (a second init,
/// in tests, keeps the first subscriber).
pub fn init_with(config: &LogConfig, extra: Option<ExtraLayer>) -> bool {
    let filter = filter(config);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let Some(extra) = extra else {
        // Without tracing: the plain subscriber, the log filter applying to all.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        return match config.format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
        }
        .is_ok();
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let log: ExtraLayer = match config.format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(vec![log, extra])
        .try_init()
        .is_ok()
}
