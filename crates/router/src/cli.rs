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
    /// PEM CA certificate to verify the router's TLS certificate (with an https:// --addr).
    #[arg(long, global = true, env = "BEAMLINE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
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
    /// The registry of the running router.
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Extensions.
    #[command(subcommand)]
    Ext(ExtCmd),
    /// Extension health.
    #[command(subcommand)]
    Health(HealthCmd),
    /// Circuit breakers.
    #[command(subcommand)]
    Breaker(BreakerCmd),
    /// Tenant policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Debug, Subcommand)]
pub enum RegistryCmd {
    /// Running, size, source, database state, last sync, configuration (redacted).
    Status,
    /// Check the router's database connection.
    TestConnection,
    /// Reload from the current source (refused reloads keep the previous snapshot).
    Reload,
    /// Switch the source live: fixtures, database or auto.
    Source { mode: String },
}

#[derive(Debug, Subcommand)]
pub enum ExtCmd {
    /// One extension's base record.
    Get { id: String },
    /// Every extension, or those of one type.
    List {
        #[arg(long = "type")]
        ext_type: Option<String>,
    },
    /// The record an extension resolves to for a context (version routing).
    Resolve {
        id: String,
        /// key=value, repeatable: --context tenant_id=premium_tenant
        #[arg(long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
    },
    /// Enable (database write, audit-logged, then reload).
    Enable { id: String },
    /// Disable (database write, audit-logged, then reload).
    Disable { id: String },
    /// Change timeout, retry and/or config (database write, audit-logged, then reload).
    Set {
        id: String,
        #[arg(long)]
        timeout_ms: Option<i32>,
        #[arg(long)]
        retry: Option<i32>,
        /// A JSON object replacing the config.
        #[arg(long)]
        config: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum HealthCmd {
    /// One extension's health and breaker.
    Get { id: String },
    /// Totals over every extension.
    Summary,
    /// Every extension's health.
    List,
}

#[derive(Debug, Subcommand)]
pub enum BreakerCmd {
    /// Close an extension's breakers here and, through the database, on every router.
    Reset { id: String },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Which policies use an extension.
    Uses { id: String },
    /// Every policy (of one tenant).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// One policy document.
    Get { tenant: String, policy: String },
    /// Create or replace a policy from a JSON file ("-" reads standard input).
    Upsert {
        tenant: String,
        policy: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Delete a policy.
    Delete { tenant: String, policy: String },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("'{s}' is not key=value"))
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

/// Exit codes scripts can rely on: 2 bad configuration, usage or input; 3 the router
/// or a dependency cannot be reached; 4 not found; 5 missing/invalid key or role too
/// small; 6 refused in the current state (fixtures mode, reload refused); 1 anything
/// else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<crate::config::ConfigError>().is_some() {
        return 2;
    }
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return match s.code() {
            tonic::Code::InvalidArgument => 2,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 3,
            tonic::Code::NotFound => 4,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => 5,
            tonic::Code::FailedPrecondition => 6,
            _ => 1,
        };
    }
    if e.downcast_ref::<crate::ops::Unreachable>().is_some() {
        return 3;
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
