//! Operator writes to the database: enable/disable/set an extension, upsert/delete a
//! policy, add/remove an extension, its versions and instances, and route a version
//! (rollout, rollback). Each is one transaction that validates the resulting record with the same
//! rules as a reload, writes it, and appends `extension_audit_log` (old and new
//! values, `changed_by` = the API key's name). Policy changes are audited under
//! `extension_id = 'policy:<tenant>/<policy>'`.

use beamline_model::{ExtensionRecord, InstanceRecord, Limits, Policy, VersionRecord};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::error::{Origin, RegistryError};

/// What `ext set` / `ext enable|disable` changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct ExtensionChange {
    pub enabled: Option<bool>,
    pub timeout_ms: Option<i64>,
    pub retry: Option<i64>,
    pub config: Option<Value>,
}

/// The record before and after a write.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub old: Value,
    pub new: Value,
}

type Row = (String, String, String, i32, i32, bool, String, Value, Value);

fn row_json(r: &Row) -> Value {
    json!({"id": r.0, "type": r.1, "subject": r.2, "timeout_ms": r.3, "retry": r.4,
           "enabled": r.5, "version": r.6, "config": r.7, "metadata": r.8})
}

pub async fn update_extension(
    pool: &PgPool,
    database: &str,
    id: &str,
    change: &ExtensionChange,
    changed_by: &str,
    limits: &Limits,
) -> Result<WriteOutcome, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, type, subject, timeout_ms, retry, enabled, version, config, metadata \
         FROM extensions WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err)?;
    let Some(old) = row else {
        return Err(RegistryError::NotFound(format!(
            "extension '{id}' not found"
        )));
    };
    let record = ExtensionRecord {
        id: old.0.clone(),
        ext_type: old.1.clone(),
        subject: old.2.clone(),
        timeout_ms: change.timeout_ms.unwrap_or(i64::from(old.3)),
        retry: change.retry.unwrap_or(i64::from(old.4)),
        enabled: change.enabled.unwrap_or(old.5),
        version: old.6.clone(),
        config: change.config.clone().unwrap_or_else(|| old.7.clone()),
        metadata: old.8.clone(),
    };
    let valid = record
        .validate(limits)
        .map_err(|error| RegistryError::Invalid {
            origin: Origin::Row {
                table: "extensions",
                key: format!("id='{id}'"),
            },
            error,
        })?;
    sqlx::query(
        "UPDATE extensions SET enabled = $2, timeout_ms = $3, retry = $4, config = $5, updated_by = $6 WHERE id = $1",
    )
    .bind(id)
    .bind(valid.enabled)
    .bind(valid.timeout_ms as i32)
    .bind(valid.retry as i32)
    .bind(Value::Object(valid.config.clone()))
    .bind(changed_by)
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    let new_row: Row = (
        old.0.clone(),
        old.1.clone(),
        old.2.clone(),
        valid.timeout_ms as i32,
        valid.retry as i32,
        valid.enabled,
        old.6.clone(),
        Value::Object(valid.config.clone()),
        old.8.clone(),
    );
    let action = match (
        change.enabled,
        change.timeout_ms.is_some() || change.retry.is_some() || change.config.is_some(),
    ) {
        (Some(true), false) => "enable",
        (Some(false), false) => "disable",
        _ => "update",
    };
    let outcome = WriteOutcome {
        old: row_json(&old),
        new: row_json(&new_row),
    };
    audit_and_commit(
        tx,
        database,
        id,
        action,
        &outcome.old,
        &outcome.new,
        changed_by,
    )
    .await?;
    Ok(outcome)
}

pub(crate) async fn audit(
    tx: &mut sqlx::PgConnection,
    database: &str,
    subject: &str,
    action: &str,
    old: &Value,
    new: &Value,
    changed_by: &str,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO extension_audit_log (extension_id, action, old_values, new_values, changed_by) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(subject)
    .bind(action)
    .bind(old)
    .bind(new)
    .bind(changed_by)
    .execute(tx)
    .await
    .map(|_| ())
    .map_err(|e| RegistryError::from_sqlx(database, e))
}

/// The end of every write: its audit row, then the commit.
async fn audit_and_commit(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    database: &str,
    subject: &str,
    action: &str,
    old: &Value,
    new: &Value,
    changed_by: &str,
) -> Result<(), RegistryError> {
    audit(&mut tx, database, subject, action, old, new, changed_by).await?;
    tx.commit()
        .await
        .map_err(|e| RegistryError::from_sqlx(database, e))
}

#[allow(clippy::too_many_arguments)]
pub async fn upsert_policy(
    pool: &PgPool,
    database: &str,
    tenant_id: &str,
    policy_id: &str,
    document: Value,
    enabled: bool,
    changed_by: &str,
    limits: &Limits,
) -> Result<WriteOutcome, RegistryError> {
    let origin = Origin::Row {
        table: "policies",
        key: format!("(tenant_id='{tenant_id}', policy_id='{policy_id}')"),
    };
    let invalid = |error| RegistryError::Invalid {
        origin: origin.clone(),
        error,
    };
    let parsed = Policy::parse_document(document.clone()).map_err(invalid)?;
    Policy::from_document(tenant_id, policy_id, enabled, parsed, limits).map_err(invalid)?;
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let old: Option<(Value, bool)> = sqlx::query_as(
        "SELECT policy, enabled FROM policies WHERE tenant_id = $1 AND policy_id = $2 FOR UPDATE",
    )
    .bind(tenant_id)
    .bind(policy_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err)?;
    sqlx::query(
        "INSERT INTO policies (tenant_id, policy_id, policy, enabled) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (tenant_id, policy_id) DO UPDATE SET policy = EXCLUDED.policy, enabled = EXCLUDED.enabled",
    )
    .bind(tenant_id)
    .bind(policy_id)
    .bind(&document)
    .bind(enabled)
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    let outcome = WriteOutcome {
        old: old
            .as_ref()
            .map(|(p, e)| json!({"policy": p, "enabled": e}))
            .unwrap_or(Value::Null),
        new: json!({"policy": document, "enabled": enabled}),
    };
    let action = if old.is_some() { "update" } else { "create" };
    audit_and_commit(
        tx,
        database,
        &format!("policy:{tenant_id}/{policy_id}"),
        action,
        &outcome.old,
        &outcome.new,
        changed_by,
    )
    .await?;
    Ok(outcome)
}

pub async fn delete_policy(
    pool: &PgPool,
    database: &str,
    tenant_id: &str,
    policy_id: &str,
    changed_by: &str,
) -> Result<WriteOutcome, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let old: Option<(Value, bool)> = sqlx::query_as(
        "DELETE FROM policies WHERE tenant_id = $1 AND policy_id = $2 RETURNING policy, enabled",
    )
    .bind(tenant_id)
    .bind(policy_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err)?;
    let Some((policy, enabled)) = old else {
        return Err(RegistryError::NotFound(format!(
            "policy '{policy_id}' of tenant '{tenant_id}' not found"
        )));
    };
    let outcome = WriteOutcome {
        old: json!({"policy": policy, "enabled": enabled}),
        new: Value::Null,
    };
    audit_and_commit(
        tx,
        database,
        &format!("policy:{tenant_id}/{policy_id}"),
        "delete",
        &outcome.old,
        &outcome.new,
        changed_by,
    )
    .await?;
    Ok(outcome)
}

// ---------------------------------------------------------------------------
// Registering extensions, versions and instances (`ext add`, `ext version`,
// `ext rollout|rollback`, `ext instance`). Each call is one transaction: the records
// are validated with the rules a reload applies, written, and audited — one
// `extension_audit_log` row per row written, keyed by the extension id, whose values
// name the table (`"table": "extension_versions"`) for version and instance rows.

fn invalid_at(origin: &Origin) -> impl Fn(beamline_model::ValidationError) -> RegistryError + '_ {
    move |error| RegistryError::Invalid {
        origin: origin.clone(),
        error,
    }
}

fn version_json(v: &beamline_model::ExtensionVersion) -> Value {
    json!({"table": "extension_versions", "id": v.id, "version": v.version, "subject": v.subject,
           "timeout_ms": v.timeout_ms, "retry": v.retry, "config": v.config, "metadata": v.metadata,
           "routing_rules": v.routing_rules.to_json(), "enabled": v.enabled})
}

fn instance_json(i: &beamline_model::ExtensionInstance) -> Value {
    json!({"table": "extension_instances", "extension_id": i.extension_id, "instance_id": i.instance_id,
           "subject": i.subject, "weight": i.weight, "enabled": i.enabled,
           "health_status": i.health_status.as_str()})
}

/// Writes every extension of `data` (records as `ext add` or a fixture file holds
/// them, with their versions and instances), all or nothing. An id that exists
/// already is a [`RegistryError::Conflict`]. Returns each extension as written.
pub async fn add_extensions(
    pool: &PgPool,
    database: &str,
    data: crate::dataset::Dataset,
    changed_by: &str,
    limits: &Limits,
) -> Result<Vec<Value>, RegistryError> {
    let written = write_extensions(pool, database, data, changed_by, limits, false).await?;
    Ok(written.into_iter().flatten().collect())
}

/// What [`seed`] did with each record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedReport {
    /// `extension 'id'` / `policy 'p' of tenant 't'`, and whether it was written
    /// (false: a row of that key existed and was kept as it is).
    pub records: Vec<(String, bool)>,
}

/// Writes the extensions and policies of `data` whose keys have no row yet, and
/// keeps every existing row as it is (`migrate --seed-default`). One transaction,
/// audited like the admin API's writes.
pub async fn seed(
    pool: &PgPool,
    database: &str,
    data: crate::dataset::Dataset,
    changed_by: &str,
    limits: &Limits,
) -> Result<SeedReport, RegistryError> {
    let ids: Vec<String> = data.extensions.iter().map(|e| e.value.id.clone()).collect();
    let policies = data.policies.clone();
    let written = write_extensions(pool, database, data, changed_by, limits, true).await?;
    let mut records: Vec<(String, bool)> = ids
        .into_iter()
        .zip(written)
        .map(|(id, w)| (format!("extension '{id}'"), w.is_some()))
        .collect();
    for p in policies {
        let p = p.value;
        let exists: Option<(bool,)> =
            sqlx::query_as("SELECT enabled FROM policies WHERE tenant_id = $1 AND policy_id = $2")
                .bind(&p.tenant_id)
                .bind(&p.policy_id)
                .fetch_optional(pool)
                .await
                .map_err(|e| RegistryError::from_sqlx(database, e))?;
        let label = format!("policy '{}' of tenant '{}'", p.policy_id, p.tenant_id);
        if exists.is_some() {
            records.push((label, false));
            continue;
        }
        upsert_policy(
            pool,
            database,
            &p.tenant_id,
            &p.policy_id,
            p.document,
            p.enabled,
            changed_by,
            limits,
        )
        .await?;
        records.push((label, true));
    }
    Ok(SeedReport { records })
}

/// [`add_extensions`], or with `skip_existing` [`seed`]'s half: one entry per
/// extension, `None` where a row existed and was kept.
async fn write_extensions(
    pool: &PgPool,
    database: &str,
    data: crate::dataset::Dataset,
    changed_by: &str,
    limits: &Limits,
    skip_existing: bool,
) -> Result<Vec<Option<Value>>, RegistryError> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut extensions = Vec::new();
    let mut seen = BTreeSet::new();
    for s in data.extensions {
        let e = s.value.validate(limits).map_err(invalid_at(&s.origin))?;
        if !seen.insert(e.id.clone()) {
            return Err(RegistryError::Malformed {
                origin: s.origin,
                message: format!("extension '{}' is given twice", e.id),
            });
        }
        extensions.push(e);
    }
    let mut versions: BTreeMap<String, Vec<beamline_model::ExtensionVersion>> = BTreeMap::new();
    for s in data.versions {
        let v = s.value.validate(limits).map_err(invalid_at(&s.origin))?;
        let list = versions.entry(v.id.clone()).or_default();
        if list.iter().any(|o| o.version == v.version) {
            return Err(RegistryError::Malformed {
                origin: s.origin,
                message: format!("version '{}' is given twice", v.version),
            });
        }
        list.push(v);
    }
    let mut instances: BTreeMap<String, Vec<beamline_model::ExtensionInstance>> = BTreeMap::new();
    for s in data.instances {
        let i = s.value.validate().map_err(invalid_at(&s.origin))?;
        let list = instances.entry(i.extension_id.clone()).or_default();
        if list.iter().any(|o| o.instance_id == i.instance_id) {
            return Err(RegistryError::Malformed {
                origin: s.origin,
                message: format!("instance '{}' is given twice", i.instance_id),
            });
        }
        list.push(i);
    }
    if extensions.is_empty() {
        return Err(RegistryError::Malformed {
            origin: Origin::Request {
                name: "the request".into(),
                item: None,
            },
            message: "holds no extension".into(),
        });
    }

    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let mut written = Vec::new();
    for e in &extensions {
        let inserted = sqlx::query(
            "INSERT INTO extensions (id, type, subject, timeout_ms, retry, enabled, version, config, metadata, created_by, updated_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&e.id)
        .bind(e.ext_type.as_str())
        .bind(&e.subject)
        .bind(e.timeout_ms as i32)
        .bind(e.retry as i32)
        .bind(e.enabled)
        .bind(&e.version)
        .bind(Value::Object(e.config.clone()))
        .bind(Value::Object(e.metadata.clone()))
        .bind(changed_by)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        if inserted.rows_affected() == 0 {
            if skip_existing {
                written.push(None);
                continue;
            }
            return Err(RegistryError::Conflict(format!(
                "extension '{}' exists already: change it with `ext set`, or `ext remove` it first",
                e.id
            )));
        }
        let mut record = row_json(&(
            e.id.clone(),
            e.ext_type.as_str().to_string(),
            e.subject.clone(),
            e.timeout_ms as i32,
            e.retry as i32,
            e.enabled,
            e.version.clone(),
            Value::Object(e.config.clone()),
            Value::Object(e.metadata.clone()),
        ));
        let mine = versions.remove(&e.id).unwrap_or_default();
        for v in &mine {
            insert_version(&mut tx, database, v, changed_by).await?;
        }
        let their_instances = instances.remove(&e.id).unwrap_or_default();
        for i in &their_instances {
            insert_instance(&mut tx, database, i).await?;
        }
        record["versions"] = Value::Array(mine.iter().map(version_json).collect());
        record["instances"] = Value::Array(their_instances.iter().map(instance_json).collect());
        audit(
            &mut tx,
            database,
            &e.id,
            "create",
            &Value::Null,
            &record,
            changed_by,
        )
        .await?;
        written.push(Some(record));
    }
    tx.commit().await.map_err(err)?;
    Ok(written)
}

async fn insert_version(
    tx: &mut sqlx::PgConnection,
    database: &str,
    v: &beamline_model::ExtensionVersion,
    changed_by: &str,
) -> Result<(), RegistryError> {
    let inserted = sqlx::query(
        "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, config, metadata, routing_rules, enabled, created_at, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, COALESCE($10, now()), $11) ON CONFLICT (id, version) DO NOTHING",
    )
    .bind(&v.id)
    .bind(&v.version)
    .bind(&v.subject)
    .bind(v.timeout_ms as i32)
    .bind(v.retry as i32)
    .bind(Value::Object(v.config.clone()))
    .bind(Value::Object(v.metadata.clone()))
    .bind(v.routing_rules.to_json())
    .bind(v.enabled)
    .bind(v.created_at)
    .bind(changed_by)
    .execute(&mut *tx)
    .await
    .map_err(|e| RegistryError::from_sqlx(database, e))?;
    if inserted.rows_affected() == 0 {
        return Err(RegistryError::Conflict(format!(
            "version '{}' of extension '{}' exists already",
            v.version, v.id
        )));
    }
    Ok(())
}

async fn insert_instance(
    tx: &mut sqlx::PgConnection,
    database: &str,
    i: &beamline_model::ExtensionInstance,
) -> Result<(), RegistryError> {
    let inserted = sqlx::query(
        "INSERT INTO extension_instances (extension_id, instance_id, subject, weight, enabled, health_status) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (extension_id, instance_id) DO NOTHING",
    )
    .bind(&i.extension_id)
    .bind(&i.instance_id)
    .bind(&i.subject)
    .bind(i.weight as i32)
    .bind(i.enabled)
    .bind(i.health_status.as_str())
    .execute(&mut *tx)
    .await
    .map_err(|e| RegistryError::from_sqlx(database, e))?;
    if inserted.rows_affected() == 0 {
        return Err(RegistryError::Conflict(format!(
            "instance '{}' of extension '{}' exists already: change it with `ext instance set`",
            i.instance_id, i.extension_id
        )));
    }
    Ok(())
}

/// The base record's columns a version or instance inherits, locked against a
/// concurrent removal; [`RegistryError::NotFound`] when there is no such extension.
async fn base_of(
    tx: &mut sqlx::PgConnection,
    database: &str,
    id: &str,
) -> Result<Row, RegistryError> {
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, type, subject, timeout_ms, retry, enabled, version, config, metadata \
         FROM extensions WHERE id = $1 FOR KEY SHARE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| RegistryError::from_sqlx(database, e))?;
    row.ok_or_else(|| RegistryError::NotFound(format!("extension '{id}' not found")))
}

/// Removes an extension; its versions and instances go with it (ON DELETE CASCADE).
/// The audit row keeps all of them. Returns what was removed.
pub async fn remove_extension(
    pool: &PgPool,
    database: &str,
    id: &str,
    changed_by: &str,
) -> Result<Value, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let versions: Vec<(String, Value)> = sqlx::query_as(
        "SELECT version, to_jsonb(v) FROM extension_versions v WHERE id = $1 ORDER BY version",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    let instances: Vec<(String, Value)> = sqlx::query_as(
        "SELECT instance_id, to_jsonb(i) FROM extension_instances i WHERE extension_id = $1 ORDER BY instance_id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    let row: Option<Row> = sqlx::query_as(
        "DELETE FROM extensions WHERE id = $1 \
         RETURNING id, type, subject, timeout_ms, retry, enabled, version, config, metadata",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err)?;
    let Some(row) = row else {
        return Err(RegistryError::NotFound(format!(
            "extension '{id}' not found"
        )));
    };
    let mut old = row_json(&row);
    old["versions"] = Value::Array(versions.into_iter().map(|(_, v)| v).collect());
    old["instances"] = Value::Array(instances.into_iter().map(|(_, v)| v).collect());
    audit_and_commit(tx, database, id, "delete", &old, &Value::Null, changed_by).await?;
    Ok(old)
}

/// A version to add; `None` fields take the base record's, except `routing_rules`,
/// whose default ([`no_traffic`]) gives the version no traffic until a rollout.
#[derive(Debug, Clone, Default)]
pub struct NewVersion {
    pub id: String,
    pub version: String,
    pub subject: Option<String>,
    pub timeout_ms: Option<i64>,
    pub retry: Option<i64>,
    pub config: Option<Value>,
    pub metadata: Option<Value>,
    pub routing_rules: Option<Value>,
}

/// `{"tenant_id": []}`: matches no context (the runbook's rollback).
pub fn no_traffic() -> Value {
    json!({"tenant_id": []})
}

pub async fn add_version(
    pool: &PgPool,
    database: &str,
    new: NewVersion,
    changed_by: &str,
    limits: &Limits,
) -> Result<Value, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let base = base_of(&mut tx, database, &new.id).await?;
    let origin = Origin::Row {
        table: "extension_versions",
        key: format!("(id='{}', version='{}')", new.id, new.version),
    };
    let version = VersionRecord {
        id: new.id,
        version: new.version,
        subject: new.subject.unwrap_or(base.2),
        timeout_ms: new.timeout_ms.unwrap_or(i64::from(base.3)),
        retry: new.retry.unwrap_or(i64::from(base.4)),
        config: new.config.unwrap_or(base.7),
        metadata: new.metadata.unwrap_or(base.8),
        routing_rules: new.routing_rules.unwrap_or_else(no_traffic),
        enabled: true,
        created_at: None,
    }
    .validate(limits)
    .map_err(invalid_at(&origin))?;
    insert_version(&mut tx, database, &version, changed_by).await?;
    let new_json = version_json(&version);
    audit_and_commit(
        tx,
        database,
        &version.id,
        "create",
        &Value::Null,
        &new_json,
        changed_by,
    )
    .await?;
    Ok(new_json)
}

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
    Option<chrono::DateTime<chrono::Utc>>,
);

fn version_record(r: VersionRow) -> VersionRecord {
    VersionRecord {
        id: r.0,
        version: r.1,
        subject: r.2,
        timeout_ms: i64::from(r.3),
        retry: i64::from(r.4),
        config: r.5,
        metadata: r.6,
        routing_rules: r.7,
        enabled: r.8,
        created_at: r.9,
    }
}

fn raw_version_json(v: &VersionRecord) -> Value {
    json!({"table": "extension_versions", "id": v.id, "version": v.version, "subject": v.subject,
           "timeout_ms": v.timeout_ms, "retry": v.retry, "config": v.config, "metadata": v.metadata,
           "routing_rules": v.routing_rules, "enabled": v.enabled})
}

pub async fn remove_version(
    pool: &PgPool,
    database: &str,
    id: &str,
    version: &str,
    changed_by: &str,
) -> Result<Value, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let row: Option<VersionRow> = sqlx::query_as(
        "DELETE FROM extension_versions WHERE id = $1 AND version = $2 \
         RETURNING id, version, subject, timeout_ms, retry, config, metadata, routing_rules, enabled, created_at",
    )
    .bind(id)
    .bind(version)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err)?;
    let Some(row) = row else {
        base_of(&mut tx, database, id).await?;
        return Err(RegistryError::NotFound(format!(
            "version '{version}' of extension '{id}' not found"
        )));
    };
    let old = raw_version_json(&version_record(row));
    audit_and_commit(tx, database, id, "delete", &old, &Value::Null, changed_by).await?;
    Ok(old)
}

/// What `ext rollout` / `ext rollback` do to a version's `routing_rules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// Add these tenants to `tenant_id` (the runbook's "enable gradually").
    AddTenants(Vec<String>),
    /// `{}`: every request (the runbook's "rollout to all tenants").
    AllTenants,
    /// `{"tenant_id": []}`: none (the runbook's rollback).
    NoTraffic,
}

impl Routing {
    /// The rules after the change, or why the change does not apply to `old`.
    pub fn apply(&self, old: &Value) -> Result<Value, String> {
        match self {
            Routing::AllTenants => Ok(json!({})),
            Routing::NoTraffic => Ok(no_traffic()),
            Routing::AddTenants(tenants) => {
                let Value::Object(map) = old else {
                    return Err(format!("routing_rules {old} is not an object"));
                };
                let mut list: Vec<Value> = match map.get("tenant_id") {
                    None if map.is_empty() => return Ok(old.clone()),
                    None => {
                        return Err(format!(
                            "routing_rules {old} do not route by tenant_id; adding tenants would narrow them (change them with SQL)"
                        ));
                    }
                    Some(Value::String(t)) => vec![Value::String(t.clone())],
                    Some(Value::Array(items)) => items.clone(),
                    Some(other) => {
                        return Err(format!(
                            "routing_rules.tenant_id {other} is not a string or a list"
                        ));
                    }
                };
                for t in tenants {
                    if !list.iter().any(|v| v.as_str() == Some(t)) {
                        list.push(Value::String(t.clone()));
                    }
                }
                let mut new = map.clone();
                new.insert("tenant_id".into(), Value::Array(list));
                Ok(Value::Object(new))
            }
        }
    }
}

/// The outcome of a routing change.
#[derive(Debug, Clone)]
pub struct RoutingOutcome {
    pub version: String,
    pub old: Value,
    pub new: Value,
    /// False when the rules already were what was asked (nothing written).
    pub changed: bool,
    /// The extension's canary rollout this manual change paused, if one was running.
    pub paused_rollout: Option<i64>,
}

/// Changes the `routing_rules` of one version, as the runbook's SQL does. With
/// `version` `None` (rollback only), the one enabled version that receives traffic.
pub async fn route_version(
    pool: &PgPool,
    database: &str,
    id: &str,
    version: Option<&str>,
    routing: &Routing,
    changed_by: &str,
    limits: &Limits,
) -> Result<RoutingOutcome, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let rows: Vec<VersionRow> = sqlx::query_as(
        "SELECT id, version, subject, timeout_ms, retry, config, metadata, routing_rules, enabled, created_at \
         FROM extension_versions WHERE id = $1 ORDER BY version FOR UPDATE",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .map_err(err)?;
    let chosen = match version {
        Some(v) => rows.into_iter().find(|r| r.1 == v).ok_or_else(|| {
            RegistryError::NotFound(format!("version '{v}' of extension '{id}' not found"))
        }),
        None => {
            let live: Vec<VersionRow> = rows
                .into_iter()
                .filter(|r| {
                    r.8 && beamline_model::RoutingRules::parse(&r.7)
                        .map(|rules| !rules.matches_nothing())
                        .unwrap_or(false)
                })
                .collect();
            match live.len() {
                1 => Ok(live.into_iter().next().expect("one element")),
                0 => Err(RegistryError::Unsupported(format!(
                    "no version of extension '{id}' receives traffic: nothing to roll back"
                ))),
                _ => Err(RegistryError::Unsupported(format!(
                    "several versions of extension '{id}' receive traffic ({}): say which with --version",
                    live.iter()
                        .map(|r| r.1.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
    };
    let chosen = match chosen {
        Ok(c) => c,
        Err(e) => {
            // Name a missing extension as such rather than its version.
            base_of(&mut tx, database, id).await?;
            return Err(e);
        }
    };
    let old = version_record(chosen);
    let origin = Origin::Row {
        table: "extension_versions",
        key: format!("(id='{id}', version='{}')", old.version),
    };
    let rules = routing
        .apply(&old.routing_rules)
        .map_err(|message| RegistryError::Unsupported(format!("{origin}: {message}")))?;
    let mut new = old.clone();
    new.routing_rules = rules;
    new.clone().validate(limits).map_err(invalid_at(&origin))?;
    let outcome = RoutingOutcome {
        version: old.version.clone(),
        old: old.routing_rules.clone(),
        new: new.routing_rules.clone(),
        changed: old.routing_rules != new.routing_rules,
        paused_rollout: None,
    };
    let mut outcome = outcome;
    if outcome.changed {
        sqlx::query(
            "UPDATE extension_versions SET routing_rules = $3 WHERE id = $1 AND version = $2",
        )
        .bind(id)
        .bind(&old.version)
        .bind(&new.routing_rules)
        .execute(&mut *tx)
        .await
        .map_err(err)?;
        audit(
            &mut tx,
            database,
            id,
            "update",
            &raw_version_json(&old),
            &raw_version_json(&new),
            changed_by,
        )
        .await?;
        // A manual routing change takes over from an automatic rollout.
        let what = match routing {
            Routing::NoTraffic => format!("`ext rollback` of version '{}'", old.version),
            _ => format!("`ext rollout` of version '{}'", old.version),
        };
        outcome.paused_rollout =
            crate::canary::pause_for_manual_routing(&mut tx, database, id, &what, changed_by)
                .await?;
    }
    tx.commit().await.map_err(err)?;
    Ok(outcome)
}

/// An instance to add or change; `None` fields keep their value (or, on add, take
/// the defaults: the extension's subject, weight 100, enabled).
#[derive(Debug, Clone, Default)]
pub struct InstanceChange {
    pub id: String,
    pub instance_id: String,
    pub weight: Option<i64>,
    pub subject: Option<String>,
    pub enabled: Option<bool>,
}

fn instance_origin(c: &InstanceChange) -> Origin {
    Origin::Row {
        table: "extension_instances",
        key: format!("(extension_id='{}', instance_id='{}')", c.id, c.instance_id),
    }
}

pub async fn add_instance(
    pool: &PgPool,
    database: &str,
    change: InstanceChange,
    changed_by: &str,
) -> Result<Value, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let base = base_of(&mut tx, database, &change.id).await?;
    let origin = instance_origin(&change);
    let instance = InstanceRecord {
        extension_id: change.id,
        instance_id: change.instance_id,
        subject: change.subject.unwrap_or(base.2),
        weight: change.weight.unwrap_or(100),
        enabled: change.enabled.unwrap_or(true),
        health_status: "unknown".into(),
    }
    .validate()
    .map_err(invalid_at(&origin))?;
    insert_instance(&mut tx, database, &instance).await?;
    let new = instance_json(&instance);
    audit_and_commit(
        tx,
        database,
        &instance.extension_id,
        "create",
        &Value::Null,
        &new,
        changed_by,
    )
    .await?;
    Ok(new)
}

type InstanceRow = (String, String, String, i32, bool, String);

fn instance_record(r: InstanceRow) -> InstanceRecord {
    InstanceRecord {
        extension_id: r.0,
        instance_id: r.1,
        subject: r.2,
        weight: i64::from(r.3),
        enabled: r.4,
        health_status: r.5,
    }
}

fn raw_instance_json(i: &InstanceRecord) -> Value {
    json!({"table": "extension_instances", "extension_id": i.extension_id, "instance_id": i.instance_id,
           "subject": i.subject, "weight": i.weight, "enabled": i.enabled, "health_status": i.health_status})
}

/// Changes an instance; returns (old, new).
pub async fn set_instance(
    pool: &PgPool,
    database: &str,
    change: InstanceChange,
    changed_by: &str,
) -> Result<WriteOutcome, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let row: Option<InstanceRow> = sqlx::query_as(
        "SELECT extension_id, instance_id, subject, weight, enabled, health_status \
         FROM extension_instances WHERE extension_id = $1 AND instance_id = $2 FOR UPDATE",
    )
    .bind(&change.id)
    .bind(&change.instance_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err)?;
    let Some(row) = row else {
        base_of(&mut tx, database, &change.id).await?;
        return Err(RegistryError::NotFound(format!(
            "instance '{}' of extension '{}' not found",
            change.instance_id, change.id
        )));
    };
    let old = instance_record(row);
    let mut new = old.clone();
    if let Some(w) = change.weight {
        new.weight = w;
    }
    if let Some(s) = &change.subject {
        new.subject = s.clone();
    }
    if let Some(e) = change.enabled {
        new.enabled = e;
    }
    let valid = new
        .clone()
        .validate()
        .map_err(invalid_at(&instance_origin(&change)))?;
    sqlx::query(
        "UPDATE extension_instances SET subject = $3, weight = $4, enabled = $5 \
         WHERE extension_id = $1 AND instance_id = $2",
    )
    .bind(&valid.extension_id)
    .bind(&valid.instance_id)
    .bind(&valid.subject)
    .bind(valid.weight as i32)
    .bind(valid.enabled)
    .execute(&mut *tx)
    .await
    .map_err(err)?;
    let outcome = WriteOutcome {
        old: raw_instance_json(&old),
        new: raw_instance_json(&new),
    };
    audit_and_commit(
        tx,
        database,
        &change.id,
        "update",
        &outcome.old,
        &outcome.new,
        changed_by,
    )
    .await?;
    Ok(outcome)
}

pub async fn remove_instance(
    pool: &PgPool,
    database: &str,
    id: &str,
    instance_id: &str,
    changed_by: &str,
) -> Result<Value, RegistryError> {
    let err = |e| RegistryError::from_sqlx(database, e);
    let mut tx = pool.begin().await.map_err(err)?;
    let row: Option<InstanceRow> = sqlx::query_as(
        "DELETE FROM extension_instances WHERE extension_id = $1 AND instance_id = $2 \
         RETURNING extension_id, instance_id, subject, weight, enabled, health_status",
    )
    .bind(id)
    .bind(instance_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(err)?;
    let Some(row) = row else {
        base_of(&mut tx, database, id).await?;
        return Err(RegistryError::NotFound(format!(
            "instance '{instance_id}' of extension '{id}' not found"
        )));
    };
    let old = raw_instance_json(&instance_record(row));
    audit_and_commit(tx, database, id, "delete", &old, &Value::Null, changed_by).await?;
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_adds_tenants_and_rollback_routes_nothing() {
        let add = |t: &[&str]| Routing::AddTenants(t.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            add(&["premium_tenant"]).apply(&no_traffic()).unwrap(),
            json!({"tenant_id": ["premium_tenant"]})
        );
        assert_eq!(
            add(&["standard_tenant", "premium_tenant"])
                .apply(&json!({"tenant_id": ["premium_tenant"]}))
                .unwrap(),
            json!({"tenant_id": ["premium_tenant", "standard_tenant"]})
        );
        assert_eq!(
            add(&["b"])
                .apply(&json!({"tenant_id": "a", "region": "eu"}))
                .unwrap(),
            json!({"tenant_id": ["a", "b"], "region": "eu"})
        );
        // {} already routes everything: unchanged.
        assert_eq!(add(&["a"]).apply(&json!({})).unwrap(), json!({}));
        assert!(add(&["a"]).apply(&json!({"region": "eu"})).is_err());
        assert_eq!(Routing::AllTenants.apply(&no_traffic()).unwrap(), json!({}));
        assert_eq!(
            Routing::NoTraffic.apply(&json!({})).unwrap(),
            json!({"tenant_id": []})
        );
    }
}
