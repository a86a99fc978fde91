//! `[extension_registry]`: where the registry reads from and how often it syncs.
//! Key names are the original's (REFERENCE.md §8), so existing configs keep working.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use beamline_model::{Secret, SecretUrl, ValidationError};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

/// Where the registry's records come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// JSON files: development, and a router with no database.
    #[default]
    Fixtures,
    /// PostgreSQL only: the source of truth in production.
    Database,
    /// PostgreSQL, falling back to fixtures while the database cannot be reached.
    Auto,
}

impl SourceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceMode::Fixtures => "fixtures",
            SourceMode::Database => "database",
            SourceMode::Auto => "auto",
        }
    }
}

impl fmt::Display for SourceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SourceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fixtures" => Ok(SourceMode::Fixtures),
            "database" => Ok(SourceMode::Database),
            "auto" => Ok(SourceMode::Auto),
            other => Err(format!(
                "unknown source '{other}' (expected fixtures, database or auto)"
            )),
        }
    }
}

/// The `[extension_registry]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// fixtures | database | auto.
    pub source: SourceMode,
    /// Whether the database may be used at all; `source = "database"` needs it true,
    /// and `auto` with it false behaves as `fixtures`.
    pub db_enabled: bool,
    /// Full connection URL; when set it wins over the `db_*` fields.
    pub database_url: Option<SecretUrl>,
    /// Database host, used when `database_url` is not set.
    pub db_host: String,
    /// Database port.
    pub db_port: u16,
    /// Database name.
    pub db_name: String,
    /// Database user.
    pub db_user: String,
    /// Database password (never printed).
    pub db_password: Option<Secret>,
    /// Connections the registry keeps (reloads, LISTEN, writes).
    pub db_pool_size: u32,
    /// How long to wait for a connection before calling the database unreachable.
    pub db_connect_timeout_ms: u64,
    /// Folder of extension fixture files; unset means the fixtures built into the binary.
    pub fixtures_dir: Option<PathBuf>,
    /// Folder of policy fixtures (`<tenant>/<policy>.json`); unset means the built-in
    /// policies when `fixtures_dir` is also unset, and no policies otherwise.
    pub policies_dir: Option<PathBuf>,
    /// Full resync period; the safety net behind LISTEN/NOTIFY.
    pub sync_interval_seconds: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            source: SourceMode::Fixtures,
            db_enabled: true,
            database_url: None,
            db_host: "127.0.0.1".to_string(),
            db_port: 5432,
            db_name: "beamline".to_string(),
            db_user: "postgres".to_string(),
            db_password: None,
            db_pool_size: 5,
            db_connect_timeout_ms: 2000,
            fixtures_dir: None,
            policies_dir: None,
            sync_interval_seconds: 30,
        }
    }
}

impl RegistryConfig {
    /// Refuses values no registry can run with; `field` is the key's name.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.source == SourceMode::Database && !self.db_enabled {
            return Err(ValidationError::new(
                "db_enabled",
                "source = \"database\" needs db_enabled = true",
            ));
        }
        if !(1..=86_400).contains(&self.sync_interval_seconds) {
            return Err(ValidationError::new(
                "sync_interval_seconds",
                format!("{} is out of range 1..=86400", self.sync_interval_seconds),
            ));
        }
        if !(2..=100).contains(&self.db_pool_size) {
            return Err(ValidationError::new(
                "db_pool_size",
                format!(
                    "{} is out of range 2..=100 (one connection is held by LISTEN)",
                    self.db_pool_size
                ),
            ));
        }
        if !(100..=60_000).contains(&self.db_connect_timeout_ms) {
            return Err(ValidationError::new(
                "db_connect_timeout_ms",
                format!("{} is out of range 100..=60000", self.db_connect_timeout_ms),
            ));
        }
        if self.db_port == 0 {
            return Err(ValidationError::new("db_port", "must not be 0"));
        }
        if let Some(url) = &self.database_url {
            let raw = url.expose();
            if !(raw.starts_with("postgres://") || raw.starts_with("postgresql://")) {
                return Err(ValidationError::new(
                    "database_url",
                    format!(
                        "'{}' is not a postgres:// or postgresql:// URL",
                        url.redacted()
                    ),
                ));
            }
            raw.parse::<PgConnectOptions>().map_err(|e| {
                ValidationError::new(
                    "database_url",
                    format!(
                        "'{}' cannot be parsed: {}",
                        url.redacted(),
                        scrub(&e.to_string(), raw)
                    ),
                )
            })?;
        } else {
            for (field, value) in [
                ("db_host", &self.db_host),
                ("db_name", &self.db_name),
                ("db_user", &self.db_user),
            ] {
                if value.trim().is_empty() {
                    return Err(ValidationError::new(field, "must not be empty"));
                }
            }
        }
        Ok(())
    }

    /// Whether this configuration reads PostgreSQL at all.
    pub fn uses_database(&self) -> bool {
        self.db_enabled && self.source != SourceMode::Fixtures
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.db_connect_timeout_ms)
    }

    pub fn sync_interval(&self) -> Duration {
        Duration::from_secs(self.sync_interval_seconds)
    }

    /// Connection options from `database_url` or the `db_*` fields.
    pub fn connect_options(&self) -> Result<PgConnectOptions, ValidationError> {
        let options = match &self.database_url {
            Some(url) => url.expose().parse::<PgConnectOptions>().map_err(|e| {
                ValidationError::new("database_url", scrub(&e.to_string(), url.expose()))
            })?,
            None => {
                let mut o = PgConnectOptions::new_without_pgpass()
                    .host(&self.db_host)
                    .port(self.db_port)
                    .database(&self.db_name)
                    .username(&self.db_user);
                if let Some(pw) = &self.db_password {
                    o = o.password(pw.expose());
                }
                o
            }
        };
        Ok(options.application_name("beamline-router"))
    }

    /// The configuration as it is used, for status and logs: with `database_url` set,
    /// the `db_*` fields show what the URL says (host, port, database, user) rather
    /// than their unused defaults; secrets stay redacted.
    pub fn as_used(&self) -> RegistryConfig {
        let mut shown = self.clone();
        if let Some(url) = &self.database_url
            && let Ok(o) = url.expose().parse::<PgConnectOptions>()
        {
            shown.db_host = o.get_host().to_string();
            shown.db_port = o.get_port();
            shown.db_name = o.get_database().unwrap_or_default().to_string();
            shown.db_user = o.get_username().to_string();
            shown.db_password = None;
        }
        shown
    }

    /// Where the database is, for status and logs, without any password.
    pub fn database_display(&self) -> String {
        match &self.database_url {
            Some(url) => url.redacted(),
            None => format!(
                "postgres://{}@{}:{}/{}",
                self.db_user, self.db_host, self.db_port, self.db_name
            ),
        }
    }
}

/// Removes a secret-bearing string from an error message a library produced.
fn scrub(message: &str, secret_source: &str) -> String {
    if secret_source.is_empty() {
        message.to_string()
    } else {
        message.replace(
            secret_source,
            &beamline_model::secret::redact_url(secret_source),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_use_fixtures() {
        let c = RegistryConfig::default();
        c.validate().unwrap();
        assert!(!c.uses_database());
    }

    #[test]
    fn database_source_needs_db_enabled() {
        let c = RegistryConfig {
            source: SourceMode::Database,
            db_enabled: false,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "db_enabled");
    }

    #[test]
    fn bad_url_is_named_without_its_password() {
        let c = RegistryConfig {
            database_url: Some(SecretUrl::new("mysql://u:hunter2@h/db")),
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert_eq!(err.field, "database_url");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn ranges_are_checked() {
        for c in [
            RegistryConfig {
                sync_interval_seconds: 0,
                ..Default::default()
            },
            RegistryConfig {
                db_pool_size: 1,
                ..Default::default()
            },
            RegistryConfig {
                db_port: 0,
                ..Default::default()
            },
        ] {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn the_database_shown_is_the_one_database_url_names() {
        let c = RegistryConfig {
            database_url: Some(SecretUrl::new(
                "postgres://ops:hunter2@db.internal:6432/registry_prod",
            )),
            ..Default::default()
        };
        let shown = c.as_used();
        assert_eq!(
            (
                shown.db_host.as_str(),
                shown.db_port,
                shown.db_name.as_str()
            ),
            ("db.internal", 6432, "registry_prod")
        );
        assert_eq!(shown.db_user, "ops");
        let text = serde_json::to_string(&shown).unwrap() + &c.database_display();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(c.database_display().contains("registry_prod"));
    }

    #[test]
    fn source_parses_case_insensitively() {
        assert_eq!(
            "Database".parse::<SourceMode>().unwrap(),
            SourceMode::Database
        );
        assert!("db".parse::<SourceMode>().is_err());
    }
}
