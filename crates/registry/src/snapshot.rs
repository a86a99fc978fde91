//! The immutable, validated view of the registry that every request reads.
//!
//! [`Snapshot::build`] validates a whole [`Dataset`] or refuses it, so a snapshot is
//! either entirely new or not made at all. Everything a request needs is precomputed:
//! each extension's enabled versions sorted newest first with their effective records,
//! its instances, the per-type lists and the policies, so a lookup is one hash probe
//! and a version resolve a short scan with no allocation.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use beamline_model::extension::compare_version_names;
use beamline_model::{
    Extension, ExtensionInstance, ExtensionType, ExtensionVersion, Limits, Policy, RoutingContext,
};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::dataset::{Dataset, Sourced};
use crate::error::{Origin, RegistryError};

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
}

impl ExtensionEntry {
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
    extensions: HashMap<String, ExtensionEntry>,
    by_type: [Vec<Arc<Extension>>; 4],
    /// tenant → policy id → policy
    policies: HashMap<String, HashMap<String, Arc<Policy>>>,
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
            extensions: HashMap::new(),
            by_type: Default::default(),
            policies: HashMap::new(),
        }
    }

    /// Validates every record of `data` and builds a snapshot, or names the first
    /// record that is wrong.
    pub fn build(
        data: Dataset,
        limits: &Limits,
        source: ActiveSource,
        generation: u64,
    ) -> Result<Snapshot, RegistryError> {
        let mut origins: HashMap<String, Origin> = HashMap::with_capacity(data.extensions.len());
        let mut bases: HashMap<String, Arc<Extension>> =
            HashMap::with_capacity(data.extensions.len());
        for Sourced { origin, value } in data.extensions {
            let ext = value
                .validate(limits)
                .map_err(|error| RegistryError::Invalid {
                    origin: origin.clone(),
                    error,
                })?;
            if let Some(first) = origins.get(&ext.id) {
                return Err(RegistryError::Malformed {
                    origin,
                    message: format!("extension '{}' is also defined in {first}", ext.id),
                });
            }
            origins.insert(ext.id.clone(), origin);
            bases.insert(ext.id.clone(), Arc::new(ext));
        }

        let mut versions: HashMap<String, Vec<(ExtensionVersion, Origin)>> = HashMap::new();
        let mut version_count = 0;
        for Sourced { origin, value } in data.versions {
            let v = value
                .validate(limits)
                .map_err(|error| RegistryError::Invalid {
                    origin: origin.clone(),
                    error,
                })?;
            if !bases.contains_key(&v.id) {
                return Err(RegistryError::Malformed {
                    origin,
                    message: format!("version of unknown extension '{}'", v.id),
                });
            }
            let list = versions.entry(v.id.clone()).or_default();
            if let Some((_, first)) = list.iter().find(|(x, _)| x.version == v.version) {
                return Err(RegistryError::Malformed {
                    origin,
                    message: format!(
                        "version '{}' of '{}' is also defined in {first}",
                        v.version, v.id
                    ),
                });
            }
            list.push((v, origin));
            version_count += 1;
        }

        let mut instances: HashMap<String, Vec<ExtensionInstance>> = HashMap::new();
        let mut instance_count = 0;
        for Sourced { origin, value } in data.instances {
            let i = value.validate().map_err(|error| RegistryError::Invalid {
                origin: origin.clone(),
                error,
            })?;
            if !bases.contains_key(&i.extension_id) {
                return Err(RegistryError::Malformed {
                    origin,
                    message: format!("instance of unknown extension '{}'", i.extension_id),
                });
            }
            let list = instances.entry(i.extension_id.clone()).or_default();
            if list.iter().any(|x| x.instance_id == i.instance_id) {
                return Err(RegistryError::Malformed {
                    origin,
                    message: format!(
                        "instance '{}' of '{}' is defined twice",
                        i.instance_id, i.extension_id
                    ),
                });
            }
            list.push(i);
            instance_count += 1;
        }

        let mut warnings = Vec::new();
        let mut policies: HashMap<String, HashMap<String, Arc<Policy>>> = HashMap::new();
        let mut per_tenant: HashMap<String, (BTreeSet<String>, Origin)> = HashMap::new();
        let mut policy_count = 0;
        for Sourced { origin, value } in data.policies {
            let invalid = |error| RegistryError::Invalid {
                origin: origin.clone(),
                error,
            };
            let document = Policy::parse_document(value.document).map_err(invalid)?;
            let policy = Policy::from_document(
                &value.tenant_id,
                &value.policy_id,
                value.enabled,
                document,
                limits,
            )
            .map_err(invalid)?;
            for (field, expected, id) in policy.extension_refs() {
                match bases.get(&id) {
                    None => warnings.push(format!(
                        "{origin}: field `{field}`: extension '{id}' does not exist; requests using this policy will fail with extension_not_found"
                    )),
                    Some(ext) if ext.ext_type != expected => warnings.push(format!(
                        "{origin}: field `{field}`: extension '{id}' is of type {}, not {expected}; requests using this policy will fail with invalid_request",
                        ext.ext_type
                    )),
                    Some(_) => {}
                }
            }
            if policy.enabled {
                let (set, _) = per_tenant
                    .entry(policy.tenant_id.clone())
                    .or_insert_with(|| (BTreeSet::new(), origin.clone()));
                set.extend(policy.extension_refs().into_iter().map(|(_, _, id)| id));
                if set.len() > limits.max_extensions_per_tenant {
                    return Err(RegistryError::Malformed {
                        origin,
                        message: format!(
                            "tenant '{}' uses {} distinct extensions across its policies, more than the limit of {}",
                            policy.tenant_id,
                            set.len(),
                            limits.max_extensions_per_tenant
                        ),
                    });
                }
            }
            let tenant = policies.entry(policy.tenant_id.clone()).or_default();
            if tenant.contains_key(&policy.policy_id) {
                return Err(RegistryError::Malformed {
                    origin,
                    message: format!(
                        "policy '{}' of tenant '{}' is defined twice",
                        policy.policy_id, policy.tenant_id
                    ),
                });
            }
            tenant.insert(policy.policy_id.clone(), Arc::new(policy));
            policy_count += 1;
        }

        let mut by_type: [Vec<Arc<Extension>>; 4] = Default::default();
        let mut extensions = HashMap::with_capacity(bases.len());
        for (id, base) in bases {
            by_type[base.ext_type.index()].push(base.clone());
            let mut list: Vec<ExtensionVersion> = versions
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
            let mut inst = instances.remove(&id).unwrap_or_default();
            inst.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
            extensions.insert(
                id,
                ExtensionEntry {
                    base,
                    versions,
                    enabled_versions,
                    instances: inst.into(),
                },
            );
        }
        for list in &mut by_type {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Ok(Snapshot {
            generation,
            source,
            loaded_at: Utc::now(),
            load_duration: Duration::ZERO,
            counts: Counts {
                extensions: extensions.len(),
                versions: version_count,
                instances: instance_count,
                policies: policy_count,
            },
            warnings,
            extensions,
            by_type,
            policies,
        })
    }

    /// The base record of `id` (`router_extension_registry:lookup`).
    #[inline]
    pub fn lookup(&self, id: &str) -> Option<&Arc<Extension>> {
        self.extensions.get(id).map(|e| &e.base)
    }

    /// Everything about `id`: base, versions, instances.
    #[inline]
    pub fn entry(&self, id: &str) -> Option<&ExtensionEntry> {
        self.extensions.get(id)
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
                .filter(|p| p.enabled)
        };
        find(tenant).or_else(|| find(FALLBACK_TENANT))
    }

    /// Every policy (enabled or not), sorted by tenant and id.
    pub fn policies(&self) -> Vec<Arc<Policy>> {
        let mut all: Vec<Arc<Policy>> = self
            .policies
            .values()
            .flat_map(|m| m.values().cloned())
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
