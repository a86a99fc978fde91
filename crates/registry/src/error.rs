//! Registry errors: what went wrong, where, and whether trying again can help.

use std::fmt;
use std::path::PathBuf;

use beamline_model::ValidationError;

/// Where a record came from, so an error can send the operator straight to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A fixture file, and where inside it the record is, as a field path (`[2]`,
    /// `[2].versions[0]`, `instances[1]`).
    File { path: PathBuf, item: Option<String> },
    /// A fixture built into the binary.
    Builtin { name: String, item: Option<String> },
    /// A database row, with its primary key spelled out.
    Row { table: &'static str, key: String },
    /// Records sent to the admin API (`ext add`), named by where the operator took
    /// them from (a file name, or "the command line").
    Request { name: String, item: Option<String> },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, item } => {
                write!(f, "file {}", path.display())?;
                if let Some(item) = item {
                    write!(f, " at {item}")?;
                }
                Ok(())
            }
            Origin::Builtin { name, item } => {
                write!(f, "built-in fixture {name}")?;
                if let Some(item) = item {
                    write!(f, " at {item}")?;
                }
                Ok(())
            }
            Origin::Row { table, key } => write!(f, "table {table}, row {key}"),
            Origin::Request { name, item } => {
                write!(f, "{name}")?;
                if let Some(item) = item {
                    write!(f, " at {item}")?;
                }
                Ok(())
            }
        }
    }
}

/// What kind of failure, for callers that act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A record or file is invalid: someone must fix the data; retrying will not help.
    InvalidData,
    /// The database cannot be reached now; retrying later may help, and `auto` falls
    /// back to fixtures.
    Unreachable,
    /// The database answers but lacks the registry schema: run `migrate`.
    SchemaMissing,
    /// The fixtures folder cannot be read.
    Io,
    /// The database refused a query for another reason.
    Database,
    /// The operation does not apply in the current configuration.
    Unsupported,
    /// The record asked for does not exist.
    NotFound,
    /// The record to create exists already.
    Conflict,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A record failed validation.
    #[error("{origin}: {error}")]
    Invalid {
        origin: Origin,
        error: ValidationError,
    },
    /// A file is not the JSON it should be, or records contradict each other.
    #[error("{origin}: {message}")]
    Malformed { origin: Origin, message: String },
    #[error("cannot read {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("database {database} is unreachable: {message}")]
    Unreachable { database: String, message: String },
    #[error(
        "database {database} has no registry schema ({message}); run `beamline-router migrate --database-url URL`"
    )]
    SchemaMissing { database: String, message: String },
    #[error("database {database}: {message}")]
    Database { database: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::Invalid { .. } | RegistryError::Malformed { .. } => {
                ErrorKind::InvalidData
            }
            RegistryError::Io { .. } => ErrorKind::Io,
            RegistryError::Unreachable { .. } => ErrorKind::Unreachable,
            RegistryError::SchemaMissing { .. } => ErrorKind::SchemaMissing,
            RegistryError::Database { .. } => ErrorKind::Database,
            RegistryError::Unsupported(_) => ErrorKind::Unsupported,
            RegistryError::NotFound(_) => ErrorKind::NotFound,
            RegistryError::Conflict(_) => ErrorKind::Conflict,
        }
    }

    /// Whether the same call may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Unreachable | ErrorKind::Database)
    }

    pub(crate) fn from_sqlx(database: &str, error: sqlx::Error) -> RegistryError {
        let database = database.to_string();
        let message = error.to_string();
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => RegistryError::Unreachable { database, message },
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                match code.as_str() {
                    // undefined_table, undefined_column, undefined_function
                    "42P01" | "42703" | "42883" => {
                        RegistryError::SchemaMissing { database, message }
                    }
                    // connection exceptions, shutdown in progress, cannot connect now,
                    // database does not exist, authentication failures
                    c if c.starts_with("08")
                        || c.starts_with("57P")
                        || c.starts_with("28")
                        || c == "3D000"
                        || c == "53300" =>
                    {
                        RegistryError::Unreachable { database, message }
                    }
                    _ => RegistryError::Database { database, message },
                }
            }
            _ => RegistryError::Database { database, message },
        }
    }
}
