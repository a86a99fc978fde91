//! The immutable, validated view of the registry that every request reads.
//!
//! [`Snapshot::build`] validates every record of a [`Dataset`]; a record that fails is
//! quarantined on its own ([`crate::quarantine`]) — its key keeps the last good
//! version the replaced snapshot had, or is absent — while every other record
//! applies. Everything a request needs is precomputed:
//! each extension's enabled versions sorted newest first with their effective records,
//! its instances, the per-type lists and the policies, so a lookup is one hash probe
//! and a version resolve a short scan with no allocation.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use beamline_model::extension::compare_version_names;
use beamline_model::{
    Extension, ExtensionInstance, ExtensionRecord, ExtensionType, ExtensionVersion, InstanceRecord,
    Limits, Policy, RoutingContext, VersionRecord,
};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::dataset::{Dataset, PolicyRecord, Rejected, Sourced};
use crate::error::{Origin, RegistryError};
use crate::quarantine::{Quarantined, Serving, Table};

/// Which source a snapshot was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveSource {
    /// Nothing loaded yet.
    Empty,
    Fixtures,
    Database,
}

impl ActiveSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ActiveSource::Empty => "empty",
            ActiveSource::Fixtures => "fixtures",
            ActiveSource::Database => "database",
        }
    }
}

/// A version and the record it resolves to.
#[derive(Debug, Clone)]
pub struct VersionEntry {
    pub version: ExtensionVersion,
    pub resolved: Arc<Extension>,
}

/// One extension with everything a request needs about it.
#[derive(Debug, Clone)]
pub struct ExtensionEntry {
    pub base: Arc<Extension>,
    /// Every version, newest first (enabled or not), for operators.
    pub versions: Vec<VersionEntry>,
    /// Indices into `versions` of the enabled ones, newest first.
    enabled_versions: Vec<usize>,
    pub instances: Arc<[ExtensionInstance]>,
    /// Where the base record was read (a fixture file that later cannot be read
    /// holds the entries it had).
    pub origin: Origin,
}

impl ExtensionEntry {
    /// Whether both were built from the same records (everything else in an entry is
    /// derived from those).
    fn same_records(&self, other: &ExtensionEntry) -> bool {
        *self.base == *other.base
            && self.origin == other.origin
            && self.versions.len() == other.versions.len()
            && self
                .versions
                .iter()
                .zip(&other.versions)
                .all(|(a, b)| a.version == b.version)
            && self.instances == other.instances
    }

    /// `lookup_with_version`: the first enabled version (newest first) whose
    /// `routing_rules` match, else the base record.
    pub fn resolve<C: RoutingContext + ?Sized>(&self, context: &C) -> &Arc<Extension> {
        for &i in &self.enabled_versions {
            let entry = &self.versions[i];
            if entry.version.routing_rules.matches(context) {
                return &entry.resolved;
            }
        }
        &self.base
    }
}

/// Counts of what a snapshot holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub extensions: usize,
    pub versions: usize,
    pub instances: usize,
    pub policies: usize,
}

/// A policy and the record it was read from (warnings name it).
#[derive(Debug, Clone)]
struct PolicyEntry {
    policy: Arc<Policy>,
    origin: Origin,
}

/// tenant → policy id → policy
type PolicyMap = HashMap<String, HashMap<String, PolicyEntry>>;

/// Entries are shared between snapshots: an incremental reload copies the map of
/// pointers and rebuilds only the entries that changed.
type EntryMap = HashMap<Arc<str>, Arc<ExtensionEntry>>;

/// What changed in the source since a snapshot was read: the extensions (by id)
/// and the tenants (by id) whose records must be read again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub extensions: BTreeSet<String>,
    pub tenants: BTreeSet<String>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.extensions.is_empty() && self.tenants.is_empty()
    }

    /// Number of keys to read again.
    pub fn len(&self) -> usize {
        self.extensions.len() + self.tenants.len()
    }
}

/// An immutable registry state.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub source: ActiveSource,
    pub loaded_at: DateTime<Utc>,
    pub load_duration: Duration,
    pub counts: Counts,
    /// Problems that do not stop the load (a policy naming an unknown extension).
    pub warnings: Vec<String>,
    /// The database position this state is exactly equal to ([`Dataset::position`]).
    pub position: Option<String>,
    /// Records held out because they failed validation, by table and key.
    pub quarantine: Vec<Quarantined>,
    extensions: EntryMap,
    by_type: [Vec<Arc<Extension>>; 4],
    policies: PolicyMap,
}

/// The tenant whose policies serve tenants that have none of their own.
pub const FALLBACK_TENANT: &str = "default";

impl Snapshot {
    /// The snapshot a registry holds before its first load.
    pub fn empty() -> Snapshot {
        Snapshot {
            generation: 0,
            source: ActiveSource::Empty,
            loaded_at: Utc::now(),
            load_duration: Duration::ZERO,
            counts: Counts::default(),
            warnings: Vec::new(),
            position: None,
            quarantine: Vec::new(),
            extensions: HashMap::new(),
            by_type: Default::default(),
            policies: HashMap::new(),
        }
    }

    /// Validates every record of `data` and builds a snapshot; records that fail are
    /// quarantined (and absent: there is no earlier snapshot to hold them from).
    pub fn build(
        data: Dataset,
        limits: &Limits,
        source: ActiveSource,
        generation: u64,
    ) -> Snapshot {
        Snapshot::build_over(data, limits, source, generation, None)
    }

    /// [`Snapshot::build`] replacing `previous`: a quarantined record keeps the
    /// version `previous` served for its key (when `previous` was read from the same
    /// kind of source), and every entry of `previous` whose records did not change is
    /// kept as it is — a full reload then leaves the long-lived entries where they
    /// are in memory and allocates only what changed, so reload after reload the heap
    /// does not fragment (a periodic reload that rebuilt all 10 000 entries grew a
    /// router from 98 to 148 MB resident over ten reloads).
    pub fn rebuild(
        data: Dataset,
        limits: &Limits,
        source: ActiveSource,
        generation: u64,
        previous: &Snapshot,
    ) -> Snapshot {
        Snapshot::build_over(data, limits, source, generation, Some(previous))
    }

    fn build_over(
        data: Dataset,
        limits: &Limits,
        source: ActiveSource,
        generation: u64,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let Dataset {
            position,
            extensions,
            versions,
            instances,
            policies,
            rejected,
        } = data;
        let mut build = Builder::new(limits, previous, source);
        let (policy_rejected, ext_rejected): (Vec<Rejected>, Vec<Rejected>) = rejected
            .into_iter()
            .partition(|r| r.table == Table::Policies);
        let extensions = build.entries(extensions, versions, instances, ext_rejected);
        let policies = build.policies(policies, policy_rejected);
        let mut by_type: [Vec<Arc<Extension>>; 4] = Default::default();
        for entry in extensions.values() {
            by_type[entry.base.ext_type.index()].push(entry.base.clone());
        }
        for list in &mut by_type {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let quarantine = build.finish(Vec::new());
        Snapshot::assemble(
            extensions, by_type, policies, quarantine, source, position, generation,
        )
    }

    /// A snapshot equal to this one with the extensions and tenants of `changes`
    /// replaced by what `data` holds for them: `data` must be a fresh read of exactly
    /// those keys (an extension or tenant in `changes` with no record in `data` was
    /// deleted), and its position becomes the snapshot's. Unchanged entries are
    /// shared, not copied, so the cost follows the size of the change, not of the
    /// registry. Validation and quarantine are the same as [`Snapshot::rebuild`]'s.
    /// Fails only when `data` holds a key that is not among `changes`.
    pub fn apply_changes(
        &self,
        data: Dataset,
        changes: &ChangeSet,
        limits: &Limits,
        generation: u64,
    ) -> Result<Snapshot, RegistryError> {
        let Dataset {
            position,
            extensions,
            versions,
            instances,
            policies,
            rejected,
        } = data;
        let outside = |origin: &Origin, what: &str, key: &str| RegistryError::Malformed {
            origin: origin.clone(),
            message: format!("{what} '{key}' was read but is not among the changed keys"),
        };
        for r in &extensions {
            if !changes.extensions.contains(&r.value.id) {
                return Err(outside(&r.origin, "extension", &r.value.id));
            }
        }
        for r in &policies {
            if !changes.tenants.contains(&r.value.tenant_id) {
                return Err(outside(&r.origin, "tenant", &r.value.tenant_id));
            }
        }
        let mut build = Builder::new(limits, Some(self), self.source);
        let (policy_rejected, ext_rejected): (Vec<Rejected>, Vec<Rejected>) = rejected
            .into_iter()
            .partition(|r| r.table == Table::Policies);
        let fresh = build.entries(extensions, versions, instances, ext_rejected);
        let fresh_policies = build.policies(policies, policy_rejected);

        let mut entries = self.extensions.clone();
        let mut by_type = self.by_type.clone();
        for id in &changes.extensions {
            if let Some(old) = entries.remove(id.as_str()) {
                let list = &mut by_type[old.base.ext_type.index()];
                if let Ok(i) = list.binary_search_by(|e| e.id.as_str().cmp(id)) {
                    list.remove(i);
                }
            }
        }
        for (id, entry) in fresh {
            let list = &mut by_type[entry.base.ext_type.index()];
            let at = list
                .binary_search_by(|e| e.id.as_str().cmp(&id))
                .unwrap_or_else(|at| at);
            list.insert(at, entry.base.clone());
            entries.insert(id, entry);
        }

        let mut policies = self.policies.clone();
        for tenant in &changes.tenants {
            policies.remove(tenant);
        }
        policies.extend(fresh_policies);
        // The entries of keys read again are replaced by what this read found.
        let kept: Vec<Quarantined> = self
            .quarantine
            .iter()
            .filter(|q| match (&q.owner, q.table) {
                (Some(t), Table::Policies) => !changes.tenants.contains(t),
                (Some(id), _) => !changes.extensions.contains(id),
                (None, _) => true,
            })
            .cloned()
            .collect();
        let quarantine = build.finish(kept);
        Ok(Snapshot::assemble(
            entries,
            by_type,
            policies,
            quarantine,
            self.source,
            position,
            generation,
        ))
    }

    fn assemble(
        extensions: EntryMap,
        by_type: [Vec<Arc<Extension>>; 4],
        policies: PolicyMap,
        quarantine: Vec<Quarantined>,
        source: ActiveSource,
        position: Option<String>,
        generation: u64,
    ) -> Snapshot {
        let counts = Counts {
            extensions: extensions.len(),
            versions: extensions.values().map(|e| e.versions.len()).sum(),
            instances: extensions.values().map(|e| e.instances.len()).sum(),
            policies: policies.values().map(HashMap::len).sum(),
        };
        let warnings = policy_warnings(&policies, &extensions, &quarantine);
        Snapshot {
            generation,
            source,
            loaded_at: Utc::now(),
            load_duration: Duration::ZERO,
            counts,
            warnings,
            position,
            quarantine,
            extensions,
            by_type,
            policies,
        }
    }

    /// Quarantined records per table, every table listed (for the gauge).
    pub fn quarantined_by_table(&self) -> [(Table, usize); 4] {
        Table::ALL.map(|t| (t, self.quarantine.iter().filter(|q| q.table == t).count()))
    }

    /// The base record of `id` (`router_extension_registry:lookup`).
    #[inline]
    pub fn lookup(&self, id: &str) -> Option<&Arc<Extension>> {
        self.extensions.get(id).map(|e| &e.base)
    }

    /// Everything about `id`: base, versions, instances.
    #[inline]
    pub fn entry(&self, id: &str) -> Option<&ExtensionEntry> {
        self.extensions.get(id).map(|e| &**e)
    }

    /// The record `id` resolves to for `context` (`lookup_with_version`).
    #[inline]
    pub fn resolve<C: RoutingContext + ?Sized>(
        &self,
        id: &str,
        context: &C,
    ) -> Option<&Arc<Extension>> {
        self.extensions.get(id).map(|e| e.resolve(context))
    }

    /// Extensions of one type, sorted by id.
    pub fn list_by_type(&self, ext_type: ExtensionType) -> &[Arc<Extension>] {
        &self.by_type[ext_type.index()]
    }

    /// All extensions sorted by id.
    pub fn list(&self) -> Vec<Arc<Extension>> {
        let mut all: Vec<Arc<Extension>> = self.by_type.iter().flatten().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The instances of `id` (empty when it has none or does not exist).
    pub fn instances(&self, id: &str) -> &[ExtensionInstance] {
        self.extensions
            .get(id)
            .map(|e| &e.instances[..])
            .unwrap_or(&[])
    }

    /// The enabled policy `policy_id` of `tenant`; a tenant without its own uses the
    /// policy of the same id of tenant [`FALLBACK_TENANT`].
    pub fn policy(&self, tenant: &str, policy_id: &str) -> Option<&Arc<Policy>> {
        let find = |t: &str| {
            self.policies
                .get(t)
                .and_then(|m| m.get(policy_id))
                .map(|e| &e.policy)
                .filter(|p| p.enabled)
        };
        find(tenant).or_else(|| find(FALLBACK_TENANT))
    }

    /// Why a tenant without a policy of its own gets `policy_not_found`: the fallback
    /// policy `default` of tenant [`FALLBACK_TENANT`] is missing or disabled.
    pub fn fallback_policy_warning(&self) -> Option<String> {
        if self.policy(FALLBACK_TENANT, "default").is_some() {
            return None;
        }
        Some(format!(
            "no enabled policy 'default' of tenant '{FALLBACK_TENANT}': a request without a policy of its tenant's own gets policy_not_found (write one with `beamline-router policy upsert {FALLBACK_TENANT} default --file FILE`, or `beamline-router migrate --seed-default`)"
        ))
    }

    /// [`warnings_of`] one policy against this snapshot's extensions.
    pub fn warnings_for(&self, policy: &Policy) -> Vec<String> {
        let at = format!(
            "policy '{}' of tenant '{}'",
            policy.policy_id, policy.tenant_id
        );
        warnings_of(policy, &at, |id| self.lookup(id).map(|e| e.ext_type))
    }

    /// Every policy (enabled or not), sorted by tenant and id.
    pub fn policies(&self) -> Vec<Arc<Policy>> {
        let mut all: Vec<Arc<Policy>> = self
            .policies
            .values()
            .flat_map(|m| m.values().map(|e| e.policy.clone()))
            .collect();
        all.sort_by(|a, b| (&a.tenant_id, &a.policy_id).cmp(&(&b.tenant_id, &b.policy_id)));
        all
    }

    /// Number of extensions (`ets:info(extension_registry, size)`).
    pub fn size(&self) -> usize {
        self.extensions.len()
    }

    /// Extension count per type, for the registry gauge.
    pub fn count_by_type(&self) -> [(ExtensionType, usize); 4] {
        ExtensionType::ALL.map(|t| (t, self.by_type[t.index()].len()))
    }
}

/// Newest first: by `created_at` when both have one, else by version name.
fn newest_first(a: &ExtensionVersion, b: &ExtensionVersion) -> Ordering {
    let by_time = match (a.created_at, b.created_at) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    by_time.then_with(|| compare_version_names(&b.version, &a.version))
}

/// How an extension's entry stands in for a quarantined record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// The base record was invalid: the previous base, with the versions and
    /// instances read now.
    Base,
    /// Nothing of the extension could be read (its fixture item or file): the whole
    /// previous entry.
    Entry,
}

/// Validates records one by one, quarantining those that fail, and builds the
/// snapshot's maps from the rest.
struct Builder<'a> {
    limits: &'a Limits,
    /// The snapshot being replaced: its entries are shared when unchanged, and the
    /// `since` of entries still quarantined is kept.
    previous: Option<&'a Snapshot>,
    /// `previous`, when it was read from the same kind of source, so its entries may
    /// stand in for quarantined records (a database row is never held at a fixture's
    /// version).
    held_from: Option<&'a Snapshot>,
    quarantine: Vec<Quarantined>,
}

impl<'a> Builder<'a> {
    fn new(limits: &'a Limits, previous: Option<&'a Snapshot>, source: ActiveSource) -> Self {
        Builder {
            limits,
            previous,
            held_from: previous.filter(|p| p.source == source),
            quarantine: Vec::new(),
        }
    }

    fn held_entry(&self, id: &str) -> Option<&'a Arc<ExtensionEntry>> {
        self.held_from.and_then(|p| p.extensions.get(id))
    }

    /// The quarantine of this build, after `kept` (entries of keys not read again),
    /// with each entry's `since` carried over from the replaced snapshot.
    fn finish(self, kept: Vec<Quarantined>) -> Vec<Quarantined> {
        let mut all = kept;
        if let Some(previous) = self.previous {
            let since: HashMap<(Table, &str), DateTime<Utc>> = previous
                .quarantine
                .iter()
                .map(|q| ((q.table, q.key.as_str()), q.since))
                .collect();
            all.extend(self.quarantine.into_iter().map(|mut q| {
                if let Some(s) = since.get(&(q.table, q.key.as_str())) {
                    q.since = *s;
                }
                q
            }));
        } else {
            all.extend(self.quarantine);
        }
        all.sort_by(|a, b| (a.table, &a.key, &a.origin).cmp(&(b.table, &b.key, &b.origin)));
        all
    }

    /// Validates extensions, versions and instances and builds one entry per
    /// extension, taking the entry (and key) of the previous snapshot instead where
    /// nothing changed.
    fn entries(
        &mut self,
        extensions: Vec<Sourced<ExtensionRecord>>,
        versions: Vec<Sourced<VersionRecord>>,
        instances: Vec<Sourced<InstanceRecord>>,
        rejected: Vec<Rejected>,
    ) -> EntryMap {
        let limits = self.limits;
        let mut bases: HashMap<String, (Arc<Extension>, Origin)> =
            HashMap::with_capacity(extensions.len());
        // Quarantined extensions, with the index of their quarantine entry.
        let mut holds: Vec<(String, Hold, usize)> = Vec::new();
        for Sourced { origin, value } in extensions {
            let id = value.id.clone();
            match value.validate(limits) {
                Ok(ext) => {
                    if let Some((_, first)) = bases.get(&ext.id) {
                        let mut q = Quarantined::at_field(
                            Table::Extensions,
                            &id,
                            &origin,
                            &quarantine_path(&origin, Table::Extensions, "id"),
                            format!("extension '{id}' is also defined in {first}"),
                            Some(id.clone()),
                        );
                        q.serving = Serving::OtherRecord;
                        self.quarantine.push(q);
                        continue;
                    }
                    bases.insert(id, (Arc::new(ext), origin));
                }
                Err(error) => {
                    self.quarantine.push(Quarantined::new(
                        Table::Extensions,
                        &id,
                        &origin,
                        &error,
                        Some(id.clone()),
                    ));
                    holds.push((id, Hold::Base, self.quarantine.len() - 1));
                }
            }
        }
        for r in rejected {
            let key = r.key.clone().unwrap_or_else(|| origin_key(&r.origin));
            self.quarantine.push(Quarantined::new(
                r.table,
                key,
                &r.origin,
                &r.error,
                r.key.clone(),
            ));
            let at = self.quarantine.len() - 1;
            match (&r.key, &r.origin) {
                (Some(id), _) => holds.push((id.clone(), Hold::Entry, at)),
                // A whole file: what the previous snapshot had from it.
                (None, Origin::File { path, .. }) => {
                    if let Some(p) = self.held_from {
                        for (id, e) in &p.extensions {
                            if matches!(&e.origin, Origin::File { path: p2, .. } if p2 == path) {
                                holds.push((id.to_string(), Hold::Entry, at));
                            }
                        }
                    }
                }
                (None, _) => {}
            }
        }
        let mut held_entries: HashMap<String, Arc<ExtensionEntry>> = HashMap::new();
        let mut absent: BTreeSet<String> = BTreeSet::new();
        for (id, hold, at) in holds {
            if bases.contains_key(&id) || held_entries.contains_key(&id) {
                // Another record of the same id is valid (or already held).
                if self.quarantine[at].serving == Serving::Absent && bases.contains_key(&id) {
                    self.quarantine[at].serving = Serving::OtherRecord;
                }
                continue;
            }
            match (self.held_entry(&id), hold) {
                (Some(e), Hold::Base) => {
                    bases.insert(id, (e.base.clone(), e.origin.clone()));
                    self.quarantine[at].serving = Serving::LastGood;
                }
                (Some(e), Hold::Entry) => {
                    held_entries.insert(id, e.clone());
                    self.quarantine[at].serving = Serving::LastGood;
                }
                (None, _) => {
                    absent.insert(id);
                }
            }
        }
        // A held base keeps its versions and instances: those read now apply.
        let mut by_extension: HashMap<String, Vec<(ExtensionVersion, Origin)>> = HashMap::new();
        for Sourced { origin, value } in versions {
            let (id, name) = (value.id.clone(), value.version.clone());
            if held_entries.contains_key(&id) || absent.contains(&id) {
                // Waits with its quarantined extension.
                continue;
            }
            let key = format!("{id}/{name}");
            let v = match value.validate(limits) {
                Ok(v) => v,
                Err(error) => {
                    let mut q = Quarantined::new(
                        Table::ExtensionVersions,
                        key,
                        &origin,
                        &error,
                        Some(id.clone()),
                    );
                    let last_good = self.held_entry(&id).and_then(|e| {
                        e.versions
                            .iter()
                            .find(|v| v.version.version == name)
                            .map(|v| v.version.clone())
                    });
                    if let Some(v) = last_good.filter(|_| bases.contains_key(&id)) {
                        q.serving = Serving::LastGood;
                        by_extension.entry(id).or_default().push((v, origin));
                    }
                    self.quarantine.push(q);
                    continue;
                }
            };
            if !bases.contains_key(&v.id) {
                self.quarantine.push(Quarantined::at_field(
                    Table::ExtensionVersions,
                    key,
                    &origin,
                    &quarantine_path(&origin, Table::ExtensionVersions, "id"),
                    format!("version of unknown extension '{id}'"),
                    Some(id),
                ));
                continue;
            }
            let list = by_extension.entry(id.clone()).or_default();
            if let Some((_, first)) = list.iter().find(|(x, _)| x.version == v.version) {
                let mut q = Quarantined::at_field(
                    Table::ExtensionVersions,
                    key,
                    &origin,
                    &quarantine_path(&origin, Table::ExtensionVersions, "version"),
                    format!("version '{name}' of '{id}' is also defined in {first}"),
                    Some(id),
                );
                q.serving = Serving::OtherRecord;
                self.quarantine.push(q);
                continue;
            }
            list.push((v, origin));
        }

        let mut instances_of: HashMap<String, Vec<ExtensionInstance>> = HashMap::new();
        for Sourced { origin, value } in instances {
            let (id, name) = (value.extension_id.clone(), value.instance_id.clone());
            if held_entries.contains_key(&id) || absent.contains(&id) {
                continue;
            }
            let key = format!("{id}/{name}");
            let i = match value.validate() {
                Ok(i) => i,
                Err(error) => {
                    let mut q = Quarantined::new(
                        Table::ExtensionInstances,
                        key,
                        &origin,
                        &error,
                        Some(id.clone()),
                    );
                    let last_good = self
                        .held_entry(&id)
                        .and_then(|e| e.instances.iter().find(|i| i.instance_id == name).cloned());
                    if let Some(i) = last_good.filter(|_| bases.contains_key(&id)) {
                        q.serving = Serving::LastGood;
                        instances_of.entry(id).or_default().push(i);
                    }
                    self.quarantine.push(q);
                    continue;
                }
            };
            if !bases.contains_key(&i.extension_id) {
                self.quarantine.push(Quarantined::at_field(
                    Table::ExtensionInstances,
                    key,
                    &origin,
                    &quarantine_path(&origin, Table::ExtensionInstances, "extension_id"),
                    format!("instance of unknown extension '{id}'"),
                    Some(id),
                ));
                continue;
            }
            let list = instances_of.entry(id.clone()).or_default();
            if list.iter().any(|x| x.instance_id == i.instance_id) {
                let mut q = Quarantined::at_field(
                    Table::ExtensionInstances,
                    key,
                    &origin,
                    &quarantine_path(&origin, Table::ExtensionInstances, "instance_id"),
                    format!("instance '{name}' of '{id}' is defined twice"),
                    Some(id),
                );
                q.serving = Serving::OtherRecord;
                self.quarantine.push(q);
                continue;
            }
            list.push(i);
        }

        let previous = self.previous.map(|p| &p.extensions);
        let mut entries: EntryMap = HashMap::with_capacity(bases.len() + held_entries.len());
        for (id, (base, origin)) in bases {
            let mut list: Vec<ExtensionVersion> = by_extension
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .map(|(v, _)| v)
                .collect();
            list.sort_by(newest_first);
            let versions: Vec<VersionEntry> = list
                .into_iter()
                .map(|version| VersionEntry {
                    resolved: Arc::new(base.with_version(&version)),
                    version,
                })
                .collect();
            let enabled_versions = versions
                .iter()
                .enumerate()
                .filter(|(_, v)| v.version.enabled)
                .map(|(i, _)| i)
                .collect();
            let mut inst = instances_of.remove(&id).unwrap_or_default();
            inst.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
            let entry = ExtensionEntry {
                base,
                versions,
                enabled_versions,
                instances: inst.into(),
                origin,
            };
            match previous.and_then(|p| p.get_key_value(id.as_str())) {
                Some((key, old)) if old.same_records(&entry) => {
                    entries.insert(key.clone(), old.clone());
                }
                _ => {
                    entries.insert(Arc::from(id), Arc::new(entry));
                }
            }
        }
        for (id, entry) in held_entries {
            entries.insert(Arc::from(id), entry);
        }
        entries
    }

    /// Validates policies; one tenant's set is held to the per-tenant extension limit.
    fn policies(&mut self, rows: Vec<Sourced<PolicyRecord>>, rejected: Vec<Rejected>) -> PolicyMap {
        let limits = self.limits;
        let mut policies: PolicyMap = HashMap::new();
        // Quarantined keys: (tenant, policy) → index of their quarantine entry.
        let mut holds: Vec<(String, String, usize)> = Vec::new();
        for Sourced { origin, value } in rows {
            let PolicyRecord {
                tenant_id,
                policy_id,
                document,
                enabled,
            } = value;
            let key = format!("{tenant_id}/{policy_id}");
            let owner = Some(tenant_id.clone());
            let key_error = beamline_model::extension::check_id("tenant_id", &tenant_id)
                .and_then(|()| beamline_model::extension::check_id("policy_id", &policy_id));
            if let Err(e) = key_error {
                // A key column (or, in fixtures, the folder or file name).
                self.quarantine.push(Quarantined::at_field(
                    Table::Policies,
                    key,
                    &origin,
                    &e.field,
                    e.reason,
                    owner,
                ));
                continue;
            }
            let parsed = Policy::parse_document(document)
                .and_then(|d| Policy::from_document(&tenant_id, &policy_id, enabled, d, limits));
            let policy = match parsed {
                Ok(p) => p,
                Err(error) => {
                    self.quarantine.push(Quarantined::new(
                        Table::Policies,
                        key,
                        &origin,
                        &error,
                        owner,
                    ));
                    holds.push((tenant_id, policy_id, self.quarantine.len() - 1));
                    continue;
                }
            };
            let tenant = policies.entry(tenant_id.clone()).or_default();
            if let Some(first) = tenant.get(&policy_id) {
                let mut q = Quarantined::at_field(
                    Table::Policies,
                    key,
                    &origin,
                    "",
                    format!(
                        "policy '{policy_id}' of tenant '{tenant_id}' is also defined in {}",
                        first.origin
                    ),
                    owner,
                );
                q.serving = Serving::OtherRecord;
                self.quarantine.push(q);
                continue;
            }
            tenant.insert(
                policy_id,
                PolicyEntry {
                    policy: Arc::new(policy),
                    origin,
                },
            );
        }
        for r in rejected {
            let key = r.key.clone().unwrap_or_else(|| origin_key(&r.origin));
            let owner = r
                .key
                .as_deref()
                .and_then(|k| k.split_once('/'))
                .map(|(t, p)| (t.to_string(), p.to_string()));
            self.quarantine.push(Quarantined::new(
                Table::Policies,
                key,
                &r.origin,
                &r.error,
                owner.as_ref().map(|(t, _)| t.clone()),
            ));
            if let Some((t, p)) = owner {
                holds.push((t, p, self.quarantine.len() - 1));
            }
        }
        for (tenant, policy_id, at) in holds {
            let exists = policies
                .get(&tenant)
                .is_some_and(|m| m.contains_key(&policy_id));
            if exists {
                continue;
            }
            let last_good = self
                .held_from
                .and_then(|p| p.policies.get(&tenant))
                .and_then(|m| m.get(&policy_id));
            if let Some(e) = last_good {
                self.quarantine[at].serving = Serving::LastGood;
                policies
                    .entry(tenant)
                    .or_default()
                    .insert(policy_id, e.clone());
            }
        }
        self.enforce_tenant_limit(&mut policies);
        policies
    }

    /// A tenant's enabled policies may use at most `max_extensions_per_tenant`
    /// distinct extensions: in policy id order, a policy that goes over is
    /// quarantined (held at its last good version if that fits).
    fn enforce_tenant_limit(&mut self, policies: &mut PolicyMap) {
        let max = self.limits.max_extensions_per_tenant;
        for (tenant, map) in policies.iter_mut() {
            let mut ids: Vec<String> = map.keys().cloned().collect();
            ids.sort();
            let mut used: BTreeSet<String> = BTreeSet::new();
            for policy_id in ids {
                let fits = |p: &Policy, used: &BTreeSet<String>| {
                    !p.enabled
                        || used
                            .iter()
                            .cloned()
                            .chain(p.extension_refs().into_iter().map(|(_, _, id)| id))
                            .collect::<BTreeSet<_>>()
                            .len()
                            <= max
                };
                let Some(entry) = map.get(&policy_id) else {
                    continue;
                };
                if fits(&entry.policy, &used) {
                    if entry.policy.enabled {
                        used.extend(
                            entry
                                .policy
                                .extension_refs()
                                .into_iter()
                                .map(|(_, _, id)| id),
                        );
                    }
                    continue;
                }
                let mut q = Quarantined::at_field(
                    Table::Policies,
                    format!("{tenant}/{policy_id}"),
                    &entry.origin,
                    "",
                    format!(
                        "tenant '{tenant}' would use more than {max} distinct extensions across its policies (max_extensions_per_tenant)"
                    ),
                    Some(tenant.clone()),
                );
                let last_good = self
                    .held_from
                    .and_then(|p| p.policies.get(tenant))
                    .and_then(|m| m.get(&policy_id))
                    .filter(|e| !Arc::ptr_eq(&e.policy, &entry.policy) && fits(&e.policy, &used));
                match last_good {
                    Some(e) => {
                        q.serving = Serving::LastGood;
                        if e.policy.enabled {
                            used.extend(e.policy.extension_refs().into_iter().map(|(_, _, id)| id));
                        }
                        map.insert(policy_id, e.clone());
                    }
                    None => {
                        map.remove(&policy_id);
                    }
                }
                self.quarantine.push(q);
            }
        }
        policies.retain(|_, m| !m.is_empty());
    }
}

/// The field path of a key column of a record (`id`, `version`), placed in its
/// document as [`crate::quarantine::document_path`] says.
fn quarantine_path(origin: &Origin, table: Table, column: &str) -> String {
    match origin {
        Origin::Row { .. } => column.to_string(),
        _ => crate::quarantine::join_path(&crate::quarantine::document_path(origin, table), column),
    }
}

/// A key for a record whose own key could not be read: its file and place in it.
fn origin_key(origin: &Origin) -> String {
    match origin {
        Origin::File { path, item } => format!(
            "{}{}",
            path.display(),
            item.as_deref().map(|i| format!(" {i}")).unwrap_or_default()
        ),
        Origin::Builtin { name, item } | Origin::Request { name, item } => format!(
            "{name}{}",
            item.as_deref().map(|i| format!(" {i}")).unwrap_or_default()
        ),
        Origin::Row { table, key } => format!("{table} {key}"),
    }
}

/// A warning for every policy field that names an extension that does not exist (or
/// is quarantined with no version to serve) or has another type, and for every
/// provider that names a provider extension by `name` only, in tenant and policy
/// order.
fn policy_warnings(
    policies: &PolicyMap,
    extensions: &EntryMap,
    quarantine: &[Quarantined],
) -> Vec<String> {
    let quarantined: BTreeSet<&str> = quarantine
        .iter()
        .filter(|q| q.table == Table::Extensions)
        .map(|q| q.key.as_str())
        .collect();
    let mut all: Vec<&PolicyEntry> = policies.values().flat_map(HashMap::values).collect();
    all.sort_by(|a, b| {
        (&a.policy.tenant_id, &a.policy.policy_id).cmp(&(&b.policy.tenant_id, &b.policy.policy_id))
    });
    all.into_iter()
        .flat_map(|PolicyEntry { policy, origin }| {
            warnings_with(
                policy,
                origin,
                |id| extensions.get(id).map(|e| e.base.ext_type),
                |id| quarantined.contains(id),
            )
        })
        .collect()
}

/// What will not work as written in one policy, given the type of each extension id
/// (`None`: no such extension). `at` names the policy in the messages.
pub fn warnings_of(
    policy: &Policy,
    at: &dyn std::fmt::Display,
    type_of: impl Fn(&str) -> Option<ExtensionType>,
) -> Vec<String> {
    warnings_with(policy, at, type_of, |_| false)
}

/// [`warnings_of`], saying so when a missing extension is quarantined.
fn warnings_with(
    policy: &Policy,
    at: &dyn std::fmt::Display,
    type_of: impl Fn(&str) -> Option<ExtensionType>,
    quarantined: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for (field, expected, id) in policy.extension_refs() {
        match type_of(&id) {
            None if quarantined(&id) => warnings.push(format!(
                "{at}: field `{field}`: extension '{id}' is quarantined (see `registry status`) and has no valid version; requests using this policy will fail with extension_not_found"
            )),
            None => warnings.push(format!(
                "{at}: field `{field}`: extension '{id}' does not exist; requests using this policy will fail with extension_not_found"
            )),
            Some(t) if t != expected => warnings.push(format!(
                "{at}: field `{field}`: extension '{id}' is of type {t}, not {expected}; requests using this policy will fail with invalid_request"
            )),
            Some(_) => {}
        }
    }
    for (i, p) in policy.document.providers.iter().enumerate() {
        if p.extension.is_none() && type_of(&p.name) == Some(ExtensionType::Provider) {
            warnings.push(format!(
                "{at}: field `providers[{i}]`: provider '{name}' has the name of a provider extension but no \"extension\": it is chosen but never called (add \"extension\": \"{name}\")",
                name = p.name
            ));
        }
    }
    warnings
}
