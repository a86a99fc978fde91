//! The extension registry of beamline-router.
//!
//! It reads extensions, versions, instances and policies from fixtures or PostgreSQL,
//! validates them record by record into an immutable [`Snapshot`] (a record that
//! fails is quarantined on its own), and serves that snapshot
//! behind one atomic pointer while a sync task keeps it current (periodic resync plus
//! LISTEN/NOTIFY, where a notification makes the router read only what changed since
//! its last read, from migration 0003's `registry_changes` log).
//!
//! Layout:
//! - [`config`]: `[extension_registry]` and the source modes.
//! - [`fixtures`], [`database`]: the two sources; each yields a [`Dataset`].
//! - [`snapshot`]: validation of a whole dataset and the read API (lookup, resolve,
//!   list by type, instances, policies); a snapshot is patched with a change set or
//!   rebuilt keeping unchanged entries.
//! - [`registry`]: the running registry — atomic swap, reloads, auto fallback, sync.
//! - [`quarantine`]: records that fail validation, held out one by one.
//! - [`check`]: `registry validate` and `registry diff` (read, compare, change nothing).
//! - [`writes`]: operator writes (one transaction each, audit-logged).
//! - [`health_store`]: the `extension_health` table: periodic upserts, manual resets.
//! - [`canary`]: canary rollouts (migration 0004): operator writes, per-version
//!   health reports, and the judge's evaluation and moves.
//! - [`error`]: [`RegistryError`], with the origin (file or row) and an [`ErrorKind`].

pub mod canary;
pub mod check;
pub mod config;
pub mod database;
pub mod dataset;
pub mod error;
pub mod fixtures;
pub mod health_store;
pub mod quarantine;
pub mod registry;
pub mod snapshot;
pub mod writes;

pub use config::{RegistryConfig, SourceMode};
pub use dataset::Dataset;
pub use error::{ErrorKind, Origin, RegistryError};
pub use registry::{DbState, Registry, RegistryStatus, ReloadReport, Trigger};
pub use snapshot::{ActiveSource, ChangeSet, Counts, ExtensionEntry, Snapshot};
