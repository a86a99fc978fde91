//! Command-line arguments. Global flags are accepted before or after the subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "beamline-router",
    version,
    about = "Extension registry and pipeline of the Beamline request router"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every operator command shares.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Admin API address of the running router.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:9000",
        env = "BEAMLINE_ADDR"
    )]
    pub addr: String,
    /// API key for the admin API.
    #[arg(long, global = true, env = "BEAMLINE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the router until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Apply the PostgreSQL schema (idempotent).
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the router runs on its built-in fixtures.
    #[arg(long, env = "BEAMLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Also run the reference extensions (normalize_text, pii_guard, mask_pii,
    /// test_provider) in-process against the same NATS: a working pipeline in one command.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database to migrate; defaults to the configuration's database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Configuration file to take the database from when --database-url is not given.
    #[arg(long, env = "BEAMLINE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Exit codes scripts can rely on: 2 for a bad configuration or usage, 3 when a
/// dependency (database) cannot be reached, 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<crate::config::ConfigError>().is_some() {
        return 2;
    }
    if let Some(r) = e.downcast_ref::<beamline_registry::RegistryError>() {
        return match r.kind() {
            beamline_registry::ErrorKind::Unreachable => 3,
            beamline_registry::ErrorKind::Unsupported => 2,
            _ => 1,
        };
    }
    1
}
