//! `beamline-router migrate`: apply the embedded schema migrations; with
//! `--seed-default`, also write the reference extensions and the `default` policy
//! (the embedded default's records), so database mode starts as usefully as the
//! embedded default. Seeding never changes a row that exists.

use anyhow::Context;
use beamline_model::SecretUrl;
use beamline_registry::{RegistryConfig, database};

use crate::cli::MigrateArgs;
use crate::config::Config;

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    // The limits the seeded records are validated against: the configuration's when
    // one is given, else the defaults.
    let config = match &args.config {
        Some(path) => Some(Config::load(Some(path))?),
        None => None,
    };
    let limits = config
        .as_ref()
        .map(|c| c.limits.clone())
        .unwrap_or_default();
    let registry_config = match args.database_url {
        Some(url) => RegistryConfig {
            database_url: Some(SecretUrl::new(url)),
            ..RegistryConfig::default()
        },
        None => match config {
            Some(c) => c.extension_registry,
            None => Config::load(None)?.extension_registry,
        },
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
    if args.seed_default {
        let data = beamline_registry::fixtures::load_builtin(true)?;
        let report =
            beamline_registry::writes::seed(&pool, &shown, data, "migrate --seed-default", &limits)
                .await
                .with_context(|| format!("seeding {shown}"))?;
        for (record, written) in report.records {
            if written {
                println!("seeded {record}");
            } else {
                println!("kept {record} (a row of that key exists; not changed)");
            }
        }
    }
    Ok(())
}
