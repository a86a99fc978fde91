//! Operator writes to the database: enable/disable/set an extension, upsert/delete a
//! policy. Each is one transaction that validates the resulting record with the same
//! rules as a reload, writes it, and appends `extension_audit_log` (old and new
//! values, `changed_by` = the API key's name). Policy changes are audited under
//! `extension_id = 'policy:<tenant>/<policy>'`.

use beamline_model::{ExtensionRecord, Limits, Policy};
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
    audit(
        &mut tx,
        database,
        id,
        action,
        &outcome.old,
        &outcome.new,
        changed_by,
    )
    .await?;
    tx.commit().await.map_err(err)?;
    Ok(outcome)
}

async fn audit(
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
    audit(
        &mut tx,
        database,
        &format!("policy:{tenant_id}/{policy_id}"),
        action,
        &outcome.old,
        &outcome.new,
        changed_by,
    )
    .await?;
    tx.commit().await.map_err(err)?;
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
    audit(
        &mut tx,
        database,
        &format!("policy:{tenant_id}/{policy_id}"),
        "delete",
        &outcome.old,
        &outcome.new,
        changed_by,
    )
    .await?;
    tx.commit().await.map_err(err)?;
    Ok(outcome)
}
