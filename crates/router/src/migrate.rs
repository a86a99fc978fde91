//! `beamline-router migrate`: apply the embedded schema migrations.

use anyhow::Context;
use beamline_model::SecretUrl;
use beamline_registry::{RegistryConfig, database};

use crate::cli::MigrateArgs;
use crate::config::Config;

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let registry_config = match args.database_url {
        Some(url) => RegistryConfig {
            database_url: Some(SecretUrl::new(url)),
            ..RegistryConfig::default()
        },
        None => Config::load(args.config.as_deref())?.extension_registry,
    };
    registry_config
        .validate()
        .map_err(|e| crate::config::ConfigError::Invalid {
            key: format!("extension_registry.{}", e.field),
            message: e.reason,
        })?;
    let shown = registry_config.database_display();
    let pool = database::lazy_pool(&registry_config)?;
    database::test_connection(&pool, &shown).await?;
    database::migrate(&pool, &shown)
        .await
        .with_context(|| format!("migrating {shown}"))?;
    let latest = database::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    println!("database {shown} is at schema version {latest}");
    Ok(())
}
