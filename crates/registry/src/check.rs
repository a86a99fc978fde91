//! Checks before a reload: `registry validate` (every invalid record of the source,
//! with its field path) and `registry diff` (what a reload would add, change and
//! remove, per table). Both read the configured source exactly as a reload does and
//! change nothing: no snapshot swap, no sync counted.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::error::RegistryError;
use crate::quarantine::{Quarantined, Table};
use crate::registry::Registry;
use crate::snapshot::{ActiveSource, Counts, Snapshot};

/// What `registry validate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    /// Whether every record read is valid.
    pub valid: bool,
    /// Where the records were read: `database` or `fixtures`.
    pub source: ActiveSource,
    /// The database (password masked) or the fixtures folders read.
    pub location: String,
    /// Records read that are valid, per table.
    pub counts: Counts,
    /// Every invalid record: table, key, field path, reason.
    pub invalid: Vec<Quarantined>,
    /// Policy references to missing or mistyped extensions (not errors: answered at
    /// request time).
    pub warnings: Vec<String>,
}

/// Keys of one table that a reload would add, change or remove.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableDiff {
    pub added: Vec<String>,
    /// Changed keys, each with the fields that differ.
    pub changed: Vec<ChangedKey>,
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangedKey {
    pub key: String,
    pub fields: Vec<String>,
}

impl TableDiff {
    fn len(&self) -> usize {
        self.added.len() + self.changed.len() + self.removed.len()
    }
}

/// What `registry diff` reports: what the serving snapshot would become after a
/// reload now. Quarantined records count as what a reload would serve for them
/// (their last good version), and are listed apart.
#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    /// Total added + changed + removed keys over every table.
    pub changes: usize,
    pub source: ActiveSource,
    pub location: String,
    /// The serving snapshot's generation the diff is against.
    pub generation: u64,
    pub extensions: TableDiff,
    pub extension_versions: TableDiff,
    pub extension_instances: TableDiff,
    pub policies: TableDiff,
    /// Records a reload would newly quarantine (key `table/key`).
    pub quarantine_entering: Vec<Quarantined>,
    /// Records quarantined now that a reload would find valid (or gone).
    pub quarantine_leaving: Vec<String>,
}

impl Registry {
    /// `registry validate`: reads the configured source and lists every record that
    /// fails validation, as if nothing had been loaded before. Changes nothing.
    pub async fn validate(&self) -> Result<ValidationReport, RegistryError> {
        let (config, limits, pool) = self.settings_now();
        let (data, source, _) = self.read_source(&config, pool.as_ref()).await?;
        let built = Snapshot::build(data, &limits, source, 0);
        Ok(ValidationReport {
            valid: built.quarantine.is_empty(),
            source,
            location: location(&config, source),
            counts: built.counts,
            invalid: built.quarantine.clone(),
            warnings: built.warnings.clone(),
        })
    }

    /// `registry diff`: reads the configured source, builds what a reload would
    /// serve, and compares it with what is served now. Changes nothing.
    pub async fn diff(&self) -> Result<DiffReport, RegistryError> {
        let (config, limits, pool) = self.settings_now();
        let (data, source, _) = self.read_source(&config, pool.as_ref()).await?;
        let current = self.snapshot();
        let next = Snapshot::rebuild(data, &limits, source, current.generation + 1, &current);
        let now = records(&current);
        let then = records(&next);
        let table = |t: Table| diff_table(&now[t as usize], &then[t as usize]);
        let key = |q: &Quarantined| (q.table, q.key.clone());
        let was: std::collections::HashSet<_> = current.quarantine.iter().map(key).collect();
        let will: std::collections::HashSet<_> = next.quarantine.iter().map(key).collect();
        let mut report = DiffReport {
            changes: 0,
            source,
            location: location(&config, source),
            generation: current.generation,
            extensions: table(Table::Extensions),
            extension_versions: table(Table::ExtensionVersions),
            extension_instances: table(Table::ExtensionInstances),
            policies: table(Table::Policies),
            quarantine_entering: next
                .quarantine
                .iter()
                .filter(|q| !was.contains(&key(q)))
                .cloned()
                .collect(),
            quarantine_leaving: current
                .quarantine
                .iter()
                .filter(|q| !will.contains(&key(q)))
                .map(|q| format!("{}/{}", q.table.as_str(), q.key))
                .collect(),
        };
        report.changes = report.extensions.len()
            + report.extension_versions.len()
            + report.extension_instances.len()
            + report.policies.len();
        Ok(report)
    }
}

fn location(config: &crate::RegistryConfig, source: ActiveSource) -> String {
    match source {
        ActiveSource::Database => config.database_display(),
        _ => {
            let show = |p: &Option<std::path::PathBuf>, builtin: &str| {
                p.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| builtin.to_string())
            };
            format!(
                "{} and {}",
                show(&config.fixtures_dir, "built-in extension fixtures"),
                show(&config.policies_dir, "built-in policies")
            )
        }
    }
}

/// Every record a snapshot serves, per table, keyed as the quarantine keys them.
fn records(s: &Snapshot) -> [BTreeMap<String, Value>; 4] {
    let mut out: [BTreeMap<String, Value>; 4] = Default::default();
    for ext in s.list() {
        let Some(entry) = s.entry(&ext.id) else {
            continue;
        };
        out[Table::Extensions as usize].insert(ext.id.clone(), json(&*entry.base));
        for v in &entry.versions {
            out[Table::ExtensionVersions as usize].insert(
                format!("{}/{}", ext.id, v.version.version),
                json(&v.version),
            );
        }
        for i in entry.instances.iter() {
            out[Table::ExtensionInstances as usize]
                .insert(format!("{}/{}", ext.id, i.instance_id), json(i));
        }
    }
    for p in s.policies() {
        let mut doc = serde_json::to_value(&p.document).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut doc {
            m.insert("enabled".into(), Value::Bool(p.enabled));
        }
        out[Table::Policies as usize].insert(format!("{}/{}", p.tenant_id, p.policy_id), doc);
    }
    out
}

fn json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn diff_table(now: &BTreeMap<String, Value>, then: &BTreeMap<String, Value>) -> TableDiff {
    let mut d = TableDiff::default();
    for (k, v) in then {
        match now.get(k) {
            None => d.added.push(k.clone()),
            Some(old) if old != v => d.changed.push(ChangedKey {
                key: k.clone(),
                fields: changed_fields(old, v),
            }),
            Some(_) => {}
        }
    }
    d.removed = now
        .keys()
        .filter(|k| !then.contains_key(*k))
        .cloned()
        .collect();
    d
}

/// The top-level fields that differ between two records.
fn changed_fields(a: &Value, b: &Value) -> Vec<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect()
        }
        _ => Vec::new(),
    }
}
