//! Helpers shared by the registry's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use beamline_model::{Limits, SecretUrl};
use beamline_registry::{Registry, RegistryConfig, SourceMode};
use sqlx::PgPool;

/// The repository's `fixtures/` folder.
pub fn repo_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn db_config(url: &str, source: SourceMode) -> RegistryConfig {
    RegistryConfig {
        source,
        database_url: Some(SecretUrl::new(url)),
        db_connect_timeout_ms: 500,
        sync_interval_seconds: 3600,
        ..RegistryConfig::default()
    }
}

pub fn fixtures_config(dir: &Path, policies: Option<&Path>) -> RegistryConfig {
    RegistryConfig {
        source: SourceMode::Fixtures,
        fixtures_dir: Some(dir.to_path_buf()),
        policies_dir: policies.map(Path::to_path_buf),
        ..RegistryConfig::default()
    }
}

pub async fn start(config: RegistryConfig) -> Registry {
    Registry::start(config, Limits::default())
        .await
        .expect("registry config is valid")
}

pub async fn migrate(pool: &PgPool) {
    beamline_registry::database::migrate(pool, "test")
        .await
        .expect("migrations apply");
}

/// Inserts the original's four extensions and the default policy.
pub async fn seed_original(pool: &PgPool) {
    sqlx::raw_sql(
        r#"
INSERT INTO extensions (id, type, subject, timeout_ms, retry, enabled, config, metadata) VALUES
 ('normalize_text', 'pre', 'beamline.ext.pre.normalize_text.v1', 100, 0, true, '{}', '{"description": "Text normalization pre-processor", "version": "v1"}'),
 ('pii_guard', 'validator', 'beamline.ext.validate.pii_guard.v1', 200, 0, true, '{}', '{}'),
 ('mask_pii', 'post', 'beamline.ext.post.mask_pii.v1', 150, 0, true, '{}', '{}'),
 ('test_provider', 'provider', 'beamline.provider.test_provider.v1', 5000, 1, true, '{}', '{}');
INSERT INTO policies (tenant_id, policy_id, policy) VALUES
 ('default', 'default', '{"providers": [{"name": "test_provider", "weight": 100}], "pre": [{"id": "normalize_text", "mode": "required"}], "validators": [{"id": "pii_guard", "on_fail": "block"}], "post": [{"id": "mask_pii", "mode": "optional"}]}');
"#,
    )
    .execute(pool)
    .await
    .expect("seed");
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}
