//! What a source hands to the snapshot builder: every record as read, not yet
//! validated, each with its origin so a validation error can say where to look.

use beamline_model::{ExtensionRecord, InstanceRecord, ValidationError, VersionRecord};
use serde_json::Value;

use crate::error::Origin;
use crate::quarantine::Table;

/// A value and where it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub origin: Origin,
    pub value: T,
}

/// A policy document as read, before validation.
#[derive(Debug, Clone)]
pub struct PolicyRecord {
    pub tenant_id: String,
    pub policy_id: String,
    pub document: Value,
    pub enabled: bool,
}

/// Part of a source that could not even be read as a record (a fixture file that is
/// not JSON, an item that does not have the shape of an extension, a policy file
/// outside a tenant folder). The snapshot builder quarantines it like an invalid
/// record, holding what it last held.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub origin: Origin,
    /// The kind of record it held.
    pub table: Table,
    /// The record's key when it is known (an extension item's `id`, a policy file's
    /// `tenant/policy`); `None` for a whole file, whose records are then those the
    /// previous snapshot had from that file.
    pub key: Option<String>,
    /// What is wrong; `field` relative to the origin's item.
    pub error: ValidationError,
}

/// One consistent read of a source.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Where in the database's history the read was taken: the text of
    /// `pg_current_snapshot()` in the reading transaction. Lets the next read ask
    /// only for what changed since (see migration 0003). `None` for fixtures.
    pub position: Option<String>,
    pub extensions: Vec<Sourced<ExtensionRecord>>,
    pub versions: Vec<Sourced<VersionRecord>>,
    pub instances: Vec<Sourced<InstanceRecord>>,
    pub policies: Vec<Sourced<PolicyRecord>>,
    /// What could not be read as records (fixtures only).
    pub rejected: Vec<Rejected>,
}
