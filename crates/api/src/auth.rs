//! API keys and roles for the admin API (and, when configured, Decide).
//!
//! Keys arrive as `x-api-key: KEY` or `authorization: Bearer KEY`. Only SHA-256
//! digests are kept in memory (a plain `key` in the configuration is hashed at load)
//! and the digest of the presented key is compared with every configured digest in
//! constant time, so timing tells nothing about which key was close. No key, or an
//! unknown one → UNAUTHENTICATED; a known key whose role is too small →
//! PERMISSION_DENIED, counted in `router_rbac_denied_total{resource}`. Keys never
//! appear in logs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use beamline_model::Secret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// What a key may do: viewer reads; operator also reloads, enables/disables,
/// switches source and resets breakers; admin may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// One `[[admin.api_keys]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds the key; written to the audit log as `changed_by`.
    pub name: String,
    pub role: Role,
    /// Lowercase hex SHA-256 of the key (preferred: the key itself is not stored).
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// The key in clear, for development only.
    #[serde(default)]
    pub key: Option<Secret>,
}

/// `[admin]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub api_keys: Vec<ApiKeyConfig>,
    /// Whether `Router/Decide` needs a key too (any role).
    pub decide_requires_key: bool,
    /// Whether the original's read-only admin NATS subjects
    /// (`beamline.router.v1.admin.*`) need a key (any role), sent in a NATS header
    /// (`x-api-key` or `authorization`).
    pub nats_requires_key: bool,
}

impl AdminConfig {
    /// Checks every key entry; the error is (key path, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mut names = std::collections::BTreeSet::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            let key = format!("admin.api_keys[{i}]");
            if k.name.trim().is_empty() {
                return Err((format!("{key}.name"), "must not be empty".into()));
            }
            if !names.insert(k.name.as_str()) {
                return Err((format!("{key}.name"), format!("'{}' is used twice", k.name)));
            }
            match (&k.key_sha256, &k.key) {
                (Some(_), Some(_)) => return Err((key, "give key_sha256 or key, not both".into())),
                (None, None) => return Err((key, "needs key_sha256 (preferred) or key".into())),
                (Some(h), None) => {
                    let ok = h.len() == 64
                        && h.chars()
                            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
                    if !ok {
                        return Err((
                            format!("{key}.key_sha256"),
                            "must be 64 lowercase hex characters (sha256sum of the key)".into(),
                        ));
                    }
                }
                (None, Some(k)) => {
                    if k.expose().len() < 16 {
                        return Err((
                            format!("{key}.key"),
                            "must be at least 16 characters".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The `resource` label values of `router_rbac_denied_total`.
pub const RESOURCES: &[&str] = &[
    "registry",
    "extension",
    "health",
    "breaker",
    "policy",
    "status",
    "decide",
];

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

struct KeyEntry {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The configured keys, ready to check requests.
pub struct Authenticator {
    keys: Vec<KeyEntry>,
    denied: Mutex<BTreeMap<&'static str, u64>>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Authenticator {
    /// Builds from a validated configuration.
    pub fn new(config: &AdminConfig) -> Authenticator {
        let keys = config
            .api_keys
            .iter()
            .filter_map(|k| {
                let digest = match (&k.key_sha256, &k.key) {
                    (Some(h), _) => {
                        let bytes = hex::decode(h).ok()?;
                        <[u8; 32]>::try_from(bytes.as_slice()).ok()?
                    }
                    (None, Some(plain)) => sha256(plain.expose().as_bytes()),
                    (None, None) => return None,
                };
                Some(KeyEntry {
                    name: k.name.clone(),
                    role: k.role,
                    digest,
                })
            })
            .collect();
        Authenticator {
            keys,
            denied: Mutex::new(BTreeMap::new()),
        }
    }

    /// The key a caller sent: `x-api-key: KEY`, `authorization: Bearer KEY`, or — as
    /// the original accepted — a bare `authorization: KEY`. `header` looks a header up
    /// by its lowercase name (gRPC metadata, NATS headers).
    fn presented<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
        if let Some(v) = header("x-api-key") {
            return Some(v.trim().to_string());
        }
        let auth = header("authorization")?.trim();
        match auth.split_once(' ') {
            Some((scheme, token)) => scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string()),
            None => Some(auth.to_string()),
        }
    }

    /// Who is calling, if the key is valid.
    pub fn identify(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        self.identify_key(Self::presented(|name| {
            metadata.get(name).and_then(|v| v.to_str().ok())
        }))
    }

    /// [`Authenticator::identify`] for a NATS request: the key in its headers.
    pub fn identify_nats(&self, headers: Option<&async_nats::HeaderMap>) -> Result<Caller, Status> {
        self.identify_key(Self::presented(|name| {
            let h = headers?;
            h.get(name)
                .or_else(|| {
                    // NATS header names keep the sender's case.
                    h.iter()
                        .find(|(k, _)| AsRef::<str>::as_ref(*k).eq_ignore_ascii_case(name))
                        .and_then(|(_, v)| v.first())
                })
                .map(|v| v.as_str())
        }))
    }

    fn identify_key(&self, presented: Option<String>) -> Result<Caller, Status> {
        let Some(key) = presented.filter(|k| !k.is_empty()) else {
            return Err(Status::unauthenticated(
                "missing API key: send `x-api-key: KEY` or `authorization: Bearer KEY`",
            ));
        };
        let digest = sha256(key.as_bytes());
        // Compare with every key, always, so timing does not depend on the match.
        let mut found: Option<&KeyEntry> = None;
        for entry in &self.keys {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        match found {
            Some(e) => Ok(Caller {
                name: e.name.clone(),
                role: e.role,
            }),
            None if self.keys.is_empty() => Err(Status::unauthenticated(
                "no API keys are configured on this router; add [[admin.api_keys]] or set BEAMLINE_ADMIN_KEY",
            )),
            None => Err(Status::unauthenticated("invalid API key")),
        }
    }

    /// Checks the caller has at least `needed` for `resource`.
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        needed: Role,
        resource: &'static str,
    ) -> Result<Caller, Status> {
        let caller = self.identify(metadata)?;
        if caller.role < needed {
            *self
                .denied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(resource)
                .or_insert(0) += 1;
            return Err(Status::permission_denied(format!(
                "key '{}' has role {}, this needs {} ({resource})",
                caller.name,
                caller.role.as_str(),
                needed.as_str()
            )));
        }
        Ok(caller)
    }

    /// `router_rbac_denied_total` by resource.
    pub fn denied_counts(&self) -> BTreeMap<&'static str, u64> {
        self.denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(&AdminConfig {
            api_keys: vec![
                ApiKeyConfig {
                    name: "ops".into(),
                    role: Role::Operator,
                    key_sha256: Some(hex::encode(sha256(b"operator-key-123456"))),
                    key: None,
                },
                ApiKeyConfig {
                    name: "dev".into(),
                    role: Role::Viewer,
                    key_sha256: None,
                    key: Some(Secret::new("viewer-key-1234567")),
                },
            ],
            decide_requires_key: false,
            nats_requires_key: false,
        })
    }

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn header_and_bearer_both_work() {
        let a = auth();
        assert_eq!(
            a.identify(&md(&[("x-api-key", "operator-key-123456")]))
                .unwrap()
                .name,
            "ops"
        );
        assert_eq!(
            a.identify(&md(&[("authorization", "Bearer viewer-key-1234567")]))
                .unwrap()
                .role,
            Role::Viewer
        );
        assert_eq!(
            a.identify(&md(&[])).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.identify(&md(&[("x-api-key", "nope")]))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.identify(&md(&[("authorization", "Basic xyz")]))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_bare_authorization_key_works_as_the_original_accepted() {
        let a = auth();
        assert_eq!(
            a.identify(&md(&[("authorization", "viewer-key-1234567")]))
                .unwrap()
                .name,
            "dev"
        );
        assert_eq!(
            a.identify(&md(&[("authorization", "wrong-key-1234567")]))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn nats_headers_carry_the_key_in_any_case() {
        let a = auth();
        let mut h = async_nats::HeaderMap::new();
        h.insert("Authorization", "Bearer operator-key-123456");
        assert_eq!(a.identify_nats(Some(&h)).unwrap().name, "ops");
        let mut h = async_nats::HeaderMap::new();
        h.insert("x-api-key", "viewer-key-1234567");
        assert_eq!(a.identify_nats(Some(&h)).unwrap().name, "dev");
        assert_eq!(
            a.identify_nats(None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn roles_are_ordered_and_denials_counted() {
        let a = auth();
        let viewer = md(&[("x-api-key", "viewer-key-1234567")]);
        assert!(a.authorize(&viewer, Role::Viewer, "registry").is_ok());
        let e = a
            .authorize(&viewer, Role::Operator, "registry")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            !e.message().contains("viewer-key"),
            "key leaked: {}",
            e.message()
        );
        a.authorize(
            &md(&[("x-api-key", "operator-key-123456")]),
            Role::Admin,
            "policy",
        )
        .unwrap_err();
        assert_eq!(a.denied_counts().get("registry"), Some(&1));
        assert_eq!(a.denied_counts().get("policy"), Some(&1));
    }
}
