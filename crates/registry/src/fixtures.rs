//! The fixtures source: `*.json` extension files and `<tenant>/<policy>.json` policies.
//!
//! An extension file holds one record or an array of them; a record may carry
//! `versions` and `instances` arrays, whose omitted fields default to the record's own
//! (a version without `subject` uses the base subject). Files are read in name order so
//! that errors and duplicates are reported the same way every time.
//!
//! A file or item that cannot be read as records (not JSON, not UTF-8, too large, not
//! the shape of an extension) does not fail the read: it comes back in
//! [`Dataset::rejected`], and the snapshot quarantines it while every other file
//! applies. Only a folder that cannot be listed fails the whole read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use beamline_model::{ExtensionRecord, InstanceRecord, VersionRecord};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use beamline_model::ValidationError;

use crate::dataset::{Dataset, PolicyRecord, Rejected, Sourced};
use crate::error::{Origin, RegistryError};
use crate::quarantine::Table;

/// Largest fixture file read, so a stray huge file cannot exhaust memory.
pub const MAX_FIXTURE_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Fixtures compiled into the binary: the original's four extensions and a default
/// policy, so `beamline-router serve` runs from anywhere with no files at all.
pub const BUILTIN_EXTENSIONS: &[(&str, &str)] = &[
    (
        "normalize_text.json",
        include_str!("../../../fixtures/extensions/normalize_text.json"),
    ),
    (
        "pii_guard.json",
        include_str!("../../../fixtures/extensions/pii_guard.json"),
    ),
    (
        "mask_pii.json",
        include_str!("../../../fixtures/extensions/mask_pii.json"),
    ),
    (
        "test_provider.json",
        include_str!("../../../fixtures/extensions/test_provider.json"),
    ),
];

/// Built-in policies as (tenant, policy, JSON).
pub const BUILTIN_POLICIES: &[(&str, &str, &str)] = &[(
    "default",
    "default",
    include_str!("../../../fixtures/policies/default/default.json"),
)];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an extension object")]
struct FixtureExtension {
    id: String,
    #[serde(rename = "type")]
    ext_type: String,
    subject: String,
    timeout_ms: Option<i64>,
    retry: Option<i64>,
    enabled: Option<bool>,
    version: Option<String>,
    config: Option<Value>,
    metadata: Option<Value>,
    #[serde(default)]
    versions: Vec<FixtureVersion>,
    #[serde(default)]
    instances: Vec<FixtureInstance>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a version object with \"version\"")]
struct FixtureVersion {
    version: String,
    subject: Option<String>,
    timeout_ms: Option<i64>,
    retry: Option<i64>,
    config: Option<Value>,
    metadata: Option<Value>,
    routing_rules: Option<Value>,
    enabled: Option<bool>,
    created_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an instance object with \"instance_id\""
)]
struct FixtureInstance {
    instance_id: String,
    subject: Option<String>,
    weight: Option<i64>,
    enabled: Option<bool>,
    health_status: Option<String>,
}

/// Reads the extension files of `dir` and, when given, the policies of `policies_dir`.
pub fn load_dir(dir: &Path, policies_dir: Option<&Path>) -> Result<Dataset, RegistryError> {
    let mut data = Dataset::default();
    for path in json_files(dir)? {
        let origin = |item| Origin::File {
            path: path.clone(),
            item,
        };
        match read_file(&path) {
            Ok(text) => parse_extension_file(&text, &mut data, origin),
            Err(error) => data.rejected.push(Rejected {
                origin: origin(None),
                table: Table::Extensions,
                key: None,
                error,
            }),
        }
    }
    if let Some(pdir) = policies_dir {
        load_policies(pdir, &mut data)?;
    }
    Ok(data)
}

/// Parses the text of one extension fixture file named `name` (the fuzz target and
/// tools use this; loading a folder goes through [`load_dir`]).
pub fn parse_str(name: &str, text: &str) -> Result<Dataset, RegistryError> {
    let mut data = Dataset::default();
    parse_extension_file(text, &mut data, |item| Origin::Builtin {
        name: name.to_string(),
        item,
    });
    Ok(data)
}

/// Parses extension records sent to the admin API (`ext add`), in the fixture file
/// format; errors name `source_name` and the item. A request is all or nothing: the
/// first item that cannot be read refuses it (nothing is quarantined here).
pub fn parse_request(source_name: &str, text: &str) -> Result<Dataset, RegistryError> {
    let mut data = Dataset::default();
    parse_extension_file(text, &mut data, |item| Origin::Request {
        name: source_name.to_string(),
        item,
    });
    if data.rejected.is_empty() {
        return Ok(data);
    }
    let first = data.rejected.swap_remove(0);
    Err(RegistryError::Invalid {
        origin: first.origin,
        error: first.error,
    })
}

/// The fixtures compiled into the binary.
pub fn load_builtin(with_policies: bool) -> Result<Dataset, RegistryError> {
    let mut data = Dataset::default();
    for (name, text) in BUILTIN_EXTENSIONS {
        parse_extension_file(text, &mut data, |item| Origin::Builtin {
            name: (*name).to_string(),
            item,
        });
    }
    if with_policies {
        for (tenant, policy, text) in BUILTIN_POLICIES {
            let origin = Origin::Builtin {
                name: format!("policies/{tenant}/{policy}.json"),
                item: None,
            };
            let document = parse_json(text).map_err(|error| RegistryError::Invalid {
                origin: origin.clone(),
                error,
            })?;
            data.policies.push(Sourced {
                origin,
                value: PolicyRecord {
                    tenant_id: (*tenant).to_string(),
                    policy_id: (*policy).to_string(),
                    document,
                    enabled: true,
                },
            });
        }
    }
    Ok(data)
}

fn io_error(path: &Path, e: std::io::Error) -> RegistryError {
    RegistryError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// `*.json` files directly in `dir`, by name; hidden files are skipped.
fn json_files(dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The text of one fixture file; what is wrong with it otherwise.
fn read_file(path: &Path) -> Result<String, ValidationError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ValidationError::new("", format!("cannot read the file: {e}")))?;
    if meta.len() > MAX_FIXTURE_FILE_BYTES {
        return Err(ValidationError::new(
            "",
            format!(
                "file is {} bytes, larger than the {MAX_FIXTURE_FILE_BYTES}-byte limit",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| ValidationError::new("", format!("cannot read the file: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        ValidationError::new(
            "",
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

fn parse_json(text: &str) -> Result<Value, ValidationError> {
    serde_json::from_str(text).map_err(|e| ValidationError::new("", format!("invalid JSON: {e}")))
}

/// Reads the records of one extension file into `data`; what cannot be read goes to
/// `data.rejected`. Items of an array are labelled by their place (`[2]`), so field
/// paths read as paths in the file.
fn parse_extension_file(text: &str, data: &mut Dataset, origin: impl Fn(Option<String>) -> Origin) {
    let reject = |data: &mut Dataset, item: Option<String>, key: Option<String>, error| {
        data.rejected.push(Rejected {
            origin: origin(item),
            table: Table::Extensions,
            key,
            error,
        })
    };
    let value = match parse_json(text) {
        Ok(v) => v,
        Err(e) => return reject(data, None, None, e),
    };
    let (items, is_array) = match value {
        Value::Array(items) => (items, true),
        v @ Value::Object(_) => (vec![v], false),
        other => {
            let e = ValidationError::new(
                "",
                format!(
                    "expected an extension object or an array of them, found {}",
                    beamline_model::limits::json_kind(&other)
                ),
            );
            return reject(data, None, None, e);
        }
    };
    for (index, item) in items.into_iter().enumerate() {
        let id_hint = item.get("id").and_then(Value::as_str).map(str::to_string);
        let label = is_array.then(|| format!("[{index}]"));
        match serde_path_to_error::deserialize::<_, FixtureExtension>(item) {
            Ok(fixture) => push_extension(fixture, &origin(label), data),
            Err(e) => reject(data, label, id_hint, ValidationError::from_serde(e)),
        }
    }
}

fn push_extension(f: FixtureExtension, origin: &Origin, data: &mut Dataset) {
    let record = ExtensionRecord {
        id: f.id,
        ext_type: f.ext_type,
        subject: f.subject,
        timeout_ms: f
            .timeout_ms
            .unwrap_or(beamline_model::extension::DEFAULT_TIMEOUT_MS),
        retry: f.retry.unwrap_or(0),
        enabled: f.enabled.unwrap_or(true),
        version: f
            .version
            .unwrap_or_else(|| beamline_model::extension::DEFAULT_VERSION.to_string()),
        config: f.config.unwrap_or_else(empty_object),
        metadata: f.metadata.unwrap_or_else(empty_object),
    };
    for (i, v) in f.versions.into_iter().enumerate() {
        data.versions.push(Sourced {
            origin: nested(origin, &format!("versions[{i}]")),
            value: VersionRecord {
                id: record.id.clone(),
                version: v.version,
                subject: v.subject.unwrap_or_else(|| record.subject.clone()),
                timeout_ms: v.timeout_ms.unwrap_or(record.timeout_ms),
                retry: v.retry.unwrap_or(record.retry),
                config: v.config.unwrap_or_else(|| record.config.clone()),
                metadata: v.metadata.unwrap_or_else(|| record.metadata.clone()),
                routing_rules: v.routing_rules.unwrap_or_else(empty_object),
                enabled: v.enabled.unwrap_or(true),
                created_at: v.created_at,
            },
        });
    }
    for (i, inst) in f.instances.into_iter().enumerate() {
        data.instances.push(Sourced {
            origin: nested(origin, &format!("instances[{i}]")),
            value: InstanceRecord {
                extension_id: record.id.clone(),
                instance_id: inst.instance_id,
                subject: inst.subject.unwrap_or_else(|| record.subject.clone()),
                weight: inst.weight.unwrap_or(100),
                enabled: inst.enabled.unwrap_or(true),
                health_status: inst.health_status.unwrap_or_else(|| "unknown".to_string()),
            },
        });
    }
    data.extensions.push(Sourced {
        origin: origin.clone(),
        value: record,
    });
}

fn nested(origin: &Origin, inner: &str) -> Origin {
    let join = |item: &Option<String>| match item {
        Some(i) => Some(format!("{i}.{inner}")),
        None => Some(inner.to_string()),
    };
    match origin {
        Origin::File { path, item } => Origin::File {
            path: path.clone(),
            item: join(item),
        },
        Origin::Builtin { name, item } => Origin::Builtin {
            name: name.clone(),
            item: join(item),
        },
        Origin::Request { name, item } => Origin::Request {
            name: name.clone(),
            item: join(item),
        },
        Origin::Row { .. } => origin.clone(),
    }
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// `policies_dir/<tenant>/<policy>.json`; any other file or folder is an error, so a
/// policy saved in the wrong place is not silently ignored.
pub fn load_policies(dir: &Path, data: &mut Dataset) -> Result<(), RegistryError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    let mut tenants: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            tenants.push(path);
        } else {
            data.rejected.push(Rejected {
                origin: Origin::File { path, item: None },
                table: Table::Policies,
                key: None,
                error: ValidationError::new(
                    "",
                    "policies must be stored as <tenant>/<policy>.json; this file is not in a tenant folder",
                ),
            });
        }
    }
    tenants.sort();
    let mut seen: HashMap<(String, String), PathBuf> = HashMap::new();
    for tenant_dir in tenants {
        let tenant = tenant_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for path in json_files(&tenant_dir)? {
            let policy_id = path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let origin = Origin::File {
                path: path.clone(),
                item: None,
            };
            let document = match read_file(&path).and_then(|text| parse_json(&text)) {
                Ok(d) => d,
                Err(error) => {
                    data.rejected.push(Rejected {
                        origin,
                        table: Table::Policies,
                        key: Some(format!("{tenant}/{policy_id}")),
                        error,
                    });
                    continue;
                }
            };
            if let Some(prev) = seen.insert((tenant.clone(), policy_id.clone()), path.clone()) {
                data.rejected.push(Rejected {
                    origin,
                    table: Table::Policies,
                    key: None,
                    error: ValidationError::new(
                        "",
                        format!("policy also defined in {}", prev.display()),
                    ),
                });
                continue;
            }
            data.policies.push(Sourced {
                origin,
                value: PolicyRecord {
                    tenant_id: tenant.clone(),
                    policy_id,
                    document,
                    enabled: true,
                },
            });
        }
    }
    Ok(())
}
