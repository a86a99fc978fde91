//! [`TestDatabase`]: a fresh database per test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use url::Url;

use crate::database_url;
use crate::process::block_on_fresh_runtime;

/// How long to wait for the admin connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times [`Drop`] tries to drop the database.
const DROP_ATTEMPTS: u32 = 5;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new, empty, uniquely named database, dropped again when the value is dropped.
///
/// The database is called `beamline_test_<pid>_<counter>_<nanos>` and is created
/// from `template0` over an admin connection ([`database_url`] for
/// [`create`](Self::create)). Its URL is the admin URL with the database name
/// replaced, so it has the same user, host and options.
///
/// Dropping the value runs `DROP DATABASE … WITH (FORCE)` over a new admin connection,
/// which disconnects any sessions still open on it (a pool the test forgot to close,
/// say). That happens on a helper thread with its own runtime, so dropping works inside
/// and outside a tokio runtime; it blocks the dropping thread until the database is
/// gone. Failures are reported on stderr, never as a panic.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates a database on the server at [`database_url`] (`DATABASE_URL`).
    ///
    /// # Panics
    ///
    /// If the server cannot be reached or the database cannot be created.
    pub async fn create() -> TestDatabase {
        Self::create_on(&database_url()).await
    }

    /// Creates a database on the server at `admin_url`, which must name a database
    /// that the user can connect to and that user must be allowed to create databases
    /// (e.g. `postgres://postgres@127.0.0.1:5432/postgres`).
    ///
    /// # Panics
    ///
    /// If `admin_url` is not a URL, the server cannot be reached, or the database
    /// cannot be created.
    pub async fn create_on(admin_url: &str) -> TestDatabase {
        Self::try_create_on(admin_url)
            .await
            .unwrap_or_else(|message| panic!("{message}"))
    }

    /// Like [`create`](Self::create), but returns an error message instead of
    /// panicking, for callers that skip work when there is no PostgreSQL (benches).
    pub async fn try_create() -> Result<TestDatabase, String> {
        Self::try_create_on(&database_url()).await
    }

    /// Like [`create_on`](Self::create_on), but returns an error message instead of
    /// panicking.
    pub async fn try_create_on(admin_url: &str) -> Result<TestDatabase, String> {
        let shown = redact(admin_url);
        let mut url = Url::parse(admin_url).map_err(|e| {
            format!("TestDatabase: the admin database URL {shown:?} is not a valid URL: {e}")
        })?;
        let name = unique_name();
        url.set_path(&format!("/{name}"));

        let mut conn = connect_admin(admin_url).await.map_err(|e| {
            format!(
                "TestDatabase: cannot connect to PostgreSQL at {shown}: {e} \
                 (is it running? set DATABASE_URL, or run the tests with scripts/test)"
            )
        })?;
        let created = sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {} TEMPLATE template0",
            quote_ident(&name)
        )))
        .execute(&mut conn)
        .await;
        let _ = conn.close().await;
        created
            .map_err(|e| format!("TestDatabase: cannot create database {name} on {shown}: {e}"))?;

        Ok(TestDatabase {
            admin_url: admin_url.to_owned(),
            name,
            url: url.into(),
        })
    }

    /// The URL of the new database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The name of the new database.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection pool for the new database (at most 5 connections). For other pool
    /// settings, build one from [`url`](Self::url).
    ///
    /// # Panics
    ///
    /// If the database cannot be connected to.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "TestDatabase: cannot connect to the test database {}: {e}",
                    redact(&self.url)
                )
            })
    }

    async fn drop_database(admin_url: &str, name: &str) -> Result<(), String> {
        let mut last_error = String::new();
        for attempt in 0..DROP_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let mut conn = match connect_admin(admin_url).await {
                Ok(conn) => conn,
                Err(e) => {
                    last_error = format!("cannot connect: {e}");
                    continue;
                }
            };
            let result = sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(name)
            )))
            .execute(&mut conn)
            .await;
            let _ = conn.close().await;
            match result {
                Ok(_) => return Ok(()),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(last_error)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.as_str();
        let name = self.name.as_str();
        let outcome = block_on_fresh_runtime(Self::drop_database(admin_url, name));
        let error = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        };
        eprintln!(
            "warning: TestDatabase could not drop database {name} on {}: {error}; \
             drop it by hand with: DROP DATABASE {} WITH (FORCE)",
            redact(admin_url),
            quote_ident(name)
        );
    }
}

async fn connect_admin(admin_url: &str) -> Result<PgConnection, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(admin_url)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {CONNECT_TIMEOUT:?}")),
    }
}

/// `beamline_test_<pid>_<counter>_<nanos>`: unique per process (counter), across
/// processes (pid) and across runs (time).
fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "beamline_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The URL with its password, if any, replaced by `***`, for messages.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.into()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "<invalid URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_valid_identifiers() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.len() <= 63, "{name} is longer than NAMEDATALEN-1");
            assert!(name.starts_with("beamline_test_"));
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            );
        }
    }

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn quote_ident_escapes_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
