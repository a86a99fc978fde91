//! Log setup: text or JSON lines on stderr, filtered by `RUST_LOG` or `[log] level`.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub fn init(config: &LogConfig) {
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
    let filter = EnvFilter::try_new(&wanted)
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
