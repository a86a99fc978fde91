//! The PostgreSQL source: migrations, one consistent read of every registry table,
//! the read of only what changed since an earlier read (`registry_changes`), and the
//! NOTIFY channel that tells routers a change was committed.

use beamline_model::{ExtensionRecord, InstanceRecord, VersionRecord};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::RegistryConfig;
use crate::dataset::{Dataset, PolicyRecord, Sourced};
use crate::error::{Origin, RegistryError};
use crate::snapshot::ChangeSet;

/// Channel the registry triggers notify on after every committed change.
pub const NOTIFY_CHANNEL: &str = "beamline_registry";

/// Most keys a router re-reads one by one after a NOTIFY; past this, one full
/// reload is cheaper than the keyed reads.
pub const MAX_CHANGED_KEYS: usize = 1024;

/// Whether a `beamline_registry` payload is one the registry's triggers send (a
/// table name, with the keys in `registry_changes`). Anything else — a hand-written
/// `NOTIFY beamline_registry, 'reload'` — asks for a full reload.
pub fn is_logged_change(payload: &str) -> bool {
    matches!(
        payload,
        "extensions" | "extension_versions" | "extension_instances" | "policies"
    )
}

/// What changed since a position, as read from `registry_changes`.
#[derive(Debug)]
pub enum Changes {
    /// Some change must be read whole (a TRUNCATE, a statement over 256 keys, more
    /// than [`MAX_CHANGED_KEYS`] keys in all): do a full reload.
    Everything,
    /// These keys changed; `Dataset` holds their records as of `Dataset::position`.
    Keys(ChangeSet, Dataset),
}

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
/// A row of `extension_versions` as the registry reads it.
pub(crate) type VersionRow = (
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
    let mut tx = begin_read(pool, database).await?;
    let data = read(&mut tx, database, None).await?;
    tx.commit().await.map_err(err)?;
    Ok(data)
}

/// In one REPEATABLE READ transaction, the keys of every transaction committed since
/// `since` (a [`Dataset::position`]) and their records now: applied to the state read
/// at `since`, they give exactly the database's state at the new position.
pub async fn load_changes_since(
    pool: &PgPool,
    database: &str,
    since: &str,
) -> Result<Changes, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = begin_read(pool, database).await?;
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT DISTINCT table_name, key FROM registry_changes \
         WHERE NOT pg_visible_in_snapshot(xid, $1::pg_snapshot)",
    )
    .bind(since)
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    let mut changes = ChangeSet::default();
    for (table, key) in rows {
        let Some(key) = key else {
            return Ok(Changes::Everything);
        };
        match table.as_str() {
            "policies" => changes.tenants.insert(key),
            _ => changes.extensions.insert(key),
        };
    }
    if changes.len() > MAX_CHANGED_KEYS {
        return Ok(Changes::Everything);
    }
    let data = read(&mut tx, database, Some(&changes)).await?;
    tx.commit().await.map_err(err)?;
    Ok(Changes::Keys(changes, data))
}

async fn begin_read(
    pool: &PgPool,
    database: &str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(err)?;
    Ok(tx)
}

/// Deletes `registry_changes` rows older than an hour. Returns how many.
pub async fn prune_changes(pool: &PgPool, database: &str) -> Result<i64, RegistryError> {
    sqlx::query_scalar("SELECT beamline_registry_prune_changes()")
        .fetch_one(pool)
        .await
        .map_err(|e| RegistryError::from_sqlx(database, e))
}

// Each read as two statements, all rows and some keys, so the keyed one is planned
// as an index scan rather than under a generic plan that must also serve the full
// read.
const EXTENSIONS_SQL: [&str; 2] = [
    "SELECT id, type, subject, timeout_ms, retry, enabled, version, config, metadata \
     FROM extensions ORDER BY id",
    "SELECT id, type, subject, timeout_ms, retry, enabled, version, config, metadata \
     FROM extensions WHERE id = ANY($1) ORDER BY id",
];
const VERSIONS_SQL: [&str; 2] = [
    "SELECT id, version, subject, timeout_ms, retry, config, metadata, routing_rules, \
     enabled, created_at FROM extension_versions ORDER BY id, version",
    "SELECT id, version, subject, timeout_ms, retry, config, metadata, routing_rules, \
     enabled, created_at FROM extension_versions WHERE id = ANY($1) ORDER BY id, version",
];
const INSTANCES_SQL: [&str; 2] = [
    "SELECT extension_id, instance_id, subject, weight, enabled, health_status \
     FROM extension_instances ORDER BY extension_id, instance_id",
    "SELECT extension_id, instance_id, subject, weight, enabled, health_status \
     FROM extension_instances WHERE extension_id = ANY($1) ORDER BY extension_id, instance_id",
];
const POLICIES_SQL: [&str; 2] = [
    "SELECT tenant_id, policy_id, policy, enabled FROM policies ORDER BY tenant_id, policy_id",
    "SELECT tenant_id, policy_id, policy, enabled FROM policies WHERE tenant_id = ANY($1) \
     ORDER BY tenant_id, policy_id",
];

/// Reads every record, or only those of the keys in `only`, inside `tx`.
async fn read(
    tx: &mut sqlx::PgConnection,
    database: &str,
    only: Option<&ChangeSet>,
) -> Result<Dataset, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let (ids, tenants): (Vec<&str>, Vec<&str>) = match only {
        None => (Vec::new(), Vec::new()),
        Some(c) => (
            c.extensions.iter().map(String::as_str).collect(),
            c.tenants.iter().map(String::as_str).collect(),
        ),
    };
    let keyed = usize::from(only.is_some());
    let position: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&mut *tx)
        .await
        .map_err(err)?;
    let mut extensions: Vec<ExtensionRow> = Vec::new();
    let mut versions: Vec<VersionRow> = Vec::new();
    let mut instances: Vec<InstanceRow> = Vec::new();
    let mut policies: Vec<PolicyRow> = Vec::new();
    if only.is_none() || !ids.is_empty() {
        let mut q = sqlx::query_as(EXTENSIONS_SQL[keyed]);
        if only.is_some() {
            q = q.bind(&ids);
        }
        extensions = q.fetch_all(&mut *tx).await.map_err(err)?;
        let mut q = sqlx::query_as(VERSIONS_SQL[keyed]);
        if only.is_some() {
            q = q.bind(&ids);
        }
        versions = q.fetch_all(&mut *tx).await.map_err(err)?;
        let mut q = sqlx::query_as(INSTANCES_SQL[keyed]);
        if only.is_some() {
            q = q.bind(&ids);
        }
        instances = q.fetch_all(&mut *tx).await.map_err(err)?;
    }
    if only.is_none() || !tenants.is_empty() {
        let mut q = sqlx::query_as(POLICIES_SQL[keyed]);
        if only.is_some() {
            q = q.bind(&tenants);
        }
        policies = q.fetch_all(&mut *tx).await.map_err(err)?;
    }

    let mut data = Dataset {
        position: Some(position),
        extensions: Vec::with_capacity(extensions.len()),
        versions: Vec::with_capacity(versions.len()),
        instances: Vec::with_capacity(instances.len()),
        policies: Vec::with_capacity(policies.len()),
        rejected: Vec::new(),
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
