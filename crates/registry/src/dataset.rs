//! What a source hands to the snapshot builder: every record as read, not yet
//! validated, each with its origin so a validation error can say where to look.

use beamline_model::{ExtensionRecord, InstanceRecord, VersionRecord};
use serde_json::Value;

use crate::error::Origin;

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
}
