//! `[nats]`: the seeds, credentials and TLS the router joins NATS with, and the
//! connection itself — made in the background (the router starts while NATS is down),
//! retried for ever, and reported in one log line per distinct problem rather than one
//! per attempt.
//!
//! Every file named in `[nats]` is read when the configuration is validated, so a
//! missing or unreadable file stops the start with the key named; secrets (`token`,
//! `password`, passwords in URLs, the contents of credentials and seed files) are
//! never logged or shown.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use beamline_model::{Secret, SecretUrl};
use serde::{Deserialize, Serialize};

/// The `[nats]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port` or `tls://host:port`; several seeds comma-separated
    /// (`nats://a:4222,nats://b:4222`), the NATS clients' convention. Credentials in
    /// a URL are redacted when printed.
    pub url: SecretUrl,
    /// The seeds as a list; when given, `url` must be left at its default.
    pub urls: Vec<SecretUrl>,
    /// A NATS credentials file (JWT + NKey seed, as `nsc` writes it).
    pub credentials_file: Option<PathBuf>,
    /// A file holding an NKey user seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A token (`authorization { token: … }` on the server).
    pub token: Option<Secret>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<Secret>,
    /// PEM CA bundle to verify the servers' certificates with (else the system's).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (with `tls_key_file`), for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    pub tls_required: bool,
    /// Where a Decide that came without a reply subject is answered (the original's
    /// callers listen on `beamline.router.v1.decide.reply`).
    pub decide_reply_subject: String,
}

/// The default seed.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl::new(DEFAULT_URL),
            urls: Vec::new(),
            credentials_file: None,
            nkey_seed_file: None,
            token: None,
            user: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            decide_reply_subject: beamline_api::nats_intake::DEFAULT_REPLY_SUBJECT.to_string(),
        }
    }
}

/// A key and what is wrong with it.
type KeyError = (String, String);

fn key_error(key: &str, message: impl Into<String>) -> KeyError {
    (format!("nats.{key}"), message.into())
}

/// Reads a file named by `key`; the error names the key and the path, never the
/// contents.
fn read_file(key: &str, path: &Path) -> Result<String, KeyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| key_error(key, format!("cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(key_error(key, format!("{} is empty", path.display())));
    }
    Ok(text)
}

fn read_pem(key: &str, path: &Path) -> Result<(), KeyError> {
    let text = read_file(key, path)?;
    if !text.contains("-----BEGIN ") {
        return Err(key_error(
            key,
            format!("{} is not PEM (no -----BEGIN line)", path.display()),
        ));
    }
    Ok(())
}

impl NatsConfig {
    /// The seeds, as given (secrets included: for connecting only).
    pub fn seeds(&self) -> Vec<String> {
        if self.urls.is_empty() {
            self.url
                .expose()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        } else {
            self.urls
                .iter()
                .map(|u| u.expose().trim().to_string())
                .collect()
        }
    }

    /// The seeds for logs and status, passwords masked.
    pub fn seeds_redacted(&self) -> String {
        self.seeds()
            .iter()
            .map(|s| beamline_model::secret::redact_url(s))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How the router authenticates, for logs (no secret).
    pub fn auth_kind(&self) -> &'static str {
        if self.credentials_file.is_some() {
            "credentials_file"
        } else if self.nkey_seed_file.is_some() {
            "nkey"
        } else if self.token.is_some() {
            "token"
        } else if self.user.is_some() {
            "user/password"
        } else {
            "none (or in the URL)"
        }
    }

    /// Checks the seeds, that at most one way to authenticate is given, and that every
    /// file named can be read and holds what it should. The error is (key, reason).
    pub fn validate(&self) -> Result<(), KeyError> {
        let url_key = if self.urls.is_empty() { "url" } else { "urls" };
        if !self.urls.is_empty() && self.url.expose() != DEFAULT_URL {
            return Err(key_error(
                "urls",
                "give the seeds in url (comma-separated) or in urls, not both",
            ));
        }
        let seeds = self.seeds();
        if seeds.is_empty() {
            return Err(key_error(url_key, "no NATS server given"));
        }
        for (i, seed) in seeds.iter().enumerate() {
            let shown = beamline_model::secret::redact_url(seed);
            let at = if seeds.len() > 1 {
                format!("seed {} ('{shown}')", i + 1)
            } else {
                format!("'{shown}'")
            };
            if !(seed.starts_with("nats://") || seed.starts_with("tls://")) {
                return Err(key_error(
                    url_key,
                    format!("{at} is not a nats:// or tls:// URL"),
                ));
            }
            async_nats::ServerAddr::from_str(seed)
                .map_err(|e| key_error(url_key, format!("{at} cannot be parsed: {e}")))?;
        }
        beamline_model::subject::check_subject(&self.decide_reply_subject)
            .map_err(|reason| key_error("decide_reply_subject", reason))?;
        let ways: Vec<&str> = [
            ("credentials_file", self.credentials_file.is_some()),
            ("nkey_seed_file", self.nkey_seed_file.is_some()),
            ("token", self.token.is_some()),
            ("user", self.user.is_some() || self.password.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        if ways.len() > 1 {
            return Err(key_error(
                ways[1],
                format!(
                    "give one way to authenticate, not several ({} are set)",
                    ways.join(" and ")
                ),
            ));
        }
        match (&self.user, &self.password) {
            (Some(u), Some(_)) if u.trim().is_empty() => {
                return Err(key_error("user", "must not be empty"));
            }
            (Some(_), None) => return Err(key_error("password", "user needs a password")),
            (None, Some(_)) => return Err(key_error("user", "password needs a user")),
            _ => {}
        }
        if let Some(t) = &self.token
            && t.expose().trim().is_empty()
        {
            return Err(key_error("token", "must not be empty"));
        }
        if let Some(path) = &self.credentials_file {
            let text = read_file("credentials_file", path)?;
            async_nats::ConnectOptions::with_credentials(&text).map_err(|e| {
                key_error(
                    "credentials_file",
                    format!(
                        "{} is not a NATS credentials file (a JWT and an NKey seed): {e}",
                        path.display()
                    ),
                )
            })?;
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = read_file("nkey_seed_file", path)?;
            nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| {
                key_error(
                    "nkey_seed_file",
                    format!("{} does not hold an NKey seed: {e}", path.display()),
                )
            })?;
        }
        if let Some(path) = &self.tls_ca_file {
            read_pem("tls_ca_file", path)?;
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                read_pem("tls_cert_file", cert)?;
                read_pem("tls_key_file", key)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(key_error(
                    "tls_key_file",
                    "tls_cert_file needs tls_key_file",
                ));
            }
            (None, Some(_)) => {
                return Err(key_error(
                    "tls_cert_file",
                    "tls_key_file needs tls_cert_file",
                ));
            }
        }
        Ok(())
    }

    /// Connect options with the credentials and TLS of this section (the files are
    /// read again now; [`NatsConfig::validate`] has checked them).
    pub fn connect_options(&self) -> Result<async_nats::ConnectOptions, KeyError> {
        let mut options = match &self.credentials_file {
            Some(path) => {
                let text = read_file("credentials_file", path)?;
                async_nats::ConnectOptions::with_credentials(&text)
                    .map_err(|e| key_error("credentials_file", e.to_string()))?
            }
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(path) = &self.nkey_seed_file {
            options = options.nkey(read_file("nkey_seed_file", path)?.trim().to_string());
        }
        if let Some(token) = &self.token {
            options = options.token(token.expose().to_string());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.expose().to_string());
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// Starts connecting to the configured seeds — or to `only` (`--demo`'s private
/// server, which takes no credentials) — and returns at once: the client keeps
/// trying in the background, and extension calls fail fast until it is connected.
pub async fn connect(
    config: &NatsConfig,
    only: Option<&str>,
) -> anyhow::Result<async_nats::Client> {
    let (seeds, shown, options) = match only {
        Some(url) => (
            vec![url.to_string()],
            url.to_string(),
            async_nats::ConnectOptions::new(),
        ),
        None => (
            config.seeds(),
            config.seeds_redacted(),
            config
                .connect_options()
                .map_err(|(key, message)| crate::config::ConfigError::Invalid { key, message })?,
        ),
    };
    let uses_tls = only.is_none()
        && (config.tls_required
            || config.tls_ca_file.is_some()
            || config.tls_cert_file.is_some()
            || seeds.iter().any(|s| s.starts_with("tls://")));
    let log = ConnectionLog {
        uses_tls,
        ..ConnectionLog::default()
    };
    let events_shown = shown.clone();
    tracing::info!(nats = %shown, auth = config.auth_kind(), tls_required = config.tls_required, "connecting to NATS");
    let client = options
        .name("beamline-router")
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let (log, shown) = (log.clone(), events_shown.clone());
            async move { log.event(event, &shown) }
        })
        .connect(seeds)
        .await
        .map_err(|e| anyhow::anyhow!("cannot use NATS at {shown}: {e}"))?;
    Ok(client)
}

/// Logs the connection's life in few lines: each distinct problem once (until the
/// connection is up again), with what to check; connected and disconnected once each
/// time they happen.
#[derive(Clone, Default)]
pub struct ConnectionLog {
    last_problem: Arc<Mutex<Option<String>>>,
    /// TLS is configured: a connection cut during set-up is most likely a refused
    /// handshake (the client library reports it as a bare IO error).
    uses_tls: bool,
}

impl ConnectionLog {
    /// The event callback for `ConnectOptions::event_callback`.
    pub fn event(&self, event: async_nats::Event, seeds: &str) {
        use async_nats::Event;
        let mut last = self.last_problem.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Event::Connected => match last.take() {
                Some(problem) => {
                    tracing::info!(nats = %seeds, resolved = %problem, "NATS connected")
                }
                None => tracing::info!(nats = %seeds, "NATS connected"),
            },
            Event::Disconnected => {
                tracing::warn!(nats = %seeds, "NATS disconnected; reconnecting (extension calls fail with extension_unavailable meanwhile)");
            }
            Event::LameDuckMode => {
                tracing::info!(nats = %seeds, "the NATS server is entering lame duck mode; the client will move to another server");
            }
            Event::SlowConsumer(sid) => {
                tracing::warn!(
                    subscription = sid,
                    "NATS slow consumer: messages were dropped"
                );
            }
            Event::ServerError(e) => self.problem(&mut last, e.to_string(), seeds),
            Event::ClientError(e) => self.problem(&mut last, e.to_string(), seeds),
            Event::Draining | Event::Closed => {}
        }
    }
}

impl ConnectionLog {
    /// Logs `problem` unless it is the one logged last: an error when someone must act
    /// (credentials, permissions, TLS), a warning when waiting may heal it.
    fn problem(&self, last: &mut Option<String>, problem: String, seeds: &str) {
        if last.as_deref() == Some(problem.as_str()) {
            return;
        }
        let (needs_action, what) = explain(&problem, self.uses_tls);
        if needs_action {
            tracing::error!(nats = %seeds, error = %problem, "{what}");
        } else {
            tracing::warn!(nats = %seeds, error = %problem, "{what}");
        }
        *last = Some(problem);
    }
}

/// What a client or server error means for the operator, what to check, and whether
/// someone must act (rather than wait for a server to come back).
fn explain(problem: &str, uses_tls: bool) -> (bool, &'static str) {
    let p = problem.to_ascii_lowercase();
    if p.contains("authorization") || p.contains("authentication") {
        (
            true,
            "NATS refused the router's credentials: check [nats] credentials_file, nkey_seed_file, token or user/password; retrying until it accepts them",
        )
    } else if p.contains("permissions violation") {
        (
            true,
            "NATS refused a subscription or publish: the router's user lacks a permission (docs/DEPLOYMENT.md, Permissions)",
        )
    } else if p.contains("signing nonce") {
        (
            true,
            "the router could not sign the NATS server's challenge: check [nats] nkey_seed_file or credentials_file; retrying",
        )
    } else if p.contains("tls") {
        (
            true,
            "TLS with NATS failed: check [nats] tls_ca_file, tls_cert_file/tls_key_file and whether the server requires TLS; retrying",
        )
    } else if uses_tls && p.contains("io error") {
        (
            true,
            "the NATS connection was cut during its TLS set-up: a server that requires client certificates (verify: true) refuses one without [nats] tls_cert_file/tls_key_file, or one its CA does not trust; retrying",
        )
    } else {
        (
            false,
            "no NATS seed answers; retrying (extension calls fail with extension_unavailable meanwhile)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> NatsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn seeds_come_from_a_comma_separated_url_or_a_list() {
        let c = config("url = \"nats://a:4222, nats://b:4223,nats://c:4224\"");
        assert_eq!(
            c.seeds(),
            ["nats://a:4222", "nats://b:4223", "nats://c:4224"]
        );
        c.validate().unwrap();
        let c = config("urls = [\"nats://a:4222\", \"tls://b:4223\"]");
        assert_eq!(c.seeds(), ["nats://a:4222", "tls://b:4223"]);
        c.validate().unwrap();
        let both = config("url = \"nats://x:1\"\nurls = [\"nats://a:4222\"]");
        assert_eq!(both.validate().unwrap_err().0, "nats.urls");
        let bad = config("url = \"nats://a:4222,nats://b:xx\"");
        let (key, message) = bad.validate().unwrap_err();
        assert_eq!(key, "nats.url");
        assert!(message.contains("seed 2"), "{message}");
        let shown = config("url = \"nats://u:hunter2@a:4222,nats://b:1\"").seeds_redacted();
        assert!(
            !shown.contains("hunter2") && shown.contains("nats://b:1"),
            "{shown}"
        );
    }

    #[test]
    fn one_way_to_authenticate_and_files_named_by_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.creds");
        let (key, message) = config(&format!("credentials_file = \"{}\"", missing.display()))
            .validate()
            .unwrap_err();
        assert_eq!(key, "nats.credentials_file");
        assert!(message.contains("nope.creds"), "{message}");
        let seed = dir.path().join("seed");
        std::fs::write(&seed, "not a seed").unwrap();
        let (key, _) = config(&format!("nkey_seed_file = \"{}\"", seed.display()))
            .validate()
            .unwrap_err();
        assert_eq!(key, "nats.nkey_seed_file");
        let good = nkeys::KeyPair::new_user().seed().unwrap();
        std::fs::write(&seed, &good).unwrap();
        config(&format!("nkey_seed_file = \"{}\"", seed.display()))
            .validate()
            .unwrap();
        let (key, _) = config(&format!(
            "nkey_seed_file = \"{}\"\ntoken = \"t0k3n\"",
            seed.display()
        ))
        .validate()
        .unwrap_err();
        assert_eq!(key, "nats.token");
        assert_eq!(
            config("user = \"u\"").validate().unwrap_err().0,
            "nats.password"
        );
        let (key, _) = config("tls_cert_file = \"/etc/hostname\"")
            .validate()
            .unwrap_err();
        assert_eq!(key, "nats.tls_key_file");
        let (key, message) = config("tls_ca_file = \"/etc/hostname\"")
            .validate()
            .unwrap_err();
        assert_eq!(key, "nats.tls_ca_file");
        assert!(message.contains("not PEM"), "{message}");
    }

    #[test]
    fn a_credentials_file_is_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("router.creds");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        // The layout `nsc` writes: a user JWT and its NKey seed.
        std::fs::write(
            &creds,
            format!(
                "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
        .unwrap();
        let c = config(&format!("credentials_file = \"{}\"", creds.display()));
        c.validate().unwrap();
        c.connect_options().unwrap();
        std::fs::write(&creds, "just text").unwrap();
        let (key, message) = c.validate().unwrap_err();
        assert_eq!(key, "nats.credentials_file");
        assert!(message.contains("not a NATS credentials file"), "{message}");
        assert!(!message.contains("just text"), "{message}");
    }

    #[test]
    fn secrets_never_print() {
        let c = config("token = \"t0k3n-secret\"\nurl = \"nats://u:hunter2@h:4222\"");
        let shown = format!(
            "{c:?} {} {}",
            serde_json::to_string(&c).unwrap(),
            c.seeds_redacted()
        );
        assert!(
            !shown.contains("t0k3n-secret") && !shown.contains("hunter2"),
            "{shown}"
        );
        let c = config("user = \"ops\"\npassword = \"pw-secret\"");
        let shown = format!("{c:?} {}", serde_json::to_string(&c).unwrap());
        assert!(!shown.contains("pw-secret"), "{shown}");
    }
}
