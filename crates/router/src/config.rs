//! The router's configuration: a TOML file (DESIGN.md §3) plus environment overrides,
//! validated as a whole before anything starts.
//!
//! Every error names where the bad value came from (the file and key, or the
//! environment variable and the key it sets) and why it is refused. Secrets
//! (`db_password`, the password inside `database_url`, API keys) print as `***`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use beamline_api::auth::AdminConfig;
#[cfg(test)]
use beamline_api::auth::Role;
use beamline_model::{Limits, Secret, SecretUrl, ValidationError};
use beamline_pipeline::{BreakerConfig, PipelineConfig};
use beamline_registry::{RegistryConfig, SourceMode};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the registry reads from (`[extension_registry]`).
    pub extension_registry: RegistryConfig,
    /// The NATS server extensions are reached through.
    pub nats: NatsConfig,
    /// The gRPC listener (Decide, RouterAdmin, health, reflection).
    pub grpc: GrpcConfig,
    /// The HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    pub http: HttpConfig,
    /// Admin API keys and their roles.
    pub admin: AdminConfig,
    /// Circuit breaker tuning.
    pub circuit_breaker: BreakerConfig,
    /// Request budget, retries and reply limits of the pipeline.
    pub pipeline: PipelineConfig,
    /// Size, depth and range limits (REFERENCE.md §6).
    pub limits: Limits,
    /// Log format and level.
    pub log: LogConfig,
    /// Label cardinality of the metrics.
    pub metrics: beamline_api::metrics::MetricsConfig,
    /// The process's lifecycle (how long a stop may drain).
    pub server: ServerConfig,
    /// The canary judge (progressive delivery, `ext canary`).
    pub canary: beamline_pipeline::CanaryConfig,
    /// OpenTelemetry export of spans (off unless an endpoint is set).
    pub tracing: crate::telemetry::TracingConfig,
}

/// `[server]`: the stop sequence's bounds (docs/RUNBOOK.md, "Stopping a router").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// After SIGTERM/SIGINT, how long requests already accepted may take to finish
    /// before the router stops anyway. Health persistence (at most 5 s), the final
    /// NATS flush (at most 1 s) and the span export's flush (at most 1 s) come after
    /// it, so a stop ends within this plus ~8 s whatever state NATS, PostgreSQL and
    /// the trace collector are in.
    pub drain_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 30_000,
        }
    }
}

impl ServerConfig {
    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.drain_timeout_ms)
    }
}

pub use crate::nats::NatsConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Address the gRPC server binds.
    pub listen: SocketAddr,
    /// PEM certificate chain: set it (with `tls_key_file`) to serve gRPC over TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    pub tls_client_ca_file: Option<PathBuf>,
    /// How Decide's failures map to status codes: `grpc` (gRPC's guidance: only what
    /// a retry can fix is UNAVAILABLE) or `original` (INTERNAL for every pipeline
    /// failure, as the original router answered).
    pub status_codes: beamline_api::router_service::StatusCodes,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            status_codes: Default::default(),
        }
    }
}

impl GrpcConfig {
    /// The TLS settings, reading the files now so a bad path stops the start.
    pub fn tls(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, (String, String)> {
        let read = |key: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                (
                    format!("grpc.{key}"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })
        };
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => {
                if self.tls_client_ca_file.is_some() {
                    return Err((
                        "grpc.tls_client_ca_file".into(),
                        "needs tls_cert_file and tls_key_file".into(),
                    ));
                }
                Ok(None)
            }
            (Some(cert), Some(key)) => {
                let identity = tonic::transport::Identity::from_pem(
                    read("tls_cert_file", cert)?,
                    read("tls_key_file", key)?,
                );
                let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
                if let Some(ca) = &self.tls_client_ca_file {
                    tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(
                        "tls_client_ca_file",
                        ca,
                    )?));
                }
                Ok(Some(tls))
            }
            _ => Err((
                "grpc.tls_cert_file".into(),
                "tls_cert_file and tls_key_file go together".into(),
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the metrics and probe server binds.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// text | json.
    pub format: LogFormat,
    /// A tracing filter (`info`, `beamline_registry=debug,info`); `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {message}")]
    Read { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Key {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("environment variable {var} (sets `{key}`): {message}")]
    Env {
        var: String,
        key: String,
        message: String,
    },
    #[error("configuration: key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl Config {
    /// Reads `path` (or the defaults when `None`), applies the environment, validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.to_path_buf(),
                    message: e.to_string(),
                })?;
                Self::parse(&text, p)?
            }
        };
        apply_env(&mut config, &env)?;
        config.validate().map_err(|(key, message)| match path {
            Some(p) => ConfigError::Key {
                path: p.to_path_buf(),
                key,
                message,
            },
            None => ConfigError::Invalid { key, message },
        })?;
        Ok(config)
    }

    /// Parses TOML text; errors name the key path.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: one_line(&e.to_string()),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let message = one_line(&e.inner().to_string());
            if key == "." || key.is_empty() {
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                }
            } else {
                ConfigError::Key {
                    path: path.to_path_buf(),
                    key,
                    message,
                }
            }
        })
    }

    /// Checks every section; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let within = |section: &str, e: ValidationError| {
            let key = if e.field.is_empty() {
                section.to_string()
            } else {
                format!("{section}.{}", e.field)
            };
            (key, e.reason)
        };
        self.extension_registry
            .validate()
            .map_err(|e| within("extension_registry", e))?;
        self.limits.validate().map_err(|e| within("limits", e))?;
        self.nats.validate()?;
        self.circuit_breaker
            .validate()
            .map_err(|(k, m)| (format!("circuit_breaker.{k}"), m))?;
        let p = &self.pipeline;
        if !(1..=600_000).contains(&p.default_request_timeout_ms) {
            return Err((
                "pipeline.default_request_timeout_ms".into(),
                format!(
                    "{} is out of range 1..=600000",
                    p.default_request_timeout_ms
                ),
            ));
        }
        if p.invoker.retry_backoff_base_ms > p.invoker.retry_backoff_max_ms {
            return Err((
                "pipeline.retry_backoff_base_ms".into(),
                "must not exceed retry_backoff_max_ms".into(),
            ));
        }
        if p.max_in_flight_per_extension == 0 {
            return Err((
                "pipeline.max_in_flight_per_extension".into(),
                "must be at least 1".into(),
            ));
        }
        if p.invoker.max_reply_bytes == 0 {
            return Err((
                "pipeline.max_reply_bytes".into(),
                "must be greater than 0".into(),
            ));
        }
        self.admin.validate()?;
        self.grpc.tls()?;
        if self.server.drain_timeout_ms > 3_600_000 {
            return Err((
                "server.drain_timeout_ms".into(),
                format!(
                    "{} is out of range 0..=3600000",
                    self.server.drain_timeout_ms
                ),
            ));
        }
        self.canary
            .validate()
            .map_err(|(k, m)| (format!("canary.{k}"), m))?;
        if self.metrics.max_tenants == 0 {
            return Err(("metrics.max_tenants".into(), "must be at least 1".into()));
        }
        self.tracing.validate()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            (
                "log.level".to_string(),
                format!("'{}' is not a valid filter: {e}", self.log.level),
            )
        })?;
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The environment variables the router reads, with the key each one sets. The
/// `EXTENSION_REGISTRY_*` names are the original system's.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("EXTENSION_REGISTRY_SOURCE", "extension_registry.source"),
    (
        "EXTENSION_REGISTRY_DB_ENABLED",
        "extension_registry.db_enabled",
    ),
    (
        "EXTENSION_REGISTRY_DATABASE_URL",
        "extension_registry.database_url",
    ),
    ("EXTENSION_REGISTRY_DB_HOST", "extension_registry.db_host"),
    ("EXTENSION_REGISTRY_DB_PORT", "extension_registry.db_port"),
    ("EXTENSION_REGISTRY_DB_NAME", "extension_registry.db_name"),
    ("EXTENSION_REGISTRY_DB_USER", "extension_registry.db_user"),
    (
        "EXTENSION_REGISTRY_DB_PASSWORD",
        "extension_registry.db_password",
    ),
    (
        "EXTENSION_REGISTRY_DB_POOL_SIZE",
        "extension_registry.db_pool_size",
    ),
    (
        "EXTENSION_REGISTRY_FIXTURES_DIR",
        "extension_registry.fixtures_dir",
    ),
    (
        "EXTENSION_REGISTRY_POLICIES_DIR",
        "extension_registry.policies_dir",
    ),
    (
        "EXTENSION_REGISTRY_SYNC_INTERVAL_SECONDS",
        "extension_registry.sync_interval_seconds",
    ),
    (
        "EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED",
        "circuit_breaker.enabled",
    ),
    (
        "EXTENSION_REGISTRY_CIRCUIT_BREAKER_FAILURE_THRESHOLD",
        "circuit_breaker.failure_threshold",
    ),
    (
        "EXTENSION_REGISTRY_CIRCUIT_BREAKER_TIMEOUT_SECONDS",
        "circuit_breaker.timeout_seconds",
    ),
    ("BEAMLINE_NATS_URL", "nats.url"),
    ("BEAMLINE_NATS_CREDENTIALS_FILE", "nats.credentials_file"),
    ("BEAMLINE_NATS_NKEY_SEED_FILE", "nats.nkey_seed_file"),
    ("BEAMLINE_NATS_TOKEN", "nats.token"),
    ("BEAMLINE_NATS_USER", "nats.user"),
    ("BEAMLINE_NATS_PASSWORD", "nats.password"),
    ("BEAMLINE_NATS_TLS_CA_FILE", "nats.tls_ca_file"),
    ("BEAMLINE_NATS_TLS_CERT_FILE", "nats.tls_cert_file"),
    ("BEAMLINE_NATS_TLS_KEY_FILE", "nats.tls_key_file"),
    ("BEAMLINE_NATS_TLS_REQUIRED", "nats.tls_required"),
    ("BEAMLINE_GRPC_LISTEN", "grpc.listen"),
    ("BEAMLINE_HTTP_LISTEN", "http.listen"),
    ("BEAMLINE_LOG_FORMAT", "log.format"),
    ("BEAMLINE_LOG_LEVEL", "log.level"),
    ("BEAMLINE_DRAIN_TIMEOUT_MS", "server.drain_timeout_ms"),
    ("BEAMLINE_CANARY_ENABLED", "canary.enabled"),
    (
        "BEAMLINE_CANARY_EVALUATION_INTERVAL_MS",
        "canary.evaluation_interval_ms",
    ),
    ("BEAMLINE_TRACING_ENDPOINT", "tracing.endpoint"),
    ("BEAMLINE_TRACING_SAMPLE_RATIO", "tracing.sample_ratio"),
    ("BEAMLINE_TRACING_SERVICE_NAME", "tracing.service_name"),
    (
        "BEAMLINE_ADMIN_KEY",
        "admin.api_keys (an admin key named \"env\")",
    ),
];

fn apply_env(
    config: &mut Config,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (var, key) in ENV_VARS {
        let Some(raw) = env(var) else { continue };
        let value = raw.trim();
        let fail = |message: String| ConfigError::Env {
            var: (*var).to_string(),
            key: (*key).to_string(),
            message,
        };
        // Never echo the value of a secret-bearing variable.
        let shown = if var.contains("PASSWORD") || var.contains("KEY") || var.contains("TOKEN") {
            "***".to_string()
        } else if var.ends_with("_URL") {
            beamline_model::secret::redact_url(value)
        } else {
            value.to_string()
        };
        let r = &mut config.extension_registry;
        match *var {
            "EXTENSION_REGISTRY_SOURCE" => r.source = value.parse::<SourceMode>().map_err(fail)?,
            "EXTENSION_REGISTRY_DB_ENABLED" => r.db_enabled = parse_bool(value).map_err(fail)?,
            "EXTENSION_REGISTRY_DATABASE_URL" => r.database_url = Some(SecretUrl::new(value)),
            "EXTENSION_REGISTRY_DB_HOST" => r.db_host = value.to_string(),
            "EXTENSION_REGISTRY_DB_PORT" => {
                r.db_port = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a port number")))?
            }
            "EXTENSION_REGISTRY_DB_NAME" => r.db_name = value.to_string(),
            "EXTENSION_REGISTRY_DB_USER" => r.db_user = value.to_string(),
            "EXTENSION_REGISTRY_DB_PASSWORD" => r.db_password = Some(Secret::new(raw.clone())),
            "EXTENSION_REGISTRY_DB_POOL_SIZE" => {
                r.db_pool_size = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a whole number")))?
            }
            "EXTENSION_REGISTRY_FIXTURES_DIR" => r.fixtures_dir = Some(PathBuf::from(value)),
            "EXTENSION_REGISTRY_POLICIES_DIR" => r.policies_dir = Some(PathBuf::from(value)),
            "EXTENSION_REGISTRY_SYNC_INTERVAL_SECONDS" => {
                r.sync_interval_seconds = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a whole number of seconds")))?
            }
            "EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED" => {
                config.circuit_breaker.enabled = parse_bool(value).map_err(fail)?
            }
            "EXTENSION_REGISTRY_CIRCUIT_BREAKER_FAILURE_THRESHOLD" => {
                config.circuit_breaker.failure_threshold = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a whole number")))?
            }
            "EXTENSION_REGISTRY_CIRCUIT_BREAKER_TIMEOUT_SECONDS" => {
                config.circuit_breaker.timeout_seconds = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a whole number of seconds")))?
            }
            "BEAMLINE_NATS_URL" => {
                config.nats.url = SecretUrl::new(value);
                config.nats.urls.clear();
            }
            "BEAMLINE_NATS_CREDENTIALS_FILE" => {
                config.nats.credentials_file = Some(PathBuf::from(value))
            }
            "BEAMLINE_NATS_NKEY_SEED_FILE" => {
                config.nats.nkey_seed_file = Some(PathBuf::from(value))
            }
            "BEAMLINE_NATS_TOKEN" => config.nats.token = Some(Secret::new(value)),
            "BEAMLINE_NATS_USER" => config.nats.user = Some(value.to_string()),
            "BEAMLINE_NATS_PASSWORD" => config.nats.password = Some(Secret::new(raw.clone())),
            "BEAMLINE_NATS_TLS_CA_FILE" => config.nats.tls_ca_file = Some(PathBuf::from(value)),
            "BEAMLINE_NATS_TLS_CERT_FILE" => config.nats.tls_cert_file = Some(PathBuf::from(value)),
            "BEAMLINE_NATS_TLS_KEY_FILE" => config.nats.tls_key_file = Some(PathBuf::from(value)),
            "BEAMLINE_NATS_TLS_REQUIRED" => {
                config.nats.tls_required = parse_bool(value).map_err(fail)?
            }
            "BEAMLINE_GRPC_LISTEN" => {
                config.grpc.listen = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not an address like 127.0.0.1:9000")))?
            }
            "BEAMLINE_HTTP_LISTEN" => {
                config.http.listen = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not an address like 127.0.0.1:9100")))?
            }
            "BEAMLINE_LOG_FORMAT" => {
                config.log.format = match value {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(fail(format!("'{shown}' is not text or json"))),
                }
            }
            "BEAMLINE_LOG_LEVEL" => config.log.level = value.to_string(),
            "BEAMLINE_DRAIN_TIMEOUT_MS" => {
                config.server.drain_timeout_ms = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a whole number of ms")))?
            }
            "BEAMLINE_CANARY_ENABLED" => config.canary.enabled = parse_bool(value).map_err(fail)?,
            "BEAMLINE_CANARY_EVALUATION_INTERVAL_MS" => {
                config.canary.evaluation_interval_ms = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a whole number of ms")))?
            }
            "BEAMLINE_TRACING_ENDPOINT" => config.tracing.endpoint = value.to_string(),
            "BEAMLINE_TRACING_SAMPLE_RATIO" => {
                config.tracing.sample_ratio = value
                    .parse()
                    .map_err(|_| fail(format!("'{shown}' is not a number from 0.0 to 1.0")))?
            }
            "BEAMLINE_TRACING_SERVICE_NAME" => config.tracing.service_name = value.to_string(),
            "BEAMLINE_ADMIN_KEY" => {
                config.admin.api_keys.retain(|k| k.name != "env");
                config
                    .admin
                    .api_keys
                    .push(beamline_api::auth::ApiKeyConfig {
                        name: "env".into(),
                        role: beamline_api::auth::Role::Admin,
                        key_sha256: None,
                        key: Some(Secret::new(value)),
                    });
            }
            _ => {}
        }
    }
    Ok(())
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("'{value}' is not a boolean (true/false)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        std::fs::write(&path, text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with_env(Some(&path), |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    const DESIGN_SAMPLE: &str = r#"
[extension_registry]
source = "database"
db_enabled = true
database_url = "postgres://postgres:hunter2@127.0.0.1:5432/beamline"
fixtures_dir = "fixtures/extensions"
policies_dir = "fixtures/policies"
sync_interval_seconds = 30

[nats]
url = "nats://127.0.0.1:4222"

[grpc]
listen = "127.0.0.1:9000"

[http]
listen = "127.0.0.1:9100"

[[admin.api_keys]]
name = "ops"
role = "admin"
key_sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
"#;

    #[test]
    fn the_design_sample_loads() {
        let c = load(DESIGN_SAMPLE, &[]).unwrap();
        assert_eq!(c.extension_registry.source, SourceMode::Database);
        assert_eq!(c.admin.api_keys[0].role, Role::Admin);
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("hunter2"), "secret leaked: {shown}");
    }

    #[test]
    fn no_file_means_fixtures_defaults() {
        let c = Config::load_with_env(None, |_| None).unwrap();
        assert_eq!(c.extension_registry.source, SourceMode::Fixtures);
        assert_eq!(c.grpc.listen.port(), 9000);
    }

    #[test]
    fn original_env_vars_override_the_file() {
        let c = load(
            DESIGN_SAMPLE,
            &[
                ("EXTENSION_REGISTRY_SOURCE", "auto"),
                ("EXTENSION_REGISTRY_DB_HOST", "db.internal"),
                ("EXTENSION_REGISTRY_DB_PORT", "6432"),
                ("EXTENSION_REGISTRY_SYNC_INTERVAL_SECONDS", "5"),
                ("EXTENSION_REGISTRY_CIRCUIT_BREAKER_FAILURE_THRESHOLD", "7"),
            ],
        )
        .unwrap();
        let r = &c.extension_registry;
        assert_eq!(
            (r.source, r.db_host.as_str(), r.db_port),
            (SourceMode::Auto, "db.internal", 6432)
        );
        assert_eq!(r.sync_interval_seconds, 5);
        assert_eq!(c.circuit_breaker.failure_threshold, 7);
    }

    #[test]
    fn a_bad_value_names_file_key_and_reason() {
        let err = load(
            "[extension_registry]\nsync_interval_seconds = \"often\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("router.toml"), "{err}");
        assert!(
            err.contains("extension_registry.sync_interval_seconds"),
            "{err}"
        );

        let err = load("[extension_registry]\nsource = \"db\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("extension_registry.source") && err.contains("db"),
            "{err}"
        );

        let err = load("[extension_registry]\ndb_pool_size = 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("extension_registry.db_pool_size") && err.contains("2..=100"),
            "{err}"
        );

        let err = load("[extension_registy]\n", &[]).unwrap_err().to_string();
        assert!(err.contains("extension_registy"), "{err}");

        let err = load("[limits]\nmax_timeout_ms = 5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.min_timeout_ms"), "{err}");

        let err = load("not toml = = =", &[]).unwrap_err().to_string();
        assert!(err.contains("router.toml"), "{err}");
    }

    #[test]
    fn a_bad_env_value_names_the_variable_and_hides_secrets() {
        let err = load("", &[("EXTENSION_REGISTRY_DB_PORT", "fifty")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EXTENSION_REGISTRY_DB_PORT") && err.contains("fifty"),
            "{err}"
        );
        let err = load(
            "",
            &[("EXTENSION_REGISTRY_DATABASE_URL", "mysql://u:hunter2@h/db")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("database_url") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn nats_keys_come_from_the_environment_too() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("router.nk");
        std::fs::write(&seed, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
        let c = load(
            "",
            &[
                ("BEAMLINE_NATS_URL", "nats://a:4222,nats://b:4222"),
                ("BEAMLINE_NATS_NKEY_SEED_FILE", seed.to_str().unwrap()),
                ("BEAMLINE_NATS_TLS_REQUIRED", "true"),
            ],
        )
        .unwrap();
        assert_eq!(c.nats.seeds(), ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(c.nats.nkey_seed_file.as_deref(), Some(seed.as_path()));
        assert!(c.nats.tls_required);
        let c = load("", &[("BEAMLINE_NATS_TOKEN", "t0k3n-xyz")]).unwrap();
        assert_eq!(c.nats.token.as_ref().map(|t| t.expose()), Some("t0k3n-xyz"));
        // A missing file is named by its key; a bad value by its variable.
        let err = load(
            "",
            &[(
                "BEAMLINE_NATS_CREDENTIALS_FILE",
                "/nonexistent/router.creds",
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("nats.credentials_file") && err.contains("/nonexistent/router.creds"),
            "{err}"
        );
        let err = load("", &[("BEAMLINE_NATS_TLS_REQUIRED", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("BEAMLINE_NATS_TLS_REQUIRED"), "{err}");
        let err = load(
            "[nats]\nuser = \"ops\"\n",
            &[("BEAMLINE_NATS_TOKEN", "t0k3n-xyz")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nats.") && !err.contains("t0k3n-xyz"), "{err}");
    }

    #[test]
    fn canary_keys_load_validate_and_come_from_the_environment() {
        let c = load("", &[]).unwrap();
        assert!(c.canary.enabled);
        assert_eq!(c.canary.evaluation_interval_ms, 10_000);
        let c = load(
            "[canary]\nenabled = false\nevaluation_interval_ms = 250\n",
            &[],
        )
        .unwrap();
        assert!(!c.canary.enabled);
        assert_eq!(c.canary.evaluation_interval_ms, 250);
        let err = load("[canary]\nevaluation_interval_ms = 5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("canary.evaluation_interval_ms") && err.contains("100..=3600000"),
            "{err}"
        );
        let err = load("[canary]\ninterval = 5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("interval"), "{err}");
        let c = load(
            "",
            &[
                ("BEAMLINE_CANARY_ENABLED", "false"),
                ("BEAMLINE_CANARY_EVALUATION_INTERVAL_MS", "500"),
            ],
        )
        .unwrap();
        assert!(!c.canary.enabled && c.canary.evaluation_interval_ms == 500);
        let err = load("", &[("BEAMLINE_CANARY_EVALUATION_INTERVAL_MS", "often")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BEAMLINE_CANARY_EVALUATION_INTERVAL_MS"),
            "{err}"
        );
    }

    #[test]
    fn tracing_is_off_by_default_and_checked_key_by_key() {
        let c = load("", &[]).unwrap();
        assert!(!c.tracing.enabled());
        assert_eq!(c.tracing.sample_ratio, 1.0);
        assert_eq!(c.tracing.service_name, "beamline-router");
        let c = load(
            "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.25\n[tracing.resource_attributes]\n\"deployment.environment\" = \"prod\"\n",
            &[("BEAMLINE_TRACING_SERVICE_NAME", "router-eu")],
        )
        .unwrap();
        assert!(c.tracing.enabled());
        assert_eq!(c.tracing.sample_ratio, 0.25);
        assert_eq!(c.tracing.service_name, "router-eu");
        assert_eq!(
            c.tracing.resource_attributes["deployment.environment"],
            "prod"
        );
        for (text, key) in [
            ("[tracing]\nsample_ratio = 1.5\n", "tracing.sample_ratio"),
            (
                "[tracing]\nendpoint = \"127.0.0.1:4317\"\n",
                "tracing.endpoint",
            ),
            (
                "[tracing]\nendpoint = \"ftp://collector:4317\"\n",
                "tracing.endpoint",
            ),
            ("[tracing]\nservice_name = \"\"\n", "tracing.service_name"),
            ("[tracing]\nmax_queue_size = 0\n", "tracing.max_queue_size"),
            (
                "[tracing]\nmax_queue_size = 10\nmax_export_batch_size = 11\n",
                "tracing.max_export_batch_size",
            ),
            (
                "[tracing]\nexport_timeout_ms = 0\n",
                "tracing.export_timeout_ms",
            ),
            (
                "[tracing]\nendpoint = \"http://c:4317\"\ntls_ca_file = \"/etc/ca.pem\"\n",
                "tracing.tls_ca_file",
            ),
            ("[tracing]\nsampling = 1\n", "sampling"),
        ] {
            let err = load(text, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let err = load("", &[("BEAMLINE_TRACING_SAMPLE_RATIO", "most")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("BEAMLINE_TRACING_SAMPLE_RATIO"), "{err}");
        let err = load("", &[("BEAMLINE_TRACING_SAMPLE_RATIO", "2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tracing.sample_ratio"), "{err}");
    }

    #[test]
    fn api_keys_are_checked() {
        let err = load(
            "[[admin.api_keys]]\nname = \"ops\"\nrole = \"admin\"\nkey_sha256 = \"XYZ\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("admin.api_keys[0].key_sha256"), "{err}");
        let err = load(
            "[[admin.api_keys]]\nname = \"ops\"\nrole = \"root\"\nkey = \"0123456789abcdef\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("root"), "{err}");
        let ok = load("[[admin.api_keys]]\nname = \"dev\"\nrole = \"viewer\"\nkey = \"0123456789abcdefXYZ\"\n", &[]).unwrap();
        assert!(!format!("{ok:?}").contains("0123456789abcdefXYZ"));
    }
}
