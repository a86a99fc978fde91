//! Quarantine: a record that fails validation is held out on its own (DESIGN.md §4).
//!
//! One bad row or fixture entry must never freeze every other change: the snapshot
//! builder sets it aside as a [`Quarantined`] entry — naming the table, the key, the
//! field path in the document and the reason — and serves that key's last good
//! version (or nothing, if it never had one) while every other record applies. The
//! entry leaves quarantine at the first read that finds the record valid.

use std::fmt::Write as _;

use beamline_model::ValidationError;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::Origin;

/// The kind of record, named after its table (fixture entries use the same names:
/// an extension file holds `extensions` with nested `extension_versions` and
/// `extension_instances`; a policy file is one of `policies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Extensions,
    ExtensionVersions,
    ExtensionInstances,
    Policies,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Extensions,
        Table::ExtensionVersions,
        Table::ExtensionInstances,
        Table::Policies,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Extensions => "extensions",
            Table::ExtensionVersions => "extension_versions",
            Table::ExtensionInstances => "extension_instances",
            Table::Policies => "policies",
        }
    }
}

/// What the snapshot serves for a quarantined key instead of the bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Serving {
    /// The last version of this record that was valid.
    LastGood,
    /// Nothing: the record never had a valid version (while this router ran).
    Absent,
    /// Another record with the same key (the bad one is a duplicate).
    OtherRecord,
}

impl Serving {
    pub fn as_str(self) -> &'static str {
        match self {
            Serving::LastGood => "last_good",
            Serving::Absent => "absent",
            Serving::OtherRecord => "other_record",
        }
    }
}

/// One record held out of the snapshot, as `registry status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quarantined {
    pub table: Table,
    /// The record's key: `normalize_text`, `normalize_text/v2` (extension/version),
    /// `pii_guard/pii-a` (extension/instance), `acme/default` (tenant/policy); for a
    /// fixture file that could not be read at all, the file.
    pub key: String,
    /// Where it was read: the table row or the file (and where in the file).
    pub origin: String,
    /// Path of the failing field in the document (`policy.providers[0]`,
    /// `[2].versions[0].routing_rules.tenant_id`); empty for the whole record.
    pub field: String,
    pub reason: String,
    /// The one-line message: `policies[acme/default].policy.providers[0]: expected …`.
    pub error: String,
    /// When this router first found the record invalid (kept while it stays invalid).
    pub since: DateTime<Utc>,
    pub serving: Serving,
    /// The extension id (extension tables) or tenant (policies) whose records were
    /// read together with this one: an incremental sync of that key replaces it.
    #[serde(skip)]
    pub(crate) owner: Option<String>,
}

impl Quarantined {
    /// An entry for `error`, found in the record read from `origin`. `error.field` is
    /// relative to the record's place in its document (see [`document_path`]).
    pub(crate) fn new(
        table: Table,
        key: impl Into<String>,
        origin: &Origin,
        error: &ValidationError,
        owner: Option<String>,
    ) -> Quarantined {
        let key = key.into();
        let field = join_path(&document_path(origin, table), &error.field);
        let mut reason = error.reason.clone();
        if let Some(code) = error.code {
            let _ = write!(reason, " ({code})");
        }
        let error = message(origin, table, &key, &field, &reason);
        Quarantined {
            table,
            key,
            origin: origin.to_string(),
            field,
            reason,
            error,
            since: Utc::now(),
            serving: Serving::Absent,
            owner,
        }
    }

    /// Like [`Quarantined::new`], with a field path that is already absolute (a key
    /// column of a row, not a field of its document).
    pub(crate) fn at_field(
        table: Table,
        key: impl Into<String>,
        origin: &Origin,
        field: &str,
        reason: impl Into<String>,
        owner: Option<String>,
    ) -> Quarantined {
        let mut q = Quarantined::new(table, key, origin, &ValidationError::new("", reason), owner);
        q.field = field.to_string();
        q.error = message(origin, table, &q.key, &q.field, &q.reason);
        q
    }
}

/// Where a record sits in its document, as a field path prefix: a policy row's
/// document is its `policy` column; a fixture record is where the item label says
/// (`[2]`, `[2].versions[0]`); an extension, version or instance row's fields are
/// its columns.
pub(crate) fn document_path(origin: &Origin, table: Table) -> String {
    match origin {
        Origin::Row { .. } if table == Table::Policies => "policy".to_string(),
        Origin::Row { .. } => String::new(),
        Origin::File { item, .. } | Origin::Builtin { item, .. } | Origin::Request { item, .. } => {
            item.clone().unwrap_or_default()
        }
    }
}

/// `a` + `b` as one field path (`policy` + `providers[0]`, `[2]` + `timeout_ms`).
pub(crate) fn join_path(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ if b.starts_with('[') => format!("{a}{b}"),
        _ => format!("{a}.{b}"),
    }
}

/// The one-line message: rows as `table[key].field: reason`, files as
/// `path: field: reason`.
fn message(origin: &Origin, table: Table, key: &str, field: &str, reason: &str) -> String {
    let mut out = match origin {
        Origin::Row { .. } => format!("{}[{key}]", table.as_str()),
        Origin::File { path, .. } => path.display().to_string(),
        Origin::Builtin { name, .. } => format!("built-in fixture {name}"),
        Origin::Request { name, .. } => name.clone(),
    };
    if !field.is_empty() {
        match origin {
            Origin::Row { .. } if field.starts_with('[') => out.push_str(field),
            Origin::Row { .. } => {
                out.push('.');
                out.push_str(field);
            }
            _ => {
                out.push_str(": ");
                out.push_str(field);
            }
        }
    }
    out.push_str(": ");
    out.push_str(reason);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_table_key_and_field_path() {
        let row = Origin::Row {
            table: "policies",
            key: "(tenant_id='acme', policy_id='default')".into(),
        };
        let e = ValidationError::new("providers[0]", "expected an object with \"name\"");
        let q = Quarantined::new(Table::Policies, "acme/default", &row, &e, None);
        assert_eq!(
            q.error,
            "policies[acme/default].policy.providers[0]: expected an object with \"name\""
        );
        assert_eq!(q.field, "policy.providers[0]");

        let file = Origin::File {
            path: "fixtures/extensions/all.json".into(),
            item: Some("[2].versions[0]".into()),
        };
        let e = ValidationError::new("timeout_ms", "60000 is out of range").with_code("x");
        let q = Quarantined::new(Table::ExtensionVersions, "n/v2", &file, &e, None);
        assert_eq!(
            q.error,
            "fixtures/extensions/all.json: [2].versions[0].timeout_ms: 60000 is out of range (x)"
        );
    }

    /// Field paths join with a dot, except before an index, and an empty part adds
    /// nothing.
    #[test]
    fn field_paths_join_like_the_documents_read() {
        assert_eq!(join_path("", "timeout_ms"), "timeout_ms");
        assert_eq!(join_path("policy", ""), "policy");
        assert_eq!(join_path("policy", "providers[0]"), "policy.providers[0]");
        assert_eq!(join_path("[2].versions", "[0]"), "[2].versions[0]");
        let row = Origin::Row {
            table: "extensions",
            key: "(id='x')".into(),
        };
        let q = Quarantined::at_field(Table::Extensions, "x", &row, "[3]", "bad item", None);
        assert_eq!(q.error, "extensions[x][3]: bad item");
        let q = Quarantined::at_field(Table::Extensions, "x", &row, "config", "bad", None);
        assert_eq!(q.error, "extensions[x].config: bad");
    }
}
