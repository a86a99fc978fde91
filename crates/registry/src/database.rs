//! The PostgreSQL source: migrations, one consistent read of every registry table,
//! and the NOTIFY channel that tells routers a change was committed.

use beamline_model::{ExtensionRecord, InstanceRecord, VersionRecord};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::RegistryConfig;
use crate::dataset::{Dataset, PolicyRecord, Sourced};
use crate::error::{Origin, RegistryError};

/// Channel the registry triggers notify on after every committed change.
pub const NOTIFY_CHANNEL: &str = "beamline_registry";

/// The embedded schema migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool that connects on first use, so a router starts while its database is down.
pub fn lazy_pool(config: &RegistryConfig) -> Result<PgPool, RegistryError> {
    let options = config
        .connect_options()
        .map_err(|e| RegistryError::Unsupported(format!("extension_registry.{e}")))?;
    Ok(pool_with(options, config))
}

pub(crate) fn pool_with(options: PgConnectOptions, config: &RegistryConfig) -> PgPool {
    PgPoolOptions::new()
        .max_connections(config.db_pool_size)
        .min_connections(0)
        .acquire_timeout(config.connect_timeout())
        .connect_lazy_with(options)
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool, database: &str) -> Result<(), RegistryError> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(inner) => RegistryError::from_sqlx(database, inner),
        other => RegistryError::Database {
            database: database.to_string(),
            message: format!("migration failed: {other}"),
        },
    })
}

/// `SELECT 1` round trip: is the database there and answering?
pub async fn test_connection(pool: &PgPool, database: &str) -> Result<(), RegistryError> {
    sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(pool)
        .await
        .map(|_| ())
        .map_err(|e| RegistryError::from_sqlx(database, e))
}

type ExtensionRow = (String, String, String, i32, i32, bool, String, Value, Value);
type VersionRow = (
    String,
    String,
    String,
    i32,
    i32,
    Value,
    Value,
    Value,
    bool,
    Option<DateTime<Utc>>,
);
type InstanceRow = (String, String, String, i32, bool, String);
type PolicyRow = (String, String, Value, bool);

/// Reads every table in one REPEATABLE READ transaction, so the snapshot never mixes
/// the state before and after a concurrent change.
pub async fn load(pool: &PgPool, database: &str) -> Result<Dataset, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    let extensions: Vec<ExtensionRow> = sqlx::query_as(
        "SELECT id, type, subject, timeout_ms, retry, enabled, version, config, metadata \
         FROM extensions ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    let versions: Vec<VersionRow> = sqlx::query_as(
        "SELECT id, version, subject, timeout_ms, retry, config, metadata, routing_rules, \
         enabled, created_at FROM extension_versions ORDER BY id, version",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    let instances: Vec<InstanceRow> = sqlx::query_as(
        "SELECT extension_id, instance_id, subject, weight, enabled, health_status \
         FROM extension_instances ORDER BY extension_id, instance_id",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    let policies: Vec<PolicyRow> = sqlx::query_as(
        "SELECT tenant_id, policy_id, policy, enabled FROM policies ORDER BY tenant_id, policy_id",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)?;

    let mut data = Dataset {
        extensions: Vec::with_capacity(extensions.len()),
        versions: Vec::with_capacity(versions.len()),
        instances: Vec::with_capacity(instances.len()),
        policies: Vec::with_capacity(policies.len()),
    };
    for (id, ext_type, subject, timeout_ms, retry, enabled, version, config, metadata) in extensions
    {
        data.extensions.push(Sourced {
            origin: Origin::Row {
                table: "extensions",
                key: format!("id='{id}'"),
            },
            value: ExtensionRecord {
                id,
                ext_type,
                subject,
                timeout_ms: timeout_ms.into(),
                retry: retry.into(),
                enabled,
                version,
                config,
                metadata,
            },
        });
    }
    for (
        id,
        version,
        subject,
        timeout_ms,
        retry,
        config,
        metadata,
        routing_rules,
        enabled,
        created_at,
    ) in versions
    {
        data.versions.push(Sourced {
            origin: Origin::Row {
                table: "extension_versions",
                key: format!("(id='{id}', version='{version}')"),
            },
            value: VersionRecord {
                id,
                version,
                subject,
                timeout_ms: timeout_ms.into(),
                retry: retry.into(),
                config,
                metadata,
                routing_rules,
                enabled,
                created_at,
            },
        });
    }
    for (extension_id, instance_id, subject, weight, enabled, health_status) in instances {
        data.instances.push(Sourced {
            origin: Origin::Row {
                table: "extension_instances",
                key: format!("(extension_id='{extension_id}', instance_id='{instance_id}')"),
            },
            value: InstanceRecord {
                extension_id,
                instance_id,
                subject,
                weight: weight.into(),
                enabled,
                health_status,
            },
        });
    }
    for (tenant_id, policy_id, document, enabled) in policies {
        data.policies.push(Sourced {
            origin: Origin::Row {
                table: "policies",
                key: format!("(tenant_id='{tenant_id}', policy_id='{policy_id}')"),
            },
            value: PolicyRecord {
                tenant_id,
                policy_id,
                document,
                enabled,
            },
        });
    }
    Ok(data)
}
